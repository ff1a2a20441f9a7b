"""Activation cache and statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ablation import activations, lm, store


def test_cache_checksum_catches_modification(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.ones((10, 4), dtype=np.float32))
    store.write_json_atomic(path.with_suffix(".json"), {"model_name": "m", "shape": [10, 4],
                                                    "sha256": store.file_sha256(path)})
    assert activations.load_cache(path, {"model_name": "m"}) is not None
    arr = np.load(path, mmap_mode="r+")
    arr[3] = np.nan
    arr.flush()
    del arr
    assert activations.load_cache(path, {"model_name": "m"}) is None
    with pytest.raises(FileNotFoundError, match="acts.npy does not match its recorded shape and checksum"):
        activations.open_cache(path)


def test_entropy_and_activation_statistics_on_known_cases():
    assert lm.unigram_entropy(np.array([0, 1, 2, 3] * 10)) == pytest.approx(np.log(4))
    far = torch.randn(5000, 8) * 0.1 + 10.0  # a tight cloud far from the origin
    s = activations.activation_stats(far)
    assert s["mean_norm"] == pytest.approx(10 * np.sqrt(8), rel=0.01)
    assert s["rms_from_mean"] == pytest.approx(0.1 * np.sqrt(8), rel=0.05)
    assert s["cos_raw"] > 0.99 and abs(s["cos_centered"]) < 0.05
