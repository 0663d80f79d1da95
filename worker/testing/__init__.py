"""The plugin author's test kit: signed events, a handler's context, the emulator."""
