"""tapgate: the edge daemon of a transit or retail fare gate."""

__version__ = "0.1.0"
