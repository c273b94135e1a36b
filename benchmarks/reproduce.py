"""Do re-run benchmark results reproduce the committed ones? A figure-by-figure comparison.

Re-run a benchmark into a separate folder with the committed settings (every script takes
``--out DIR``), then compare:

    .venv/bin/python benchmarks/reproduce.py RERUN_DIR                  # vs git HEAD's results
    .venv/bin/python benchmarks/reproduce.py RERUN_DIR --committed DIR  # vs a folder
    .venv/bin/python benchmarks/reproduce.py RERUN_DIR --names linalg pretrain

Every ``X.json`` in RERUN_DIR with a committed counterpart (``git show REV:benchmarks/results/X.json``
or ``DIR/X.json``) is walked in parallel with it. Rows in lists are matched by their identifying
keys (task, method, allocation, ratio, shape, rank, ...; `ID_KEYS`), never by position, so a subset
re-run in another order still lines up; rows only on one side are counted, not compared. Each
numeric leaf is classified by its name (and its parents' names):

- quality (perplexity, accuracy, error, loss, cosine, parameter counts, bytes, ...): integers must
  be equal, floats agree within ``|a - b| <= rel_tol * max(|a|, |b|) + abs_tol`` (default rel 1e-3,
  abs 1e-9). The benchmarks are seeded and single-threaded, so the same code gives the same
  numbers up to float reduction order; 1e-3 is far above that drift and far below any change a
  reader of the tables would notice.
- interleaved timing ratio (speed-ups, step-time ratios, latency / dense; measured side by side
  in one process): re-run / committed must lie in ``--ratio-band`` (default 0.67-1.5).
- absolute measurement (seconds, ms, tokens/s, sweep time, peak RSS): re-run / committed must lie in
  ``--time-band`` (default 1/3-3): the machine is a shared 2-core box whose load average moved
  between ~1 and ~8 while these results were made, so absolute times carry load, not behaviour (a
  peak RSS carries allocator and OS state). Counted memory (parameters, gradients, optimizer
  state, saved activations: rankwise.profiling's tensor sums) is a quality figure.

Metadata (settings, environment, load averages, labels, a whole run's wall time) is not compared; differing settings are
listed, since only figures made with equal settings are comparable. Writes OUT/reproduce.json and
OUT/reproduce.md (OUT: benchmarks/results); a hand-written ``--notes`` file explaining the
differences is included in the report.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Keys that identify a row of a table (a dict in a list); everything else in a row is a figure.
ID_KEYS = ("task", "method", "base", "compensation", "allocation", "ratio", "data", "config", "decay",
           "m", "n", "shape", "rank", "damping", "calib_tokens", "update_tokens", "compensation_rank",
           "update_target", "step", "name", "seed")
# Leaves that describe the run, not its results.
META_KEYS = {"settings", "environment", "machine", "env", "platform", "torch", "python", "cpus",
             "threads", "quick", "label", "note", "benchmark", "peer", "defaults", "error"}
META_PATTERN = re.compile(r"load(avg|_before|_after|avg_at_end)")
# Wall time of a whole (possibly partial) run or section: depends on what was run, not a figure.
RUN_TOTALS = {"seconds", "total_seconds", "merged_seconds", "runtime_s", "section_seconds"}
TIMING_RATIO = re.compile(r"speedup|step_time_ratio|_over_base|latency_vs_dense|floor_ratio|slope_in")
TIMING_ABS = re.compile(r"seconds|(^|_)s$|^t_|(^|_)ms$|time|latency|per_s$|runtime|wall")
QUALITY_NAMES = {"latency_batch"}  # a setting whose name says latency
Path_ = tuple[str, ...]


def row_id(row: dict[str, Any]) -> str:
    """The identity of a table row: its ID_KEYS present, e.g. ``[task=fortunes,method=lora]``."""
    parts = [f"{k}={_fmt_id(row[k])}" for k in ID_KEYS if k in row and not isinstance(row[k], dict)]
    return "[" + ",".join(parts) + "]"


def _fmt_id(v: Any) -> str:
    return "x".join(map(str, v)) if isinstance(v, list) else str(v)


def leaves(obj: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """(path, value) of every scalar leaf; list rows are named by `row_id` (numbered if a key
    repeats; their key fields are not figures), plain lists by position. Metadata is skipped."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in META_KEYS or META_PATTERN.search(k) or (k in RUN_TOTALS and len(path) <= 1):
                continue
            yield from leaves(v, (*path, str(k)))
    elif isinstance(obj, list):
        seen: dict[str, int] = {}
        for i, v in enumerate(obj):
            if isinstance(v, dict) and row_id(v) != "[]":
                name = row_id(v)
                seen[name] = seen.get(name, 0) + 1
                name = name if seen[name] == 1 else f"{name}#{seen[name]}"
                v = {k: x for k, x in v.items() if k not in ID_KEYS or isinstance(x, dict)}  # keys: no figures
            else:
                name = f"[{i}]"
            yield from leaves(v, (*path, name))
    else:
        yield path, obj


