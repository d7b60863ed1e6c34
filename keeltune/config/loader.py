"""YAML (anchors, merge keys, a cap on alias expansion) and ``--set`` overrides into a typed Config, with errors
that name the file, line and full key."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from keeltune.config.schema import RESUME_MUTABLE, STAGE_SECTIONS, Config, ConfigError
from keeltune.config.sweep import SweepConfig

# --------------------------------------------------------------------------- YAML with line numbers


class _Source:
    """Remembers where each dotted key came from (file and line) for error messages."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.places: dict[str, str] = {}

    def mark(self, key: str, line: int) -> None:
        self.places[key] = f"{self.path}:{line}"

    def where(self, key: str) -> str:
        parts = key.split(".")
        while parts:
            place = self.places.get(".".join(parts))
            if place is not None:
                return f"{place}: "
            parts.pop()
        return f"{self.path}: "


MAX_YAML_VALUES = 20_000  # values a config may expand to through anchors and aliases (real ones: hundreds)
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Expansion:
    """Counts the values built from a YAML document, aliases expanded: an alias bomb ("billion laughs") is
    refused at the cap instead of eating memory."""

    def __init__(self, path: str) -> None:
        self.path, self.values = path, 0
        self.open: set[int] = set()  # the collections being built: an alias to one of them contains itself
        self.scalars = yaml.SafeLoader("")  # builds scalar values (one loader: making one per value is slow)

    def count(self, node: yaml.Node) -> None:
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            raise ConfigError(
                f"{self.path}:{node.start_mark.line + 1}: the config expands to more than {MAX_YAML_VALUES:,} "
                "values through YAML anchors and aliases (an alias bomb?); a config needs a few hundred: "
                "write the values out, or use fewer nested aliases"
            )


def _merged_pairs(
    node: yaml.MappingNode, source: _Source, expansion: _Expansion
) -> list[tuple[yaml.Node, yaml.Node]]:
    """The mapping's key/value pairs with YAML merge keys (``<<: *base``) applied: merged keys first, the
    mapping's own keys override them."""
    merged: list[tuple[yaml.Node, yaml.Node]] = []
    own: list[tuple[yaml.Node, yaml.Node]] = []
    for key_node, value_node in node.value:
        if key_node.tag != MERGE_TAG:
            own.append((key_node, value_node))
            continue
        bases = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for base in bases:
            expansion.count(base)
            if not isinstance(base, yaml.MappingNode):
                raise ConfigError(
                    f"{source.path}:{key_node.start_mark.line + 1}: '<<' merges mappings (an alias of one, or a "
                    "list of them)"
                )
            merged += _merged_pairs(base, source, expansion)
    names = {str(k.value) for k, _ in own}
    seen: set[str] = set()
    kept = []
    for key_node, value_node in reversed(merged):  # the first base wins among bases, as YAML says
        name = str(key_node.value)
        if name not in names and name not in seen:
            seen.add(name)
            kept.append((key_node, value_node))
    return kept[::-1] + own


