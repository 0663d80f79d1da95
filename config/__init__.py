"""Configuration of the worker: see :mod:`config.settings`."""

from config.settings import (
    SECRET_VARIABLES,
    SETTINGS,
    VARIABLES,
    BiotSettings,
    Setting,
    Settings,
    SettingsError,
    WorkerSettings,
    defaults,
    load_settings,
    replace_settings,
)

__all__ = [
    "SECRET_VARIABLES",
    "SETTINGS",
    "VARIABLES",
    "BiotSettings",
    "Setting",
    "Settings",
    "SettingsError",
    "WorkerSettings",
    "defaults",
    "load_settings",
    "replace_settings",
]
