"""Settings machinery: typed dataclass sections read from YAML files and `--section.field value` flags.

Generic over the settings class: every config of the project (the training config, `cllm4rec tune`'s spec) is a
dataclass of sections; this module reads, converts, checks the type of and documents their fields, and knows no
section. Errors go through ``ConfigError``: one line naming the setting, its source and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

import yaml

from cllm4rec_dist.errors import UserError

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (1 MiB): a config is a few dozen settings; a larger file is a mistake (a data file
passed as --config), refused before it is parsed."""
MAX_CONFIG_DEPTH = 32
"""Deepest nesting of mappings and lists a config file may have (a config is two or three levels deep); checked
on the parser's events, before the file is built into objects (which recurses once per level)."""
INT_RANGE = (-(2**63), 2**63 - 1)
"""Every whole-number setting fits a signed 64-bit integer (what torch, numpy and the RNGs take); the sections
check their own tighter ranges (a seed: 0 <= seed < 2**32)."""


class ConfigError(UserError, ValueError):
    """A setting with a wrong type, range or value; the message names the setting, its source and the fix."""


def require(ok: bool, setting: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{setting}={value!r}: must be {rule}.")


def _field_type(tp):
    """The argparse converter of a (possibly Optional) annotated field type."""
    if isinstance(tp, str):
        tp = eval(tp, {"float": float, "int": int, "str": str, "bool": bool, "None": type(None)})  # noqa: S307
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return tp, False


def _convert(value: str, tp, optional: bool):
    if optional and value.lower() in ("none", "null", ""):
        return None
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    return tp(value)


def _walk(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (the per-field docs shown by --help), from the class and its bases
    (a class built at run time, such as the training config with its registered sections, has no source itself)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for owner in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(owner):
            continue
        try:
            source = inspect.getsource(owner)
        except (OSError, TypeError):
            continue
        body = ast.parse(textwrap.dedent(source)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_config_arguments(p: argparse.ArgumentParser, cls) -> None:
    p.add_argument("--config", help="YAML file with any of the settings below; flags override it")
    for name, tp, f in _walk(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        owner = cls
        for part in name.split(".")[:-1]:
            owner = typing.get_type_hints(owner)[part]
        doc = field_docs(owner).get(f.name, "")
        p.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=_field_type(tp)[0].__name__.upper(),
                       help=f"{doc} (default: {default})".replace("%", "%%"))


def _set(cfg, dotted: str, value, source: str):
    *path, leaf = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    hints = typing.get_type_hints(type(obj))
    if leaf not in hints:
        known = ", ".join(n for n, _, _ in _walk(type(cfg)))
        raise ConfigError(f"{source}: unknown setting {dotted!r}; known: {known}")
    tp, optional = _field_type(hints[leaf])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {dotted} must be a mapping of settings, got {type(value).__name__}")
        for k, v in value.items():
            _set(cfg, f"{dotted}.{k}", v, source)
        return
    given = value
    if isinstance(value, str) and tp is not str:
        try:
            value = _convert(value, tp, optional)
        except ValueError:
            raise ConfigError(f"{source}: {dotted}={_shown(value)}: expected {_kind(tp, optional)}.") from None
    elif value is None:
        if not optional:
            raise ConfigError(f"{source}: {dotted} is empty; expected {_kind(tp, optional)}.")
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # a whole number beyond any float
            value = math.inf
    elif not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise ConfigError(f"{source}: {dotted}={_shown(value)}: expected {_kind(tp, optional)}, "
                          f"got {type(value).__name__}.")
    if tp is float and value is not None and not math.isfinite(value):
        raise ConfigError(f"{source}: {dotted}={_shown(given)}: expected a finite number (not infinite or NaN).")
    if tp is int and value is not None and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise ConfigError(f"{source}: {dotted}={_shown(value)}: out of range; a whole-number setting is between "
                          "-2**63 and 2**63-1 (and its own range, see --help).")
    setattr(obj, leaf, value)


def _shown(value, limit: int = 60) -> str:
    """``value``'s repr, shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _kind(tp, optional: bool) -> str:
    kind = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(tp, tp.__name__)
    return f"{kind} (or none)" if optional else kind


def read_yaml_settings(path: str) -> dict:
    """The mapping of settings in a YAML file. Every problem is a ``ConfigError`` naming the file: larger than
    ``MAX_CONFIG_BYTES``, not UTF-8 (the byte offset and line), nested deeper than ``MAX_CONFIG_DEPTH``, a syntax
    error (the line), or not a mapping."""
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, the most a config file may hold (a "
                          "config is a few dozen settings); pass the YAML file of settings.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}, line {line}: 0x{raw[err.start]:02x}, "
                          f"{err.reason}); save the file as UTF-8.") from None
    try:
        _check_depth(path, text)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(problem).split())}); fix the file.") from None
    except RecursionError:  # not reached below MAX_CONFIG_DEPTH; kept as the last guard
        raise ConfigError(f"{path}: nested deeper than the YAML reader can build; a config is a mapping of "
                          "sections two or three levels deep.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: holds a YAML {type(loaded).__name__}, but a config is a mapping of settings "
                          "(e.g. 'batch:' then '  batch_size: 16').")
    return loaded


def _check_depth(path: str, text: str) -> None:
    """Refuse ``text`` nested deeper than ``MAX_CONFIG_DEPTH`` from the parser's events (built iteratively:
    nothing recurses per level), stopping at the first level too deep."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark is not None else "?"
                raise ConfigError(f"{path}:{line}: nested deeper than {MAX_CONFIG_DEPTH} levels of mappings and "
                                  "lists; a config is a mapping of sections two or three levels deep.")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def config_from_args(args: argparse.Namespace, cls):
    """Defaults <- YAML (--config) <- command-line flags, then validated."""
    cfg = cls()
    if getattr(args, "config", None):
        for key, value in read_yaml_settings(args.config).items():
            _set(cfg, str(key), value, args.config)
    for name, _, _ in _walk(cls):
        if name in vars(args):
            _set(cfg, name, vars(args)[name], "command line")
    return cfg.validate()


def config_from_dict(values: dict, source: str, cls):
    """A validated config from a (possibly nested) dict, e.g. one saved in a checkpoint; ``source`` names it in
    errors."""
    cfg = cls()
    for key, value in values.items():
        _set(cfg, key, value, source)
    return cfg.validate()


def load_config(path: str, cls):
    return config_from_dict(read_yaml_settings(path), path, cls)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
