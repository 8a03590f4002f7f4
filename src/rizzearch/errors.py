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


def check_shape(name: str, tensor, expected: tuple) -> None:
    """Raise ShapeError unless ``tensor.shape`` matches ``expected`` (``None`` matches any size)."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ShapeError(f"{name}: expected shape {want}, got {shape}")
