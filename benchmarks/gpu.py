"""GPU benchmarks: what only a GPU shows, written to benchmarks/results/gpu.{json,md}.

1. Optimizers: peak CUDA memory of a training step and the persistent optimizer state (bytes
   the allocator still holds after the step, beyond parameters and gradients) of every
   optimizer of benchmarks/optim.py (torch AdamW, galore-torch's GaLoreAdamW, the rankwise
   presets at rank d/4), with the first step (projector computed) and the median later step.
2. Latency of a shrunk model vs dense: a Llama compressed by `compress_` (plain SVD, LoRD) at
   two ratios, in bf16, against the dense model: prefill (1 x 512 tokens) and per-token decoding
   (KV cache), interleaved medians timed with CUDA synchronisation.
3. Streaming compression onto the device (`rankwise.compress.compress_streaming(...,
   device="cuda")`, where this tree has it): seconds per block and peak CUDA memory against the
   in-memory `compress_` of the same model.

Run: ``make test-gpu`` (the GPU tests, then this script), or ``python benchmarks/gpu.py``
(``--quick``: a tiny model, for a smoke run; ``--device cpu --out /tmp/x``: the same code path on
a CPU, memory columns empty). Without a CUDA device and ``--device cuda`` (the default) it
measures nothing, writes nothing and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# `python benchmarks/gpu.py` puts benchmarks/ first on sys.path, where kernels.py would shadow
# the `kernels` package transformers probes for: take it off (siblings load by file path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
DECODE_STEPS = 32  # tokens generated per decoding measurement (after a 16-token prompt)
NO_CUDA = "no CUDA device: nothing measured, benchmarks/results/gpu.json left as it is"

# (hidden, intermediate, layers, heads, kv heads, vocab, seq, batch): ~0.2 B parameters full size
SIZES = {"full": (1024, 2816, 12, 16, 4, 32000, 256, 4), "quick": (64, 128, 2, 4, 2, 256, 32, 2)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    p.add_argument("--quick", action="store_true", help="a tiny model: checks the code path")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per optimizer")
    p.add_argument("--repeats", type=int, default=9, help="interleaved latency measurements")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def allocated(device: str) -> int | None:
    return torch.cuda.memory_allocated() if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def llama(size: str, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n, heads, kv, vocab, _, _ = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device)


def token_ids(size: str, device: str, seed: int = 1) -> torch.Tensor:
    _, _, _, _, _, vocab, seq, batch = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- 1. optimizers
def optimizer_factories() -> dict[str, Callable]:
    """benchmarks/optim.py's contenders (same labels, ranks and learning rates)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rankwise_bench_optim", HERE / "optim.py")
    optim_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(optim_bench)  # type: ignore[union-attr]
    return optim_bench.make_optimizers()


def one_optimizer(build: Callable, size: str, device: str, steps: int) -> dict[str, Any]:
    model = llama(size, device)
    model.train()
    ids = token_ids(size, device)

    def loss() -> torch.Tensor:
        return model(ids, labels=ids).loss

    loss().backward()
    before = allocated(device)  # parameters + gradients (+ cached activations freed)
    opt = build(model)
    reset_peak(device)
    first = timed(opt.step, device)
    state = None if before is None else allocated(device) - before
    later, last = [], float("nan")
    for _ in range(steps - 1):
        opt.zero_grad(set_to_none=True)

        def step() -> None:
            nonlocal last
            value = loss()
            value.backward()
            opt.step()
            last = float(value.detach())

        later.append(timed(step, device))
    return {"state_bytes": state, "peak_step_bytes": peak(device), "first_step_s": first,
            "median_step_s": statistics.median(later) if later else None, "last_loss": last}


def optimizers(size: str, device: str, steps: int) -> list[dict[str, Any]]:
    rows = []
    for label, build in optimizer_factories().items():
        try:
            row = {"optimizer": label, **one_optimizer(build, size, device, steps)}
        except Exception as exc:  # one missing peer (galore-torch) must not hide the others
            row = {"optimizer": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"  {label}: {row}", flush=True)
    base = next((r for r in rows if r["optimizer"] == "torch AdamW" and "error" not in r), None)
    for r in rows:
        if base and base["state_bytes"] and r.get("state_bytes") is not None:
            r["state_vs_adamw"] = r["state_bytes"] / base["state_bytes"]
        if base and base["peak_step_bytes"] and r.get("peak_step_bytes") is not None:
            r["peak_vs_adamw"] = r["peak_step_bytes"] / base["peak_step_bytes"]
    return rows


