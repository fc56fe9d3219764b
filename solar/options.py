"""Config option machinery: fields with help and checks, validation, dict round trip.

`option(default, help, ...)` declares a config dataclass field with its ``--help`` line and
its checks (``choices``, bounds ``ge`` / ``gt`` / ``le``); `check_fields` applies them (config
classes call it from ``__post_init__``), `validate_config` re-runs every check of a nested
config on its current values, and `config_to_dict` / `config_from_dict` give a json round
trip.  This module imports nothing from solar, so every other module can use it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import field
from typing import Optional

__all__ = ["ConfigError", "option", "check_fields", "validate_config", "config_to_dict", "config_from_dict",
           "type_hints", "show_choices"]


# --------------------------------------------------------------------------- fields and checks

class ConfigError(ValueError):
    """A config field holds a bad value.  `owner` is the dataclass (or, from `validate_config`,
    the section: "stage1"), `name` the field, `detail` what is wrong and what was expected; str(e)
    reads e.g. "Stage1Config.rho_schedule must be one of 'linear', 'cosine', 'step', got 'cosin'"."""

    def __init__(self, owner: str, name: str, detail: str):
        super().__init__(f"{owner}.{name} {detail}")
        self.owner, self.name, self.detail = owner, name, detail

    def __reduce__(self):
        return type(self), (self.owner, self.name, self.detail)


def option(default, help: str, *, choices: Optional[tuple] = None, ge=None, gt=None, le=None):
    """A config dataclass field: its default, a one-line `help` (the CLI's ``--help`` text) and the
    checks `check_fields` applies: `choices` (the allowed values; for a tuple field, of each
    element) and the bounds value >= ge, value > gt, value <= le."""
    meta = {"help": help}
    for k, v in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le)):
        if v is not None:
            meta[k] = v
    if isinstance(default, (list, dict, set)):
        return field(default_factory=functools.partial(copy.copy, default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.lru_cache(maxsize=None)
def type_hints(cls) -> dict:
    """The resolved type hints of dataclass `cls` ({} when they cannot be resolved)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {}


_TYPE_WORDS = {bool: "a boolean", int: "an int", float: "a number", str: "a string"}


def _type_ok(value, hint) -> bool:
    """Whether `value` fits a field's type hint (only plain bool / int / float / str / tuple / list
    and Optional of those are checked; anything else passes)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return value is None or _type_ok(value, args[0])
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or typing.get_origin(hint) in (tuple, list):
        return isinstance(value, (tuple, list))
    return True


def show_choices(choices) -> str:
    """Allowed values as an error message shows them: 'a', 'b'."""
    return ", ".join(repr(c) for c in choices)


def check_fields(cfg) -> None:
    """ConfigError for the first field of dataclass `cfg` whose value has the wrong type or breaks
    its `option` checks (choices, bounds).  Config classes call it from ``__post_init__``."""
    owner = type(cfg).__name__
    hints = type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        hint = hints.get(f.name)
        if hint is not None and not _type_ok(v, hint):
            what = _TYPE_WORDS.get(hint, "a list" if hint in (tuple, list) else str(hint))
            raise ConfigError(owner, f.name, f"must be {what}, got {v!r}")
        m = f.metadata
        if "choices" in m:
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if x not in m["choices"]:
                    raise ConfigError(owner, f.name, f"must be one of {show_choices(m['choices'])}, got {x!r}")
        if v is None or not isinstance(v, (int, float)):
            continue
        ok = (("ge" not in m or v >= m["ge"]) and ("gt" not in m or v > m["gt"])
              and ("le" not in m or v <= m["le"]))
        if not ok:
            lo = f">= {m['ge']}" if "ge" in m else f"> {m['gt']}" if "gt" in m else ""
            hi = f"<= {m['le']}" if "le" in m else ""
            raise ConfigError(owner, f.name, f"must be {' and '.join(b for b in (lo, hi) if b)}, got {v!r}")


# --------------------------------------------------------------------------- dict round trip

def config_to_dict(cfg) -> dict:
    """A json-able dict of a (nested) config dataclass."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = config_to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def config_from_dict(cfg, d: dict, *, strict: bool = True, validate: bool = True, _prefix: str = ""):
    """Update dataclass `cfg` in place from a nested dict (as written by config_to_dict).

    Unknown keys raise a ValueError naming them (unless strict=False).  validate: re-run every
    check on the result (`validate_config`; ConfigError on a bad value); pass False when more
    values are still to come (the CLI validates after the flags)."""
    names = {f.name: f for f in dataclasses.fields(cfg)}
    for k, v in d.items():
        if k not in names:
            if strict:
                raise ValueError(f"config: unknown field {_prefix + k!r}; known: {sorted(names)}")
            continue
        cur = getattr(cfg, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ValueError(f"config: {_prefix + k!r} is a section and needs a dict, got {v!r}")
            config_from_dict(cur, v, strict=strict, validate=False, _prefix=_prefix + k + ".")
        elif isinstance(cur, tuple) and isinstance(v, list):
            setattr(cfg, k, tuple(v))
        else:
            setattr(cfg, k, v)
    if validate and not _prefix:
        validate_config(cfg)
    return cfg


def validate_config(cfg, _prefix: str = ""):
    """Re-run the checks (``__post_init__``) of dataclass `cfg` and of every sub-config on their
    current values, e.g. after `config_from_dict` or setattr.  A ConfigError names the dotted
    field: owner "stage1", name "rho_schedule".  Returns `cfg`."""
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            validate_config(sub, _prefix + f.name + ".")
    post = getattr(cfg, "__post_init__", None)
    if post is not None:
        try:
            post()
        except ConfigError as e:
            if not _prefix:
                raise
            raise ConfigError(_prefix[:-1], e.name, e.detail) from None
    return cfg
