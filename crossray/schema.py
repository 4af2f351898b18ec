"""Typed configuration plumbing: dataclasses from plain data, and command-line flags from fields.

`from_dict` builds a (nested) frozen dataclass from YAML data, refusing unknown keys, wrong types and
values out of range with the key path; `add_flags` turns every leaf field into a `--section.field` flag
whose help is the field's attribute docstring, and `apply_overrides` writes flag values into the data
before validation.

A field's allowed values are declared once, in its type: `Annotated[int, Range(lo=1)]` (aliases below:
`PositiveInt`, `Share`, `Name`, ...); every float must be finite. The loader checks them with the key
path; `Checked.__post_init__` checks them when code builds a config directly. Error messages quote at
most a short prefix of a bad value.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")
MAX_STRING = 4096
"""Longest string a config field takes (paths, names, sources)."""
MAX_LIST = 10_000
"""Most items a config list takes (revisions, tasks)."""

_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple = 2, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = 60


def short(value: Any) -> str:
    """A bounded repr: at most a short prefix of a value (a config may hold megabytes)."""
    return _SHORT.repr(value)


# -- declared ranges --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """Numbers from `lo` to `hi` (None: unbounded); `open_lo`/`open_hi` exclude the bound."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def __str__(self) -> str:
        lo = None if self.lo is None else f"{'>' if self.open_lo else '>='} {self.lo:g}"
        hi = None if self.hi is None else f"{'<' if self.open_hi else '<='} {self.hi:g}"
        return " and ".join(b for b in (lo, hi) if b) or "any number"

    def error(self, value: Any) -> str | None:
        too_low = self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo)
        too_high = self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi)
        return f"must be {self}" if too_low or too_high else None


@dataclass(frozen=True)
class Pattern:
    """Strings that match `regex` whole (`empty`: "" is allowed too, meaning "the default")."""

    regex: str
    what: str
    empty: bool = False

    def error(self, value: Any) -> str | None:
        if (self.empty and value == "") or re.fullmatch(self.regex, value):
            return None
        return f"must be {self.what}"


PositiveInt = Annotated[int, Range(lo=1)]
NonNegativeInt = Annotated[int, Range(lo=0)]
PositiveFloat = Annotated[float, Range(lo=0, open_lo=True)]
NonNegativeFloat = Annotated[float, Range(lo=0)]
Share = Annotated[float, Range(0, 1)]
"""A probability or fraction, in [0, 1]."""
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = f"a name of 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit ({NAME_RE})"
Name = Annotated[str, Pattern(NAME_RE, _NAME)]
"""A name that becomes a folder or a registry entry: no path separator, never '.' or '..'."""
OptionalName = Annotated[str, Pattern(NAME_RE, _NAME + ", or empty for the default", empty=True)]


def _marks(tp: Any) -> tuple[Any, tuple]:
    """(base type, range/pattern marks) of a hint, looking inside `X | None`."""
    if get_origin(tp) is Annotated:
        return get_args(tp)[0], tuple(m for m in tp.__metadata__ if hasattr(m, "error"))
    if get_origin(tp) in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if get_origin(arg) is Annotated:
                return _marks(arg)
    return tp, ()


def _check_value(value: Any, tp: Any, where: str) -> None:
    """Raise ValueError when a (typed) value breaks its declared range or pattern, or is not finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {short(value)}")
    if value is None or isinstance(value, bool):
        return
    for mark in _marks(tp)[1]:
        problem = mark.error(value)
        if problem:
            raise ValueError(f"{where} {problem}, got {short(value)}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


class Checked:
    """Base of the config dataclasses: building one checks every field's declared range."""

    def __post_init__(self) -> None:
        for name, tp in _hints(type(self)).items():
            if name in self.__dataclass_fields__:  # type: ignore[attr-defined]
                _check_value(getattr(self, name), tp, name)


# -- typed loading ----------------------------------------------------------------------------------

def _join(where: str, key: str) -> str:
    return f"{where}{key}" if where.endswith(":") else f"{where}.{key}"


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Coerce/validate one value against a type hint; raise ValueError naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        value = _check_type(value, get_args(tp)[0], where)
        _check_value(value, tp, where)
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{where}: {short(value)} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error, which says more
            return _check_type(value, options[0], where)
        for arg in options:
            try:
                return _check_type(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {short(value)} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        if len(value) > MAX_LIST:
            raise ValueError(f"{where}: a list of {len(value)} items; at most {MAX_LIST}")
        inner = get_args(tp)[0]
        return tuple(_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)  # type: ignore[arg-type]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or
                                          (tp is not bool and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {short(value)}")
    if tp is str and len(value) > MAX_STRING:
        raise ValueError(f"{where}: a string of {len(value)} characters; at most {MAX_STRING}")
    _check_value(value, tp, where)
    return value


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build a config dataclass from plain data; unknown keys and wrong types raise ValueError."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {short(unknown)}; allowed: {sorted(names)}")
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
    """The type of field `dotted` of `cls`; a KeyError names an unknown part and the fields allowed there."""
    tp: Any = cls
    for i, part in enumerate(dotted.split(".")):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            where = ".".join(dotted.split(".")[:i]) or "the config"
            raise KeyError(f"unknown field {dotted!r}: {where} has {', '.join(sorted(hints)) or 'no fields'}")
        tp = hints[part]
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
