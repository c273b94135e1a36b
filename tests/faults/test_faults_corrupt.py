"""Loads that trust bytes: corrupt, truncated and tampered files give one clear error naming
the file, before anything large is allocated; never NaN logits or a raw TypeError."""

from __future__ import annotations

import json

import pytest
import torch
from fault_harness import compressed_llama, tiny_llama


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from rankwise.compress import save_compressed

    out = tmp_path_factory.mktemp("saved") / "model"
    save_compressed(compressed_llama(0), out)
    return out


@pytest.fixture
def model_copy(saved_model, tmp_path):
    import shutil

    return shutil.copytree(saved_model, tmp_path / "model")


def test_overwritten_tensor_bytes_are_caught_by_the_checksum(model_copy):
    """The failure of the issue: 4 KB of overwritten tensor data loaded silently as NaN logits."""
    from rankwise.compress import load_compressed

    path = model_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4096:] = b"\xff" * 4096  # NaN bit patterns in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the checksum"):
        load_compressed(model_copy)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_truncated_file_is_named(model_copy, name):
    from rankwise.compress import load_compressed

    path = model_copy / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_compressed(model_copy)


def test_missing_file_is_named(model_copy):
    from rankwise.compress import load_compressed

    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors is missing"):
        load_compressed(model_copy)


def _tamper(meta, how):
    layer = next(iter(meta["layers"]))
    if how == "root-list":
        return [meta]
    if how == "layers-list":
        meta["layers"] = list(meta["layers"].values())
    elif how == "spec-list":
        meta["layers"][layer] = [1, 2]
    elif how == "rank-8192":
        meta["layers"][layer]["rank"] = 8192
    elif how == "rank-str":
        meta["layers"][layer]["rank"] = "8"
    elif how == "rank-zero":
        meta["layers"][layer]["rank"] = 0
    elif how == "in-huge":
        meta["layers"][layer]["in"] = 10**7
        meta["layers"][layer]["rank"] = 10**6
    elif how == "bias-str":
        meta["layers"][layer]["bias"] = "yes"
    elif how == "type-unknown":
        meta["layers"][layer]["type"] = "sparse"
    elif how == "no-such-layer":
        meta["layers"]["model.nowhere.proj"] = meta["layers"][layer]
    elif how == "dtype":
        meta["dtype"] = "complex128"
    elif how == "tied-list":
        meta["tied"] = ["a", "b"]
    elif how == "files-list":
        meta["files"] = ["model.safetensors"]
    elif how == "files-escape":
        meta["files"] = {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}
    elif how == "architecture-int":
        meta["architecture"] = 3
    elif how == "format":
        meta["format"] = 99
    return meta


TAMPERS = ["root-list", "layers-list", "spec-list", "rank-8192", "rank-str", "rank-zero", "in-huge",
           "bias-str", "type-unknown", "no-such-layer", "dtype", "tied-list", "files-list", "files-escape",
           "architecture-int", "format"]


@pytest.mark.parametrize("how", TAMPERS)
def test_tampered_marker_gives_a_clear_error_before_allocation(model_copy, how, monkeypatch):
    """Every tampered variant raises ValueError naming the marker before any layer is built or
    any tensor is read (the issue saw 504 MB allocated before a shape check)."""
    from rankwise.compress import load_compressed, saving

    def forbidden(*args, **kwargs):
        raise AssertionError("allocated a layer before the marker was validated")

    monkeypatch.setattr(saving, "_empty_layer", forbidden)
    monkeypatch.setattr("rankwise.io.load_tensors", forbidden)
    marker = model_copy / "rankwise_compression.json"
    marker.write_text(json.dumps(_tamper(json.loads(marker.read_text()), how)))
    with pytest.raises(ValueError, match=r"rankwise_compression\.json|passwd"):
        load_compressed(model_copy)


def _saved_adapter(tmp_path):
    from rankwise import adapt

    model = tiny_llama(0)
    adapt.adapt_(model, "lora", rank=2, target_modules=["q_proj"])
    return adapt.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("how", ["layers-list", "spec-list", "rank-8192", "rank-str", "shape-str",
                                 "config-list", "method-int", "files-tampered", "version-str"])
