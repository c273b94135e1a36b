"""DoRA (Liu et al., ICML 2024, arXiv 2402.09353; W' = m ⊙ (W + sBA) / ‖W + sBA‖_row):
magnitude init on PEFT's axis, the decomposed forward and merged weight, the detached norm.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import torch
from torch import nn

from rankwise import adapt

LINEARS = ["fc1", "c1d", "conv"]


def test_magnitude_is_the_row_norm(toy):
    weights = {
        "fc1": toy.fc1.weight.detach().clone(),  # (out, in)
        "c1d": toy.c1d.weight.detach().T.clone(),  # Conv1D stores (in, out)
        "conv": toy.conv.weight.detach().flatten(1).clone(),  # (out, C_in*kh*kw)
    }
    adapt.adapt_(toy, "dora", rank=2, target_modules=LINEARS)
    for name, layer in adapt.adapter_layers(toy).items():
        # one norm per output feature, taken over the input axis: ‖W‖_row
        expected = torch.sqrt((weights[name] ** 2).sum(dim=1))
        torch.testing.assert_close(layer.adapter.magnitude.detach(), expected)


def test_trainable_count_adds_out_features(toy):
    adapt.adapt_(toy, "dora", rank=2, target_modules=LINEARS)
    expected = sum(2 * (m + n) + m for m, n in
                   (layer.geometry.shape for layer in adapt.adapter_layers(toy).values()))
    assert adapt.trainable_parameter_count(toy) == expected


def test_forward_and_merged_weight_are_the_decomposed_weight(toy, perturb):
    originals = {n: getattr(toy, n).weight.detach().clone() for n in LINEARS}
    adapt.adapt_(toy, "dora", rank=2, target_modules=LINEARS)
    perturb(toy)
    # reference W' = (m / ‖W + sBA‖_row) ⊙_row (W + sBA) for the Linear layer
    layer = toy.fc1
    m = layer.adapter
    V = originals["fc1"] + m.scale * m.B.detach() @ m.A.detach()
    W_prime = (m.magnitude.detach() / V.norm(dim=1))[:, None] * V
    x = torch.relu(torch.randn(4, 12))
    torch.testing.assert_close(layer(x), nn.functional.linear(x, W_prime, layer.base_layer.bias),
                               rtol=1e-5, atol=1e-6)
    adapt.merge_(toy)
    torch.testing.assert_close(toy.fc1.base_layer.weight, W_prime, rtol=1e-5, atol=1e-6)


def test_magnitude_scales_one_output_feature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    x = torch.randn(3, 5)
    base = model(x)
    adapt.adapt_(model, "dora", rank=2, target_modules=["0"])
    with torch.no_grad():
        model[0].adapter.magnitude[2] *= 2  # B = 0: only W x of feature 2 doubles
    bias = model[0].base_layer.bias
    expected = base.clone()
    expected[:, 2] = 2 * (base[:, 2] - bias[2]) + bias[2]
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_norm_is_detached_from_the_graph():
    """Autograd of our forward equals a hand-written forward with n.detach() (paper §4.3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False)).double()
    adapt.adapt_(model, "dora", rank=2, target_modules=["0"])
    layer = model[0]
    m = layer.adapter
    with torch.no_grad():
        m.B.normal_()
    W = layer.base_layer.weight.detach()
    x = torch.randn(7, 6, dtype=torch.float64)

    def grads(detach: bool):
        A, B, mag = (t.detach().clone().requires_grad_(True) for t in (m.A, m.B, m.magnitude))
        V = W + m.scale * B @ A
        n = V.norm(dim=1)
        n = n.detach() if detach else n
        ((mag / n)[:, None] * V @ x.T).square().sum().backward()
        return A.grad, B.grad, mag.grad

    layer.train()
    model(x).square().sum().backward()
    ours = (m.A.grad, m.B.grad, m.magnitude.grad)
    for o, r in zip(ours, grads(detach=True), strict=True):
        torch.testing.assert_close(o, r)
    assert not torch.allclose(ours[0], grads(detach=False)[0])


def test_dropout_path_recomputes_wx(toy, inputs, perturb):
    """With dropout active the correction term sees the dropped input (PEFT's forward)."""
    adapt.adapt_(toy, "dora", rank=2, dropout=0.3, target_modules=["fc1"])
    perturb(toy)
    layer = toy.fc1
    layer.train()
    x = torch.randn(4, 12)
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    xt = nn.functional.dropout(x, 0.3, training=True)
    m = layer.adapter
    W, b = layer.base_layer.weight, layer.base_layer.bias
    f = m.magnitude / (W + m.scale * m.B @ m.A).norm(dim=1)
    ref = x @ W.T + b + (f - 1) * (xt @ W.T) + f * (m.scale * xt @ m.A.T @ m.B.T)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_magnitude_matches_peft(make_llama):
    import peft

    model = make_llama()
    ref = peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, target_modules=["v_proj"],
                                                            use_dora=True))
    adapt.adapt_(model, "dora", rank=2, target_modules=["v_proj"])
    for name, layer in adapt.adapter_layers(model).items():
        theirs = ref.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(layer.adapter.magnitude.detach(), theirs.detach())


def test_training_after_an_inference_mode_forward(toy):
    """The cached norm of an evaluation under torch.inference_mode must not enter autograd
    (a fine-tune evaluates, then trains on unchanged weights)."""
    adapt.adapt_(toy, "dora", rank=2, target_modules=["fc1"])
    layer, x = toy.fc1, torch.randn(4, 12)
    with torch.inference_mode():
        expected = layer(x)
    got = layer(x)
    got.pow(2).mean().backward()  # raised "Inference tensors cannot be saved for backward"
    torch.testing.assert_close(got.detach(), expected)
    assert layer.adapter.magnitude.grad is not None
