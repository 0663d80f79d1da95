"""biot-worker: a long-lived asyncio worker for BioT plugins."""

__version__ = "0.1.0"
