"""Write a synthetic Llama (random weights) as sharded safetensors, for scale tests.

    python scripts/make_synthetic_llama.py --out /tmp/synthetic-llama-1b

Default shapes are TinyLlama-1.1B's (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 key/value heads, vocab 32000, untied head): 1.10 B parameters, 2.2 GB in bf16. Weights are
N(0, 0.02^2) (norm weights 1), generated and written a few layers at a time, so the script
itself never holds more than one shard. Quality is not the point: this model exercises memory
and time of the streaming compressor (benchmarks/scale.py) on a model that would need 4.4 GB in
float32 if resident. No tokenizer is written; calibrate with random input_ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _layer_shapes(h: int, ff: int, heads: int, kv: int) -> dict[str, tuple[int, ...]]:
    d = h // heads
    return {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * d, h), "self_attn.k_proj.weight": (kv * d, h),
        "self_attn.v_proj.weight": (kv * d, h), "self_attn.o_proj.weight": (h, heads * d),
        "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--layers-per-shard", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    config.architectures = ["LlamaForCausalLM"]
    config.to_json_file(str(args.out / "config.json"))

    def tensor(shape: tuple[int, ...], name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        return (0.02 * torch.randn(shape, generator=gen)).to(dtype)

    groups: list[list[str]] = [["model.embed_tokens.weight"]]
    shapes = {"model.embed_tokens.weight": (args.vocab, args.hidden)}
    for i in range(args.layers):
        if i % args.layers_per_shard == 0:
            groups.append([])
        for k, s in _layer_shapes(args.hidden, args.intermediate, args.heads, args.kv_heads).items():
            shapes[f"model.layers.{i}.{k}"] = s
            groups[-1].append(f"model.layers.{i}.{k}")
    groups.append(["model.norm.weight", "lm_head.weight"])
    shapes |= {"model.norm.weight": (args.hidden,), "lm_head.weight": (args.vocab, args.hidden)}
    weight_map, total, n = {}, 0, len(groups)
    for j, names in enumerate(groups):
        file = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        shard = {k: tensor(shapes[k], k) for k in names}
        save_file(shard, str(args.out / file), metadata={"format": "pt"})
        total += sum(t.numel() for t in shard.values())
        weight_map |= dict.fromkeys(names, file)
        print(f"wrote {file} ({len(names)} tensors)", file=sys.stderr)
        del shard
    index = {"metadata": {"total_size": total * torch.empty((), dtype=dtype).element_size()},
             "weight_map": weight_map}
    (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(json.dumps({"out": str(args.out), "params": total, "dtype": args.dtype}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
