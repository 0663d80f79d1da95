"""The interceptor latency benchmark (``biot-worker bench``)."""
