"""PEFT's format in both directions: equal outputs with peft on a tiny Llama built from config."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from rankwise import adapt

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 60, 11], [4, 4, 8, 15, 16, 23, 42, 0]])

PEFT_OPTIONS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def perturb_peft(model, seed: int = 4) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_ours_loads_in_peft_with_equal_outputs(tmp_path, make_llama, perturb, method):
    model = make_llama()
    adapt.adapt_(model, method, rank=4, alpha=6.0, target_modules=TARGETS)
    perturb(model)
    ours = logits(model)
    assert (ours - logits(make_llama())).abs().max() > 0.05  # the adapter matters
    adapt.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] == (method == "dora") and cfg["use_rslora"] == (method == "rslora")
    theirs = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)
    with theirs.disable_adapter():
        torch.testing.assert_close(logits(theirs), logits(make_llama()), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_peft_adapter_loads_in_ours_with_equal_outputs(tmp_path, make_llama, method):
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, **PEFT_OPTIONS[method])
    theirs = peft.get_peft_model(make_llama(), config).eval()
    perturb_peft(theirs)
    assert (logits(theirs) - logits(make_llama())).abs().max() > 0.05
    theirs.save_pretrained(tmp_path)
    model = adapt.import_peft(make_llama(), tmp_path)
    layers = adapt.adapter_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    assert {layer.adapter.preset for layer in layers.values()} == {method}
    torch.testing.assert_close(logits(model), logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pissa_as", ["lora", "pissa"])
def test_our_pissa_in_peft_from_the_original_base(tmp_path, make_llama, perturb, pissa_as):
    model = make_llama()
    adapt.adapt_(model, "pissa", rank=4, alpha=8.0, target_modules=TARGETS)
    perturb(model)
    ours = logits(model)
    adapt.export_peft(model, tmp_path, pissa_as=pissa_as)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    if pissa_as == "lora":  # rank-2r LoRA with α' = 2α: same scale, base untouched
        assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16.0, True)
    else:
        assert cfg["init_lora_weights"] == "pissa"
    theirs = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-4, atol=1e-5)


def test_peft_pissa_loads_in_ours_native_and_converted(tmp_path, make_llama):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    theirs = peft.get_peft_model(make_llama(), config).eval()
    # PEFT's conversion recipe: save the initial adapter (marked as a plain init) before training
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    perturb_peft(theirs)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "native")
    theirs.save_pretrained(
        tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    native = adapt.import_peft(make_llama(), tmp_path / "native")
    assert {layer.adapter.preset for layer in adapt.adapter_layers(native).values()} == {"pissa"}
    torch.testing.assert_close(logits(native), expected, rtol=1e-4, atol=1e-5)
    converted = adapt.import_peft(make_llama(), tmp_path / "lora")
    layer = next(iter(adapt.adapter_layers(converted).values()))
    assert layer.adapter.preset == "lora" and layer.adapter.config.rank == 8
    torch.testing.assert_close(logits(converted), expected, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_round_trip_both_ways(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
        return GPT2LMHeadModel(cfg).eval()

    model = gpt2()
    adapt.adapt_(model, "lora", rank=4, target_modules=["c_attn", "c_proj"])
    with torch.no_grad():
        for layer in adapt.adapter_layers(model).values():
            layer.adapter.B.normal_(std=0.1)
    adapt.export_peft(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"]
    theirs = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = adapt.import_peft(gpt2(), tmp_path / "theirs")
    torch.testing.assert_close(logits(back), logits(model), rtol=1e-5, atol=1e-5)


def test_wrong_base_and_unsupported_adapters_are_clear_errors(tmp_path, make_llama):
    config = peft.LoraConfig(r=4, target_modules=["q_proj"])
    peft.get_peft_model(make_llama(), config).save_pretrained(tmp_path / "a")
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="different base model.*q_proj"):
        adapt.import_peft(wider, tmp_path / "a")
    assert not adapt.adapter_layers(wider)
    ia3 = peft.get_peft_model(make_llama(), peft.IA3Config(target_modules=["q_proj"],
                                                          feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="PEFT 'IA3' adapter"):
        adapt.import_peft(make_llama(), tmp_path / "ia3")
    model = make_llama()
    adapt.adapt_(model, "lora", rank=2, target_modules=["q_proj"])
    adapt.adapt_(model, "dora", rank=2, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="export one kind at a time"):
        adapt.export_peft(model, tmp_path / "mixed")


@pytest.mark.parametrize(
    ("method", "targets"), [("lora", ["emb", "fc1", "c1d", "conv"]), ("dora", ["fc1", "c1d", "conv"])]
)
def test_embedding_conv1d_conv2d_layouts_match_peft(tmp_path, toy, inputs, perturb, method, targets):
    state = {k: v.clone() for k, v in toy.state_dict().items()}

    def fresh():
        model = type(toy)().eval()
        model.load_state_dict(state)
        return model

    adapt.adapt_(toy, method, rank=2, target_modules=targets)
    perturb(toy)
    ours = toy(*inputs)
    adapt.export_peft(toy, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours").eval()
    for a, b in zip(ours, theirs(*inputs), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    back = adapt.import_peft(fresh(), tmp_path / "theirs")
    for a, b in zip(ours, back(*inputs), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ VeRA, AdaLoRA, EVA


def _both_ways(tmp_path, make_llama, model, expect_type):
    """Our adapter -> PEFT's loader (equal logits) -> PEFT's save -> ours (equal logits)."""
    ours = logits(model)
    assert (ours - logits(make_llama())).abs().max() > 0.01  # the adapter matters
    adapt.export_peft(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == expect_type
    theirs = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = adapt.import_peft(make_llama(), tmp_path / "theirs")
    torch.testing.assert_close(logits(back), ours, rtol=1e-5, atol=1e-5)
    return cfg, back


def test_vera_round_trip_through_peft(tmp_path, make_llama, perturb):
    model = make_llama()
    adapt.adapt_(model, "vera", rank=8, projection_prng_key=3, target_modules=TARGETS)
    perturb(model)
    cfg, back = _both_ways(tmp_path, make_llama, model, "VERA")
    assert cfg["projection_prng_key"] == 3 and cfg["save_projection"]
    assert {layer.adapter.preset for layer in adapt.adapter_layers(back).values()} == {"vera"}


def test_peft_vera_with_a_foreign_basis_is_refused(tmp_path, make_llama):
    theirs = peft.get_peft_model(make_llama(), peft.VeraConfig(r=8, target_modules=TARGETS))
    with torch.no_grad():
        theirs.base_model.vera_A["default"].add_(1.0)  # no longer the key's draw
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not PEFT's draw"):
        adapt.import_peft(make_llama(), tmp_path)


def test_adalora_round_trip_through_peft(tmp_path, make_llama, perturb):
    model = make_llama()
    adapt.adapt_(model, "adalora", rank=6, target_rank=3, alpha=4.0, total_step=10,
                 target_modules=TARGETS)
    perturb(model)
    with torch.no_grad():  # a budgeted adapter: two triplets of one layer masked
        next(iter(adapt.adapter_layers(model).values())).adapter.E[:2] = 0.0
    cfg, back = _both_ways(tmp_path, make_llama, model, "ADALORA")
    assert cfg["init_r"] == 6 and cfg["lora_alpha"] == 4.0


def test_peft_adalora_after_budgeting_loads_in_ours(tmp_path, make_llama):
    config = peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=4, total_step=10,
                                target_modules=TARGETS)
    theirs = peft.get_peft_model(make_llama(), config).eval()
    perturb_peft(theirs)
    key = next(n for n, _ in theirs.named_parameters() if "lora_E" in n)
    mask = [True, False, True, True, False, True]
    theirs.peft_config["default"].rank_pattern = {
        key.removeprefix("base_model.model."): mask}  # what update_and_allocate leaves
    with torch.no_grad():
        dict(theirs.named_parameters())[key][[1, 4]] = 0.0
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert any(sum(v) == 4 for v in saved["rank_pattern"].values())  # tensors stored at rank 4
    model = adapt.import_peft(make_llama(), tmp_path)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_eva_exports_as_peft_eva_with_rank_and_alpha_patterns(tmp_path, make_llama, perturb):
    model = make_llama()
    data = [{"input_ids": IDS}]
    adapt.adapt_(model, "eva", rank=4, alpha=8.0, rho=2.0, target_modules=TARGETS, data=data)
    perturb(model)
    ranks = {f: lay.adapter.eva_rank for f, lay in adapt.adapter_layers(model).items()}
    assert len(set(ranks.values())) > 1  # the ranks were redistributed
    cfg, back = _both_ways(tmp_path, make_llama, model, "LORA")
    assert cfg["init_lora_weights"] == "eva"
    nonzero = {f: r for f, r in ranks.items() if r}
    for fqn, layer in adapt.adapter_layers(back).items():
        assert layer.adapter.config.rank == nonzero[fqn]
