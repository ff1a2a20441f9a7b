"""The README's context on known cases: what a robustness variant would cost, from the records."""

from __future__ import annotations

import json

import pytest

import readme


def test_a_variants_cost_is_the_profiles_recorded_rate_times_what_it_trains(tmp_path, monkeypatch):
    cells = tmp_path / "report" / "default" / "cells"
    cells.mkdir(parents=True)
    for name, seconds in (("topk-random", 1000.0), ("ra-random-points", 2000.0), ("ra-kmeans-shared", 4000.0)):
        (cells / f"{name}__centered.json").write_text(json.dumps(
            {"key": {"configuration": name}, "made": {"seconds": {"train": seconds}}}))
    monkeypatch.setattr(readme, "ROOT", tmp_path)
    costs = {c["variant"]: c for c in readme.variant_costs()}
    # 8 decisive cells on two preprocessings: 4 TopK at 1,000 s, 4 archetypal at the mean 3,000 s
    assert costs["second seed set"]["cells"] == 16
    assert costs["second seed set"]["hours"] == pytest.approx(2 * (4 * 1000 + 4 * 3000) / 3600)
    assert costs["delta x4"]["cells"] == 8  # a TopK SAE has no delta: its cells are the profile's
    assert costs["delta x4"]["hours"] == pytest.approx(2 * 4 * 3000 / 3600)
    assert costs["no final decay"]["cells"] == 0 and costs["no final decay"]["hours"] == 0
    big = costs["dictionary x4"]
    assert big["lower_bound"] and big["hours"] == pytest.approx(4 * costs["second seed set"]["hours"])
    monkeypatch.setattr(readme, "ROOT", tmp_path / "nothing")
    assert readme.variant_costs() == []  # no record of an architecture yet: no rate to quote
