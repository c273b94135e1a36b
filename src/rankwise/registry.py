"""One registry for every kind of named method rankwise offers.

Kinds: ``adapter`` (rankwise.adapt methods), ``optimizer`` (rankwise.optim presets),
``compressor`` (rankwise.compress presets), ``layer`` (rankwise.layers parameterisations) and
``healing`` (rankwise.pipeline healing methods). Every kind registers the same way and follows
one naming rule: names are ``lower_snake_case``; user input may use dashes (``svd-llm`` is
``svd_llm``), which `canonical_name` folds before any lookup, so the CLI, the Python API and
saved files all resolve to one entry.

An entry's target is the object the kind's code builds from (a class, a preset dataclass, a
function) or a lazy ``"module:attribute"`` string, imported on first use so that importing
rankwise stays cheap. Built-in entries are registered by importing the kind's ``loader`` module
on first lookup.

>>> reg = Registry("example")
>>> @reg.register("my_method", summary="does a thing", rank=8)
... class MyMethod: ...
>>> reg.get("my-method").defaults
{'rank': 8}
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "KINDS",
    "Entry",
    "Registry",
    "canonical_name",
    "catalogue",
    "registry",
]

_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def canonical_name(name: str) -> str:
    """The registry spelling of a user-given name: lower case, dashes and spaces as underscores."""
    if not isinstance(name, str):
        raise TypeError(f"method names are strings, got {type(name).__name__} {name!r}")
    return re.sub(r"[-\s]+", "_", name.strip().lower())


@dataclass(frozen=True)
class Entry:
    """One registered name: its kind, target, preset defaults and one-line summary."""

    kind: str
    name: str
    target: Any
    defaults: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""

    def load(self) -> Any:
        """The target object, importing a lazy ``"module:attribute"`` target on first use."""
        if isinstance(self.target, str):
            module, _, attribute = self.target.partition(":")
            return getattr(importlib.import_module(module), attribute)
        return self.target

    def describe(self) -> str:
        """The summary, or the first line of the target's docstring when none was given."""
        if self.summary:
            return self.summary
        doc = getattr(self.load(), "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """Named entries of one kind (see the module docstring for the naming rule).

    Args:
        kind: what the entries are ("adapter", "optimizer", ...).
        loader: a module whose import registers the built-in entries (imported on first
            lookup, so registering modules may import this one without cycles).
        noun: how error messages call one entry (default: `kind`), e.g. "adapter method".
    """

    def __init__(self, kind: str, loader: str | None = None, *, noun: str | None = None) -> None:
        self.kind = kind
        self.loader = loader
        self.noun = noun or kind
        self._entries: dict[str, Entry] = {}
        self._loaded = loader is None

    def register(self, name: str, target: Any = None, /, *, summary: str = "",
                 replace: bool = False, **defaults: Any) -> Any:
        """Register `target` under `name` with preset `defaults`; usable as a decorator.

        Raises ValueError for a name that breaks the naming rule or is already taken by another
        target (pass ``replace=True`` to override deliberately, e.g. in tests).
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{self.kind} names are lower_snake_case (letters, digits, single underscores), "
                f"got {name!r}: use e.g. {canonical_name(str(name))!r}"
            )

        def add(obj: Any) -> Any:
            old = self._entries.get(name)
            if old is not None and not replace and old.target is not obj:
                raise ValueError(f"{self.noun} {name!r} is already registered to {old.target!r}")
            self._entries[name] = Entry(self.kind, name, obj, MappingProxyType(dict(defaults)),
                                        summary)
            return obj

        return add if target is None else add(target)

    def unregister(self, name: str) -> None:
        """Remove `name` if present (tests register toy entries)."""
        self._entries.pop(canonical_name(name), None)

    def get(self, name: str) -> Entry:
        """The entry for `name` (dashes allowed); unknown names list the known ones."""
        self._load_builtin()
        key = canonical_name(name)
        try:
            return self._entries[key]
        except KeyError:
            close = difflib.get_close_matches(key, self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown {self.noun} {name!r}{hint}: choose one of {self.names()}"
            ) from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        self._load_builtin()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Registered entries, sorted by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load_builtin()
        return isinstance(name, str) and canonical_name(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def _load_builtin(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: the loader's imports call back into register()
            try:
                importlib.import_module(self.loader)  # type: ignore[arg-type]
            except BaseException:
                self._loaded = False  # a failed import is retried (and re-raised) next lookup
                raise


# Every kind rankwise has, with the module that registers its built-in entries.
KINDS: dict[str, str] = {
    "adapter": "rankwise.adapt.methods",
    "optimizer": "rankwise.optim.presets",
    "compressor": "rankwise.compress.presets",
    "layer": "rankwise.layers",
    "healing": "rankwise.pipeline.healing",
}
# How error messages name one entry where "unknown <kind>" alone would be ambiguous.
_NOUNS = {"adapter": "adapter method", "layer": "layer method"}
_REGISTRIES: dict[str, Registry] = {kind: Registry(kind, loader, noun=_NOUNS.get(kind))
                                    for kind, loader in KINDS.items()}


def registry(kind: str) -> Registry:
    """The registry of `kind` (one of `KINDS`)."""
    try:
        return _REGISTRIES[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}: choose one of {sorted(_REGISTRIES)}") from None


def catalogue(describe: Callable[[Entry], str] = Entry.describe) -> dict[str, list[tuple[str, str]]]:
    """Every registered method of every kind as ``{kind: [(name, one-line description)]}``."""
    return {kind: [(e.name, describe(e)) for e in reg.entries()] for kind, reg in
            _REGISTRIES.items()}
