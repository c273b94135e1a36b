"""`rankwise list`: every registered method of every kind, one line each.

    rankwise list                      # adapters, optimizers, compressors, layers, healing
    rankwise list --kind adapter       # one kind (dashes or underscores)
    rankwise list --json               # {kind: [{"name": ..., "summary": ..., "defaults": ...}]}

The names are the ones every other command and the Python API accept (`rankwise.registry`):
lower_snake_case, with dashes allowed on input (``svd-llm`` is ``svd_llm``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rankwise.registry import KINDS, Entry, registry


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "list",
        help="list every registered method (adapters, optimizers, compressors, layers, healing)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kind", choices=sorted(KINDS), help="only this kind of method")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def collect(kinds: list[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """``({kind: [{name, summary, defaults}]}, {kind: load error})`` for `kinds`.

    A kind whose built-in module fails to import is reported in the second mapping instead of
    hiding the other kinds; a kind that registers nothing yet lists as empty.
    """
    listed: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for kind in kinds:
        try:
            entries = registry(kind).entries()
        except Exception as exc:  # noqa: BLE001  (reported per kind, the others still listed)
            errors[kind] = f"{type(exc).__name__}: {exc}"
            entries = []
        listed[kind] = [_describe(e) for e in entries]
    return listed, errors


def _describe(entry: Entry) -> dict[str, Any]:
    try:
        summary = entry.describe()
    except Exception as exc:  # noqa: BLE001  (a lazy target that fails to import)
        summary = f"(cannot load {entry.target!r}: {exc})"
    return {"name": entry.name, "summary": summary,
            "defaults": {k: _jsonable(v) for k, v in entry.defaults.items()}}


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, bool | int | float | str | None) else repr(value)


def run(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    listed, errors = collect(kinds)
    if args.json:
        print(json.dumps(listed, indent=2, ensure_ascii=False))
    else:
        print(format_table(listed))
    for kind, error in errors.items():
        print(f"rankwise list: could not load the {kind} methods ({KINDS[kind]}): {error}",
              file=sys.stderr)
    return 1 if errors else 0


def format_table(listed: dict[str, list[dict[str, Any]]]) -> str:
    """One block per kind: ``name  summary`` rows, names aligned; empty kinds say so."""
    width = max((len(m["name"]) for methods in listed.values() for m in methods), default=0)
    blocks = []
    for kind, methods in listed.items():
        rows = [f"  {m['name']:<{width}}  {m['summary']}" for m in methods]
        blocks.append("\n".join([f"{kind} ({len(methods)})", *(rows or ["  (none registered)"])]))
    return "\n\n".join(blocks)
