"""Run configs: the default YAML (``hrnas/configs/default.yaml``), a user YAML merged over it,
and ``key.sub=value`` overrides (values parsed as YAML), all checked against the default's keys
and value types so that a typo or a bad value is an error naming it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

DEFAULT = Path(__file__).parent / "configs" / "default.yaml"
# Keys that also take null (no budget of that kind; the dataset's own size; no table).
NULLABLE = {
    "search.target_macs",
    "search.target_ratio",
    "search.target_latency",
    "data.train_count",
    "data.test_count",
}
# The values of ``memory_format``: the layout networks are moved to (``job.in_layout``).
MEMORY_FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
# Keys that take a string or null (a path).
PATHS = {"search.latency_table"}


def default_config() -> dict:
    with open(DEFAULT) as f:
        return yaml.safe_load(f)


def _check(value, reference, key: str):
    """``value`` checked against the default's ``reference`` (None defaults take numbers)."""
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            raise ValueError(f"config: {key} must be a mapping, got {value!r}")
        return value
    if value is None and (key in NULLABLE or key in PATHS):
        return value
    if key in PATHS:
        if not isinstance(value, str) or not value:
            raise ValueError(f"config: {key} must be a path or null, got {value!r}")
        return value
    if isinstance(value, str) and (reference is None or type(reference) in (int, float)):
        try:  # YAML 1.1 reads "1e6" (no dot) as a string: take it as the number it spells
            value = float(value)
        except ValueError:
            pass
    if reference is None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config: {key} must be a number or null, got {value!r}")
        return value
    if isinstance(reference, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config: {key} must be true or false, got {value!r}")
        return value
    if isinstance(reference, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config: {key} must be a number, got {value!r}")
        if isinstance(reference, int) and not isinstance(reference, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"config: {key} must be an integer, got {value!r}")
            return int(value)
        return float(value)
    if not isinstance(value, type(reference)):
        raise ValueError(f"config: {key} must be a {type(reference).__name__}, got {value!r}")
    return value


def merge(base: dict, update: dict, prefix: str = "") -> dict:
    """``update`` merged into a copy of ``base``; unknown keys raise (except under
    ``data.options``, free keyword options checked by the dataset)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ValueError(f"config: unknown key {name!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict) and name != "data.options":
            out[key] = merge(base[key], _check(value, base[key], name), f"{name}.")
        else:
            out[key] = _check(value, base[key], name)
    return out


def parse_override(text: str) -> dict:
    """``"a.b=value"`` -> ``{"a": {"b": value}}`` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: value is not valid YAML ({e})") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides=()) -> dict:
    """The default config, then the YAML file ``path``, then ``overrides`` (``key=value``)."""
    config = default_config()
    if path is not None:
        with open(path) as f:
            user = yaml.safe_load(f) or {}
        if not isinstance(user, dict):
            raise ValueError(f"config file {path}: must hold a mapping, got {type(user).__name__}")
        config = merge(config, user)
    for text in overrides:
        config = merge(config, parse_override(text))
    search = config["search"]
    given = [k for k in ("target_macs", "target_ratio", "target_latency") if search[k] is not None]
    if len(given) > 1:
        raise ValueError(
            f"config: give one of search.target_macs, search.target_ratio, "
            f"search.target_latency, not {' and '.join(given)} (set the others to null)"
        )
    if config["memory_format"] not in MEMORY_FORMATS:
        raise ValueError(
            f"config: memory_format must be one of {sorted(MEMORY_FORMATS)}, "
            f"got {config['memory_format']!r}"
        )
    init = config["retrain"]["init"]
    if init not in ("scratch", "inherit"):
        raise ValueError(f"config: retrain.init must be 'scratch' or 'inherit', got {init!r}")
    return config
