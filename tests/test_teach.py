"""The teach profile: a clone re-renders it from its committed records without training a cell,
its exercises are lines the runner accepts, and TEACHING.md says what they measured."""

from __future__ import annotations

import json
import shlex

import pytest
from conftest import ROOT, run, tracked_copy

import teaching

pytestmark = pytest.mark.slow


def test_a_clone_renders_the_teach_profile_from_its_records_and_shows_its_effects(tmp_path):
    repo = tracked_copy(tmp_path / "repo", outputs=True)
    run(["make", "report", "PROFILE=teach"], repo)
    folder = repo / "runs" / "teach"
    grid = json.loads((folder / "02_train_saes.json").read_text())
    assert all(c["reused"] for c in grid["cells"].values()) and len(grid["cells"]) == 8  # nothing trained
    abl = json.loads((folder / "04_initialization_ablation.json").read_text())
    committed = json.loads((ROOT / "report" / "teach" / "04_initialization_ablation.json").read_text())
    for k in ("verdict_over_budgets", "claims", "endpoint", "verdict"):
        assert abl[k] == committed[k], k  # the committed numbers, from the records
    galaxy = json.loads((folder / "03_galaxy_far_away.json").read_text())
    st, margin = abl["stabilization"], abl["equivalence_margin"]
    # the galaxy far away: far from the origin, cosine makes dictionaries look alike
    assert galaxy["kmeans_distance_raw"] < galaxy["kmeans_distance_centered"]
    # a shared start sits at 0 at step 0; independent k-means starts do not
    assert st["ra-kmeans-shared__centered"]["step0"] < 1e-6 < 0.02 < st["ra-kmeans-independent__centered"]["step0"]
    # one stabilization curve: TopK runs from random starts come closer over training
    topk = st["topk-random__centered"]
    assert topk["stabilizes"] and topk["end"] < topk["step0"] - margin


def test_every_exercise_is_a_line_the_runner_accepts():
    for name, (_, line, over, _) in teaching.EXERCISES.items():
        for command in line.split(" && "):
            args = shlex.split(command)
            assert args[:3] == [".venv/bin/python", "report.py", "run"], name
            check = run(["python", "report.py", "check", "teach", *args[5:]], ROOT)
            assert "run folder" in check.stderr, (name, check.stderr)


def test_teaching_md_states_what_each_committed_exercise_measured():
    assert (ROOT / "TEACHING.md").read_text() == teaching.render(), "TEACHING.md is stale: make TEACHING.md"
    done = sorted((ROOT / "report" / "teach" / "exercises").glob("*.json"))
    assert len(done) >= 4
    text = (ROOT / "TEACHING.md").read_text()
    for path in done:
        ex = json.loads(path.read_text())
        assert ex["line"] in text and f"Took {ex['seconds']} s here" in text