def row_of(path: Path_) -> str:
    """The row a leaf belongs to: the path up to its first table row, else its first two parts."""
    for i, part in enumerate(path):
        if part.startswith("[") and "=" in part:
            return "/".join(path[: i + 1])
    return "/".join(path[:2])


def classify(path: Path_, value: Any) -> str:
    """'quality', 'timing_ratio', 'timing' or 'other' (non-numeric) for one leaf.

    By the leaf's own name (positions in plain lists skipped), else by its parent's when that is a
    named group (median_step_seconds/peft), never by a table's name (latency/[row]/ratio_model).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value is None:
        return "other"
    parts = list(path)
    while parts and re.fullmatch(r"\[\d+\]", parts[-1]):
        parts.pop()
    names = parts[-1:] + (parts[-2:-1] if len(parts) > 1 and not parts[-2].startswith("[") else [])
    for name in names:
        if name.startswith("goal"):
            return "other"
        if "peak" in name:  # a process's peak RSS: allocator and OS state, measured like a time
            return "timing"
        if "bytes" in name or "memory" in name or name in QUALITY_NAMES:
            return "quality"
        if TIMING_RATIO.search(name):
            return "timing_ratio"
        if TIMING_ABS.search(name):
            return "timing"
    return "quality"


def agree(a: float, b: float, rel_tol: float, abs_tol: float) -> bool:
    """Quality figures: integers equal, floats within rel_tol (NaN equals NaN)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rel_tol * max(abs(a), abs(b)) + abs_tol


def compare(committed: dict[str, Any], rerun: dict[str, Any], *, rel_tol: float = 1e-3, abs_tol: float = 1e-9,
            ratio_band: tuple[float, float] = (0.67, 1.5),
            time_band: tuple[float, float] = (1 / 3, 3.0)) -> dict[str, Any]:
    """Compare two results of one benchmark figure by figure (see the module docstring)."""
    old, new = dict(leaves(committed)), dict(leaves(rerun))
    rows_old, rows_new = {row_of(p) for p in old}, {row_of(p) for p in new}
    common_rows = rows_old & rows_new
    counts = {c: {"compared": 0, "agree": 0, "differ": 0} for c in ("quality", "timing_ratio", "timing")}
    exact, worst, differ, timing_ratios, missing, flags = 0, 0.0, [], {"timing_ratio": [], "timing": []}, [], []
    for path in sorted(old.keys() | new.keys()):
        if row_of(path) not in common_rows:
            continue
        if path not in old or path not in new:
            missing.append({"path": "/".join(path), "side": "rerun only" if path in new else "committed only"})
            continue
        a, b = old[path], new[path]
        kind = classify(path, a)
        if kind == "other" or classify(path, b) == "other":
            if a != b and isinstance(a, bool):
                flags.append({"path": "/".join(path), "committed": a, "rerun": b})
            continue
        c = counts[kind]
        c["compared"] += 1
        if kind == "quality":
            ok = agree(a, b, rel_tol, abs_tol)
            exact += a == b
            rel = abs(a - b) / max(abs(a), abs(b)) if a != b else 0.0
            worst = max(worst, rel) if ok else worst
        else:
            ratio = b / a if a else (1.0 if b == a else math.inf)
            lo, hi = ratio_band if kind == "timing_ratio" else time_band
            ok = lo <= ratio <= hi
            timing_ratios[kind].append(ratio)
            rel = ratio
        c["agree" if ok else "differ"] += 1
        if not ok:
            differ.append({"path": "/".join(path), "kind": kind, "committed": a, "rerun": b,
                           "rel_diff" if kind == "quality" else "rerun_over_committed": rel})
    return {"rows_committed": len(rows_old), "rows_rerun": len(rows_new), "rows_compared": len(common_rows),
            "rows_not_rerun": sorted(rows_old - rows_new), "rows_new": sorted(rows_new - rows_old),
            "counts": counts, "quality_bitwise_equal": exact,
            "quality_max_rel_diff_agreeing": worst, "differences": differ,
            "timing_spread": {k: _spread(v) for k, v in timing_ratios.items()},
            "one_side_only": missing, "flags_changed": flags,
            "settings_differ": _settings_diff(committed.get("settings"), rerun.get("settings"))}


