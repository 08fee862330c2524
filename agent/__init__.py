"""TinyDefectNet Line: the streaming inspection agent."""

__version__ = "0.1.0"
