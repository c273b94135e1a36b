"""One config base for every method and stage: frozen, keyword-only, typed, with help text.

A config is a ``@dataclass(frozen=True, kw_only=True)`` subclass of `Config`; each field that a
user sets is declared with `option` so its help text lives beside its default. From that one
declaration come:

* validation (`Config.__post_init__` calls `validate`, which subclasses extend),
* serialisation (`to_dict` / `from_dict`, which names unknown keys and lists the valid ones),
* the command line (`add_arguments` generates ``--field-name`` flags with the field's default,
  type, choices and help; `from_args` builds the config back from the parsed namespace), so a
  CLI default is never written twice.

>>> @dataclass(frozen=True, kw_only=True)
... class Example(Config):
...     rank: int = option(8, "adapter rank r")
>>> Example.from_dict({"rank": 4}).to_dict()
{'rank': 4}
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Self, TypeVar

__all__ = ["Config", "add_arguments", "document_fields", "field_help", "from_args", "option"]

C = TypeVar("C", bound="Config")
_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, choices: tuple[Any, ...] | None = None,
           cli: bool = True, default_factory: Any = _MISSING,
           check: typing.Callable[[str, Any], None] | None = None) -> Any:
    """A config field with its help text (and choices) recorded for docs and the CLI.

    Args:
        default: the default value (omit for a required field).
        help: one line for ``--help`` and the docs.
        choices: the allowed values (also inferred from a ``Literal[...]`` annotation).
        cli: False keeps the field off the generated command line (Python-only options).
        default_factory: for mutable defaults.
        check: ``check(name, value)`` raises ValueError for a bad value; `Config.validate` runs
            it, so a field shared by many configs is validated where it is declared.
    """
    metadata = {"help": help, "choices": choices, "cli": cli}
    if check is not None:
        metadata["check"] = check
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every rankwise config (see the module docstring)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming a bad field and the fix; subclasses extend (call super)."""
        for f in dataclasses.fields(self):
            choices = _choices(type(self), f)
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {value!r}")
            if f.metadata.get("check") is not None:
                f.metadata["check"](f.name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready field values (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, Any]) -> Self:
        """Build from saved or user values; unknown keys raise naming the valid ones."""
        if not isinstance(values, typing.Mapping):
            raise TypeError(f"{cls.__name__} values must be a mapping, got {type(values).__name__}")
        check_keys(cls, values)
        hints = _hints(cls)
        return cls(**{k: _coerce(hints.get(k), v) for k, v in values.items()})

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied (validated; unknown names raise)."""
        check_keys(type(self), changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def help_text(cls, name: str) -> str:
        """The help text of field `name`: its `option` help, else its line in the docstring's
        ``Attributes:`` section (of this class or the nearest base that documents it)."""
        return field_help(cls)[name]


def field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` for every field of dataclass `cls` (see `Config.help_text`)."""
    documented: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # nearer classes override their bases
        documented.update(_docstring_attributes(vars(klass).get("__doc__")))
    # an `option` help wins; help that `document_fields` copied from a docstring does not, since
    # a subclass sharing the field may document it differently
    return {f.name: (f.metadata.get("help") if not f.metadata.get("help_from_doc") else "")
            or documented.get(f.name, "") or f.metadata.get("help", "")
            for f in dataclasses.fields(cls)}


def document_fields(cls: type) -> type:
    """Record each field's help (`field_help`) in its metadata, where `option` did not: after
    this, ``f.metadata["help"]`` holds the text for every field of `cls`. Returns `cls`."""
    for f, text in zip(dataclasses.fields(cls), field_help(cls).values(), strict=True):
        if not f.metadata.get("help"):
            f.metadata = types.MappingProxyType({"cli": True, "choices": None, **f.metadata,
                                                 "help": text, "help_from_doc": True})
    return cls


def _docstring_attributes(doc: str | None) -> dict[str, str]:
    """Entries of a Google-style ``Attributes:`` section, continuation lines joined."""
    found: dict[str, str] = {}
    lines = (doc or "").expandtabs().splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Attributes:"]
    if not starts:
        return found
    header = lines[starts[0]]
    base = len(header) - len(header.lstrip())
    entry_indent, current = None, []
    for line in lines[starts[0] + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break  # the section ended
        key, sep, text = line.strip().partition(":")
        names = [k.strip() for k in key.split(",")]  # "beta1, beta2: ..." documents both
        if entry_indent in (None, indent) and sep and all(n.isidentifier() for n in names):
            entry_indent, current = indent, names
            found.update(dict.fromkeys(names, text.strip()))
        else:
            for name in current:
                found[name] = f"{found[name]} {line.strip()}".strip()
    return found


def check_keys(cls: type, values: typing.Mapping[str, Any]) -> None:
    """Raise TypeError naming any key of `values` that `cls` has no field for."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option(s) {unknown}: valid options are "
                        f"{sorted(valid)}")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[Config],
                  *, exclude: typing.Iterable[str] = (),
                  defaults: typing.Mapping[str, Any] | None = None) -> None:
    """Add a ``--field-name`` flag for every CLI field of `cls` (default, type, help, choices).

    `defaults` overrides a field's default on this command line only (e.g. a subcommand with a
    different preset). Booleans become ``--flag/--no-flag``; tuples take several values.
    """
    skip, hints, helps = set(exclude), _hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True) or not f.init:
            continue
        default = (defaults or {}).get(f.name, _field_default(f))
        kind, nargs = _cli_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": default,
                                  "help": f"{helps[f.name]} (default: %(default)s)"}
        choices = _choices(cls, f)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if nargs:
                kwargs["nargs"] = nargs
            if choices is not None:
                kwargs["choices"] = list(choices)
        if default is _MISSING:
            kwargs.pop("default")
            kwargs["required"] = True
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def from_args(cls: type[C], namespace: argparse.Namespace, **overrides: Any) -> C:
    """Build `cls` from the flags `add_arguments` added (plus `overrides`)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(namespace, f.name)}
    values.update(overrides)
    hints = _hints(cls)
    return cls(**{k: _coerce(hints.get(k), v) for k, v in values.items()})


# ------------------------------------------------------------------------------- helpers
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of `cls` (cached: validation runs on every construction)."""
    return typing.get_type_hints(cls)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _cli_type(tp: Any) -> tuple[Any, str | None]:
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return type(typing.get_args(tp)[0]), None
    if origin in (tuple, list):
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (_cli_type(inner[0])[0] if inner else str), "+"
    return (tp if tp in (int, float, str, bool) else str), None


def _choices(cls: type, f: dataclasses.Field) -> tuple[Any, ...] | None:
    if f.metadata.get("choices") is not None:
        return tuple(f.metadata["choices"])
    tp = _strip_optional(_hints(cls).get(f.name))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _coerce(tp: Any, value: Any) -> Any:
    """Lists from JSON or argparse become tuples where the field is a tuple."""
    if tp is not None and typing.get_origin(_strip_optional(tp)) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
