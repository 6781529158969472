"""Hardware abstraction: one folder per hardware kind, one backend per module."""
