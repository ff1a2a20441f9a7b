"""Bad input fails fast with a message naming the parameter and the allowed values."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from ablation import parameters, sae, starts, store, train

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PROFILES = sorted(p.stem for p in (ROOT / "params").glob("*.yaml"))


@pytest.mark.parametrize("call,match", [
    (lambda x: sae.TopKSAE(8, 4, 5), "k=5"),
    (lambda x: starts.make_sae("topk", "kmeans-typo", x, 8, 2, 0), "init='kmeans-typo'.*kmeans-shared"),
    (lambda x: starts.make_sae("topk", "kmeans", x, 8, 2, 0), "init='kmeans'"),
    (lambda x: starts.make_sae("mlp", "random", x, 8, 2, 0), "arch='mlp'.*topk"),
    (lambda x: sae.RelaxedArchetypalSAE(8, 4, 2, torch.randn(4, 8), delta=-1.0), "delta=-1.0"),
    (lambda x: starts.make_sae("ra", "random", torch.where(x > 0, x, torch.nan), 8, 2, 0), "NaN"),
    (lambda x: starts.make_sae("ra", "random-points", x, 8, 2, 0, n_candidates=500), "n_candidates=500"),
    (lambda x: parameters.resolve_device("tpu"), "device='tpu'"),
    (lambda x: parameters.check_seeds([0, 0, 1]), r"seeds=\[0, 0, 1\] repeats a seed"),
    (lambda x: parameters.check_seeds("0,1"), "seeds='0,1' must be a non-empty list"),
    (lambda x: parameters.check_seeds(3), "seeds=3 must be a non-empty list"),
])
def test_bad_parameters_fail_fast_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(100, 8))


def test_cuda_without_a_gpu_names_the_parameter():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA"):
        parameters.resolve_device("cuda")


@pytest.mark.parametrize("params,match", [
    ({"k": "4O"}, "k='4O' must be an integer >= 1"), ({"sae_lr": 0}, "sae_lr=0 must be a number > 0"),
    ({"device": "gpu"}, "device='gpu'"), ({"seeds": [0, 0]}, "seeds=.0, 0. must be"),
    ({"configurations": ["topk-randm"]}, "configurations=.*distinct names"),
    ({"lr_decay": 1.0}, r"lr_decay=1.0 must be a number in \[0, 1\)"),
    ({"drop_first": "yes"}, "drop_first='yes' must be true or false")])
def test_check_parameters_names_the_parameter_and_the_rule(params, match):
    with pytest.raises(ValueError, match=match):
        parameters.check_parameters(params)
    parameters.check_parameters({"k": 4, "clip_grad": 0, "seeds": [0, 1], "unknown_to_helpers": object()})


def test_trainer_rejects_mismatched_inputs(data):
    models = [starts.make_sae("topk", "random", data, 24, 4, seed=0)]
    with pytest.raises(ValueError, match="seeds"):
        train.train_saes(models, data, [0, 1], 640, 64, progress=False)
    with pytest.raises(ValueError, match="d_in"):
        train.train_saes(models, data[:, :8], [0], 640, 64, progress=False)
    with pytest.raises(ValueError, match="snapshots"):
        train.train_saes(models, data, [0], 640, 64, snapshots=[0, 99], progress=False)
    with pytest.raises(ValueError, match="clip_grad=-1"):
        train.train_saes(models, data, [0], 640, 64, clip_grad=-1, progress=False)


# ----------------------------------------------------------------------------- one home per parameter


def _cells(path: Path) -> tuple[str, str]:
    """A notebook's tagged parameters cell and the rest of its code."""
    cells = json.loads(path.read_text())["cells"]
    params = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    rest = [c for c in cells if c["cell_type"] == "code" and c is not params]
    return "".join(params["source"]), "\n".join("".join(c["source"]) for c in rest)


