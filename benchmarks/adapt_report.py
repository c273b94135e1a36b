"""Report of `benchmarks/adapt.py`: the Markdown tables and the loss-curve plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankwise.io import write_text


# ----------------------------------------------------------------------------- report
def _fmt_metric(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "failed"
    return f"{row['metric']:.3f}" if row["metric_name"] == "accuracy" else f"{row['metric']:.2f}"


def write_report(results: dict[str, Any], out: Path) -> None:
    s = results["settings"]
    lines = ["# rankwise.adapt benchmark", "",
             "Produced by `benchmarks/adapt.py` (see its docstring for the protocol). "
             f"{s['threads']} torch thread(s) on a shared CPU machine; rank {s['rank']}, "
             "attention query/value projections, same seed, data and order for every method.",
             f"fortunes: MiniLM-L6 + Linear head, {s['cls_steps']} steps of {s['cls_batch']} x "
             f"{s['cls_seq']} tokens, test accuracy (463 texts; base model with an untrained "
             f"head: chance = 0.125). python-docs: SmolLM2-135M, {s['lm_steps']} steps of "
             f"{s['lm_batch']} x {s['lm_seq']} tokens, validation perplexity on "
             f"{s['eval_tokens']} tokens (base model: {results.get('base_perplexity', 0):.2f}).",
             "The lr column is the adapters' (methods that train a few scale-like parameters use "
             "10x); the fortunes head trains at 1e-2 for every method. Schedule: 10 % warmup "
             "then linear decay (fortunes), linear decay (python-docs).",
             "Memory = parameters + gradients + AdamW moments + activations saved for backward.",
             "Step times of different rows were taken at different moments on a shared machine: "
             "compare them loosely; the LoRA-vs-PEFT ratios below are interleaved.", ""]
    for task in ("fortunes", "python-docs"):
        rows = [r for r in results["methods"] if r["task"] == task]
        if not rows:
            continue
        name = "accuracy" if task == "fortunes" else "val. perplexity"
        lines += [f"## {task}", "",
                  f"| method | lr | trainable params | {name} | step time (s) | memory (MiB) "
                  "| activations (MiB) |", "|---|---|---|---|---|---|---|"]
        if any(r.get("args") for r in rows):
            lines[-2] = lines[-2].replace("| lr |", "| lr, options |")
        for r in sorted(rows, key=lambda r: r["method"]):
            lr = f"{r['lr']:g}" + "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}"
                                          for k, v in (r.get("args") or {}).items())
            if r.get("error"):
                lines.append(f"| {r['method']} | {lr} | - | failed: "
                             f"{r['error'][:160].replace('|', '/')} | - | - | - |")
                continue
            mem = r["memory"]
            lines.append(f"| {r['method']} | {lr} | {r['trainable_parameters']:,} | "
                         f"{_fmt_metric(r)} | {r['step_seconds']:.3f} | "
                         f"{mem['total'] / 2**20:.1f} | {mem['activations'] / 2**20:.1f} |")
        lines.append("")
    cmp_rows = results.get("lora_vs_peft", {})
    if cmp_rows:
        lines += ["## LoRA: rankwise vs PEFT (side by side, same init and data)", "",
                  "| task | steps | trainable (ours / PEFT) | step time ratio | memory ratio | "
                  "memory ours / PEFT (MiB) | max loss difference | metric ours / PEFT |",
                  "|---|---|---|---|---|---|---|---|"]
        for task, c in cmp_rows.items():
            if "error" in c:
                lines.append(f"| {task} | failed: {c['error'][:160]} | | | | | | |")
                continue
            tp, mem, met = c["trainable_parameters"], c["memory"], c["metric"]
            lines.append(
                f"| {task} | {c['steps']} | {tp['rankwise']:,} / {tp['peft']:,} | "
                f"{c['step_time_ratio']:.3f} | {c['memory_ratio']:.4f} | "
                f"{mem['rankwise']['total'] / 2**20:.1f} / {mem['peft']['total'] / 2**20:.1f} | "
                f"{c['max_loss_difference']:.2e} | {met['rankwise']:.4g} / {met['peft']:.4g} |")
        merged = cmp_rows.get("python-docs", {}).get("merged_inference")
        if merged:
            lines += ["", f"Merged-adapter inference (SmolLM2-135M, {s['lm_batch']} x "
                      f"{s['lm_seq']} tokens, median of {s['infer_repeats']} interleaved "
                      f"forwards): merged / base = {merged['merged_over_base']:.3f}, "
                      f"unmerged adapter / base = {merged['adapter_over_base']:.3f} "
                      f"(base {merged['base_seconds'] * 1e3:.0f} ms)."]
        lines += ["", "Ratios are rankwise / PEFT (< 1: rankwise is faster / smaller). The "
                  "side-by-side runs use a constant lr (no schedule), so their metric differs "
                  "from the LoRA row above; PEFT loads our exported initial A/B, the two loss "
                  "curves are bit-identical and the memory is equal tensor for tensor.",
                  "![loss curves](adapt.png)", ""]
    write_text(out / "adapt.md", "\n".join(lines) + "\n")


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, task in enumerate(("fortunes", "python-docs")):
        ax = axes[0][col]
        c = results.get("lora_vs_peft", {}).get(task, {})
        if "losses" in c:
            ax.plot(c["losses"]["peft"], label="PEFT LoRA", lw=3, alpha=0.5)
            ax.plot(c["losses"]["rankwise"], label="rankwise LoRA", lw=1.2, ls="--")
            ax.legend()
        ax.set_title(f"{task}: LoRA, rankwise vs PEFT (same init)")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax = axes[1][col]
        for r in results["methods"]:
            if r["task"] == task and not r.get("error"):
                ax.plot(r["losses"], lw=0.9, label=r["method"])
        ax.set_title(f"{task}: every method")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "adapt.png", dpi=110)
    plt.close(fig)
