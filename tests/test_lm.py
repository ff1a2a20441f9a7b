"""Stage 00's corpus and its limits."""

from __future__ import annotations

import pytest

from ablation import activations, lm


def test_a_request_beyond_the_corpus_fails_before_any_tokenizing():
    class NoTokenizing:
        def __call__(self, *a, **k):
            raise AssertionError("tokenized")

    with pytest.raises(ValueError, match="n_tokens=10,000,000,000 needs more train text"):
        activations.text_tokens("stdlib", NoTokenizing(), "train", 10**10)


def test_document_splits_are_disjoint_and_hub_loading_fails_clearly_offline():
    docs = [f"doc{i}" for i in range(45)]
    train = list(lm.split_documents(docs, "train", 10))
    held = list(lm.split_documents(docs, "heldout", 10))
    assert held == ["doc9", "doc19", "doc29", "doc39"] and len(train) == 41
    assert not set(train) & set(held)
    with pytest.raises(ValueError, match="split='test'"):
        list(lm.split_documents(docs, "test", 10))
    with pytest.raises(RuntimeError, match="text_source='stdlib'"):  # HF_DATASETS_OFFLINE=1
        next(activations.hub_texts("NeelNanda/pile-10k"))
