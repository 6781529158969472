"""Secure access modules: compute MAC1, check MAC2."""

from hal.sam.base import Sam

__all__ = ["Sam"]
