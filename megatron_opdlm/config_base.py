"""Dataclass-config machinery: YAML in, dotted command-line overrides, a `--help` listing.

Each field carries its documentation in `metadata["help"]`, so the CLI help is generated from the
same place the code reads. Sections validate themselves in `validate()` and raise ValueError naming
the offending values; the top-level config checks cross-section constraints.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def doc(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 (help is the natural name)
    """A dataclass field with a default and its documentation."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def section(cls: type, help: str) -> Any:  # noqa: A002
    """A nested config section field."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def _resolve_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _is_mapping(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _parse_scalar(text: str, tp: Any, where: str) -> Any:
    """Parse a command-line string into the field's type (YAML syntax for lists/None/bools)."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or "bad syntax").split())
        raise ValueError(
            f"{where}: {text!r} is not a YAML value ({problem}); fix its syntax"
        ) from None
    return _coerce(value, tp, where)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} does not fit type {tp}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, where) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-5" (no dot) as a string; users write lr=1e-5.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build `cls` from a nested mapping; unknown keys are errors that list the known ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; "
            f"known keys in {where or 'the top level'}: {sorted(names)}"
        )
    kwargs = {}
    for key, value in data.items():
        tp = _resolve_type(cls, key)
        if _is_section(tp):
            kwargs[key] = from_dict(tp, value or {}, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_override(data: dict[str, Any], cls: type, override: str) -> None:
    """Apply one `a.b.c=value` override to the nested mapping `data` (typed by `cls`); for a
    mapping field `a.b=...` replaces it (a YAML mapping) and `a.b.KEY=value` sets one key."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node_cls)}
        if part not in names:
            prefix = ".".join(parts[:i])
            raise ValueError(
                f"override {dotted!r}: no key {part!r} in {prefix or 'the top level'}; "
                f"known: {sorted(names)}"
            )
        tp = _resolve_type(node_cls, part)
        if i == len(parts) - 2 and _is_mapping(tp):
            # one key of a mapping field (data.chat_template_kwargs.enable_thinking=false)
            mapping = node.get(part)
            if mapping is None:
                mapping = node[part] = {}
            elif not isinstance(mapping, dict):
                raise ValueError(f"override {dotted!r}: {part!r} holds {mapping!r}, not a mapping")
            mapping[parts[-1]] = _parse_scalar(text, Any, dotted)
            return
        if i == len(parts) - 1:
            if _is_section(tp):
                raise ValueError(f"override {dotted!r} names a section; give one of its keys")
            node[part] = _parse_scalar(text, tp, dotted)
        else:
            if not _is_section(tp):
                raise ValueError(f"override {dotted!r}: {part!r} is a value, not a section")
            node = node.setdefault(part, {})
            node_cls = tp


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load a config: YAML file (optional) then dotted overrides, then `validate()`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ValueError(
                f"config file {str(path)!r} is not valid YAML{at} ({problem}); fix its syntax"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of sections")
        data = loaded or {}
    for override in overrides or []:
        apply_override(data, cls, override)
    config = from_dict(cls, data)
    config.validate()
    return config


def save_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def help_text(cls: type, prefix: str = "") -> str:
    """One line per field: dotted name, default, documentation."""
    lines = []
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = _resolve_type(cls, f.name)
        if _is_section(tp):
            lines.append(f"\n[{prefix}{f.name}] {f.metadata.get('help', '')}")
            lines.append(help_text(tp, f"{prefix}{f.name}."))
        else:
            default = getattr(instance, f.name)
            lines.append(f"  {prefix}{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