def _construct(node: yaml.Node, key: str, source: _Source, expansion: _Expansion) -> Any:
    expansion.count(node)
    if key not in source.places:
        source.mark(key, node.start_mark.line + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if id(node) in expansion.open:
            raise ConfigError(
                f"{source.path}:{node.start_mark.line + 1}: {key or 'config'}: an alias that contains itself "
                "(its anchor is around it); YAML configs must be finite"
            )
        expansion.open.add(id(node))
        try:
            return _construct_collection(node, key, source, expansion)
        finally:
            expansion.open.discard(id(node))
    return expansion.scalars.construct_object(node, deep=True)


def _construct_collection(node: yaml.Node, key: str, source: _Source, expansion: _Expansion) -> Any:
    if isinstance(node, yaml.MappingNode):
        given: set[str] = set()
        for key_node, _ in node.value:
            name = str(key_node.value)
            if key_node.tag != MERGE_TAG and name in given:
                child = f"{key}.{name}" if key else name
                raise ConfigError(f"{source.path}:{key_node.start_mark.line + 1}: {child}: key given twice")
            given.add(name)
        out: dict[str, Any] = {}
        for key_node, value_node in _merged_pairs(node, source, expansion):
            name = str(key_node.value)
            child = f"{key}.{name}" if key else name
            source.mark(child, key_node.start_mark.line + 1)
            out[name] = _construct(value_node, child, source, expansion)
        return out
    return [
        _construct(item, f"{key}.{i}" if key else str(i), source, expansion)
        for i, item in enumerate(node.value)
    ]


def _read_yaml(path: Path) -> tuple[dict[str, Any], _Source]:
    source = _Source(str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the config
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return {}, source
        data = _construct(node, "", source, _Expansion(str(path)))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: malformed YAML: {err.problem or err}") from None
    except RecursionError:
        raise ConfigError(
            f"{path}: nested too deeply (hundreds of levels); a config is a few levels deep"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of sections (model:, data:, ...)")
    return data, source


# --------------------------------------------------------------------------- typed conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: _Source) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{source.where(key)}{key}: {value!r} is not one of {list(choices)}{extra}")
        return value
    if tp is Any:  # kept as written (a sweep's per-trial slurm keys, checked when the trial config is built)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"{source.where(key)}{key}: expected a mapping, got {type(value).__name__} {value!r}"
            )
        _, value_tp = typing.get_args(tp)
        return {str(k): _convert(v, value_tp, f"{key}.{k}", source) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(
                f"{source.where(key)}{key}: expected a list, got {type(value).__name__} {value!r}"
            )
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}.{i}", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    raise ConfigError(
        f"{source.where(key)}{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


def _build(cls: type, data: Any, prefix: str, source: _Source) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source.where(prefix)}{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            hint = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            suggestion = (
                f" (did you mean {key.rsplit('.', 1)[0] + '.' if prefix else ''}{hint[0]}?)" if hint else ""
            )
            raise ConfigError(
                f"{source.where(key)}{key}: unknown key{suggestion}; valid keys here: {', '.join(fields)}"
            )
        kwargs[name] = _convert(value, hints[name], key, source)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"{source.where(prefix)}{key}: required key missing")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        message = str(err)
        failing_key = re.match(r"[\w.]*", message).group(0)
        section = failing_key.split(".")[0]
        if prefix and failing_key in fields:  # a section names its own keys; give them their full path
            message, failing_key = f"{prefix}.{message}", f"{prefix}.{failing_key}"
        elif prefix.endswith(f".{section}"):  # a section nested deeper (a stage's) names itself from the top
            outer = prefix[: -len(section)]
            message, failing_key = outer + message, outer + failing_key
        raise ConfigError(f"{source.where(failing_key)}{message}") from None


# --------------------------------------------------------------------------- overrides and loading


def _apply_override(data: dict[str, Any], assignment: str, source: _Source) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. training.lr=3e-4")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({err})") from None
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not an index of that list")
            node = node[int(part)]
            continue
        if part not in node:  # a section the override creates: an error in it is the override's
            source.places[".".join(parts[: i + 1])] = f"--set {assignment}"
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last} is not an index of that list")
        node[int(last)] = value
    else:
        node[last] = value
    source.places[key] = f"--set {assignment}"


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make model and data paths absolute: relative ones are tried from the working folder, then the config's."""

    def fix(value: str) -> str:
        if not value or os.path.isabs(value):
            return value
        for candidate in (Path(value), base / value):
            if glob.glob(str(candidate)):
                return str(candidate.absolute()) if glob.has_magic(value) else str(candidate.resolve())
        return value

    model = data.get("model")
    if isinstance(model, dict):
        for key in ("path", "tokenizer"):
            if isinstance(model.get(key), str):
                model[key] = fix(model[key])
    section = data.get("data")
    if isinstance(section, dict):
        entries = list(section.get("train") or []) + list(section.get("retention") or [])
        if isinstance(section.get("validation"), dict):
            entries.append(section["validation"])
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                entry["path"] = fix(entry["path"])
            if isinstance(entry, dict):
                _fix_keys(entry.get("counterfactual"), ("swaps",), fix)
    regularization = data.get("regularization")
    if isinstance(regularization, dict):
        _fix_keys(regularization.get("consistency"), ("swaps",), fix)
    evaluation = data.get("eval")
    bias = evaluation.get("bias") if isinstance(evaluation, dict) else None
    for probe in (bias.get("probes") or []) if isinstance(bias, dict) else []:
        _fix_keys(probe, ("path", "anti_path"), fix)


