"""Streaming compression at scale: a >= 1B synthetic Llama compressed block by block.

Writes benchmarks/results/scale.json (top-level "params" and "peak_rss_over_model_fp32") and
scale.md. The model is TinyLlama-shaped with random weights (scripts/make_synthetic_llama.py;
quality is not the point), stored in bf16 safetensors shards; if resident in float32 it would
take 4 bytes x params. The compression runs in a child process so that its peak resident set
(`ru_maxrss`: everything the process ever held at once, the Python runtime, torch and
transformers included) is measured alone.

    .venv/bin/python benchmarks/scale.py                       # generates /tmp model if missing
    .venv/bin/python benchmarks/scale.py --model DIR --tokens 2 128 --method svd_llm --ratio 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# a script here named like an installed package (transformers probes for `kernels`) would
# shadow it: drop this folder from the import path (the script imports nothing from it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def child(args: argparse.Namespace) -> None:
    """Compress in this process and print one JSON line of measurements."""
    import threading

    from rankwise.compress import compensate_streaming, compress_streaming

    torch.set_num_threads(args.threads)
    timeline: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    def sample() -> None:  # resident set every 0.5 s, to see which phase holds the peak
        while True:
            status = Path("/proc/self/status").read_text()
            timeline.append((round(time.perf_counter() - t0, 1), int(status.split("VmRSS:")[1].split()[0]) // 1024))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    n, seq = args.tokens
    ids = torch.randint(0, 32000, (n, seq), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if args.method in ("int8", "int4"):  # calibration + quantisation only: the cheap full pass
        report = compensate_streaming(args.model, args.out, args.method, 0, calibration=ids,
                                      batch_size=n, device=args.device, progress=False)
    else:
        report = compress_streaming(args.model, args.out, args.method, args.ratio, calibration=ids,
                                    batch_size=n, device=args.device, progress=False)
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    step = max(1, len(timeline) // 300)
    print(json.dumps({"peak_rss_bytes": peak, "seconds": total, "report": report.to_dict(),
                      "rss_timeline_mib": timeline[::step]}))


def summarise(model: Path, out: Path, args: argparse.Namespace, measured: dict) -> dict:
    from safetensors import safe_open

    params = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for k in handle.keys():
                params += int(torch.Size(handle.get_slice(k).get_shape()).numel())
    fp32 = 4 * params
    report = measured["report"]
    blocks = report["options"]["streaming"]["block_seconds"]
    cfg = json.loads((model / "config.json").read_text())
    import rankwise

    reloaded = rankwise.load_model(out)  # the output loads as any compressed directory
    n_after = sum(p.numel() for p in reloaded.parameters())
    return {
        "params": params,
        "model_fp32_bytes": fp32,
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "peak_rss_over_model_fp32": measured["peak_rss_bytes"] / fp32,
        "goal_peak_rss_over_model_fp32": 0.35,
        "method": args.method, "ratio": args.ratio, "device": args.device,
        "calibration": {"sequences": args.tokens[0], "seq_len": args.tokens[1],
                        "tokens": args.tokens[0] * args.tokens[1], "source": "random input_ids"},
        "shapes": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "stored_dtype": "bfloat16", "compute_dtype": "float32",
        "seconds_total": measured["seconds"],
        "seconds_per_block": blocks,
        "seconds_per_block_mean": sum(blocks) / len(blocks),
        "rss_timeline_mib": measured["rss_timeline_mib"],
        "params_after": report["params_model_after"],
        "params_after_reloaded": n_after,
        "ratio_model": 1 - report["params_model_after"] / report["params_model_before"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the "
                   "end: other jobs shared them), "
                   f"{args.threads} torch thread(s); times are indicative only",
    }


def _what(run: dict) -> str:
    if run["method"] in ("int8", "int4"):
        return (f"`compensate_streaming(base=\"{run['method']}\", rank=0)` (every layer's fp64 Gram "
                "accumulated, weights quantised)")
    return f"`compress_streaming(\"{run['method']}\", ratio={run['ratio']})`"


def write(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    blocks = result["seconds_per_block"]
    what = (_what(result) + ": each block calibrated on the propagated hidden states and written, "
            "`model.safetensors` assembled and reloaded with `rankwise.load_model`")
    md = f"""# Streaming compression at scale