def _spread(ratios: list[float]) -> dict[str, float] | None:
    if not ratios:
        return None
    finite = sorted(r for r in ratios if math.isfinite(r))
    return {"n": len(ratios), "min": finite[0], "median": statistics.median(finite), "max": finite[-1]} if finite else None


def _settings_diff(a: Any, b: Any) -> dict[str, list[Any]]:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return {}
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def load_committed(name: str, committed: str) -> dict[str, Any] | None:
    """`name`.json from a folder, or from git revision `committed` (benchmarks/results/)."""
    folder = Path(committed)
    if folder.is_dir():
        path = folder / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None
    rel = (RESULTS / f"{name}.json").relative_to(HERE.parent).as_posix()
    proc = subprocess.run(["git", "show", f"{committed}:{rel}"], cwd=HERE.parent, capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any], notes: str = "") -> str:
    """reproduce.md: how to run, the bands, per benchmark the counts and every difference."""
    t = report["tolerances"]
    lines = ["# Reproduction check: re-run benchmark figures vs the committed ones", "",
             "Run: re-run a benchmark with the committed settings into a separate folder (`--out DIR`, "
             "never over benchmarks/results), then `python benchmarks/reproduce.py DIR` (compares with "
             "`git show HEAD:benchmarks/results/X.json`; `--committed DIR` compares with a folder). Rows "
             "are matched by their identifying keys; rows not re-run are not compared.", "",
             f"Quality figures agree when integers are equal and floats are within rel {t['rel_tol']:g} "
             f"(+ abs {t['abs_tol']:g}); interleaved timing ratios when re-run / committed lies in "
             f"{t['ratio_band'][0]:g}-{t['ratio_band'][1]:g}; absolute measurements (seconds, tokens/s, peak RSS) in "
             f"{t['time_band'][0]:.3g}-{t['time_band'][1]:g} (shared 2-core machine, load varied ~1-8).", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    lines += ["## Summary", "",
              "| benchmark | rows re-run / committed | quality agree / compared (bitwise equal; largest "
              "rel. diff among the agreeing) | "
              "timing ratios in band / compared (median rerun/committed) | "
              "absolute times in band / compared (median) |", "|---|---|---|---|---|"]
    for name, r in report["benchmarks"].items():
        c, sp = r["counts"], r["timing_spread"]
        med = {k: f" ({sp[k]['median']:.2f})" if sp.get(k) else "" for k in ("timing_ratio", "timing")}
        lines.append(f"| {name} | {r['rows_compared']} / {r['rows_committed']} | {c['quality']['agree']} / "
                     f"{c['quality']['compared']} ({r['quality_bitwise_equal']}; {r['quality_max_rel_diff_agreeing']:.1e}) | "
                     f"{c['timing_ratio']['agree']} / "
                     f"{c['timing_ratio']['compared']}{med['timing_ratio']} | {c['timing']['agree']} / "
                     f"{c['timing']['compared']}{med['timing']} |")
    for name, r in report["benchmarks"].items():
        lines += ["", f"## {name}", ""]
        if r["settings_differ"]:
            lines.append("Settings that differ (committed -> re-run): " + "; ".join(
                f"`{k}`: {json.dumps(v[0])} -> {json.dumps(v[1])}" for k, v in r["settings_differ"].items()))
            lines.append("")
        q = [d for d in r["differences"] if d["kind"] == "quality"]
        tm = [d for d in r["differences"] if d["kind"] != "quality"]
        lines.append(f"Quality figures beyond tolerance: {len(q)}" + (":" if q else "."))
        if q:
            lines += ["", "| figure | committed | re-run | rel. diff |", "|---|---|---|---|"]
            lines += [f"| `{d['path']}` | {_num(d['committed'])} | {_num(d['rerun'])} | {d['rel_diff']:.2e} |" for d in q]
        lines += ["", f"Timing figures outside their band: {len(tm)}" + (":" if tm else ".")]
        if tm:
            lines += ["", "| figure | kind | committed | re-run | re-run / committed |", "|---|---|---|---|---|"]
            lines += [f"| `{d['path']}` | {d['kind']} | {_num(d['committed'])} | {_num(d['rerun'])} | "
                      f"{d['rerun_over_committed']:.2f} |" for d in tm]
        if r["flags_changed"]:
            lines += ["", "Timing-dependent flags that changed: " + ", ".join(
                f"`{f['path']}` {f['committed']} -> {f['rerun']}" for f in r["flags_changed"])]
        if r["one_side_only"]:
            lines += ["", f"Figures present on one side only ({len(r['one_side_only'])}): " + ", ".join(
                f"`{m['path']}` ({m['side']})" for m in r["one_side_only"][:20])
                + (" ..." if len(r["one_side_only"]) > 20 else "")]
    return "\n".join(lines) + "\n"


def run(rerun_dir: Path, committed: str, names: list[str] | None, **tol: Any) -> dict[str, Any]:
    """Compare every benchmark JSON of `rerun_dir` (or `names`) with its committed version."""
    names = names or sorted(p.stem for p in rerun_dir.glob("*.json")
                            if not p.stem.startswith("reproduce") and ".partial" not in p.name)
    report: dict[str, Any] = {"rerun_dir": str(rerun_dir), "committed": committed, "tolerances": tol,
                              "benchmarks": {}}
    for name in names:
        path = rerun_dir / f"{name}.json"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: re-run the benchmark with --out {rerun_dir} first")
        old = load_committed(name, committed)
        if old is None:
            print(f"{name}: no committed {name}.json in {committed}; skipped", file=sys.stderr)
            continue
        report["benchmarks"][name] = compare(old, json.loads(path.read_text()), **tol)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rerun_dir", type=Path, help="folder with the re-run X.json files")
    p.add_argument("--committed", default="HEAD", help="git revision or folder of the committed results")
    p.add_argument("--names", nargs="+", default=None, help="benchmarks to compare (default: every X.json)")
    p.add_argument("--rel-tol", type=float, default=1e-3)
    p.add_argument("--abs-tol", type=float, default=1e-9)
    p.add_argument("--ratio-band", type=float, nargs=2, default=(0.67, 1.5))
    p.add_argument("--time-band", type=float, nargs=2, default=(1 / 3, 3.0))
    p.add_argument("--notes", type=Path, default=None, help="markdown explaining the differences (included)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not args.rerun_dir.is_dir():
        p.error(f"{args.rerun_dir} is not a folder: pass the --out folder of the re-runs")
    if args.rerun_dir.resolve() == RESULTS and args.committed == str(RESULTS):
        p.error("the re-run folder is the committed folder: re-run into a separate --out")
    report = run(args.rerun_dir, args.committed, args.names, rel_tol=args.rel_tol, abs_tol=args.abs_tol,
                 ratio_band=tuple(args.ratio_band), time_band=tuple(args.time_band))
    notes = args.notes.read_text() if args.notes else ""
    from rankwise.io import write_json, write_text

    write_json(args.out / "reproduce.json", report)
    write_text(args.out / "reproduce.md", markdown(report, notes))
    for name, r in report["benchmarks"].items():
        q = r["counts"]["quality"]
        print(f"{name}: {r['rows_compared']} rows; quality {q['agree']}/{q['compared']} agree; "
              f"{len(r['differences'])} figures beyond tolerance or band")
    return 0


if __name__ == "__main__":
    sys.exit(main())
