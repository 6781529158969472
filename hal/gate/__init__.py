"""Gate I/O: the flap or turnstile, the lights and the buzzer."""

from hal.gate.base import GateIO, Signal

__all__ = ["GateIO", "Signal"]
