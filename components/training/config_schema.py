"""Config validation before any work starts: every key known, every value of the right kind.

A recipe declares the keys it reads as a nested dict (its schema); :func:`validate_config`
refuses a config with an unknown or misspelled key (naming it, with the closest known key),
a missing key, or a value of the wrong type. ``_component_`` sections are checked against
the signature of the callable they name, since torchtune's ``config.instantiate`` is not
recursive and ``tune validate`` only checks top-level components.
"""

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Tuple

from omegaconf import DictConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path


class ConfigError(ValueError):
    """A config that the recipe cannot run, with the key that is wrong."""


@dataclass(frozen=True)
class OneOf:
    """One of the listed values (e.g. ``OneOf("raise", "skip")``)."""

    values: Tuple[Any, ...]

    def __init__(self, *values):
        object.__setattr__(self, "values", values)


@dataclass(frozen=True)
class Nullable:
    """``spec`` or null."""

    spec: Any


@dataclass(frozen=True)
class Component:
    """A ``{_component_: dotted.path, **kwargs}`` section; ``passed`` are arguments the recipe
    supplies itself (e.g. an optimizer's ``params``), so the config must not set them;
    ``required`` are arguments the recipe reads too, so the config must set them."""

    passed: Tuple[str, ...] = ()
    required: Tuple[str, ...] = ()


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _unknown(key: str, where: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {where}{close[0]!r}? " if close else ""
    return ConfigError(f"unknown config key {where}{key!r}: {hint}known keys here: {known}")


def _check_component(section, spec: Component, where: str) -> None:
    if not isinstance(section, dict) or "_component_" not in section:
        raise ConfigError(f"config key {where!r} must be a section with a _component_")
    path = section["_component_"]
    try:
        component = _get_component_from_path(path)
    except Exception as error:
        raise ConfigError(f"{where}._component_={path!r} cannot be imported: {error}") from None
    missing = [key for key in spec.required if key not in section]
    if missing:
        raise ConfigError(f"config keys {[f'{where}.{key}' for key in missing]} are missing (the recipe reads them)")
    parameters = inspect.signature(component).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in section:
        if key == "_component_":
            continue
        if key in spec.passed:
            raise ConfigError(f"config key {where}.{key} is set by the recipe; remove it from the config")
        if key not in parameters and not takes_any:
            raise _unknown(key, f"{where}.", [k for k in parameters if k not in spec.passed])


def _check(value, spec, where: str) -> None:
    if isinstance(spec, Nullable):
        if value is not None:
            _check(value, spec.spec, where)
    elif isinstance(spec, Component):
        _check_component(value, spec, where)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} must be a section with keys {sorted(spec)}, got {value!r}")
        prefix = f"{where}." if where else ""
        for key in value:
            if key not in spec:
                raise _unknown(key, prefix, spec)
        for key, sub in spec.items():
            if key not in value:
                raise ConfigError(f"config key {prefix}{key} is missing (the recipe reads it; null is allowed where noted)")
            _check(value[key], sub, prefix + key)
    elif isinstance(spec, OneOf):
        if value not in spec.values:
            raise ConfigError(f"config key {where}={value!r}; expected one of {list(spec.values)}")
    elif isinstance(spec, tuple):  # any of several kinds
        if not any((value in kind.values) if isinstance(kind, OneOf) else _is(value, kind) for kind in spec):
            raise ConfigError(f"config key {where}={value!r} has the wrong type; expected {spec}")
    elif not _is(value, spec):
        raise ConfigError(f"config key {where}={value!r} must be {spec.__name__}")


def validate_config(cfg, schema: dict) -> None:
    """Raises :class:`ConfigError` naming the first key of ``cfg`` that ``schema`` refuses.

    Args:
        cfg: the parsed config (``DictConfig`` or dict; interpolations are resolved first).
        schema: nested dict of key -> type, tuple of types, :class:`OneOf`,
            :class:`Nullable`, :class:`Component`, or a nested schema.
    """
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as error:  # a bad ${...} interpolation
            raise ConfigError(f"config cannot be resolved: {error}") from None
    _check(cfg, schema, "")