Synthetic TinyLlama-shaped model (random weights, `scripts/make_synthetic_llama.py`), streamed
one decoder block at a time from its bf16 safetensors shards on {result['device']}: {what}.

| measure | value |
|---|---|
| parameters | {result['params']:,} ({result['params'] / 1e9:.2f} B) |
| model size if resident in fp32 | {result['model_fp32_bytes'] / gib:.2f} GiB |
| peak RSS of the compressing process | {result['peak_rss_bytes'] / gib:.2f} GiB |
| **peak RSS / model fp32 size** | **{result['peak_rss_over_model_fp32']:.3f}** (goal <= 0.35) |
| calibration | {result['calibration']['sequences']} x {result['calibration']['seq_len']} random tokens |
| time per block (mean, min-max) | {result['seconds_per_block_mean']:.1f} s ({min(blocks):.1f}-{max(blocks):.1f} s) |
| total time | {result['seconds_total']:.0f} s |
| parameters after (report / reloaded) | {result['params_after']:,} / {result['params_after_reloaded']:,} |

Peak RSS is `ru_maxrss` of a child process that only compresses: the Python runtime, torch and
transformers (~0.4 GiB) are included. {result['machine']}.
"""
    for name, run in result.get("extra_runs", {}).items():
        md += f"""
## {name}

{_what(run)} on a {run['shapes']['num_hidden_layers']}-block model of
the same shapes ({run['params'] / 1e9:.2f} B parameters; memory does not depend on the number of blocks,
one block is resident at a time), {run['calibration']['sequences']} x {run['calibration']['seq_len']} random tokens.

| measure | value |
|---|---|
| peak RSS of the compressing process | {run['peak_rss_bytes'] / gib:.2f} GiB |
| **peak RSS / fp32 size of the {result['params'] / 1e9:.2f} B model above** | **{run['peak_rss_over_main_model_fp32']:.3f}** (goal <= 0.35) |
| time per block (mean) | {run['seconds_per_block_mean']:.1f} s |
| parameters after (report / reloaded) | {run['params_after']:,} / {run['params_after_reloaded']:,} |

{run['machine']}.
"""
    notes = RESULTS / "scale_notes.md"  # hand-written context (other runs), appended when present
    (RESULTS / "scale.md").write_text(md + ("\n" + notes.read_text() if notes.is_file() else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "rankwise-synthetic-llama-1b")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir)")
    p.add_argument("--method", default="svd_llm",
                   help="a compress_ method, or int8/int4 (compensate_ with rank 0: Grams of every "
                   "layer are still accumulated, the solve is a quantisation)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--tokens", type=int, nargs=2, default=(2, 128), metavar=("N", "SEQ"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rewrite", action="store_true", help="rewrite scale.md from scale.json")
    p.add_argument("--extra", default=None, metavar="NAME",
                   help="keep the top-level (main, >= 1B) run and record this one under extra_runs[NAME], "
                        "its peak also over the main model's fp32 size (e.g. a solve measured on a model with "
                        "fewer blocks of the same shapes: one block is resident at a time)")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.rewrite:
        write(json.loads((RESULTS / "scale.json").read_text()))
        return 0
    if not (args.model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_llama.py"), "--out",
                        str(args.model)], check=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out else None) as tmp:
        out = args.out or Path(tmp) / "compressed"
        cmd = [sys.executable, __file__, "--child", "--model", str(args.model), "--out", str(out),
               "--method", args.method, "--ratio", str(args.ratio), "--tokens", *map(str, args.tokens),
               "--device", args.device, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"the compressing process failed (exit {proc.returncode})")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        result = summarise(args.model, out, args, measured)
    if args.extra:
        main_run = json.loads((RESULTS / "scale.json").read_text())
        result["peak_rss_over_main_model_fp32"] = result["peak_rss_bytes"] / main_run["model_fp32_bytes"]
        main_run.setdefault("extra_runs", {})[args.extra] = result
        result = main_run
    elif (RESULTS / "scale.json").is_file():  # a new main run keeps the recorded extra runs
        result["extra_runs"] = json.loads((RESULTS / "scale.json").read_text()).get("extra_runs", {})
    write(result)
    print(json.dumps({k: result[k] for k in ("params", "peak_rss_over_model_fp32", "seconds_per_block_mean")}))
    if args.extra:
        print(json.dumps({k: v for k, v in result["extra_runs"][args.extra].items() if "peak" in k}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
