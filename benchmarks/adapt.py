"""Adapter benchmark: every registered `rankwise.adapt` method on both embedded tasks.

Tasks (`rankwise.finetune`): fortunes (MiniLM-L6 + mean pooling + a trainable Linear head; test
accuracy on all 463 test texts) and python-docs (SmolLM2-135M; perplexity on a fixed prefix of
the validation split). Every method trains rank 8 on the attention query/value projections
from the same base, the same seed and the same batches in the same order, for the same number
of steps, one after the other in one process (one torch thread). Reported per method: trainable
parameters, the metric, the median step time, and training memory = parameters + gradients +
AdamW moments (2 x trainable, fp32) + activations saved for backward (measured with
``torch.autograd.graph.saved_tensors_hooks`` on one batch, storages counted once, parameters
excluded). A method that fails is recorded with its error; the others go on.

LoRA vs PEFT: rankwise LoRA and ``peft`` LoRA (same r, alpha, targets, dropout 0) train side
by side in one process from the *same* initial A/B (ours exported with
`rankwise.adapt.export_peft` and loaded by ``PeftModel.from_pretrained(is_trainable=True)``),
with one AdamW each, on the same batches; steps alternate ours-first / PEFT-first so machine
load hits both alike. Reported: both loss curves (plot), the ratio of median step times, and
the ratio of training memory (measured: parameters, gradients and optimizer state after the
backward pass via `rankwise.profiling`, plus saved activations; on CUDA also the allocator's
peak). Merged inference: the forward time of the LoRA model after `merge_and_unload` over the
base model's, interleaved (goal: 1.0). DoRA vs PEFT: the training step of rankwise DoRA, PEFT
DoRA and rankwise LoRA (the floor) on every linear projection of SmolLM2, side by side.

    .venv/bin/python benchmarks/adapt.py --threads 1            # ~35 min on a busy 2-core box
    .venv/bin/python benchmarks/adapt.py --methods dora vera    # rerun a subset (merged in)
    .venv/bin/python benchmarks/adapt.py --quick                # smoke run
    .venv/bin/python benchmarks/adapt.py --dora-only            # DoRA vs PEFT, merged in

Writes benchmarks/results/adapt.{json,md,png} (tables and plot: `adapt_report.py`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from rankwise import adapt, profiling
from rankwise.finetune import (
    FinetuneConfig,
    evaluate,
    finetune,
    prepare_data,
    task_batch,
    task_loss,
)
from rankwise.finetune.loop import build_model, param_groups
from rankwise.io import write_json

RESULTS = Path(__file__).parent / "results"
MODELS = {"fortunes": "minilm-l6", "python-docs": "smollm2-135m"}
TARGETS = {"fortunes": ["query", "value"], "python-docs": ["q_proj", "v_proj"]}
# Learning rates: one per task for the LoRA family; methods that train far fewer, scale-like
# parameters (vectors of singular values / diagonals / mixing coefficients) use the larger
# rates their papers use (VeRA, NOLA, SVFit, LoLDU, LoRA-XS/SB ~1e-2 or more).
LR = {"fortunes": 3e-3, "python-docs": 1e-3}
HEAD_LR = 1e-2  # the fortunes head: one rate for every method, so accuracy compares adapters
LR_SCALE = {"vera": 10.0, "nola": 10.0, "svfit": 10.0, "loldu": 10.0,
            "lora_xs": 10.0, "lora_sb": 10.0, "salt": 3.0}
# Method options beyond rank 8: RandLoRA's default alpha 640 is PEFT's for r = 32 (alpha/r = 20);
# at r = 8 that scale would be 80 and training diverges, so keep PEFT's ratio.
METHOD_ARGS: dict[str, dict[str, Any]] = {"randlora": {"alpha": 160.0}}
log = logging.getLogger("bench.adapt")


# ----------------------------------------------------------------------------- memory hygiene
def _libc_tune() -> None:
    """Large tensors through mmap (returned to the OS when freed): with glibc's dynamic
    threshold, dozens of model copies fragment the heap until the OOM killer steps in."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed
    except (OSError, AttributeError):
        pass


