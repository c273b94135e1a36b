"""The pipeline's summary table (printed) and report.md (written beside the exported model)."""

from __future__ import annotations

from typing import Any

__all__ = ["domain_summary", "domain_table", "final_compression_report", "render_markdown", "summary_table"]

_ROWS = (("dense", "dense model"), ("compress", "compress"), ("compensate", "+ compensation"),
         ("heal", "+ healing"))


def _row_values(dense: dict[str, Any], rec: dict[str, Any]) -> tuple[str, ...]:
    def ppl(key: str) -> str:
        v = rec.get(key)
        return "-" if v is None else f"{v:.3f}"

    ratio = rec.get("test_ppl", float("nan")) / dense["test_ppl"] if rec.get("test_ppl") else float("nan")
    return (ppl("heldout_ppl"), ppl("test_ppl"), f"{ratio:.3f}x", f"{rec.get('params_targets', 0):,}",
            f"{rec.get('ratio_targets', 0.0):.2%}", f"{rec.get('ratio_model', 0.0):.2%}",
            f"{rec.get('seconds', 0.0):.0f}")


def _training_free(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return stages.get("compensate") if stages.get("compensate", {}).get("domains") else stages.get("compress", {})


def domain_summary(stages: dict[str, dict[str, Any]], used: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Per domain: perplexity x dense after healing (the final model) and training-free, and
    whether the domain is held out (read by neither calibration nor healing); worst held-out first."""
    dense = stages.get("dense", {}).get("domains") or {}
    free = _training_free(stages).get("domains") or {}
    healed = (stages.get("heal") or {}).get("domains") or free
    seen = set(used.get("calibration", [])) | set(used.get("healing", []))
    rows = {d: {"healed_x_dense": healed[d] / dense[d] if d in healed else None,
                "training_free_x_dense": free[d] / dense[d] if d in free else None,
                "held_out": d not in seen, "dense_ppl": dense[d],
                "calibration": d in used.get("calibration", []), "healing": d in used.get("healing", [])}
            for d in dense}
    return dict(sorted(rows.items(), key=lambda kv: (not kv[1]["held_out"], -(kv[1]["healed_x_dense"] or 0))))


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}x"


def domain_table(stages: dict[str, dict[str, Any]], used: dict[str, list[str]]) -> str:
    """Plain-text per-domain table (x dense), the worst held-out domain first."""
    rows = domain_summary(stages, used)
    if not rows:
        return ""
    head = ("domain", "held out", "final x dense", "training-free x dense", "dense ppl", "used by")
    body = []
    for d, r in rows.items():
        by = ", ".join(k for k in ("calibration", "healing") if r[k]) or "-"
        body.append((d, "yes" if r["held_out"] else "no", _x(r["healed_x_dense"]), _x(r["training_free_x_dense"]),
                     f"{r['dense_ppl']:.2f}", by))
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    fmt_row = "  ".join(f"{{:<{w}}}" if i in (0, 5) else f"{{:>{w}}}" for i, w in enumerate(widths))
    held = [(d, r) for d, r in rows.items() if r["held_out"]]
    lead = (f"worst held-out domain: {held[0][0]} at {held[0][1]['healed_x_dense']:.3f}x dense perplexity"
            if held and held[0][1]["healed_x_dense"] is not None else "no held-out domain: every domain was seen")
    lines = [lead, "", fmt_row.format(*head), fmt_row.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt_row.format(*r) for r in body])


def summary_table(stages: dict[str, dict[str, Any]]) -> str:
    """Plain text: the per-domain table (worst held-out first), then perplexity, parameters and
    time after each stage."""
    dense = stages.get("dense", {})
    head = ("stage", "held-out ppl", "test ppl", "x dense", "target params", "removed (targets)",
            "removed (model)", "seconds")
    rows = []
    for key, label in _ROWS:
        if key in stages:
            rows.append((label,) + _row_values(dense, stages[key]))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    exp = stages.get("export", {})
    if dense.get("domains"):
        used = exp.get("domains_used") or {}
        lines = [domain_table(stages, used), "", "python-docs (the decision data's domain) after each stage:", "",
                 *lines]
    if exp.get("latency") or exp.get("decode_latency"):
        lines.append("")
    if exp.get("fused_groups"):
        lines.append(f"latency with horizontal fusion ({exp['fused_groups']} groups of sibling layers run their "
                     "first factors as one matmul; rankwise.layers.fused.fuse_siblings_ after loading):")
    if exp.get("latency"):
        lat = exp["latency"]
        lines.append(f"prefill latency (1 x {lat['tokens']} tokens, all logits): {lat['latency_ms']:.0f} ms vs dense "
                     f"{lat['dense_ms']:.0f} ms = {lat['latency_vs_dense']:.3f}x")
    if exp.get("first_token_latency"):
        ttft = exp["first_token_latency"]
        lines.append(f"time to first token (1 x {ttft['tokens']} prompt, last logits only): {ttft['latency_ms']:.0f} ms "
                     f"vs dense {ttft['dense_ms']:.0f} ms = {ttft['latency_vs_dense']:.3f}x")
    if exp.get("decode_latency"):
        dec = exp["decode_latency"]
        lines.append(f"decode latency (per token, KV cache): {dec['ms_per_token']:.1f} ms vs dense "
                     f"{dec['dense_ms_per_token']:.1f} ms = {dec['latency_vs_dense']:.3f}x")
    return "\n".join(lines)


def _choice_lines(stages: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    comp = stages.get("compress", {})
    if comp:
        lines.append(f"- **compress**: {comp['method']} + {comp['allocation']} allocation, chosen on held-out "
                     "perplexity among:")
        lines += [f"  - {c['method']} + {c['allocation']}: {c['heldout_ppl']:.3f} ({c['seconds']:.0f} s)"
                  for c in comp.get("candidates", [])]
    cps = stages.get("compensate", {})
    if cps:
        if not cps.get("enabled"):
            lines.append("- **compensation**: disabled")
        else:
            tried = ", ".join(f"rank {v['rank']}: {v['layers']} layers improved"
                              + (f", held-out {v['heldout_ppl']:.3f}" if v.get("heldout_ppl") else "")
                              for v in cps.get("variants", []))
            used = (f"used, EoRA rank {cps['used_rank']} on {cps['layers_compensated']} layers (inside each "
                    "layer's rank: same parameters)" if cps.get("used_rank") else "not used (did not help on held-out data)")
            lines.append(f"- **compensation**: {used}; tried {tried or 'nothing'}")
    heal = stages.get("heal", {})
    if heal:
        tr = heal.get("training")
        if tr:
            lines.append(f"- **healing**: {heal['method']}, {tr['steps']} steps ({tr['tokens']:,} tokens) in "
                         f"{tr['seconds'] / 60:.1f} min, lr {tr['lr']:g}, {tr['trainable']:,} trainable; "
                         f"train loss {tr['loss_first']:.3f} -> {tr['loss_last']:.3f}; "
                         + ("kept" if heal.get("kept") else "discarded (held-out perplexity rose)"))
        else:
            lines.append("- **healing**: skipped")
    return lines


def render_markdown(stages: dict[str, dict[str, Any]], config: dict[str, Any], *, max_layers: int = 400) -> str:
    """report.md: settings, choices, the summary table, latency and per-layer ranks."""
    exp = stages.get("export", {})
    final = stages.get("heal") or stages.get("compensate") or stages.get("compress") or {}
    lines = [
        f"# rankwise shrink: {config.get('model')} at {config.get('ratio'):.0%} removed",
        "",
        "`ratio` is the fraction of parameters removed from the targeted layers (every linear but "
        "the output head); the whole-model fraction is given too. Per domain: perplexity x dense on "
        f"each embedded domain's test split (first {config.get('eval_tokens')} tokens); a domain is held "
        "out when neither calibration nor healing read it, and the worst held-out domain comes first. "
        "held-out ppl = decision data (python-docs validation split or 10 % of the user's text).",
        "",
        "## Summary",
        "",
        "```",
        summary_table(stages),
        "```",
        "",
        "## Choices (measured)",
        "",
        *_choice_lines(stages),
        "",
    ]
    if exp.get("generations"):
        lines += ["## Generations (greedy, the same prompts)", "", "| prompt | dense | shrunk |", "|---|---|---|"]
        for g in exp["generations"]:
            cells = [g[k].replace("|", "\\|").replace("\n", " ") for k in ("prompt", "dense", "shrunk")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if exp.get("reload"):
        rl = exp["reload"]
        lines += [f"Reloaded with `rankwise.load_model(DIR)`: max |logit difference| {rl['max_abs_diff']:.2e}.", ""]
    layers = exp.get("layers") or final.get("layers") or []
    if layers:
        lines += ["## Per-layer ranks", "", "| layer | shape | kind | rank | params | removed |", "|---|---|---|---:|---:|---:|"]
        for r in layers[:max_layers]:
            dense = r["out"] * r["in"]
            rank = "-" if r["rank"] is None else str(r["rank"])
            lines.append(f"| {r['fqn']} | {r['out']}x{r['in']} | {r['kind']} | {rank} | {r['params']:,} | "
                         f"{1 - r['params'] / dense:.1%} |")
        lines.append("")
    return "\n".join(lines)


def final_compression_report(model: Any, dense_shapes: dict[str, tuple[int, int]], stages: dict[str, Any],
                             config: dict[str, Any], params_model_before: int, seconds: float) -> Any:
    """A CompressionReport describing the exported structure (rankwise.compress's format)."""
    from rankwise.compress import CompressionReport, LayerRecord
    from rankwise.pipeline.structure import layer_table
    from rankwise.surgery import count_parameters

    records = []
    for row in layer_table(model, dense_shapes):
        mod = model.get_submodule(row["fqn"])
        bias = getattr(mod, "bias", None) is not None
        before = row["out"] * row["in"] + (row["out"] if bias else 0)
        records.append(LayerRecord(row["fqn"], row["out"], row["in"], row["rank"], before, row["params"],
                                   row["compensation_rank"], row["kind"] if row["kind"] == "dense" else "factorized"))
    comp = stages.get("compress", {})
    return CompressionReport(
        method=f"shrink:{comp.get('method')}", allocation=str(comp.get("allocation")),
        ratio_requested=float(config["ratio"]), scope="targets", layers=records,
        params_model_before=params_model_before, params_model_after=count_parameters(model),
        calibration=comp.get("calibration", {}),
        options={"pipeline": {k: config[k] for k in ("heal_method", "heal_minutes", "compensation")},
                 "compensation_rank": stages.get("compensate", {}).get("used_rank", 0)},
        seconds=seconds)
