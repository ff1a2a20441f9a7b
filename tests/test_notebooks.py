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

from ablation import activations, configs, evaluation, grid, labels, lm, parameters, records, store
import report

pytestmark = pytest.mark.slow
NB = Path(__file__).resolve().parents[1] / "notebooks"


def run_stage(name: str, run_dir: Path, **overrides) -> dict:
    """Run notebook `name` with the smoke profile into run_dir; return the JSON it wrote."""
    params = report.resolve("smoke", {"run_dir": str(run_dir), **overrides})
    report.run(NB / f"{name}.ipynb", params, run_dir / "report" / f"{name}.ipynb")
    return json.loads((run_dir / f"{name}.json").read_text())


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
def test_02_records_every_cell_at_every_budget_and_keeps_the_weights_in_the_run_folder(smoke):
    res = json.loads((smoke / "02_train_saes.json").read_text())
    assert len(res["cells"]) == 16 and res["budgets"] == [3_200, 6_400, 12_800]
    cells = smoke.parent.parent / "report" / "smoke" / "cells"
    record = records.read_record(cells / "ra-kmeans-shared__centered.json")
    p = record["payload"]
    assert record["key"]["code"] == grid.cell_code() and record["key"]["settings"]["clip_grad"] == 1.0
    assert p["trunk"]["tokens"][0] == 0 and p["trunk"]["tokens"][-1] == 12_800 and p["n_runs"] == 3
    assert p["trunk"]["hungarian"][0] == [0.0, 0.0, 0.0]  # a shared start: identical at step 0
    for part in ("branch_at_budget", "trunk_at_budget"):
        assert len(p[part]) == 3 and set(p[part][-1]["pairs"]) == set(evaluation.PAIR_METRICS)
    assert p["delta"] == pytest.approx(res["delta"]["centered"], abs=1e-6)  # a share of the candidates' norm
    assert res["delta_over_median_norm"]["centered"] == pytest.approx(0.1)
    assert max(f.stat().st_size for f in cells.glob("*.json")) < 200_000
    saved = store.load_result(grid.cell_file(smoke, "ra-kmeans-shared", "centered"), {})
    assert len(saved["states"]["branch"]) == 3 and saved["dictionaries"]["branch"].shape == (3, 3, 32, 32)
    assert not list(smoke.rglob("*.ckpt")) and not list(smoke.rglob("*.tmp"))
    assert {r["configuration"] for r in res["start_scale"]} == {"topk-random", "ra-kmeans-shared"}


def test_02_rerun_reuses_records_and_rejects_typos(run_copy):
    path = run_copy / "cells" / "topk-random__raw.json"
    before = path.stat().st_mtime_ns
    res = run_stage("02_train_saes", run_copy, configurations=["topk-random"], preprocessing=["raw"])
    assert path.stat().st_mtime_ns == before and res["cells"]["topk-random__raw"]["reused"]
    with pytest.raises(SystemExit, match="configurations=.'topk-randm'. must be a list of distinct names"):
        run_stage("02_train_saes", run_copy, configurations=["topk-randm"])