def test_tampered_adapter_config_gives_a_clear_error(tmp_path, how):
    from rankwise import adapt

    out = _saved_adapter(tmp_path)
    path = out / "rankwise_adapter.json"
    cfg = json.loads(path.read_text())
    layer = next(iter(cfg["layers"]))
    spec = cfg["layers"][layer]
    if how == "layers-list":
        cfg["layers"] = [spec]
    elif how == "spec-list":
        cfg["layers"][layer] = [spec]
    elif how == "rank-8192":
        spec["config"]["rank"] = 8192
    elif how == "rank-str":
        spec["config"]["rank"] = "2"
    elif how == "shape-str":
        spec["shape"] = "32x32"
    elif how == "config-list":
        spec["config"] = [2]
    elif how == "method-int":
        spec["method"] = 7
    elif how == "files-tampered":
        cfg["files"]["rankwise_adapter.safetensors"]["sha256"] = "0" * 64
    elif how == "version-str":
        cfg["version"] = "1"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rankwise_adapter|adapter .*adapter"):
        adapt.load_adapter(tiny_llama(0), out)


def test_flipped_adapter_tensor_byte_is_caught(tmp_path):
    from rankwise import adapt

    out = _saved_adapter(tmp_path)
    path = out / "rankwise_adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"rankwise_adapter\.safetensors does not match the checksum"):
        adapt.load_adapter(tiny_llama(0), out)


def test_flipped_peft_export_byte_is_caught(tmp_path):
    from rankwise import adapt

    model = tiny_llama(0)
    adapt.adapt_(model, "lora", rank=2, target_modules=["q_proj"])
    out = adapt.export_peft(model, tmp_path / "peft")
    path = out / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors does not match"):
        adapt.import_peft(tiny_llama(0), out)


def _checkpoints(tmp_path, steps=(1, 2)):
    from rankwise.train.checkpoint import save_checkpoint

    model = tiny_llama(0, layers=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Config:
        method = "full"

        def to_dict(self):
            return {"method": "full"}

    for step in steps:
        save_checkpoint(tmp_path, step=step, model=model, optimizer=opt, schedules=None, config=Config(), keep=3)
    return tmp_path / "checkpoints"


def test_tampered_checkpoint_step_is_detected(tmp_path):
    """Editing `step` in state.json (same length, so only the checksum can tell)."""
    from rankwise.train.checkpoint import latest_checkpoint, read_checkpoint_meta

    _checkpoints(tmp_path)
    path = latest_checkpoint(tmp_path) / "state.json"
    text = path.read_text()
    assert '"step": 2' in text
    path.write_text(text.replace('"step": 2', '"step": 9'))
    with pytest.raises(ValueError, match=r"state\.json does not match the checksum.*delete it to resume from the previous"):
        read_checkpoint_meta(path.parent)


def test_half_deleted_checkpoint_is_not_counted_and_resume_falls_back(tmp_path):
    """An rmtree interrupted half-way (a file gone) must not pass for a complete checkpoint."""
    from rankwise.train.checkpoint import checkpoint_dirs, checkpoint_to_resume

    root = _checkpoints(tmp_path)
    (root / "step-000002" / "model.safetensors").unlink()
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [1]
    assert checkpoint_to_resume(tmp_path, True).name == "step-000001"


def test_calibration_ids_beyond_the_vocabulary_are_refused_before_work():
    from rankwise.compress import compress_

    model = tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 96, (8, 24))
    ids[3, 5] = 500
    with pytest.raises(ValueError, match=r"vocabulary is \[0, 96\).*model's own"):
        compress_(model, "svd-llm", 0.2, calibration=ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_tokenizer_larger_than_the_vocabulary_gives_a_clear_error():
    """Calibration text tokenised by a tokenizer with ids beyond the model's vocabulary (a
    mismatched tokenizer): ValueError naming the fix, not a raw IndexError, model unchanged."""
    from rankwise.compress import compress_
    from rankwise.models import load_tokenizer

    model = tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"outside the model's vocabulary.*own tokenizer"):
        compress_(model, "svd-llm", 0.2, tokenizer=load_tokenizer("minilm-l6"), n_samples=4, seq_len=32,
                  progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tokenizer_files_may_be_edited_but_the_config_may_not(tmp_path):
    """Loaders check what they read: a chat template added to the tokenizer config is fine; an
    edited config.json (it decides the architecture) is caught."""
    from rankwise.compress import load_compressed, save_compressed
    from rankwise.models import load_tokenizer

    out = save_compressed(compressed_llama(0), tmp_path / "m", tokenizer=load_tokenizer("minilm-l6"))
    tok_cfg = out / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg["chat_template"] = "{{ messages }}"
    tok_cfg.write_text(json.dumps(cfg))
    load_compressed(out)
    config = out / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 32', '"hidden_size": 64'))
    with pytest.raises(ValueError, match=r"config\.json does not match the checksum"):
        load_compressed(out)
