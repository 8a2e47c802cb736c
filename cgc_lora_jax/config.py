"""Named, locked configs with dotted overrides.

A config is a Python file `configs/NAME.py` (installed as `cgc_lora_jax.configs.NAME`) whose `get_config()` returns a locked
`ml_collections.ConfigDict`. `load_config(name, overrides)` applies overrides such as
"lora.num_common=4" or "data.tasks=CMeIE,CHIP-CTC": the key must exist (otherwise the error
lists close matches) and the value is parsed to the type of the default (a mistyped value is
an error naming the key and the expected type).

    cfg = load_config("promptcblue", ["train.steps=100", "lora.gate=uniform"])
    args, cfg = parse_args_with_config(parser)          # in an entry point with a --config flag
"""

from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path
from typing import Sequence

import ml_collections

import cgc_lora_jax.configs as configs_package

CONFIG_DIR = Path(configs_package.__path__[0])


class ConfigError(ValueError):
    pass


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    keys = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys.update(_flat_keys(value, f"{prefix}{key}."))
        else:
            keys[f"{prefix}{key}"] = value
    return keys


def _parse(key: str, text: str, default):
    def fail(expected: str):
        raise ConfigError(f"--config.{key}={text!r}: expected {expected} (default {default!r})")

    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        fail("a bool (true/false)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            fail("an int")
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            fail("a float")
    if isinstance(default, tuple):
        items = [t.strip() for t in text.split(",") if t.strip()]
        kind = type(default[0]) if default else str
        return tuple(_parse(key, t, kind()) for t in items) if kind in (int, float) else tuple(items)
    if default is None or isinstance(default, str):
        return text if text.lower() not in ("none", "null") else None
    fail(type(default).__name__)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    flat = _flat_keys(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.removeprefix("--config.").removeprefix("config.")
        if not sep:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        if key not in flat:
            close = difflib.get_close_matches(key, flat, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(flat))}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        with node.unlocked():
            node[leaf] = _parse(key, text, flat[key])
        flat[key] = node[leaf]
    return cfg


def load_config(name: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    if name not in available_configs():
        close = difflib.get_close_matches(name, available_configs(), n=3, cutoff=0.4)
        raise ConfigError(
            f"no config named {name!r} in {CONFIG_DIR}"
            + (f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(available_configs())}")
        )
    module = importlib.import_module(f"{configs_package.__name__}.{name}")
    cfg = module.get_config()
    cfg.lock()
    return apply_overrides(cfg, overrides)


def parse_args_with_config(parser, argv=None, *, config_name: str | None = None):
    """(args, cfg) for an entry point: its own flags plus `--config.a.b=value` overrides applied
    to the config named by `--config` (or `config_name`); any error exits through `parser.error`."""
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.train.steps=100)")
    try:
        return args, load_config(config_name or args.config, overrides)
    except ConfigError as e:
        parser.error(str(e))


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)
