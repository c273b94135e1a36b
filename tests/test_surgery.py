"""Tests for rankwise.surgery: PEFT-compatible matching, swaps, shapes, parameter/FLOP counts."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise import surgery

D, FF, VOCAB, LAYERS = 16, 24, 50, 2


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        scores = (q @ k.transpose(-1, -2)) / D**0.5
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return self.o_proj(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.down_proj, self.act = nn.Linear(FF, D, bias=False), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.self_attn, self.norm2, self.mlp = (
            nn.LayerNorm(D),
            Attn(),
            nn.LayerNorm(D),
            MLP(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyLM(nn.Module):
    """Llama-shaped toy: q/k/v/o, gate/up/down, lm_head tied to the input embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return types.SimpleNamespace(logits=logits, loss=loss)


PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _names(found: dict) -> list[str]:
    return list(found)


def test_suffix_list_matches_on_dot_boundary() -> None:
    model = ToyLM()
    found = surgery.find_modules(model, ["q_proj", "mlp.down_proj"])
    assert _names(found) == [
        "layers.0.self_attn.q_proj",
        "layers.0.mlp.down_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.mlp.down_proj",
    ]
    assert all(found[n] is model.get_submodule(n) for n in found)
    # "proj" is not a dot-boundary suffix of "q_proj": nothing matches, so it is an error
    with pytest.raises(ValueError, match="'proj' matched no module"):
        surgery.find_modules(model, ["proj"])


def test_regex_is_full_match_and_glob_sweeps() -> None:
    model = ToyLM()
    assert _names(surgery.find_modules(model, r"layers\.1\..*_proj")) == [
        f"layers.1.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}" for p in PROJ
    ]
    # full match: a bare name as a str regex matches only a top-level module of that name
    with pytest.raises(
        ValueError, match=r"'q_proj' matched no module.*layers\.0\.self_attn\.q_proj"
    ):
        surgery.find_modules(model, "q_proj")
    # glob: the parameter-free act (SiLU) it also passes over is skipped, not an error
    assert _names(surgery.find_modules(model, ["*.mlp.*"])) == [
        f"layers.{i}.mlp.{p}" for i in range(LAYERS) for p in PROJ[4:]
    ]
    assert _names(surgery.find_modules(model, ["layers.0.*_proj"])) == [
        n for n in surgery.find_modules(model, "all-linear") if n.startswith("layers.0.")
    ]


def test_all_linear_excludes_tied_head_and_exclude_works() -> None:
    model = ToyLM()
    found = surgery.find_modules(model, "all-linear")
    assert _names(found) == [
        f"layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}"
        for i in range(LAYERS)
        for p in PROJ
    ]
    assert surgery.find_modules(model) == found  # None: every linear but the head
    # a head under another name is recognised by its tie to the input embedding
    model.out = model.lm_head
    del model.lm_head
    assert "out" not in surgery.find_modules(model, "all-linear")
    kept = surgery.find_modules(model, "all-linear", exclude=["o_proj", "layers.1.mlp.up_proj"])
    assert len(kept) == len(found) - 3
    assert not any(n.endswith("o_proj") for n in kept)


def test_errors_name_the_problem() -> None:
    model = ToyLM()
    with pytest.raises(TypeError, match="'layers.0.mlp', a MLP.*layers.0.mlp.gate_proj"):
        surgery.find_modules(model, ["layers.0.mlp"])
    with pytest.raises(TypeError, match="LayerNorm"):
        surgery.find_modules(model, ["norm1"])
    with pytest.raises(TypeError, match="LayerNorm"):
        surgery.find_modules(model, r".*norm\d")  # a regex that finds only unsupported modules
    with pytest.raises(ValueError, match="not a valid regular expression.*pass a list"):
        surgery.find_modules(model, "*.mlp.*")
    with pytest.raises(ValueError, match="removed every selected module"):
        surgery.find_modules(model, ["q_proj"], exclude=["q_proj"])
    found = surgery.find_modules(model, ["embed_tokens"], types=(nn.Embedding,))
    assert list(found) == ["embed_tokens"]


def test_matching_agrees_with_peft() -> None:
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    model = ToyLM()
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    patterns = [
        ["q_proj"],
        ["q_proj", "v_proj"],
        ["mlp.up_proj", "o_proj"],
        ["layers.1.self_attn.k_proj"],
        r".*\.(q|v)_proj",
        r"layers\.0\..*",
    ]
    for pattern in patterns:
        config = peft.LoraConfig(target_modules=pattern)
        expected = [n for n in linear if check_target_module_exists(config, n)]
        assert _names(surgery.find_modules(model, pattern)) == expected, pattern
    config = peft.LoraConfig(
        target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"]
    )
    expected = [n for n in linear if check_target_module_exists(config, n) is True]
    got = surgery.find_modules(model, ["q_proj", "v_proj"], exclude=["layers.0.self_attn.v_proj"])
    assert _names(got) == expected