# ----------------------------------------------------------------------------- 2. latency
def interleaved(fns: dict[str, Callable[[], Any]], device: str, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up (kernels, caches)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def latency(size: str, device: str, repeats: int, ratios: tuple[float, ...]) -> list[dict]:
    from rankwise.compress import compress_

    dtype = torch.bfloat16
    dense = llama(size, device).eval()
    calib = token_ids(size, device, seed=2)
    row = token_ids(size, device, seed=3)[:1]
    prompt = row[:, :16]  # short: decoding time is mostly the DECODE_STEPS one-token steps
    prefill = torch.cat([row] * max(1, 512 // row.shape[1]), dim=1)[:, :512]
    rows = []
    for ratio in ratios:
        small = llama(size, device).eval()
        report = compress_(small, "lord", ratio, calibration=calib, progress=False)
        models = {"dense": dense.to(dtype), "shrunk": small.to(dtype)}
        with torch.no_grad():
            fwd = interleaved({k: (lambda m=m: m(prefill)) for k, m in models.items()}, device,
                              repeats)
            gen = interleaved({k: (lambda m=m: m.generate(
                prompt, max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS,
                do_sample=False, pad_token_id=0)) for k, m in models.items()}, device,
                max(3, repeats // 3))
        rows.append({
            "method": "lord", "ratio": ratio, "ratio_model": report.ratio_model,
            "prefill_tokens": prefill.shape[1], "prefill_ms": 1e3 * fwd["shrunk"],
            "dense_prefill_ms": 1e3 * fwd["dense"], "prefill_vs_dense": fwd["shrunk"] / fwd["dense"],
            "decode_ms_per_token": 1e3 * gen["shrunk"] / DECODE_STEPS,
            "dense_decode_ms_per_token": 1e3 * gen["dense"] / DECODE_STEPS,
            "decode_vs_dense": gen["shrunk"] / gen["dense"], "dtype": "bfloat16"})
        print(f"  ratio {ratio}: {rows[-1]}", flush=True)
        dense = dense.float()
    return rows


# ----------------------------------------------------------------------------- 3. streaming
def streaming_api() -> Callable | None:
    try:
        from rankwise.compress import compress_streaming
    except (ImportError, AttributeError):
        return None
    return compress_streaming if "device" in inspect.signature(compress_streaming).parameters else None


def streaming(size: str, device: str) -> dict[str, Any]:
    stream = streaming_api()
    if stream is None:
        return {"skipped": "rankwise.compress.compress_streaming(..., device=...) is not in "
                           "this tree (issue 18 item 1)"}
    from rankwise.compress import compress_

    calib = token_ids(size, "cpu", seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "dense"
        llama(size, "cpu").save_pretrained(source, safe_serialization=True)
        reset_peak(device)
        start = time.perf_counter()
        report = stream(source, Path(tmp) / "out", "svd-llm", 0.3, calibration=calib,
                        device=device)
        sync(device)
        seconds = time.perf_counter() - start
        stream_peak = peak(device)
    model = llama(size, device)
    reset_peak(device)
    in_memory = timed(lambda: compress_(model, "svd-llm", 0.3, calibration=calib.to(device),
                                        progress=False), device)
    return {"method": "svd-llm", "ratio": 0.3, "seconds": seconds,
            "per_block_s": (report.options or {}).get("streaming"),
            "peak_bytes": stream_peak, "in_memory_seconds": in_memory,
            "in_memory_peak_bytes": peak(device)}


# ----------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    mib = lambda b: "" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    lines = [f"# GPU benchmarks ({result['device_name']})", "",
             f"torch {result['torch']}, CUDA {result['cuda']}, model {result['size']}.", "",
             "## Optimizers", "",
             "| optimizer | state MiB | state / AdamW | peak step MiB | first step s | step s |",
             "|---|---|---|---|---|---|"]
    for r in result["optimizers"]:
        if "error" in r:
            lines.append(f"| {r['optimizer']} | error: {r['error'][:60]} | | | | |")
            continue
        med = r["median_step_s"]
        lines.append(f"| {r['optimizer']} | {mib(r['state_bytes'])} | "
                     f"{r.get('state_vs_adamw', float('nan')):.3f} | {mib(r['peak_step_bytes'])} | "
                     f"{r['first_step_s']:.3f} | {'' if med is None else f'{med:.3f}'} |")
    lines += ["", "## Shrunk vs dense latency (bf16)", "",
              "| ratio | prefill ms | dense | x dense | decode ms/token | dense | x dense |",
              "|---|---|---|---|---|---|---|"]
    for r in result["latency"]:
        lines.append(f"| {r['ratio']:.0%} | {r['prefill_ms']:.2f} | {r['dense_prefill_ms']:.2f} | "
                     f"{r['prefill_vs_dense']:.2f} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['dense_decode_ms_per_token']:.2f} | {r['decode_vs_dense']:.2f} |")
    lines += ["", "## Streaming compression onto the device", "", f"`{result['streaming']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        return 0
    from rankwise.io import write_json, write_text

    size = "quick" if args.quick else "full"
    result: dict[str, Any] = {
        "device": args.device, "size": size, "torch": torch.__version__,
        "cuda": torch.version.cuda, "machine": platform.node(),
        "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                        else platform.processor() or "cpu"),
        "model": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab",
                           "seq", "batch"), SIZES[size], strict=True)),
    }
    print("optimizers:", flush=True)
    result["optimizers"] = optimizers(size, args.device, max(2, args.steps))
    print("latency:", flush=True)
    result["latency"] = latency(size, args.device, args.repeats,
                                (0.4,) if args.quick else (0.2, 0.4))
    print("streaming:", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        result["streaming"] = streaming(size, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "gpu.json", result)
    write_text(args.out / "gpu.md", markdown(result))
    print(f"wrote {args.out / 'gpu.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