def test_03_raw_distance_is_below_centered_which_is_below_chance_and_reads_atoms_one_way(smoke):
    res = json.loads((smoke / "03_galaxy_far_away.json").read_text())
    assert res["kmeans_distance_raw"] < res["kmeans_distance_centered"] < res["random_distance"]
    assert res["fvu_mean_only"] == pytest.approx(1.0, abs=0.05)
    dose = res["dose_response"]
    assert dose[0]["scale"] == 0.0 and dose[-1]["kmeans"] < dose[0]["kmeans"]  # more mean, closer
    assert len({round(d["topk_sae"], 6) for d in dose}) == 1  # b_pre absorbs the mean: flat
    grid_json = json.loads((smoke / "02_train_saes.json").read_text())
    assert res["mean_norm"] == grid_json["mean_norm"]  # one fit sample for both stages
    assert set(res["synthetic"]["topk-random"]) == {"recovered", "hungarian_between_runs", "recovered_centered",
                                                    "hungarian_between_runs_centered"}
    assert "centered synthetic data" in res["ground_truth"]
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
        assert res["quality_gate"][key] == [], key
        assert {"hungarian", "hungarian_alive", "hungarian_read", "activation_corr"} <= set(row)
    # the original protocol, two challengers against topk-random, four matched starts; two preprocessings
    n = len(configs.COMPARISONS) * 2
    assert len(res["falsification"]) == 3 * n and len(res["geometry_free"]) == n
    assert len(res["stabilization_advantage"]) == n and res["tests_skipped"] == []
    assert {r["metric"] for r in res["falsification"]} == {"mean_min", "hungarian", "hungarian_alive"}
    matched = {(r["challenger"], r["reference"]) for r in res["falsification"] if r["comparison"] == "matched start"}
    assert matched == {*configs.MATCHED_START.items(), configs.PARAMETERIZATION_MATCHED}
    assert all(r["margin"] == res["equivalence_margin"] == 1.0 for r in res["falsification"])
    over = res["over_budgets"]
    assert len(over) == n * 2 * 3 and {r["tokens"] for r in over} == set(res["budgets"])
    verdicts = res["verdict_over_budgets"]
    assert len(verdicts) == n and all(v["tokens"] == 12_800 for v in verdicts)
    assert all(set(v["noise"]) == {"cooldown", "last_doubling", "seed_sets"} for v in verdicts)
    assert all(v["noise"]["seed_sets"] is None for v in verdicts)  # 3 runs: no two seed sets of two
    assert [c["claim"] for c in res["claims"]] == list(labels.CLAIMS)
    assert {c["status"] for c in res["claims"]} <= set(labels.STATUSES)
    assert res["galaxy"]["configuration"] == "ra-kmeans-shared" and "FALSIFIED" not in res["verdict"]
    assert {r["configuration"] for r in res["authors_table"]} == {"topk-random", "ra-kmeans-shared"}
    assert len(res["authors_table"]) == 4 and set(res["authors_pattern"]) == set(labels.AUTHORS_RULES)
    for key, slope in res["slopes"].items():  # a diagnostic over each trunk's last doubling
        assert slope["lo"] <= slope["slope"] <= slope["hi"] and slope["tokens"] == 12_800, key
    for name in ("fig1_mean_min", "fig1_hungarian", "fig3_verdict_over_budgets"):
        assert (smoke / "figures" / f"{name}.png").is_file()
    assert res["seconds"] < 120  # records only: no weights read, nothing trained


def test_quality_gate_flags_an_untrained_cell_and_no_claim_rests_on_it(run_copy):
    res = run_stage("04_initialization_ablation", run_copy, max_fvu=0.01, n_boot=100)  # none this good
    assert all(res["quality_gate"].values()) and res["falsification"] == []
    assert len(res["tests_skipped"]) == 2 * len(configs.COMPARISONS) and "held-out FVU" in res["tests_skipped"][0]
    assert all(c["status"] == labels.NOT_ESTABLISHED for c in res["claims"] if c["claim"] != "galaxy")
    assert all(v["flagged"] for v in res["verdict_over_budgets"]) and "Not settled" in res["verdict"]


# ----------------------------------------------------------------------------- the run folder's defences
def test_nan_activations_are_refused_and_a_rebuilt_cache_gives_the_same_numbers(run_copy, smoke):
    acts = np.load(run_copy / "acts_train.npy", mmap_mode="r+")
    acts[3990:3995] = np.nan  # rows outside notebook 02's fit sample too
    acts.flush()
    del acts
    cells = mtimes(run_copy / "cells")
    with pytest.raises(pm.PapermillExecutionError, match="acts_train.npy does not match its recorded"):
        run_stage("02_train_saes", run_copy)
    assert mtimes(run_copy / "cells") == cells  # nothing trained, nothing recorded
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


