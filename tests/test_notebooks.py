"""Papermill smoke runs of the notebooks and tests of the model loading and activation cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers as h
import report

NB = Path(__file__).resolve().parents[1] / "notebooks"


def run_stage(name: str, run_dir: Path, **overrides) -> dict:
    """Run notebook `name` with the smoke profile into run_dir; return the JSON it wrote."""
    params = {**report.load_profile("smoke"), "run_dir": str(run_dir),
              "figures_dir": str(run_dir / "figures"), **overrides}
    report.run(NB / f"{name}.ipynb", run_dir / "executed" / f"{name}.ipynb", params)
    return json.loads((run_dir / f"{name}.json").read_text())


def test_00_trains_and_saves_a_bootable_model(smoke):
    res = json.loads((smoke / "00_language_model.json").read_text())
    model_dir = smoke / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "meta.json"):
        assert (model_dir / f).is_file(), f
    assert res["vocab"] == 512 and res["n_params"] > 10_000
    assert np.isfinite(res["heldout_loss"]) and res["heldout_loss"] < np.log(512)
    assert 0 < res["unigram_entropy"] < np.log(512)
    assert (smoke / "figures" / "00_lm_loss.png").is_file()
    assert (smoke / "figures" / "00_lm_loss.pdf").is_file()
    assert not list(smoke.glob("*.tmp"))


def test_01_caches_the_requested_vectors_and_layer_statistics(smoke):
    res = json.loads((smoke / "01_cache_activations.json").read_text())
    train = np.load(smoke / "acts_train.npy", mmap_mode="r")
    held = np.load(smoke / "acts_heldout.npy", mmap_mode="r")
    assert train.shape == (4000, 32) and held.shape == (1000, 32)
    assert np.isfinite(train).all() and train.std() > 0
    assert res["hook"] == "blocks.1.hook_resid_post" and len(res["layer_stats"]) == 2
    stats = res["cached_layer"]
    assert stats["mean_norm"] == pytest.approx(float(np.linalg.norm(held.mean(0))), rel=0.3)
    assert abs(stats["cos_centered"]) < stats["cos_raw"]


@pytest.fixture
def run_copy(smoke, tmp_path) -> Path:
    """A copy of the smoke run folder (mtimes kept), for tests that re-run stages."""
    return Path(shutil.copytree(smoke, tmp_path / "run"))


def test_rerun_reuses_the_model_and_the_cache(run_copy):
    npy = run_copy / "acts_train.npy"
    before = npy.stat().st_mtime_ns
    res00 = run_stage("00_language_model", run_copy)
    run_stage("01_cache_activations", run_copy)
    assert res00["reused"] is True
    assert npy.stat().st_mtime_ns == before  # not rewritten


def test_cache_matches_the_model_and_refuses_other_metadata(smoke, tmp_path):
    bridge = h.boot_model(str(smoke / "model"), "cpu")
    windows = np.arange(6 * 32, dtype=np.int32).reshape(6, 32) % 500
    meta = {"model_name": "t", "hook": "blocks.0.hook_resid_post", "dtype": "float32"}
    path = tmp_path / "a.npy"
    acts = h.cache_activations(bridge, windows, path, meta, meta["hook"], 100, 4, True)
    _, cache = bridge.run_with_cache(torch.from_numpy(windows[:4].astype(np.int64)),
                                     names_filter=[meta["hook"]])
    ref = cache[meta["hook"]][:, 1:].reshape(-1, 32)[:100]
    assert np.allclose(acts, ref.numpy(), atol=1e-5)
    assert h.load_cache(path, meta) is not None
    assert h.load_cache(path, {**meta, "dtype": "float16"}) is None
    assert h.load_cache(path, {**meta, "n_tokens": 99}) is None
    with pytest.raises(ValueError, match="needs"):
        h.token_windows(windows.reshape(-1), 32, 10_000, True)


def test_an_interrupted_cache_is_never_taken_for_a_whole_one(smoke, tmp_path):
    bridge = h.boot_model(str(smoke / "model"), "cpu")
    calls = {"n": 0}
    real = bridge.run_with_cache

    def dies_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    bridge.run_with_cache = dies_on_second_batch
    meta = {"model_name": "t", "hook": "blocks.0.hook_resid_post"}
    windows = np.zeros((8, 32), dtype=np.int32)
    with pytest.raises(KeyboardInterrupt):
        h.cache_activations(bridge, windows, tmp_path / "a.npy", meta, meta["hook"], 200, 2)
    assert not (tmp_path / "a.npy").exists() and not (tmp_path / "a.json").exists()
    assert h.load_cache(tmp_path / "a.npy", meta) is None


def test_loading_fails_loudly_without_tokenizer_or_hub(smoke, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(smoke / "model" / f, bare / f)
    with pytest.raises((RuntimeError, OSError, ValueError), match="(?i)tokenizer"):
        h.boot_model(str(bare), "cpu")
    with pytest.raises(RuntimeError, match="local HuggingFace-format folder"):
        h.boot_model("EleutherAI/pythia-70m-deduped", "cpu")  # HF_HUB_OFFLINE=1 in conftest


def test_bad_parameters_fail_before_heavy_work(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        report.load_profile("nope")
    with pytest.raises(SystemExit, match="unknown parameter.*n_layerz"):
        report.check_params({"n_layerz": 3}, sorted(NB.glob("[0-9][0-9]_*.ipynb")))
    with pytest.raises(Exception, match="hook='resid'"):
        run_stage("01_cache_activations", tmp_path, hook="resid")


# ----------------------------------------------------------------------------- 02, 03, 04
def test_02_saves_every_cell_with_snapshots_from_step_zero(smoke):
    res = json.loads((smoke / "02_train_saes.json").read_text())
    assert len(res["cells"]) == 12 and res["snapshots"][0] == 0
    cell = torch.load(smoke / "saes" / "ra-kmeans-shared__centered.pt", weights_only=False)
    assert cell["dictionaries"].shape == (len(res["snapshots"]), 3, 32, 32)
    assert cell["tokens"][-1] == 6400 and len(cell["state_dicts"]) == 3
    assert not list((smoke / "saes").glob("*.tmp"))


def test_02_rerun_skips_finished_cells(run_copy):
    path = run_copy / "saes" / "topk-random__raw.pt"
    before = path.stat().st_mtime_ns
    run_stage("02_train_saes", run_copy, configurations=["topk-random"], preprocessing=["raw"])
    assert path.stat().st_mtime_ns == before
    with pytest.raises(Exception, match="configurations='topk-randm'"):
        run_stage("02_train_saes", run_copy, configurations=["topk-randm"])


def test_03_raw_distance_is_below_centered_which_is_below_chance(smoke):
    res = json.loads((smoke / "03_galaxy_far_away.json").read_text())
    assert res["kmeans_distance_raw"] < res["kmeans_distance_centered"] < res["random_distance"]
    assert res["fvu_mean_only"] == pytest.approx(1.0, abs=0.05)
    dose = res["dose_response"]
    assert dose[0]["scale"] == 0.0 and dose[-1]["kmeans"] < dose[0]["kmeans"]  # more mean, closer
    for name in ("fig2_galaxy_toy", "03_dose_response"):
        assert (smoke / "figures" / f"{name}.png").is_file()


def test_04_science_invariants_hold_on_the_outputs(smoke):
    res = json.loads((smoke / "04_initialization_ablation.json").read_text())
    for key, s in res["stabilization"].items():
        name = key.split("__")[0]
        if h.CONFIGURATIONS[name][1] == "kmeans-shared":
            assert abs(s["step0"]) < 1e-12 and s["shared_start"], key  # identical starts
        else:
            assert s["step0"] > 1e-3 and not s["shared_start"], key
    for key, row in res["endpoint"].items():
        for metric, v in row.items():
            assert all(np.isfinite(x) for x in v.values()), (key, metric)
    assert len(res["falsification"]) == 8 and isinstance(res["falsified"], bool)
    assert len(res["geometry_free"]) == 4 and len(res["stabilization_advantage"]) == 8
    assert {"recovered_as_is", "hungarian_between_runs"} <= set(res["synthetic"]["topk-random"])
    for name in ("fig1_mean_min", "fig1_hungarian"):
        assert (smoke / "figures" / f"{name}.png").is_file()
