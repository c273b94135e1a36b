"""Tiny Llama models (from a config, SmolLM2's tokenizer vocabulary) for the pipeline tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer(docs):
    """A 320-token byte-level BPE trained on the test documents: a small vocabulary keeps the
    tiny models' output head (and so every perplexity) cheap."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def make_llama():
    """The tiny Llama factory: make_llama(vocab, seed=0, layers=2)."""
    return tiny_llama


@pytest.fixture(scope="session")
def fast():
    """Settings that keep one shrink run on a tiny model to a few seconds."""
    return dict(FAST)


@pytest.fixture(scope="session")
def docs():
    """About 10 k tokens of python-docs validation documents: healing text and held-out data."""
    from rankwise.data import load_corpus

    return load_corpus("python-docs", "validation")[:60]


@pytest.fixture(scope="session")
def calib(tokenizer):
    return torch.randint(0, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(3))


# Settings that keep one shrink run on a tiny model to a few seconds.
FAST = dict(heal_minutes=0, heal_steps=4, heal_seq_len=64, eval_tokens=1024, select_tokens=1024,
            compensation_ranks=(4,), progress=False)
