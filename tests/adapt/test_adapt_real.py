"""LoRA on a real pretrained model (all-MiniLM-L6-v2): trainable count and the no-op at init."""

from __future__ import annotations

import pytest
import torch

from rankwise import adapt


@pytest.mark.real_model
def test_minilm_query_value_lora():
    import rankwise

    model = rankwise.load_model("minilm-l6").eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2023, 2003, 2178, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if n.endswith(("attention.self.query", "attention.self.value"))}
    assert len(shapes) == 12  # 6 layers x (query, value)
    adapt.adapt_(model, "lora", rank=8, target_modules=["query", "value"])
    assert set(adapt.adapter_layers(model)) == set(shapes)
    expected = sum(8 * (m + n) for m, n in shapes.values())  # r (m + n) per layer
    assert adapt.trainable_parameter_count(model) == expected == 12 * 8 * (384 + 384)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-6, atol=0)
