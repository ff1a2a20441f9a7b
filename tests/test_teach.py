"""The teach profile: the whole report from an empty run folder, with the three effects its
profile file promises visible in its JSON."""

from __future__ import annotations

import json

import pytest
from conftest import run, tracked_copy

pytestmark = pytest.mark.slow


def test_teach_profile_shows_the_effects_it_promises(tmp_path):
    repo = tracked_copy(tmp_path / "repo")
    run(["make", "report", "PROFILE=teach"], repo)
    folder = repo / "runs" / "teach"
    galaxy = json.loads((folder / "03_galaxy_far_away.json").read_text())
    abl = json.loads((folder / "04_initialization_ablation.json").read_text())
    st, margin = abl["stabilization"], abl["equivalence_margin"]
    shared, independent = st["ra-kmeans-shared__centered"], st["ra-kmeans-independent__centered"]
    # the galaxy far away: far from the origin, cosine makes dictionaries look alike
    assert galaxy["kmeans_distance_raw"] < galaxy["kmeans_distance_centered"]
    assert st["ra-kmeans-shared__raw"]["end"] < shared["end"] - margin
    # shared against independent starts: a head start at step 0 that training erases
    assert shared["step0"] < 1e-6 and independent["step0"] > 0.02
    assert abs(shared["end"] - independent["end"]) < margin / 5
    # one stabilization curve: TopK runs from random starts come closer over training
    topk = st["topk-random__centered"]
    assert topk["stabilizes"] and topk["end"] < topk["step0"] - margin
    assert abl["n_runs"] == 3 and (repo / "report" / "teach" / "04_initialization_ablation.html").is_file()
