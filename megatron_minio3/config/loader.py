"""YAML + dotted command-line overrides -> a validated, typed `Config`.

    cfg = load_config("configs/tiny_cpu.yaml", ["rollout.n=16", "actor.optim.lr=1e-6"])

Every key is checked against the dataclass tree: an unknown key names its source (file or command line)
and suggests the nearest valid key; a value of the wrong type names the key, the expected type and the
value; a float that is NaN or infinite (`.nan`, `inf`, `1e999`) is refused wherever it sits in the tree.
A file that cannot be read (a directory, not UTF-8, a YAML syntax error, a `defaults:` cycle) is named with
the line where the parser stopped, on one line. Section `validate()` methods run afterwards, then the root's
cross-section checks. All of this happens before any worker or engine starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from megatron_minio3.config.data import read_template_files
from megatron_minio3.config.reward import read_prompt_files
from megatron_minio3.config.schema import Config


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message says where and what."""


class _NonFiniteError(ConfigError):
    """A NaN or infinite float: refused for every option of a union, not just the one tried."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        if name.startswith("_"):
            continue
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, key + "."))
    return keys


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    if not close:  # a typo in the last component only
        parent, _, leaf = key.rpartition(".")
        siblings = [k for k in _all_keys(Config) if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.3)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Returns `value` converted to type `tp`, or raises ConfigError naming the key."""

    def fail() -> ConfigError:
        shown = repr(value)
        shown = shown if len(shown) <= 200 else shown[:197] + "..."
        return ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, got {shown} ({type(value).__name__})")

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except _NonFiniteError:
                raise
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in get_args(tp):
            return str(value).lower()  # YAML reads `ref.enabled: true` as a bool; the option is spelt "true"
        if value in get_args(tp):
            return value
        raise fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build(tp, value, key + ".", source)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail()
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, key, source): _coerce(v, v_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                number = float(value)
            except ValueError:
                raise fail() from None
        else:
            raise fail()
        if not math.isfinite(number):
            raise _NonFiniteError(f"{source}: '{key}' must be a finite number, got {number}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. model=123 or a numeric experiment name
        raise fail()
    raise AssertionError(f"config type {tp!r} of '{key}' is not supported by the loader")


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints or name.startswith("_"):
            raise _unknown_key(key, source)
        kwargs[name] = _coerce(value, hints[name], key, source)
    return cls(**kwargs)


def _check_key_path(dotted: str, source: str) -> None:
    """Raises the unknown-key error for the full dotted key (so the suggestion is a full key too)."""
    cls: Any = Config
    for part in dotted.split("."):
        hints = _hints(cls)
        if part not in hints or part.startswith("_"):
            raise _unknown_key(dotted, source)
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            return  # a leaf, or a dict whose keys are free


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{dotted}' goes inside '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML: numbers, booleans, [lists], {maps}, null, strings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"command line: override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):  # not YAML (or nested past the parser's depth): a plain string
        value = raw
    return key, value


def _yaml_error(path: Path, err: yaml.YAMLError) -> ConfigError:
    """One line: the file, the line and column where the parser stopped (1-based), what it found."""
    if isinstance(err, yaml.MarkedYAMLError) and (err.problem_mark or err.context_mark):
        mark = err.problem_mark or err.context_mark
        what = ", ".join(part for part in (err.context, err.problem) if part)
        return ConfigError(f"config file {path}, line {mark.line + 1}, column {mark.column + 1}: "
                           f"{' '.join(what.split())}")
    return ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping of one file with its `defaults:` chain merged in; `chain` holds the files that led here."""
    named_by = f" (named by 'defaults' in {chain[-1]})" if chain else ""
    if path.resolve() in [p.resolve() for p in chain]:
        start = [p.resolve() for p in chain].index(path.resolve())
        cycle = " -> ".join(str(p) for p in (*chain[start:], path))
        raise ConfigError(f"config file {chain[-1]}: 'defaults' cycle: {cycle}")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file{named_by}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist{named_by}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start}){named_by}") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}{named_by}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    except RecursionError:
        raise ConfigError(f"config file {path}: nested too deeply to read") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("defaults", None)  # `defaults: other.yaml` inherits, relative to this file
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config file {path}: 'defaults' must be a file name")
        data = _merge(_read_yaml(path.parent / base, (*chain, path)), data)
    return data


def _validate_tree(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate_tree(child)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (optional), apply dotted overrides, type-check, validate."""
    tree: dict = {}
    if path is not None:
        tree = _read_yaml(Path(path))
        # Type-check the file alone first, so that its errors name the file.
        _build(Config, tree, "", f"config file {path}")
    for text in overrides:
        key, value = parse_override(text)
        _check_key_path(key, f"command line ({text})")
        _set_dotted(tree, key, value, "command line")
        _build(Config, {key.split(".")[0]: tree[key.split(".")[0]]}, "", f"command line ({text})")
    cfg = _build(Config, tree, "", "config")
    try:
        read_template_files(cfg.data)
        read_prompt_files(cfg.reward.judge)
        _validate_tree(cfg)
    except ConfigError:
        raise
    except ValueError as err:  # a section's own check
        raise ConfigError(str(err)) from None
    return cfg


def parse_cli(argv: Sequence[str]) -> Config:
    """`--config FILE key=value ...` (the form every entry point takes)."""
    path = None
    overrides = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(args):
                raise ConfigError("command line: --config needs a file name")
            path = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"command line: unknown option {arg!r}; use --config FILE and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return load_config(path, overrides)


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON-able data (for logging and saving next to checkpoints)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
