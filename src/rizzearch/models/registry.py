"""The model registry (``register_model``, ``build_model`` by name) and the parsing of model configs
from plain values (keyword overrides, a checkpoint's ``meta.json``), with errors that name the field.
Re-exported by ``models/base.py``, where the contract names them."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import TYPE_CHECKING, Any

from rizzearch.errors import ConfigError

if TYPE_CHECKING:
    from rizzearch.models.base import CausalLM

_REGISTRY: dict[str, tuple[type, type]] = {}
_TINY: dict[str, dict] = {}


def register_model(name: str, config_cls: type, tiny: dict | None = None):
    """Class decorator: make a CausalLM buildable by name (``build_model(name, **overrides)``).

    ``tiny`` holds overrides for a laptop-sized instance (2 layers, d=64) used by the contract
    tests and the smoke runs of every command.
    """

    def deco(cls):
        _REGISTRY[name] = (cls, config_cls)
        _TINY[name] = dict(tiny or {})
        cls.registry_name = name
        return cls

    return deco


def tiny_overrides(name: str) -> dict:
    """The registered tiny-config overrides of model ``name``."""
    get_model_class(name)
    return dict(_TINY[name])


def model_names() -> list[str]:
    """Names of all registered models (what the contract tests iterate over)."""
    import rizzearch.models  # noqa: F401  (importing the package registers every model)

    return sorted(_REGISTRY)


def get_model_class(name: str) -> tuple[type, type]:
    import rizzearch.models  # noqa: F401

    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _check_field(key: str, value: Any, hint: Any) -> Any:
    """Check one config value against its field's type; JSON lists become tuples for tuple fields.

    Nothing is parsed from strings (the CLI does that, typed by jsonargparse): a value of the wrong
    type is a ConfigError naming the key.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _check_field(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        item = args[0] if args else Any
        return tuple(v if item is Any else _check_field(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is Any or (isinstance(hint, type) and isinstance(value, hint)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def config_from_dict(config_cls: type, values: dict | None, where: str = "model config"):
    """Build a frozen config dataclass from plain values (keyword overrides, a checkpoint's meta.json).

    Unknown keys and values of the wrong type raise ConfigError naming the key; the config's own
    ``__post_init__`` checks the rest (its ValueError becomes a ConfigError too).
    """
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {config_cls.__name__}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(config_cls)
    kwargs = {k: _check_field(f"{where}.{k}", v, hints[k]) for k, v in values.items()}
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


@functools.lru_cache(maxsize=None)
def config_overrides_type(config_cls: type) -> type:
    """A frozen dataclass with every field of ``config_cls`` made optional, default None ("keep the default").

    It is the CLI's type of ``--model_config`` for a registered model (jsonargparse validates each
    key and value against it); the fields that are not None are the overrides given to ``build_model``.
    Fields whose own default is None cannot be told apart from "not given", which is harmless.
    """
    hints = typing.get_type_hints(config_cls)
    fields = [(f.name, typing.Optional[hints[f.name]], dataclasses.field(default=None)) for f in dataclasses.fields(config_cls)]
    cls = dataclasses.make_dataclass(f"{config_cls.__name__}Overrides", fields, frozen=True)
    cls.__doc__ = config_cls.__doc__
    cls.__module__ = config_cls.__module__
    return cls


def overrides_to_dict(overrides: Any) -> dict:
    """The given (non-None) fields of a ``config_overrides_type`` instance (or a dict) as a plain dict."""
    if overrides is None:
        return {}
    if dataclasses.is_dataclass(overrides):
        overrides = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)}
    return {k: v for k, v in dict(overrides).items() if v is not None}


def build_model(name: str, **overrides) -> CausalLM:
    """Build a registered model with its default config updated by ``overrides``.

    >>> model = build_model("gpt", n_layer=2, d_model=64, vocab_size=256)
    """
    cls, config_cls = get_model_class(name)
    return cls(config_from_dict(config_cls, overrides, where=f"model config for {name!r}"))


def config_to_dict(config) -> dict:
    """A JSON-serialisable dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)
