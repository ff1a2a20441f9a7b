"""One cell of the grid on the smoke profile: trained until converged, resumed bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ablation import grid, parameters, synthetic, train

CELL_KEYS = grid.TRAIN_KEYS  # train_cell's settings, as notebook 02 passes them


@pytest.fixture(scope="module")
def smoke() -> dict:
    """The smoke profile's training parameters, as notebook 02 resolves them."""
    return parameters.resolve_parameters({n: None for n in ("profile", *CELL_KEYS)} | {"profile": "smoke"})


@pytest.fixture(scope="module")
def acts(smoke) -> torch.Tensor:
    return synthetic.galaxy_toy_data(4000, 32, 5.0, seed=1)


def cell(smoke, acts, tmp_path=None, **over):
    kw = {k: smoke[k] for k in CELL_KEYS} | over
    return grid.train_cell("ra-random-points", "centered", acts, acts[:2000], [0, 1, 2],
                           checkpoint=None if tmp_path is None else tmp_path / "cell.ckpt",
                           meta={"cell": "test"}, **kw)


def test_a_cell_trains_at_the_full_rate_until_judged_then_decays(smoke, acts):
    res = cell(smoke, acts, converge_tolerance=1e-9)  # never converges: it runs to the cap
    rec, bs = res["convergence"], smoke["sae_batch_size"]
    assert not rec["converged"] and rec["capped"] and rec["tokens"] == smoke["max_sae_tokens"] // bs * bs
    assert rec["lr"] == smoke["sae_lr"] and rec["n_snapshots"] == smoke["snapshots_per_doubling"] + 1
    full = [lr == smoke["sae_lr"] for lr in res["lr"]]
    assert all(full[:full.index(False)]) and not any(full[full.index(False):])  # decay only at the end
    assert rec["decay_tokens"] == round(rec["full_rate_tokens"] * 0.2 / 0.8 / bs) * bs
    assert res["tokens"][-1] == rec["tokens_trained"] == rec["full_rate_tokens"] + rec["decay_tokens"]
    assert len(res["loss"]) * bs == rec["tokens_trained"]
    assert res["distances"]["hungarian"].shape == (len(res["tokens"]), 3, 3)
    loose = cell(smoke, acts, converge_tolerance=10.0)  # converged at the first judgement
    assert loose["convergence"]["converged"] and loose["convergence"]["tokens"] == \
        smoke["min_sae_tokens"] // bs * bs
    assert np.allclose(loose["distances"]["hungarian"][:5], res["distances"]["hungarian"][:5],
                       equal_nan=True)  # the same runs until they part


def test_an_interrupted_cell_resumes_bit_for_bit(smoke, acts, tmp_path, monkeypatch):
    whole = cell(smoke, acts, converge_tolerance=1e-9)
    advance, calls = train.SAETrainer.advance, []

    def interrupted(self, to_step, lr_at):
        calls.append(to_step)
        if to_step > smoke["max_sae_tokens"] // smoke["sae_batch_size"] * 0.6:
            raise KeyboardInterrupt  # past the first checkpoint (at min_sae_tokens)
        advance(self, to_step, lr_at)
    monkeypatch.setattr(train.SAETrainer, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cell(smoke, acts, tmp_path, converge_tolerance=1e-9)
    monkeypatch.setattr(train.SAETrainer, "advance", advance)
    saved = torch.load(tmp_path / "cell.ckpt", weights_only=True)
    assert 0 < saved["trainer"]["step"] < whole["convergence"]["full_rate_tokens"] // smoke["sae_batch_size"]
    resumed = cell(smoke, acts, tmp_path, converge_tolerance=1e-9)
    assert resumed["tokens"] == whole["tokens"] and resumed["lr"] == whole["lr"]
    for key in ("dictionaries", "loss"):
        assert torch.equal(resumed[key], whole[key]), key
    for m in whole["distances"]:
        assert torch.equal(resumed["distances"][m].nan_to_num(), whole["distances"][m].nan_to_num())
    for a, b in zip(resumed["state_dicts"], whole["state_dicts"]):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed["convergence"] == whole["convergence"]


def test_a_checkpoint_of_another_cell_is_not_resumed(smoke, acts, tmp_path):
    grid._save_checkpoint(tmp_path / "cell.ckpt", {"cell": "another"}, train.SAETrainer(
        [grid.build_cell("ra-random-points", "centered", acts[:2000], [0], **{
            k: smoke[k] for k in ("n_latents", "k", "n_candidates", "delta", "match_start_scale",
                                  "pre_bias", "center_encoder", "kmeans_shared_seed")})[0][0]],
        acts, [0], 128, progress=False), {"steps": [9]})
    assert grid._load_checkpoint(tmp_path / "cell.ckpt", {"cell": "test"}) is None
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "cell.ckpt").read_bytes()[:100])
    assert grid._load_checkpoint(tmp_path / "cut.ckpt", {"cell": "another"}) is None