def test_replace_and_restore_give_identical_outputs() -> None:
    model = ToyLM().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    before = model(ids).logits
    name = "layers.1.mlp.down_proj"
    old = model.get_submodule(name)
    # an exact full-rank factorisation B @ A of the weight keeps the output (up to rounding)
    factored = nn.Sequential(nn.Linear(FF, FF, bias=False), nn.Linear(FF, D, bias=False))
    with torch.no_grad():
        factored[0].weight.copy_(torch.eye(FF))
        factored[1].weight.copy_(old.weight)
    with surgery.replaced(model, {name: factored}) as swap:
        assert model.get_submodule(name) is factored and swap.originals[name] is old
        torch.testing.assert_close(model(ids).logits, before)
    assert model.get_submodule(name) is old
    assert torch.equal(model(ids).logits, before)

    # restored even when the block raises; ModuleList children swap by index
    with (
        pytest.raises(RuntimeError, match="boom"),
        surgery.ModuleSwap(model, {"layers.0": nn.Identity()}),
    ):
        assert isinstance(model.layers[0], nn.Identity)
        raise RuntimeError("boom")
    assert isinstance(model.layers[0], Block)
    assert torch.equal(model(ids).logits, before)

    originals = {
        n: surgery.replace_module(model, n, nn.Identity()) for n in ["norm", "layers.1.norm1"]
    }
    assert not torch.equal(model(ids).logits, before)
    surgery.restore(model, originals)
    assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="no submodule 'layers.0.mlp.gate'"):
        surgery.replace_module(model, "layers.0.mlp.gate", nn.Identity())


def test_shapes_and_weight_views_for_each_type() -> None:
    from transformers.pytorch_utils import Conv1D

    x = torch.randn(5, 7)
    conv1d = Conv1D(nf=3, nx=7)  # weight stored (in=7, out=3)
    nn.init.normal_(conv1d.weight)
    assert conv1d.weight.shape == (7, 3)
    assert surgery.linear_shape(conv1d) == (3, 7)
    w = surgery.weight_as_matrix(conv1d)
    assert w.shape == (3, 7) and w.data_ptr() == conv1d.weight.data_ptr()
    torch.testing.assert_close(x @ w.T + conv1d.bias, conv1d(x))

    emb = nn.Embedding(11, 4)
    assert surgery.linear_shape(emb) == (4, 11)
    idx = torch.tensor([3, 0, 10])
    torch.testing.assert_close(
        (surgery.weight_as_matrix(emb) @ F.one_hot(idx, 11).float().T).T, emb(idx)
    )

    conv = nn.Conv2d(3, 5, kernel_size=(2, 3), bias=False)
    assert surgery.linear_shape(conv) == (5, 18)
    img = torch.randn(1, 3, 6, 6)
    patches = F.unfold(img, (2, 3))  # (1, 18, L)
    out = (surgery.weight_as_matrix(conv) @ patches).reshape(1, 5, 5, 4)
    torch.testing.assert_close(out, conv(img))
    with pytest.raises(TypeError, match="LayerNorm is not a weight matrix"):
        surgery.linear_shape(nn.LayerNorm(3))


def test_parameter_counts_by_hand() -> None:
    model = ToyLM()
    per_layer = 4 * (D * D + D) + 3 * D * FF + 2 * 2 * D  # attn (bias), mlp, two LayerNorms
    expected = VOCAB * D + LAYERS * per_layer + 2 * D  # tied head counted once; final norm
    assert surgery.count_parameters(model) == expected
    for p in model.layers.parameters():
        p.requires_grad_(False)
    assert surgery.count_parameters(model, trainable_only=True) == VOCAB * D + 2 * D
    report = surgery.parameter_report(model)
    assert report["total"] == expected and report["frozen"] == LAYERS * per_layer
    assert sum(report["by_type"].values()) == expected
    assert report["by_type"]["Embedding"] == VOCAB * D
    assert report["by_type"]["Linear"] == LAYERS * (4 * (D * D + D) + 3 * D * FF)


def test_linear_flops_match_flop_counter() -> None:
    model = ToyLM().eval()
    ids = torch.randint(0, VOCAB, (3, 5))
    by_op = surgery.forward_flops(model, ids, by_operator=True)
    linear_ops = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
    assert surgery.count_linear_flops(model, ids.numel()) == linear_ops
    hand = 2 * ids.numel() * (LAYERS * (4 * D * D + 3 * D * FF) + D * VOCAB)
    assert linear_ops == hand
    assert surgery.forward_flops(model, ids) == sum(by_op.values())  # attention bmm on top
    # a factorised layer is walked through its two Linears: 2 r (m + n) per token
    rank = 3
    factored = nn.Sequential(nn.Linear(D, rank, bias=False), nn.Linear(rank, FF))
    assert surgery.count_linear_flops(factored, 10) == 10 * 2 * rank * (D + FF)
    assert surgery.forward_flops(factored, torch.randn(10, D)) == 10 * 2 * rank * (D + FF)


def test_tiny_hugging_face_llama_and_gpt2() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.pytorch_utils import Conv1D

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    ).eval()
    found = surgery.find_modules(llama, "all-linear")
    assert len(found) == 2 * 7 and "lm_head" not in found
    assert surgery.linear_shape(found["model.layers.0.self_attn.k_proj"]) == (16, 32)  # GQA
    assert surgery.count_parameters(llama) == sum(p.numel() for p in llama.parameters())
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        copy.deepcopy(llama), peft.LoraConfig(target_modules="all-linear", r=2)
    )
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_names = sorted(
        n.removeprefix("base_model.model.")
        for n, m in wrapped.named_modules()
        if isinstance(m, BaseTunerLayer)
    )
    assert sorted(found) == peft_names

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64)
    ).eval()
    found = surgery.find_modules(gpt2, ["c_attn", "c_fc"])
    assert all(isinstance(m, Conv1D) for m in found.values())
    assert surgery.linear_shape(found["transformer.h.0.attn.c_attn"]) == (96, 32)
    assert surgery.linear_shape(found["transformer.h.1.mlp.c_fc"]) == (128, 32)
    assert "lm_head" not in surgery.find_modules(gpt2, "all-linear")
    ids = torch.randint(0, 64, (2, 6))
    by_op = surgery.forward_flops(gpt2, ids, by_operator=True)
    assert surgery.count_linear_flops(gpt2, ids.numel()) == by_op.get("aten.mm", 0) + by_op.get(
        "aten.addmm", 0
    )
