"""t2i-reward: a reward and validation service for text-to-image models (command line entry point)."""

__version__ = "0.1.0"