def _release() -> None:
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- measurements
def saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (storages once,
    parameters and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task_loss(model, batch)
    del loss
    return sum(seen.values())


def training_memory(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    mem = {"parameters": profiling.parameter_bytes(model), "gradients": trainable,
           "optimizer_state": 2 * trainable, "activations": saved_activation_bytes(model, batch)}
    mem["total"] = sum(mem.values())
    return mem


def _config(task: str, method: str, args: argparse.Namespace, **changes: Any) -> FinetuneConfig:
    lm = task == "python-docs"
    base = dict(
        model=MODELS[task], task=task, method=method, rank=args.rank,
        target_modules=TARGETS[task], steps=args.lm_steps if lm else args.cls_steps,
        batch_size=args.lm_batch if lm else args.cls_batch,
        seq_len=args.lm_seq if lm else args.cls_seq,
        lr=LR[task] * LR_SCALE.get(method, 1.0), head_lr=None if lm else HEAD_LR,
        warmup_steps=0 if lm else None,
        method_args=METHOD_ARGS.get(method, {}), eval_tokens=args.eval_tokens,
        initial_eval=False, progress=False, seed=0)
    base["eval_every"] = base["steps"]
    return FinetuneConfig(**{**base, **changes})


# ----------------------------------------------------------------------------- per method
def _method_row(task: str, method: str, base: torch.nn.Module, data: Any,
                args: argparse.Namespace) -> dict[str, Any]:
    config = _config(task, method, args)
    row: dict[str, Any] = {"method": method, "task": task, "lr": config.lr,
                           "args": config.method_args}
    try:
        result = finetune(config, base=copy.deepcopy(base), data=data)
        batch = task_batch(data, 0, config.resolved_batch_size, config.seed)
        row.update(
            trainable_parameters=result.trainable_parameters, metric=result.metric,
            metric_name=result.metric_name, step_seconds=statistics.median(
                result.history["step_seconds"]), losses=result.history["losses"],
            memory=training_memory(result.model, batch), error=None)
    except Exception as exc:  # recorded in the table; the benchmark goes on
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        log.warning("%s on %s failed:\n%s", method, task, traceback.format_exc())
    return row


def _child(conn: Any, *payload: Any) -> None:
    try:
        conn.send(_method_row(*payload))
    finally:
        conn.close()


def run_method(task: str, method: str, base: torch.nn.Module, data: Any,
               args: argparse.Namespace) -> dict[str, Any]:
    """One method in a forked child (the base model and data are shared copy-on-write): a
    crash, a hang or memory the allocator keeps cannot affect the next method."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, task, method, base, data, args), daemon=True)
    proc.start()
    send.close()
    row = None
    if recv.poll(args.method_timeout):
        try:
            row = recv.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if row is None:
        why = (f"timed out after {args.method_timeout} s" if proc.exitcode in (None, -9)
               and time.perf_counter() - t0 >= args.method_timeout
               else f"the process died (exit code {proc.exitcode}: killed, e.g. out of memory)")
        row = {"method": method, "task": task, "lr": _config(task, method, args).lr,
               "error": f"RuntimeError: {why}"}
    row["seconds"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- LoRA vs PEFT
def _peak_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor]) -> tuple[float, float, dict[str, int]]:
    """One training step: (loss, seconds, memory measured after backward)."""
    t0 = time.perf_counter()
    loss = task_loss(model, batch)
    loss.backward()
    mem = profiling.memory_report(model, opt)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), time.perf_counter() - t0, mem


def lora_vs_peft(task: str, base: torch.nn.Module, data: Any,
                 args: argparse.Namespace) -> dict[str, Any]:
    from peft import PeftModel

    config = _config(task, "lora", args)
    ours = build_model(config, copy.deepcopy(base), getattr(data, "num_classes", None))
    adapt.adapt_(ours, "lora", rank=config.rank, target_modules=config.target_modules, seed=0)
    head = getattr(ours, "head", None)
    with tempfile.TemporaryDirectory() as tmp:  # the same initial A/B (and head) for PEFT
        inner = ours.encoder if head is not None else ours
        adapt.export_peft(inner, tmp)
        theirs = copy.deepcopy(ours)
        peft_inner = PeftModel.from_pretrained(adapt.unload_(theirs.encoder if head is not None
                                                             else theirs), tmp, is_trainable=True)
    if head is not None:
        theirs.encoder = peft_inner
        for m in (ours, theirs):
            m.head.weight.requires_grad_(True)
            m.head.bias.requires_grad_(True)
    else:
        theirs = peft_inner
    models = {"rankwise": ours, "peft": theirs}
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad)
              for k, m in models.items()}
    opts = {k: torch.optim.AdamW(param_groups(m, config)) for k, m in models.items()}
    curves: dict[str, list[float]] = {k: [] for k in models}
    times: dict[str, list[float]] = {k: [] for k in models}
    mems: dict[str, dict[str, int]] = {}
    for m in models.values():
        m.train()
    for step in range(args.peft_steps if task == "python-docs" else config.steps):
        batch = task_batch(data, step, config.resolved_batch_size, config.seed)
        order = ["rankwise", "peft"] if step % 2 == 0 else ["peft", "rankwise"]
        for k in order:
            torch.manual_seed(10_000 + step)  # the same dropout masks for both
            loss, sec, mem = _peak_step(models[k], opts[k], batch)
            curves[k].append(loss)
            times[k].append(sec)
            mems[k] = mem
    batch = task_batch(data, 0, config.resolved_batch_size, config.seed)
    for k, m in models.items():
        mems[k] = {**mems[k], "activations": saved_activation_bytes(m, batch)}
        mems[k]["total"] = sum(v for n, v in mems[k].items() if n != "total")
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # first step warms up
    metric = {k: evaluate(m, data, seq_len=config.resolved_seq_len,
                          batch_size=config.resolved_batch_size) for k, m in models.items()}
    out = {"task": task, "steps": len(curves["rankwise"]), "trainable_parameters": counts,
           "losses": curves, "median_step_seconds": med,
           "step_time_ratio": med["rankwise"] / med["peft"], "memory": mems,
           "memory_ratio": mems["rankwise"]["total"] / mems["peft"]["total"], "metric": metric,
           "max_loss_difference": max(abs(a - b) for a, b in zip(*curves.values(), strict=True))}
    if task == "python-docs":
        out["merged_inference"] = merged_speed(ours, base, data, args)
    return out


def merged_speed(model: torch.nn.Module, base: torch.nn.Module, data: Any,
                 args: argparse.Namespace) -> dict[str, float]:
    """Forward time of the merged LoRA model and of the adapter (unmerged) over the base's."""
    ids = data.train[: args.lm_batch]
    adapted = model.eval()
    merged = adapt.merge_and_unload(copy.deepcopy(model)).eval()
    plain = base.eval()
    times: dict[str, list[float]] = {"base": [], "merged": [], "adapter": []}
    with torch.inference_mode():
        for m in (plain, merged, adapted):
            m(input_ids=ids)  # warm-up
        for i in range(args.infer_repeats):
            names = ["base", "merged", "adapter"] if i % 2 == 0 else ["adapter", "merged", "base"]
            for name in names:
                m = {"base": plain, "merged": merged, "adapter": adapted}[name]
                t0 = time.perf_counter()
                m(input_ids=ids)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"base_seconds": med["base"], "merged_over_base": med["merged"] / med["base"],
            "adapter_over_base": med["adapter"] / med["base"]}


# ----------------------------------------------------------------------------- DoRA vs PEFT
DORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dora_vs_peft(base: torch.nn.Module, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Training-step time of rankwise DoRA vs PEFT DoRA (and rankwise LoRA, the floor: DoRA
    adds the row norm and the magnitude to it), SmolLM2-135M, rank 8 on every linear
    projection, the same initial factors (ours exported to PEFT), the same batches, one AdamW
    each; steps taken in rotating order so machine load hits all alike."""
    from peft import PeftModel

    ours = copy.deepcopy(base)
    adapt.adapt_(ours, "dora", rank=args.rank, target_modules=DORA_TARGETS, seed=0)
    with torch.no_grad():  # trained-like factors: B != 0
        for layer in adapt.adapter_layers(ours).values():
            layer.adapter.B.normal_(std=0.01, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        adapt.export_peft(ours, tmp)
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp, is_trainable=True)
    lora = copy.deepcopy(base)
    adapt.adapt_(lora, "lora", rank=args.rank, target_modules=DORA_TARGETS, seed=0)
    models = {"rankwise dora": ours, "peft dora": theirs, "rankwise lora": lora}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for step in range(args.dora_steps):
        ids = data.train[(step * args.lm_batch) % len(data.train):][: args.lm_batch]
        for k in names[step % 3:] + names[: step % 3]:
            models[k].train()
            t0 = time.perf_counter()
            loss = models[k](input_ids=ids, labels=ids).loss
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            times[k].append(time.perf_counter() - t0)
            losses[k].append(float(loss.detach()))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"targets": DORA_TARGETS, "rank": args.rank, "steps": args.dora_steps,
            "batch": [args.lm_batch, args.lm_seq], "median_step_seconds": med,
            "step_time_ratio": med["rankwise dora"] / med["peft dora"],
            "lora_floor_ratio": med["rankwise lora"] / med["peft dora"],
            "max_loss_difference": max(abs(a - b) for a, b in zip(
                losses["rankwise dora"], losses["peft dora"], strict=True))}


def dora_section(c: dict[str, Any]) -> str:
    med = c["median_step_seconds"]
    return "\n".join([
        "## DoRA: rankwise vs PEFT (side by side, same init and data)", "",
        f"SmolLM2-135M, DoRA rank {c['rank']} on {', '.join(c['targets'])}, "
        f"{c['batch'][0]} x {c['batch'][1]} tokens, {c['steps']} steps taken in rotating "
        "order in one process (shared 2-core machine: the ratio is what counts).", "",
        "| | median step s | x PEFT DoRA |", "|---|---|---|",
        *(f"| {k} | {v:.3f} | {v / med['peft dora']:.3f} |" for k, v in med.items()),
        "", f"Goal: rankwise DoRA <= 0.7x PEFT DoRA: {c['step_time_ratio']:.2f}x "
        f"({'met' if c['step_time_ratio'] <= 0.7 else 'missed'}); rankwise LoRA on the same "
        f"layers, the floor any DoRA can reach, is {c['lora_floor_ratio']:.2f}x. Loss curves "
        f"agree to {c['max_loss_difference']:.1e}.", ""])


# ----------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered one")
    p.add_argument("--tasks", nargs="+", default=["fortunes", "python-docs"])
    p.add_argument("--no-peft", action="store_true", help="skip the LoRA-vs-PEFT comparison")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cls-steps", type=int, default=40)
    p.add_argument("--cls-batch", type=int, default=8)
    p.add_argument("--cls-seq", type=int, default=64)
    p.add_argument("--lm-steps", type=int, default=12)
    p.add_argument("--lm-batch", type=int, default=2)
    p.add_argument("--lm-seq", type=int, default=64)
    p.add_argument("--peft-steps", type=int, default=20)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--infer-repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method-timeout", type=float, default=600.0,
                   help="seconds one method may take before it is recorded as failed")
    p.add_argument("--quick", action="store_true", help="a few steps, a few methods")
    p.add_argument("--dora-steps", type=int, default=8)
    p.add_argument("--dora-only", action="store_true",
                   help="only the DoRA-vs-PEFT comparison, merged into OUT/adapt.json")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.quick:
        args.cls_steps, args.lm_steps, args.peft_steps, args.infer_repeats = 4, 3, 4, 2
        args.methods = args.methods or ["lora", "dora"]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # methods run in forked children
    _libc_tune()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    methods = args.methods or adapt.list_methods()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "adapt.json"
    if args.dora_only:
        return _dora_only(args, path)
    previous = json.loads(path.read_text()) if args.methods and path.exists() else None
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
                               "methods": [], "lora_vs_peft": {}}
    from rankwise.models import load_model, load_tokenizer

    start = time.perf_counter()
    for task in args.tasks:
        lm = task == "python-docs"
        tok = load_tokenizer(MODELS[task])
        data = prepare_data(task, tok, seq_len=args.lm_seq if lm else args.cls_seq,
                            train_tokens=65_536, eval_tokens=args.eval_tokens)
        base = load_model(MODELS[task], task="causal-lm" if lm else "encoder")
        if lm:
            results["base_perplexity"] = evaluate(base, data, seq_len=args.lm_seq,
                                                  batch_size=args.lm_batch)
        if not args.no_peft:
            log.info("%s: LoRA vs PEFT", task)
            try:
                results["lora_vs_peft"][task] = lora_vs_peft(task, base, data, args)
            except Exception as exc:
                log.warning("LoRA vs PEFT failed:\n%s", traceback.format_exc())
                results["lora_vs_peft"][task] = {"error": f"{type(exc).__name__}: {exc}"}
            _release()
        for method in methods:
            log.info("%s: %s (%.0f s so far)", task, method, time.perf_counter() - start)
            row = run_method(task, method, base, data, args)
            log.info("  -> %s (RSS %.2f GiB)", row.get("error") or f"{row['metric']:.4g}, "
                     f"{row['step_seconds']:.3f} s/step", profiling.current_rss() / 2**30)
            results["methods"].append(row)
            write_json(path.with_suffix(".partial.json"), results)
        del base
        _release()
    if previous is not None:  # a subset rerun: keep the other rows and comparisons
        redone = {(r["task"], r["method"]) for r in results["methods"]}
        results["methods"] = [r for r in previous["methods"]
                              if (r["task"], r["method"]) not in redone] + results["methods"]
        results["lora_vs_peft"] = {**previous.get("lora_vs_peft", {}), **results["lora_vs_peft"]}
        results.setdefault("base_perplexity", previous.get("base_perplexity"))
        results["settings"] = previous["settings"]
    results["seconds"] = time.perf_counter() - start
    write_json(path, results)
    from adapt_report import plot, write_report  # benchmarks/adapt_report.py, beside this file

    write_report(results, args.out)
    if "dora_vs_peft" in results:
        with open(args.out / "adapt.md", "a") as f:
            f.write("\n" + dora_section(results["dora_vs_peft"]))
    plot(results, args.out)
    path.with_suffix(".partial.json").unlink(missing_ok=True)
    log.info("done in %.0f s: %s", results["seconds"], args.out / "adapt.md")
    return results


def _dora_only(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    from rankwise.models import load_model, load_tokenizer

    results = json.loads(path.read_text()) if path.exists() else {"methods": []}
    data = prepare_data("python-docs", load_tokenizer(MODELS["python-docs"]), seq_len=args.lm_seq,
                        train_tokens=65_536, eval_tokens=args.eval_tokens)
    results["dora_vs_peft"] = dora_vs_peft(load_model(MODELS["python-docs"]), data, args)
    write_json(path, results)
    from adapt_report import write_report

    write_report(results, args.out)
    with open(args.out / "adapt.md", "a") as f:
        f.write("\n" + dora_section(results["dora_vs_peft"]))
    log.info("%s", dora_section(results["dora_vs_peft"]))
    return results


if __name__ == "__main__":
    main()
