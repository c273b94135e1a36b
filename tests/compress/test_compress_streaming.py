"""Streaming compression equals in-memory compression (same ranks, same weights, same outputs)."""

from __future__ import annotations

import json

import pytest
import torch
from compress_models import tiny_llama

from rankwise.compress import (
    compensate_,
    compensate_streaming,
    compress_,
    compress_streaming,
    save_compressed,
)
from rankwise.io import load_tensors


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src"
    tiny_llama(layers=3).save_pretrained(path)
    return path


def _same_directory(a, b, *, rtol=0.0, atol=0.0):
    ta, tb = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=rtol, atol=atol, msg=k)
    ma, mb = (json.loads((d / "rankwise_compression.json").read_text()) for d in (a, b))
    assert ma["layers"] == mb["layers"] and ma["tied"] == mb["tied"] and ma["dtype"] == mb["dtype"]
    # the same promises as save_compressed: checksums of every file, a config plain
    # transformers refuses (naming rankwise.load_model)
    assert set(mb["files"]) >= {"model.safetensors", "config.json"}
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert cb["model_type"] == ca["model_type"] and "rankwise.load_model" in cb["model_type"]


@pytest.mark.parametrize("method, options", [
    ("svd_llm", {}),
    ("svd_llm", {"allocation": "welore"}),         # needs every spectrum: a first streaming pass
    ("svd_llm_seq", {"update_target": "original"}),  # propagates through compressed blocks
    ("afm", {"allocation": "dynamic"}),
    ("lord", {"compensation_rank": 2}),
])
def test_streaming_equals_in_memory(tmp_path, source, calib_ids, method, options):
    import rankwise

    dense = tiny_llama(layers=3)
    ref = compress_(dense, method, 0.3, calibration=calib_ids, progress=False, **options)
    save_compressed(dense, tmp_path / "mem", report=ref)
    got = compress_streaming(source, tmp_path / "stream", method, 0.3, calibration=calib_ids,
                             device="cpu", progress=False, **options)
    assert [r.rank for r in got.layers] == [r.rank for r in ref.layers]
    assert got.params_model_after == ref.params_model_after
    assert len(got.options["streaming"]["block_seconds"]) == 3
    _same_directory(tmp_path / "mem", tmp_path / "stream")
    reloaded = rankwise.load_model(tmp_path / "stream")  # loads as any compressed directory
    torch.testing.assert_close(reloaded(calib_ids[:2]).logits, dense(calib_ids[:2]).logits,
                               rtol=1e-5, atol=1e-5)


def test_streamed_directory_checks_its_bytes(tmp_path, source, calib_ids):
    import rankwise

    compress_streaming(source, tmp_path / "s", "svd_llm", 0.3, calibration=calib_ids,
                       progress=False)
    weights = tmp_path / "s" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # overwrite tensor bytes, keep the header valid
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        rankwise.load_model(tmp_path / "s")


@pytest.mark.parametrize("sequential", [False, True])
def test_compensate_streaming_equals_in_memory(tmp_path, source, calib_ids, sequential):
    dense = tiny_llama(layers=3)
    ref = compensate_(dense, "int4", 4, calibration=calib_ids, sequential=sequential, progress=False)
    save_compressed(dense, tmp_path / "mem", report=ref)
    compensate_streaming(source, tmp_path / "stream", "int4", 4, calibration=calib_ids,
                         sequential=sequential, progress=False)
    _same_directory(tmp_path / "mem", tmp_path / "stream")


def test_streaming_refuses_what_it_cannot_do(tmp_path, source, calib_ids):
    with pytest.raises(ValueError, match="cannot stream.*backward pass"):
        compress_streaming(source, tmp_path / "o", "fwsvd", 0.3, calibration=calib_ids)
    with pytest.raises(ValueError, match="cannot stream.*svd_llm_seq"):
        compress_streaming(source, tmp_path / "o", "svd-llm-update", 0.3, calibration=calib_ids)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a compressed model directory"):
        compress_streaming(source, tmp_path / "busy", "lord", 0.3)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_streaming_frees_each_block(tmp_path, source, calib_ids, monkeypatch):
    """At most one block holds real weights at any time (the rest stay on the meta device)."""
    from rankwise.compress import sequential

    seen = []
    real = sequential.run_blockwise

    def spy(model, batches, targets, on_block, **kw):
        blocks = sequential.find_blocks(model, targets)[1]

        def watch(i, stats):
            seen.append([j for j, b in enumerate(blocks)
                         if any(p.device.type != "meta" for p in b.parameters())])
            on_block(i, stats)

        return real(model, batches, targets, watch, **kw)

    monkeypatch.setattr(sequential, "run_blockwise", spy)
    compress_streaming(source, tmp_path / "o", "svd_llm", 0.3, calibration=calib_ids, progress=False)
    assert seen == [[0], [1], [2]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_onto_cuda_matches_cpu(tmp_path, source, calib_ids):
    dense = tiny_llama(layers=3)
    ref = compress_(dense, "svd_llm", 0.3, calibration=calib_ids, progress=False)
    save_compressed(dense, tmp_path / "mem", report=ref)
    got = compress_streaming(source, tmp_path / "gpu", "svd_llm", 0.3, calibration=calib_ids,
                             device="cuda", progress=False)
    assert got.options["streaming"]["device"].startswith("cuda")
    assert [r.rank for r in got.layers] == [r.rank for r in ref.layers]
    _same_directory(tmp_path / "mem", tmp_path / "gpu", rtol=1e-3, atol=1e-4)


@pytest.mark.real_model
def test_streaming_equals_in_memory_on_smollm2(tmp_path):
    """Real weights, shapes and tokenizer: the first 4 blocks of SmolLM2-135M, saved as a
    directory, stream to the same factors as `compress_` in memory (every block runs the same
    code, so 4 of 30 cover it at a seventh of the cost)."""
    import rankwise

    model = rankwise.load_model("smollm2-135m")
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    model.save_pretrained(tmp_path / "smol4")
    rankwise.load_tokenizer("smollm2-135m").save_pretrained(tmp_path / "smol4")
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    ref = compress_(model, "svd_llm", 0.2, calibration=ids, batch_size=4, progress=False)
    save_compressed(model, tmp_path / "mem", report=ref)
    del model
    got = compress_streaming(tmp_path / "smol4", tmp_path / "stream", "svd-llm", 0.2, calibration=ids,
                             batch_size=4, progress=False)
    assert len(got.layers) == 4 * 7
    assert [r.rank for r in got.layers] == [r.rank for r in ref.layers]
    _same_directory(tmp_path / "mem", tmp_path / "stream", rtol=1e-5, atol=1e-6)
    reloaded = rankwise.load_model(tmp_path / "stream")
    assert reloaded(ids[:1, :16]).logits.isfinite().all()
