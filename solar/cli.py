"""The command line of `python -m solar.train`: one flag per config field, generated from
the dataclasses of `solar.config`.

    python -m solar.train --preset tiny --stage1.lr 3e-4 --stage2-steps 200 \
        --data.cache_dir ./.solar_cache --run.out_dir runs/x

Both spellings work for nested fields: ``--stage1.lr`` and ``--stage1-lr``
(underscores and dashes are interchangeable).  Booleans take ``true/false``
(``--run.resume`` alone means true); tuples take comma-separated values.
``--config file.json`` loads a saved config (e.g. a run's ``config.json``) before
the flags are applied.  Each field's help is its ``--help`` line; every value is checked
again after ``--config`` and the flags (`validate_config`), so a bad value exits with
status 2 and a one-line error naming the flag, never silently replaced by a default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Optional

from .config import PRESETS, RUN_STAGES, TrainConfig, get_preset
from .options import ConfigError, config_from_dict, type_hints, validate_config

__all__ = ["build_parser", "parse_args"]

USAGE = "%(prog)s [-h] [--preset NAME] [--config FILE] [--SECTION.FIELD VALUE ...]"
DESCRIPTION = """Train SOLAR (stage 1, stage 2, baselines, evaluation).  Every config field is a flag;
both spellings work: --stage1.lr and --stage1-lr.  Booleans take true/false (alone: true),
tuples take comma-separated values.  Defaults shown are those of the chosen --preset / --config."""


def _leaf_fields(cfg, prefix=""):
    """Yield (dotted_name, owner, field, current_value, type hint) for every leaf field."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            yield from _leaf_fields(v, prefix + f.name + ".")
        else:
            yield prefix + f.name, cfg, f, v, type_hints(type(cfg)).get(f.name)