def _names(code: str) -> set[str]:
    """Every name a piece of code reads or binds."""
    return {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_stage_declares_exactly_what_it_uses_with_the_one_default(path):
    cell, code = _cells(path)
    declared = [n.targets[0].id for n in ast.parse(cell).body]
    assert declared[0] == "profile" and len(set(declared)) == len(declared)
    used = _names(code) & set(parameters.PARAMETERS)
    assert used <= set(declared), f"{path.name} uses {sorted(used - set(declared))} undeclared"
    # the cell is generated from the one source: every default and meaning as stated there
    assert cell.rstrip("\n") == parameters.parameters_cell(declared).rstrip("\n"), (
        f"{path.name}: run `python report.py params`")


def test_the_checks_catch_the_drift_that_once_made_a_wrong_figure():
    """Notebook 03 once used pre_bias without declaring it, so a profile's pre_bias never reached
    its dose-response SAEs; a default typed into one cell can drift from the source the same way."""
    cell, code = _cells(NOTEBOOKS[3])
    declared = {n.targets[0].id for n in ast.parse(cell).body}
    missing = (_names(code) & set(parameters.PARAMETERS)) - (declared - {"pre_bias"})
    assert missing == {"pre_bias"}  # the undeclared use is found
    stage02 = _cells(NOTEBOOKS[2])[0]
    assert "k = None  # active latents per token (default 16)" in stage02
    drifted = stage02.replace("(default 16)", "(default 32)")
    assert drifted.rstrip() != parameters.parameters_cell(
        [n.targets[0].id for n in ast.parse(stage02).body]).rstrip()


@pytest.mark.parametrize("profile", PROFILES)
def test_plain_papermill_with_a_profile_writes_under_its_own_run_folder(profile):
    """papermill -f params/<profile>.yaml injects the file's values; every other parameter is
    None in the cell, so run_dir resolves to runs/<profile> in every stage."""
    injected = parameters.load_profile(profile)
    for path in NOTEBOOKS:
        declared = {n.targets[0].id: None for n in ast.parse(_cells(path)[0]).body}
        declared["profile"] = "default"  # the cell's own line, replaced by the injected one
        resolved = parameters.resolve_parameters({**declared, **{k: v for k, v in injected.items()
                                                                 if k in declared}})
        assert resolved["run_dir"] == f"runs/{profile}", (profile, path.name)


def test_switching_profile_is_one_line_and_explicit_values_win():
    cell = {n: None for n in ("profile", "k", "n_latents", "sae_budget", "run_dir", "cells_dir", "figures_dir")}
    smoke = parameters.resolve_parameters({**cell, "profile": "smoke"})
    assert (smoke["k"], smoke["n_latents"], smoke["run_dir"]) == (4, 32, "runs/smoke")
    assert smoke["figures_dir"] == "runs/smoke/figures" and smoke["sae_budget"] == 12_800
    assert smoke["cells_dir"] == "report/smoke/cells"  # the profile's own folder: committed records
    other = parameters.resolve_parameters({**cell, "profile": "smoke", "run_dir": "runs/elsewhere"})
    assert other["cells_dir"] == "runs/elsewhere/cells"  # any other run folder keeps its records
    assert parameters.resolve_parameters({**cell, "profile": "smoke", "k": 8})["k"] == 8
    assert parameters.resolve_parameters(cell)["k"] == 16  # the default profile: the defaults
    with pytest.raises(ValueError, match="profile='smok' is unknown; choose one of"):
        parameters.resolve_parameters({**cell, "profile": "smok"})


def test_where_a_run_goes_changes_no_folder_and_what_it_computes_does():
    """device and scheduler keep the profile's run folder and figures, on a stage that does not
    declare scheduler too (make passes them to every stage); k gets a folder of its own."""
    import report
    nb00 = ROOT / "notebooks" / "00_language_model.ipynb"
    placed = report.resolve("smoke", {"device": "cpu", "scheduler": "tcp://10.0.0.5:8786"}, nb00)
    assert (placed["run_dir"], placed["figures_dir"]) == ("runs/smoke", "runs/smoke/figures")
    own = report.resolve("smoke", {"k": 2, "scheduler": "local"})
    assert (own["run_dir"], own["figures_dir"]) == ("runs/smoke+k=2", "runs/smoke+k=2/figures")
    with pytest.raises(SystemExit):  # a result-changing parameter the stage does not declare
        report.resolve("smoke", {"n_latents": 8}, nb00)


def test_a_run_folder_of_another_profile_is_never_taken_over(tmp_path):
    lock = store.lock_run_dir(tmp_path / "runs" / "x", "authors")
    lock.close()
    assert json.loads((tmp_path / "runs" / "x" / "profile.json").read_text()) == {"profile": "authors"}
    with pytest.raises(RuntimeError, match="holds the results of profile 'authors'; this run is "
                                           "profile 'smoke'.*runs/smoke"):
        store.lock_run_dir(tmp_path / "runs" / "x", "smoke")
    store.lock_run_dir(tmp_path / "runs" / "x", "authors").close()  # its own profile: welcome


# ----------------------------------------------------------------------------- checked before anything runs


@pytest.mark.parametrize("params,match", [
    ({"k": 32, "n_latents": 16}, r"k=32 must lie in 1..n_latents=16"),
    ({"dose_sae_k": 9, "dose_sae_latents": 8}, r"dose_sae_k=9 must lie in 1..dose_sae_latents=8"),
    ({"n_candidates": 600, "n_fit_tokens": 500}, r"n_candidates=600 must be at most n_fit_tokens=500"),
    ({"model_name": "smollm2", "layer": 30}, r"layer=30 must lie in 0..29 \(smollm2 has 30 blocks\)"),
    ({"model_name": "local-gptneox", "n_layers": 4, "layer": 4}, r"layer=4 must lie in 0..3"),
    ({"model_name": "./no/such/folder"}, r"model_name='./no/such/folder' is neither a folder"),
])
def test_parameters_that_tie_together_are_checked_with_their_allowed_values(params, match):
    with pytest.raises(ValueError, match=match):
        parameters.check_together(params)


def test_a_hub_id_and_an_existing_folder_pass_the_model_check(tmp_path):
    parameters.check_together({"model_name": "EleutherAI/pythia-70m-deduped", "layer": 3})
    parameters.check_together({"model_name": str(tmp_path), "layer": 40})  # depth known at boot
