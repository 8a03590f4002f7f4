"""User-facing errors.

Anything a user can cause (a bad file, a bad config key, a checkpoint from another model) raises
``RizzError`` (or a subclass) with a message that names the problem: the file, line, field or
tensor, what was expected and what was found. The CLI prints the message and exits with status 2
instead of a traceback; library users catch it like any exception.
"""

from __future__ import annotations


class RizzError(Exception):
    """An error caused by input (files, configs, arguments); the message says what to fix."""


class ConfigError(RizzError, ValueError):
    """A config key is unknown, has the wrong type, or has an invalid value."""


class DataError(RizzError, ValueError):
    """A data file is missing, empty, malformed or inconsistent."""


class CheckpointError(RizzError):
    """A checkpoint is missing, corrupted, truncated or belongs to another model/tokenizer."""


class ShapeError(RizzError, ValueError):
    """A tensor has the wrong shape, dtype or device for an op or model."""