def _parse_bool(s: str) -> bool:
    t = str(s).strip().lower()
    if t in ("1", "true", "yes", "y", "on"):
        return True
    if t in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _converter(name: str, value, hint):
    """A function str -> value of the field's type (taken from its type hint or default)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:   # Optional[X]
        inner = _converter(name, None, args[0])
        return lambda s: None if s.lower() in ("none", "null", "") else inner(s)
    if hint is bool or isinstance(value, bool):
        return _parse_bool
    if hint is int or (hint is None and isinstance(value, int)):
        return int
    if hint is float or (hint is None and isinstance(value, float)):
        return float
    if origin in (tuple, list) or isinstance(value, (tuple, list)) or hint in (tuple, list):
        elems = list(value) if isinstance(value, (tuple, list)) else []
        ctor = tuple if (origin is tuple or isinstance(value, tuple) or hint is tuple) else list
        et = type(elems[0]) if elems else str
        eargs = typing.get_args(hint)
        if eargs and eargs[0] in (int, float, str):
            et = eargs[0]

        def conv(s, et=et, ctor=ctor):
            parts = [p for p in s.split(",") if p.strip()] if s.strip() else []
            return ctor(et(p.strip()) for p in parts)
        return conv
    return str


def _show_default(value) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(x) for x in value) or "''"
    if value is None:
        return "none"
    return str(value) if value != "" else "''"


def _metavar(conv, value, hint) -> str:
    if conv is _parse_bool:
        return "BOOL"
    if conv is int:
        return "INT"
    if conv is float:
        return "FLOAT"
    if isinstance(value, (tuple, list)) or typing.get_origin(hint) in (tuple, list) or hint in (tuple, list):
        return "A,B,..."
    return "STR"


def _flag_help(f, value) -> str:
    """The --help line of a config field: its meaning, allowed values, default (argparse-escaped)."""
    text = f.metadata.get("help") or f.name.replace("_", " ")
    if "choices" in f.metadata:
        text += f"; one of: {', '.join(str(c) for c in f.metadata['choices'])}"
    return f"{text} (default: {_show_default(value)})".replace("%", "%%")


def build_parser(cfg: Optional[TrainConfig] = None, prog: str = "python -m solar.train") -> argparse.ArgumentParser:
    """An argparse parser with one option per leaf field of `cfg` (both --a.b and --a-b spellings;
    --help lists the --a.b one, with the field's help text and `cfg`'s value as the default)."""
    cfg = cfg if cfg is not None else get_preset("tiny")
    p = argparse.ArgumentParser(prog=prog, usage=USAGE, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=cfg.preset, choices=sorted(PRESETS), metavar="NAME",
                   help=f"named configuration to start from; one of: {', '.join(sorted(PRESETS))} "
                        f"(default: {cfg.preset})")
    p.add_argument("--config", default="", metavar="FILE",
                   help="json file with (part of) a config, e.g. a run's config.json; applied before the flags")
    # shortcuts used by the docs and tests
    p.add_argument("--resume", dest="run.resume", nargs="?", const=True, type=_parse_bool, default=argparse.SUPPRESS,
                   metavar="BOOL", help="same as --run.resume")
    p.add_argument("--stage", dest="run.stage", choices=list(RUN_STAGES), default=argparse.SUPPRESS,
                   help="same as --run.stage")
    p.add_argument("--out", dest="run.out_dir", default=argparse.SUPPRESS, metavar="DIR", help="same as --run.out_dir")
    p.add_argument("--seed", dest="run.seed", type=int, default=argparse.SUPPRESS, metavar="INT",
                   help="same as --run.seed")
    groups = {}
    for name, owner, f, value, hint in _leaf_fields(cfg):
        if name == "preset" or isinstance(value, dict) or dict in typing.get_args(hint) or hint is dict:
            continue   # resolved sub-configs (e.g. model.vision_tower_config) are not flags
        section = name.split(".", 1)[0]
        if section not in groups:
            doc = (type(owner).__doc__ or "").strip().split("\n")[0]
            groups[section] = p.add_argument_group(f"--{section}.*", doc.replace("%", "%%"))
        g = groups[section]
        conv = _converter(name, value, hint)
        kw = dict(dest=name, default=argparse.SUPPRESS, type=conv)
        if conv is _parse_bool:
            kw["nargs"] = "?"
            kw["const"] = True
        g.add_argument("--" + name, metavar=_metavar(conv, value, hint), help=_flag_help(f, value), **kw)
        # the other spellings: same option, not repeated in --help
        aliases = []
        for alias in ("--" + name.replace(".", "-").replace("_", "-"), "--" + name.replace(".", "_")):
            if alias != "--" + name and alias not in aliases:
                aliases.append(alias)
        if aliases:
            g.add_argument(*aliases, help=argparse.SUPPRESS, **kw)
    return p


def _set_dotted(cfg, name: str, value):
    obj = cfg
    parts = name.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)


def _dotted_keys(d: dict, prefix: str = "") -> set:
    out = set()
    for k, v in d.items():
        out |= _dotted_keys(v, prefix + k + ".") if isinstance(v, dict) else {prefix + k}
    return out


def parse_args(argv=None, prog: str = "python -m solar.train") -> TrainConfig:
    """Build a TrainConfig from command-line arguments (preset, then --config json, then flags),
    then check every value (`validate_config`).  Bad input exits with status 2 and an
    argparse-style one-line error naming the flag (or the --config file and field)."""
    pre = argparse.ArgumentParser(prog=prog, usage=USAGE, add_help=False)
    pre.add_argument("--preset", default="tiny")
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESETS:
        pre.error(f"--preset: unknown preset {known.preset!r}; expected one of {', '.join(sorted(PRESETS))}")
    cfg = get_preset(known.preset)
    from_json: set = set()
    if known.config:
        if not os.path.isfile(known.config):
            pre.error(f"--config: no such file {known.config!r}")
        with open(known.config) as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as e:
                pre.error(f"--config: {known.config!r} is not valid json ({e})")
        if not isinstance(d, dict):
            pre.error(f"--config: {known.config!r} must hold a json object (a dict of sections), "
                      f"got {type(d).__name__}")
        d.pop("preset", None)
        try:
            config_from_dict(cfg, d, validate=False)
        except ValueError as e:
            pre.error(f"--config {known.config}: {str(e).removeprefix('config: ')}")
        from_json = _dotted_keys(d)
    parser = build_parser(cfg, prog=prog)
    ns = parser.parse_args(argv)
    flags = {k: v for k, v in vars(ns).items() if k not in ("preset", "config")}
    for k, v in flags.items():
        _set_dotted(cfg, k, v)
    cfg.preset = known.preset
    try:
        validate_config(cfg)
        cfg.check_run()
    except ConfigError as e:
        dotted = f"{e.owner}.{e.name}"
        where = f"--config {known.config}: {dotted}" if dotted in from_json and dotted not in flags else f"--{dotted}"
        parser.error(f"{where} {e.detail}")
    for line in cfg.warnings(set(flags)):
        print(f"{prog}: warning: {line}", file=sys.stderr)
    return cfg