def test_a_record_of_other_code_is_retrained_and_named(run_copy):
    path = run_copy / "cells" / "topk-random__raw.json"
    stale = json.loads(path.read_text())
    stale["key"]["code"] = "an-older-trainer"  # as if made by other code (checksum recomputed: a whole record)
    records.write_record(path, stale["key"], stale["payload"], stale["made"])
    before = mtimes(run_copy / "cells")
    run_stage("02_train_saes", run_copy)
    after = mtimes(run_copy / "cells")
    assert {p.name for p in after if after[p] != before.get(p)} == {"topk-random__raw.json"}
    page = (run_copy / "report" / "02_train_saes.ipynb").read_text()
    assert "topk-random__raw.json: made for another cell definition (differs in code)" in page


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
    sizes = dict(n_latents=32, n_candidates=16, k=2, train_tokens=1000, n_fit_tokens=1000, sae_budget=12800,
                 n_budgets=2)
    trained = run_stage("02_train_saes", run_copy, **protocol, **sizes)
    assert trained["n_training_tokens"] == 1000 and len(trained["cells"]) == 8
    assert trained["delta"] == {"raw": 0.1, "centered": 0.1}  # absolute, as the authors set it
    saved = lambda n: store.load_result(grid.cell_file(run_copy, n, "raw"), {})  # noqa: E731
    cell = saved("ra-kmeans-shared")
    meta = {**cell["meta"]["settings"], "delta": cell["delta"]}
    state = cell["states"]["branch"][0]
    sums = state["W"].sum(1)
    assert (state["W"] >= 0).all() and torch.allclose(sums[sums > 0], torch.ones(1), atol=1e-4)  # the simplex
    assert "b_pre" not in dict(grid.sae_from_state(state, meta).named_parameters())
    for name in ("topk-kmeans-shared-free", "ra-projection-off-free"):  # free rows from W C
        free = saved(name)
        state = free["states"]["branch"][0]
        sae = grid.sae_from_state(state, free["meta"]["settings"], configs.CONFIGURATIONS[name][2])
        assert "b_pre" not in dict(sae.named_parameters())
        atoms = free["dictionaries"]["branch"][-1]
        assert atoms[:, 16:].norm(dim=-1).max() > 0  # the zero atoms grew
        assert not torch.allclose(atoms.norm(dim=-1), torch.tensor(1.0))
    with pytest.raises(pm.PapermillExecutionError, match="no record made for these parameters"):
        run_stage("04_initialization_ablation", run_copy, configurations=protocol["configurations"])
    abl = run_stage("04_initialization_ablation", run_copy, **protocol, **sizes, n_boot=100)  # the records 02 made
    assert len(abl["authors_table"]) == 8 and all(np.isfinite(r["mean"]) for r in abl["authors_table"])
    assert {v["comparison"] for v in abl["verdict_over_budgets"]} == {"original protocol"}


# ----------------------------------------------------------------------------- 05
def test_05_trains_what_a_variant_changes_and_finds_the_rest_among_the_records(run_copy):
    out = run_stage("05_robustness", run_copy)
    assert out["variants"] == ["dictionary x2", "delta x4", "no final decay"] and set(out["holds"]) == set(out["variants"])
    rows = [r for r in out["rows"] if r["metric"] == "hungarian"]
    ref = json.loads((run_copy / "04_initialization_ablation.json").read_text())
    assert sum(r["variant"] == "profile" for r in rows) == \
        sum(t["metric"] == "hungarian" for t in ref["falsification"])  # the profile's rows on top
    assert all(r["holds"] for r in rows if r["variant"] == "profile")
    decisive = len(out["decisive"]) * 2
    assert len(out["trained"]["dictionary x2"]) == decisive  # every cell, at twice the atoms
    assert len(out["trained"]["delta x4"]) == sum(c.startswith("ra-") for c in out["decisive"]) * 2  # no TopK
    assert out["trained"]["no final decay"] == []  # the profile's own trunks
    big = records.read_record(run_copy / "robustness" / "dictionary-x2" / "cells" / "ra-random-points__centered.json")
    assert big["payload"]["n_latents"] == 64 and big["key"]["settings"]["sae_budget"] == 2 * 12_800
    sizes = {(r["n_latents"], r["cell"]): r for r in out["dictionary_sizes"]}
    random0 = [sizes[n, "topk-random__centered"]["step0"] for n in (32, 64)]
    assert random0[1] < random0[0]  # more random atoms lie closer to each other at step 0
    assert (run_copy / "figures" / "fig4_robustness.png").is_file()
    assert all(v == 3 for v in out["runs_per_cell"].values())
    again = run_stage("05_robustness", run_copy)
    assert all(t == [] for t in again["trained"].values()) and again["rows"] == out["rows"]  # reused, same numbers
