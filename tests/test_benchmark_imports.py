"""Every `rankwise` name a benchmark script imports exists (also imports inside functions, which
only run when the benchmark does): a refactor that moves a name must move the benchmarks too."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def _rankwise_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every `import rankwise...` / `from rankwise... import name`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rankwise"):
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names
                      if alias.name.split(".")[0] == "rankwise"]
    return found


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_every_rankwise_name_a_benchmark_imports_exists(path):
    missing = []
    for line, module, name in _rankwise_imports(path):
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{path.name}:{line}: import {module} ({exc})")
            continue
        if name is not None and name != "*" and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{path.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_imports_inside_functions(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("def main():\n    from rankwise.compress.api import _capture\n")
    assert _rankwise_imports(script) == [(2, "rankwise.compress.api", "_capture")]
    assert not hasattr(importlib.import_module("rankwise.compress.api"), "_capture")
