"""Configuration of the worker: see :mod:`config.settings`."""

from config.settings import (
    BiotSettings,
    Settings,
    SettingsError,
    WorkerSettings,
    load_settings,
    replace_settings,
)

__all__ = [
    "BiotSettings",
    "Settings",
    "SettingsError",
    "WorkerSettings",
    "load_settings",
    "replace_settings",
]
