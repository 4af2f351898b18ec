"""Typed configuration plumbing: dataclasses from plain data, and command-line flags from fields.

`from_dict` builds a (nested) frozen dataclass from YAML data, refusing unknown keys and wrong types
with the key path; `add_flags` turns every leaf field into a `--section.field` flag whose help is the
field's attribute docstring, and `apply_overrides` writes flag values into the data before validation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


# -- typed loading ----------------------------------------------------------------------------------

def _join(where: str, key: str) -> str:
    return f"{where}{key}" if where.endswith(":") else f"{where}.{key}"


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Coerce/validate one value against a type hint; raise ValueError naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_type(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        inner = get_args(tp)[0]
        return tuple(_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)  # type: ignore[arg-type]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or
                                          (tp is not bool and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build a config dataclass from plain data; unknown keys and wrong types raise ValueError."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def shallow(cfg: Any) -> dict:
    """Field name -> value, one level deep (nested configs stay objects)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


# -- flags ------------------------------------------------------------------------------------------

def apply_overrides(cls: type, data: dict, overrides: dict[str, str]) -> dict:
    """Write flag strings (`section.field` -> value) into config data, typed as `cls` wants them."""
    for dotted, raw in overrides.items():
        _set(data, dotted, _parse_flag(cls, dotted, raw))
    return data


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def _leaf_type(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def _parse_flag(cls: type, dotted: str, raw: str) -> Any:
    """A flag's string as the field's type wants it: strings stay, lists split on commas."""
    import yaml

    tp = _leaf_type(cls, dotted)
    args = get_args(tp)
    if get_origin(tp) is tuple or any(get_origin(a) is tuple for a in args):
        return [v for v in raw.split(",") if v]
    if tp is str or (str in args and raw.lower() not in ("null", "none")):
        return raw
    return yaml.safe_load(raw)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (and its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(node.target, ast.Name):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, help) of every settable field of `cls`, nested configs flattened."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, field_docs(cls).get(f.name, "")))
    return out


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--section.field VALUE` for every field of `cls` (lists: comma-separated)."""
    group = parser.add_argument_group("config overrides (any field of the run config)")
    for dotted, doc in leaf_fields(cls):
        group.add_argument(f"--{dotted}", dest=f"override:{dotted}", default=argparse.SUPPRESS,
                           metavar="V", help=doc.replace("%", "%%"))


def overrides_from(args: argparse.Namespace) -> dict[str, str]:
    return {k.removeprefix("override:"): v for k, v in vars(args).items() if k.startswith("override:")}


def schema_dict(value: Any) -> Any:
    """A config dataclass as plain data (anything else unchanged), for hashing and logging."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
