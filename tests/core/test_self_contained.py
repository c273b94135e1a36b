"""The repository stands alone: code and docs cite papers and equations, never files outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A path into the planning folder beside the repository, a numbered method card, or a section of
# one of its method files ("adapters.md §9").
OUTSIDE = re.compile(r"shared/(methods|seeds|design)|\bcard \d|\b(adapters|training|compression)\.md\b")


def _texts() -> list[Path]:
    files = [*ROOT.glob("src/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md",
             *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/**/*.py")]
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def test_no_reference_to_files_outside_the_repository() -> None:
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
            for f in _texts()
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, "cite the paper and equation instead:\n" + "\n".join(hits[:40])
