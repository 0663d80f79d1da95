"""The version of biot-worker (a leaf module, so that anything can import it)."""

__version__ = "0.1.0"
