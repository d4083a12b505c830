"""Errors hfbatch raises on bad input: deterministic, so Prefect never retries them."""


class HfbatchError(Exception):
    """Base class: a problem with the user's input or configuration, not a transient failure."""


class DataError(HfbatchError):
    """A data source is missing, unreadable, empty, or lacks a column or label; the message names it."""


class ModelError(HfbatchError):
    """A model source is missing, has no (safe) weights, or cannot be resolved."""


class ConfigError(HfbatchError):
    """A parameter is out of range or inconsistent."""