def _fix_keys(entry: Any, keys: tuple[str, ...], fix: typing.Callable[[str], str]) -> None:
    """``fix`` applied to the string values of ``keys`` in ``entry`` when it is a mapping."""
    if isinstance(entry, dict):
        for key in keys:
            if isinstance(entry.get(key), str):
                entry[key] = fix(entry[key])


def _merged(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merged key by key, anything else (lists too) replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in over.items()}}
    return copy.deepcopy(over)


def _expand_stages(data: dict[str, Any], source: _Source) -> None:
    """Each stage's data, training and regularization become the top level's with the stage's keys over them."""
    stages = data.get("stages")
    if not isinstance(stages, list):
        return  # absent, or the typed conversion says what is wrong
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        for section in ("model", "sharding"):
            if section in stage:
                key = f"stages.{i}.{section}"
                raise ConfigError(
                    f"{source.where(key)}{key}: the model and its backend are the same in every stage (each "
                    f"stage trains what the previous one left); set {section} at the top level"
                )
        for section in STAGE_SECTIONS:
            over = stage.get(section, {})
            if over is not None and not isinstance(over, dict):
                continue  # the typed conversion names it
            stage[section] = _merged(data.get(section) or {}, over or {})


def config_from_dict(data: dict[str, Any], origin: str = "<dict>") -> Config:
    """Build and validate a Config from plain data."""
    data, source = copy.deepcopy(data), _Source(origin)
    _expand_stages(data, source)
    return _build(Config, data, "", source)


def load_config(path: str | os.PathLike[str], overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config, apply ``KEY=VALUE`` overrides, and validate everything that needs no files."""
    path = Path(path)
    data, source = _read_yaml(path)
    run = data.setdefault("run", {})
    if isinstance(run, dict):
        run.setdefault("name", path.stem)
    for assignment in overrides:
        _apply_override(data, assignment, source)
    _resolve_paths(data, path.parent)
    stages = data.get("stages")
    for stage in stages if isinstance(stages, list) else []:
        if isinstance(stage, dict):
            _resolve_paths(stage, path.parent)
    _expand_stages(data, source)
    return _build(Config, data, "", source)


def load_sweep(path: str | os.PathLike[str]) -> SweepConfig:
    """Load a sweep file (``keeltune sweep``); its base config path becomes absolute (relative: to the file)."""
    path = Path(path)
    data, source = _read_yaml(path)
    data.setdefault("name", path.stem)
    base = data.get("base")
    if isinstance(base, str) and base and not os.path.isabs(base):
        data["base"] = str((path.parent / base).resolve())
    sweep = _build(SweepConfig, data, "", source)
    sweep.root = str(Path(sweep.root).absolute())
    return sweep


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists keep their index)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and isinstance(data[0], dict):
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}.{i}"))
        return out
    return {prefix: data}


_NO_DEFAULT = object()


def default_value(key: str, cls: type = Config) -> Any:
    """The dataclass default of a flattened key such as ``data.dedup.threshold`` (list entries by index:
    ``data.train.0.weight``); ``_NO_DEFAULT`` for a key without one (required, or unknown)."""
    name, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        return _NO_DEFAULT
    tp = typing.get_type_hints(cls)[name]
    if rest:
        if typing.get_origin(tp) is list:  # skip the index
            tp, rest = typing.get_args(tp)[0], rest.partition(".")[2]
        nested = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        return default_value(rest, nested[0]) if nested and rest else _NO_DEFAULT
    spec = fields[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
        return value if not dataclasses.is_dataclass(value) else _NO_DEFAULT
    return _NO_DEFAULT


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Lines ``key: saved -> current`` for training-relevant keys that differ. A key the saved config lacks
    (saved by a keeltune that did not have it) counts as unchanged while it holds its default."""
    old, new = flatten(saved), flatten(current)
    lines = []
    for key in sorted(set(old) | set(new)):
        if any(key == m or key.startswith(m + ".") for m in RESUME_MUTABLE):
            continue
        if key not in old and key in new and new[key] == default_value(key):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            lines.append(f"  {key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return lines
