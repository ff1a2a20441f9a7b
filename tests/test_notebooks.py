"""Papermill smoke runs of the notebooks, the model and the activation cache, and the run folder's
defences: bad data, stale or corrupt results, overrides and concurrent runs never reach a number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch
from conftest import run, tracked_copy

from ablation import activations, configs, grid, labels, lm, parameters, store
import report

pytestmark = pytest.mark.slow
NB = Path(__file__).resolve().parents[1] / "notebooks"


def run_stage(name: str, run_dir: Path, **overrides) -> dict:
    """Run notebook `name` with the smoke profile into run_dir; return the JSON it wrote."""
    params = report.resolve("smoke", {"run_dir": str(run_dir), **overrides})
    report.run(NB / f"{name}.ipynb", params, run_dir / "report" / f"{name}.ipynb")
    return json.loads((run_dir / f"{name}.json").read_text())


def numbers(abl: dict) -> dict:
    """The parts of notebook 04's JSON that are numbers of the science (not timings)."""
    return {k: abl[k] for k in ("endpoint", "falsification", "stabilization", "synthetic", "verdict")}


def mtimes(folder: Path) -> dict:
    """File -> modification time, for every file under folder."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- 00, 01
def test_00_trains_and_saves_a_bootable_model(smoke):
    res = json.loads((smoke / "00_language_model.json").read_text())
    model_dir = smoke / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "meta.json"):
        assert (model_dir / f).is_file(), f
    assert store.read_meta(model_dir / "meta.json")["sha256"] == store.file_sha256(model_dir / "model.safetensors")
    assert res["vocab"] == 512 and res["n_params"] > 10_000
    assert np.isfinite(res["heldout_loss"]) and res["heldout_loss"] < np.log(512)
    assert 0 < res["unigram_entropy"] < np.log(512)
    for ext in ("png", "pdf"):
        assert (smoke / "figures" / f"00_lm_loss.{ext}").is_file()
    assert not list(smoke.rglob("*.tmp"))


def test_01_caches_the_requested_vectors_with_a_checksum(smoke):
    res = json.loads((smoke / "01_cache_activations.json").read_text())
    train = activations.open_cache(smoke / "acts_train.npy")
    held = activations.open_cache(smoke / "acts_heldout.npy")
    assert train.shape == (4000, 32) and held.shape == (1000, 32)
    assert np.isfinite(train).all() and train.std() > 0
    assert res["hook"] == "blocks.1.hook_resid_post" and len(res["layer_stats"]) == 2
    stats = res["cached_layer"]
    assert stats["mean_norm"] == pytest.approx(float(np.linalg.norm(held.mean(0))), rel=0.3)
    assert abs(stats["cos_centered"]) < stats["cos_raw"]


def test_rerun_reuses_the_model_and_the_cache(run_copy):
    before = mtimes(run_copy / "model") | mtimes(run_copy)
    res00 = run_stage("00_language_model", run_copy)
    run_stage("01_cache_activations", run_copy)
    assert res00["reused"] is True
    for f in ("acts_train.npy", "acts_train.json", "model/model.safetensors"):
        assert (run_copy / f).stat().st_mtime_ns == before[run_copy / f], f  # not rewritten


def test_cache_matches_the_model_and_refuses_other_metadata(smoke, tmp_path):
    bridge = lm.boot_model(str(smoke / "model"), "cpu")
    windows = np.arange(6 * 32, dtype=np.int32).reshape(6, 32) % 500
    meta = {"model_name": "t", "hook": "blocks.0.hook_resid_post", "dtype": "float32"}
    path = tmp_path / "a.npy"
    acts = activations.cache_activations(bridge, windows, path, meta, meta["hook"], 100, 4, True)
    _, cache = bridge.run_with_cache(torch.from_numpy(windows[:4].astype(np.int64)),
                                     names_filter=[meta["hook"]])
    ref = cache[meta["hook"]][:, 1:].reshape(-1, 32)[:100]
    assert np.allclose(acts, ref.numpy(), atol=1e-5)
    assert activations.load_cache(path, meta) is not None
    assert activations.load_cache(path, {**meta, "dtype": "float16"}) is None
    assert activations.load_cache(path, {**meta, "n_tokens": 99}) is None
    with pytest.raises(ValueError, match="needs"):
        activations.token_windows(windows.reshape(-1), 32, 10_000, True)


def test_an_interrupted_cache_is_never_taken_for_a_whole_one(smoke, tmp_path):
    bridge = lm.boot_model(str(smoke / "model"), "cpu")
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
        activations.cache_activations(bridge, windows, tmp_path / "a.npy", meta, meta["hook"], 200, 2)
    assert not list(tmp_path.iterdir())  # no cache, no JSON, no temporary left behind
    assert activations.load_cache(tmp_path / "a.npy", meta) is None


def test_loading_fails_loudly_without_tokenizer_or_hub(smoke, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(smoke / "model" / f, bare / f)
    with pytest.raises((RuntimeError, OSError, ValueError), match="(?i)tokenizer"):
        lm.boot_model(str(bare), "cpu")
    with pytest.raises(RuntimeError, match="local HuggingFace-format folder"):
        lm.boot_model("EleutherAI/pythia-70m-deduped", "cpu")  # HF_HUB_OFFLINE=1 in conftest


# ----------------------------------------------------------------------------- 02, 03, 04
def test_02_saves_every_cell_as_safetensors_with_snapshots_from_step_zero(smoke):
    res = json.loads((smoke / "02_train_saes.json").read_text())
    assert len(res["cells"]) == 16
    cell = grid.load_cell(smoke, "ra-kmeans-shared", "centered")
    assert cell["tokens"][0] == 0 and cell["dictionaries"].shape == (len(cell["tokens"]), 3, 32, 32)
    rec = res["cells"]["ra-kmeans-shared__centered"]["convergence"]
    assert cell["tokens"][-1] == rec["tokens_trained"] and len(cell["state_dicts"]) == 3
    assert cell["meta"]["clip_grad"] == 1.0 and cell["meta"]["code"] == store.code_hash(grid.train_cell)
    assert not list((smoke / "saes").glob("*.pt")) and not list(smoke.rglob("*.tmp"))
    assert {r["configuration"] for r in res["start_scale"]} == {"topk-random", "ra-kmeans-shared"}


def test_02_rerun_skips_finished_cells_and_rejects_typos(run_copy):
    path = run_copy / "saes" / "topk-random__raw.safetensors"
    before = path.stat().st_mtime_ns
    run_stage("02_train_saes", run_copy, configurations=["topk-random"], preprocessing=["raw"])
    assert path.stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match="configurations=.'topk-randm'. must be a list of distinct names"):
        run_stage("02_train_saes", run_copy, configurations=["topk-randm"])


def test_03_raw_distance_is_below_centered_which_is_below_chance(smoke):
    res = json.loads((smoke / "03_galaxy_far_away.json").read_text())
    assert res["kmeans_distance_raw"] < res["kmeans_distance_centered"] < res["random_distance"]
    assert res["fvu_mean_only"] == pytest.approx(1.0, abs=0.05)
    dose = res["dose_response"]
    assert dose[0]["scale"] == 0.0 and dose[-1]["kmeans"] < dose[0]["kmeans"]  # more mean, closer
    assert len({round(d["topk_sae"], 6) for d in dose}) == 1  # b_pre absorbs the mean: flat
    grid = json.loads((smoke / "02_train_saes.json").read_text())
    assert res["mean_norm"] == grid["mean_norm"]  # one fit sample for both stages
    for name in ("fig2_galaxy_toy", "03_dose_response"):
        assert (smoke / "figures" / f"{name}.png").is_file()


def test_04_science_invariants_hold_on_the_outputs(smoke):
    res = json.loads((smoke / "04_initialization_ablation.json").read_text())
    for key, s in res["stabilization"].items():
        name = key.split("__")[0]
        if configs.CONFIGURATIONS[name][1] == "kmeans-shared":
            assert abs(s["step0"]) < 1e-12 and s["shared_start"], key  # identical starts
        else:
            assert s["step0"] > 1e-3 and not s["shared_start"], key
    for key, row in res["endpoint"].items():
        assert all(np.isfinite(x) for v in row.values() for x in v.values()), key
        assert res["quality_gate"][key] == [] and res["convergence"][key]["converged"], key
    # two challengers against topk-random and three RA-SAEs at a matched start, on two preprocessings
    assert len(res["falsification"]) == 20 and len(res["geometry_free"]) == 10
    assert len(res["stabilization_advantage"]) == 20 and res["tests_skipped"] == []
    matched = {(r["challenger"], r["reference"]) for r in res["falsification"] if r["comparison"] == "matched start"}
    assert matched == set(configs.MATCHED_START.items())
    assert {r["outcome"] for r in res["falsification"]} <= {
        labels.CLOSER, labels.FURTHER, labels.EQUIVALENT, labels.UNDECIDED}
    assert all(r["margin"] == res["equivalence_margin"] == 1.0 for r in res["falsification"])
    for r in res["geometry_free"]:  # alive-only, with the all-latent version and dead shares beside
        assert -1 <= r["difference"] <= 2 and set(r["all_latents"]) == {"difference", "lo", "hi", "outcome"}
        assert 0 <= r["challenger_dead_share"] <= 1 and 0 <= r["reference_dead_share"] <= 1
    noise = res["protocol_noise"]
    assert noise["one_doubling"] == res["convergence"]["topk-random__raw"]["tolerance"]
    assert noise["decay"]["shift"] >= 0 and noise["decay"]["cell"] in res["endpoint"]
    # the grid builds two of the authors' four conditions as their code does (the other two are
    # the authors profiles' -free configurations)
    assert {r["configuration"] for r in res["authors_table"]} == {"topk-random", "ra-kmeans-shared"}
    assert len(res["authors_table"]) == 4 and set(res["authors_pattern"]) == {
        "raw_shared_far_closer", "centering_pulls_ra_apart", "unconstrained_stay_close"}
    assert {"recovered", "hungarian_between_runs"} == set(res["synthetic"]["topk-random"])
    for key, rec in res["convergence"].items():  # every cell: judged at the full rate, then decayed
        assert rec["lr"] == parameters.default("sae_lr"), key
        assert rec["tokens_trained"] == rec["full_rate_tokens"] + rec["decay_tokens"] > rec["full_rate_tokens"]
        assert np.isfinite(rec["slope"]) and rec["lo"] <= rec["slope"] <= rec["hi"], key
    over = res["tests_over_training"]
    assert {r["test"] for r in over} == {"falsification", "stabilization"}
    assert {r["comparison"] for r in over} == {"against topk-random", "matched start"}
    assert len([r for r in over if r["stage"] == "end"]) == 20 and len(res["outcome_settled"]) == 20
    for name in ("fig1_mean_min", "fig1_hungarian", "fig3_verdict_over_training"):
        assert (smoke / "figures" / f"{name}.png").is_file()
    assert not list((smoke / "saes").glob("*.ckpt"))  # checkpoints go once the cells are saved


def test_quality_gate_flags_an_untrained_cell_and_keeps_it_out_of_the_tests(run_copy):
    res = run_stage("04_initialization_ablation", run_copy, max_fvu=0.01, n_boot=100,
                    synthetic_tokens=1280)  # no smoke model reconstructs this well
    assert all(res["quality_gate"].values()) and res["falsification"] == []
    assert len(res["tests_skipped"]) == 10 and res["verdict"].startswith("no test could run")
    assert "held-out FVU" in res["tests_skipped"][0]


# ----------------------------------------------------------------------------- the run folder's defences
def test_nan_activations_are_refused_and_a_rebuilt_cache_gives_the_same_numbers(run_copy, smoke):
    acts = np.load(run_copy / "acts_train.npy", mmap_mode="r+")
    acts[3990:3995] = np.nan  # rows outside notebook 02's fit sample too
    acts.flush()
    del acts
    cells = mtimes(run_copy / "saes")
    with pytest.raises(pm.PapermillExecutionError, match="acts_train.npy does not match its recorded"):
        run_stage("02_train_saes", run_copy)
    assert mtimes(run_copy / "saes") == cells  # nothing trained, nothing saved
    run_stage("01_cache_activations", run_copy)  # sees the mismatch and rebuilds the cache
    assert np.isfinite(activations.open_cache(run_copy / "acts_train.npy")).all()
    held = np.load(run_copy / "acts_heldout.npy", mmap_mode="r+")
    held[0] = np.nan
    held.flush()
    del held
    with pytest.raises(pm.PapermillExecutionError, match="acts_heldout.npy does not match"):
        run_stage("03_galaxy_far_away", run_copy)


def test_duplicate_or_malformed_seeds_fail_in_the_notebook_too(smoke, tmp_path):
    for seeds, match in (([0, 0, 1], r"seeds=\[0, 0, 1\] must be a list of distinct integers"),
                         ("0,1", "seeds='0,1' must be a list of distinct")):
        with pytest.raises(pm.PapermillExecutionError, match=match):
            pm.execute_notebook(str(NB / "02_train_saes.ipynb"), str(tmp_path / "02.ipynb"),
                                parameters={"run_dir": str(smoke), "seeds": seeds},
                                kernel_name="python3", progress_bar=False)


def test_a_stale_cell_is_retrained_when_its_code_changed(run_copy):
    sidecar = run_copy / "saes" / "topk-random__raw.json"
    info = json.loads(sidecar.read_text())
    info["meta"]["code"] = "an-older-trainer"  # as if made by other code
    sidecar.write_text(json.dumps(info))
    before = mtimes(run_copy / "saes")
    run_stage("02_train_saes", run_copy)
    after = mtimes(run_copy / "saes")
    changed = {p.name for p in after if after[p] != before.get(p)}
    assert changed == {"topk-random__raw.safetensors", "topk-random__raw.json"}


def test_a_second_run_on_the_same_folder_is_refused_naming_the_lock(run_copy):
    held = store.lock_run_dir(run_copy, "smoke")
    try:
        with pytest.raises(pm.PapermillExecutionError, match=r"\.lock is locked by pid"):
            run_stage("03_galaxy_far_away", run_copy)
    finally:
        held.close()


def test_profile_mistakes_fail_before_any_stage(tmp_path):
    repo = tracked_copy(tmp_path)
    (repo / "params" / "typo.yaml").write_text("k: 4O\n")
    (repo / "params" / "broken.yaml").write_text("seeds: [0, 1\nk: 4\n")
    done = run(["make", "report", "PROFILE=typo"], repo, ok=False)
    assert done.returncode != 0 and "k='4O' must be an integer >= 1" in done.stderr
    assert not (repo / "runs").exists()  # stage 00 never started
    done = run(["python", "report.py", "check", "broken"], repo, ok=False)
    assert "params/broken.yaml is not valid YAML at line 2" in done.stderr
    assert "Traceback" not in done.stderr
    done = run(["python", "report.py", "check", "smoke", "-p", "device", "gpu"], repo, ok=False)
    assert "device='gpu' must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in done.stderr
    if not torch.cuda.is_available():
        done = run(["python", "report.py", "check", "smoke", "-p", "device", "cuda"], repo, ok=False)
        assert "device='cuda', but this torch" in done.stderr
    done = run(["python", "report.py", "run", "smoke", "notebooks/03_galaxy_far_away.ipynb",
                "-p", "k", "32"], repo, ok=False)
    assert "03_galaxy_far_away.ipynb does not declare ['k']" in done.stderr
    (repo / "params" / "sizes.yaml").write_text("k: 600\nlayer: 7\nmodel_name: ./no-model\n")
    done = run(["make", "report", "PROFILE=sizes"], repo, ok=False)
    for message in ("k=600 must lie in 1..n_latents=512", "model_name='./no-model' is neither a folder"):
        assert message in done.stderr, done.stderr
    assert not (repo / "runs").exists()  # checked together, before stage 00


def test_plain_papermill_with_a_profile_writes_only_under_its_run_folder(tmp_path):
    """papermill -f params/smoke.yaml, as a reader re-runs a stage (from notebooks/, as JupyterLab
    starts a kernel): the smoke profile's run folder under the repository root and nothing else;
    then a stage of another profile pointed at that folder stops, naming both."""
    repo = tracked_copy(tmp_path / "repo")
    run(["papermill", "notebooks/00_language_model.ipynb", "out.ipynb", "-f", "params/smoke.yaml",
         "--cwd", "notebooks", "--no-progress-bar"], repo)  # started in notebooks/, as JupyterLab does
    assert sorted(p.name for p in (repo / "runs").iterdir()) == ["smoke"]
    assert not (repo / "notebooks" / "runs").exists()
    assert json.loads((repo / "runs" / "smoke" / "profile.json").read_text()) == {"profile": "smoke"}
    assert (repo / "runs" / "smoke" / "00_language_model.json").is_file()
    done = run(["papermill", "notebooks/00_language_model.ipynb", "out2.ipynb", "-f",
                "params/authors.yaml", "-p", "run_dir", "runs/smoke", "--no-progress-bar"], repo, ok=False)
    assert done.returncode != 0
    assert "holds the results of profile 'smoke'; this run is profile 'authors'" in done.stderr + done.stdout


def test_the_authors_protocol_runs_on_the_smoke_model(run_copy):
    """The authors profile's mechanisms at smoke size: more atoms than centroids (the extra atoms
    start at zero), a fixed training set passed over in epochs, no pre-bias, reference starts."""
    authors = report.load_profile("authors")
    protocol = {k: authors[k] for k in ("configurations", "match_start_scale", "center_encoder",
                                        "pre_bias", "lr_decay", "dead_penalty", "clip_grad", "delta")}
    trained = run_stage("02_train_saes", run_copy, **protocol, n_latents=32, n_candidates=16, k=2,
                     train_tokens=1000, n_fit_tokens=1000, min_sae_tokens=12800,
                     max_sae_tokens=12800)
    assert trained["n_training_tokens"] == 1000 and len(trained["cells"]) == 8
    cell = grid.load_cell(run_copy, "ra-kmeans-shared", "raw")
    assert (cell["dictionaries"][0, :, 16:] == 0).all()  # W = eye(32, 16): atoms 17-32 at zero
    assert "b_pre" not in dict(grid.sae_from_state(cell["state_dicts"][0], cell["meta"]).named_parameters())
    for name in ("topk-kmeans-shared-free", "ra-projection-off-free"):  # free rows from W C
        free = grid.load_cell(run_copy, name, "raw")
        state = free["state_dicts"][0]
        assert "b_pre" not in dict(grid.sae_from_state(state, free["meta"], configs.CONFIGURATIONS[name][2])
                                   .named_parameters())
        assert torch.equal(free["dictionaries"][0, 0, :16], cell["dictionaries"][0, 0, :16])
        assert free["dictionaries"][-1, :, 16:].norm(dim=-1).max() > 0  # the zero atoms grew
        assert not torch.allclose(free["dictionaries"][-1].norm(dim=-1), torch.tensor(1.0))
    abl = run_stage("04_initialization_ablation", run_copy, configurations=protocol["configurations"],
                    n_boot=100, synthetic_tokens=1280)
    assert len(abl["authors_table"]) == 8 and all(np.isfinite(r["mean"]) for r in abl["authors_table"])
    assert abl["falsification"] == [] and abl["verdict"].startswith("not tested")


# ----------------------------------------------------------------------------- 05
def test_05_retrains_the_decisive_cells_per_variant_and_reuses_them(run_copy):
    out = run_stage("05_robustness", run_copy)
    assert out["variants"] == ["dictionary x2", "delta x4"] and set(out["holds"]) == set(out["variants"])
    rows = [r for r in out["rows"] if r["metric"] == "hungarian"]
    ref = json.loads((run_copy / "04_initialization_ablation.json").read_text())
    assert sum(r["variant"] == "profile" for r in rows) == \
        sum(t["metric"] == "hungarian" for t in ref["falsification"])  # the profile's rows on top
    assert all(r["holds"] for r in rows if r["variant"] == "profile")
    assert {r["comparison"] for r in rows if r["variant"] == "dictionary x2"} == \
        {"against topk-random", "matched start"}
    saes = run_copy / "robustness" / "dictionary-x2" / "saes"
    cell = store.load_result(saes / "ra-random-points__centered.safetensors", {})
    assert cell["meta"]["n_latents"] == 64 and cell["dictionaries"].shape[-2] == 64  # 2 x smoke's 32
    assert out["cells"]["dictionary x2"]["topk-random__centered"]["step0_hungarian"] > 0.5
    assert all(c["train_seconds"] > 0 and not c["resumed"] for c in out["cells"]["dictionary x2"].values())
    sizes = {(r["n_latents"], r["cell"]): r for r in out["dictionary_sizes"]}
    assert {n for n, _ in sizes} == {32, 64} and len(sizes) == 2 * len(out["decisive"]) * 2
    random0 = [sizes[n, "topk-random__centered"]["step0"] for n in (32, 64)]
    assert random0[1] < random0[0]  # more random atoms lie closer to each other at step 0
    assert (run_copy / "figures" / "fig4_robustness.png").is_file()
    topk = [c for c in out["decisive"] if c.startswith("topk")]
    assert out["profile_cells"] == {"dictionary x2": [], "delta x4": topk}  # a TopK SAE has no delta
    delta_saes = run_copy / "robustness" / "delta-x4" / "saes"
    assert not list(delta_saes.glob("topk-*")) and len(list(delta_saes.glob("ra-*.safetensors"))) == 6
    cell = store.load_result(delta_saes / "ra-kmeans-shared__raw.safetensors", {})
    assert cell["meta"]["delta"] == 4 * parameters.default("delta")
    before = mtimes(saes)
    again = run_stage("05_robustness", run_copy)
    assert mtimes(saes) == before and again["rows"] == out["rows"]  # reused, same numbers
