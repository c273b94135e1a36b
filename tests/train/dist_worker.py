"""Worker for the multi-process tests: run by ``torchrun --nproc_per_node N`` (or in-process with
N = 1), it trains the tiny scenarios of test_distributed.py and rank 0 writes each outcome to
OUT/<scenario>.json. Every scenario uses a fixed global batch, so N = 1 and N = 2 must agree.

    python -m torch.distributed.run --nproc_per_node 2 tests/train/dist_worker.py OUT SCENARIO...
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

V, L = 64, 16
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 64}


def pretrain_data():
    from rankwise.train.data import PretrainData

    gen = torch.Generator().manual_seed(0)
    sentences = torch.randint(4, V, (8, 12), generator=gen)
    stream = sentences[torch.randint(0, 8, (400,), generator=gen)].reshape(-1)
    train = stream[: stream.numel() // L * L].view(-1, L)
    val = sentences[torch.randint(0, 8, (20,), generator=gen)].reshape(-1)
    return PretrainData(train, val, V)


def pretrain_config(out: Path, **kw):
    from rankwise.train.config import PretrainConfig

    base = {"model_overrides": TINY, "steps": 6, "seq_len": L, "batch_size": 4, "eval_every": 3,
            "progress": False, "export": False, "out": str(out), "save_every": 2}
    return PretrainConfig(**{**base, **kw})


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64))


def lm_data():
    from rankwise.finetune import LMData

    g = torch.Generator().manual_seed(0)
    return LMData(torch.randint(0, V, (24, 12), generator=g), torch.randint(0, V, (48,), generator=g))


def run_pretrain(out: Path, method: str, **kw) -> dict:
    from rankwise.train.loop import pretrain

    r = pretrain(pretrain_config(out, method=method, **kw), data=pretrain_data(), resume=False)
    return {"losses": r.losses, "val": r.val, "steps": r.steps, "processes": r.processes}


def scenario(name: str, root: Path) -> dict:
    from rankwise.train import dist

    out = root / name
    if name in ("pretrain_full", "pretrain_galore", "pretrain_sltrain"):
        return run_pretrain(out, name.split("_")[1])
    if name == "pretrain_fsdp":
        return run_pretrain(out, "galore", fsdp=dist.world_size() > 1)
    if name == "pretrain_fsdp_stop":  # a sharded checkpoint at step 2 for a 1-process resume
        return run_pretrain(out, "galore", fsdp=dist.world_size() > 1, stop_after=2)
    if name.startswith("pretrain_") and name.endswith("_resume"):  # stop at 2, resume
        from rankwise.train.loop import pretrain

        method = {"pretrain_resume": "full", "pretrain_fsdp_resume": "galore",
                  "pretrain_fsdp_full_resume": "full"}[name]
        kw = {"method": method, "fsdp": "fsdp" in name and dist.world_size() > 1}
        pretrain(pretrain_config(out, stop_after=2, **kw), data=pretrain_data())
        r = pretrain(pretrain_config(out, **kw), data=pretrain_data(), resume=True)
        return {"losses": r.losses, "resumed_from": r.resumed_from}
    if name == "finetune":
        from rankwise.finetune import FinetuneConfig, finetune

        cfg = FinetuneConfig(model="tiny", task="python-docs", rank=2, steps=4, batch_size=4,
                             seq_len=12, lr=1e-2, warmup_steps=1, eval_every=2, progress=False,
                             out=str(out), save_every=2)
        r = finetune(cfg, base=tiny_llama(), data=lm_data())
        return {"losses": r.history["losses"], "evals": r.history["evals"], "steps": r.steps}
    if name.startswith("finetune_full"):  # full fine-tuning, GaLore, FSDP2 on several ranks
        from rankwise.finetune import FinetuneConfig, finetune

        kw = {"model": "tiny", "task": "python-docs", "method": "full", "rank": 4, "steps": 4,
              "batch_size": 4, "seq_len": 12, "lr": 1e-2, "warmup_steps": 1, "eval_every": 2,
              "progress": False, "out": str(out), "save_every": 2, "optimizer": "galore_adamw",
              "fsdp": dist.world_size() > 1}
        if name.endswith("resume"):
            finetune(FinetuneConfig(**kw, stop_after=2), base=tiny_llama(), data=lm_data())
        r = finetune(FinetuneConfig(**kw), base=tiny_llama(), data=lm_data(),
                     resume=name.endswith("resume"))
        return {"losses": r.history["losses"], "steps": r.steps, "resumed_from": r.resumed_from,
                "files": sorted(p.name for p in out.iterdir())}
    if name == "heal":
        from rankwise.compress import compress_
        from rankwise.pipeline import heal_

        model = tiny_llama()
        compress_(model, "lord", 0.3, progress=False)
        stream = torch.randint(0, V, (2048,), generator=torch.Generator().manual_seed(1))
        r = heal_(model, stream, method="lowrank", minutes=0, max_steps=4, batch_size=4,
                  seq_len=16, lr=1e-3)
        return {"losses": [c[2] for c in r.curve], "steps": r.steps}
    if name == "interrupt":  # SIGINT on the last rank only, in the middle of step index 2
        from rankwise.finetune import FinetuneConfig, finetune, loop

        real = loop.task_batch

        def batch(data, step, *args):
            if step == 2 and dist.rank() == dist.world_size() - 1:
                signal.raise_signal(signal.SIGINT)
            return real(data, step, *args)

        loop.task_batch = batch
        cfg = FinetuneConfig(model="tiny", task="python-docs", rank=2, steps=6, batch_size=4,
                             seq_len=12, lr=1e-2, eval_every=3, progress=False, out=str(out))
        r = finetune(cfg, base=tiny_llama(), data=lm_data())
        loop.task_batch = real
        return {"steps": r.steps, "interrupted": r.interrupted,
                "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir())}
    raise ValueError(f"unknown scenario {name}")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    root, names = Path(argv[0]), argv[1:]
    from rankwise.train import dist

    dist.init()
    for name in names:
        record = scenario(name, root)
        record["rank_results"] = dist.gather_tensors(torch.tensor([record.get("steps", 0)]))
        record["rank_results"] = [int(t) for t in record["rank_results"]]
        if dist.is_main():
            (root / f"{name}.json").write_text(json.dumps(record))
        dist.barrier()
    if dist.active():
        import torch.distributed as tdist

        tdist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    main(sys.argv[1:])
