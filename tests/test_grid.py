"""One cell of the grid on the smoke profile: the trunk and its cooldown branches, the record it
leaves, the relaxation scaled to the data, and a resumed cell that ends bit for bit where an
uninterrupted one does."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ablation import grid, records, schedule, train
from conftest import smoke_params, write_cache


@pytest.fixture(scope="module")
def settings() -> grid.TrainSettings:
    return grid.TrainSettings.from_params(smoke_params())


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    from ablation import synthetic

    return synthetic.galaxy_toy_data(4000, 32, 5.0, seed=1)


def cell(settings, acts, tmp_path=None, name="ra-random-points", **kw):
    return grid.train_cell(name, "centered", acts, acts[:2000], [0, 1, 2], settings,
                           checkpoint=None if tmp_path is None else tmp_path / "cell.ckpt",
                           meta={"cell": "test"}, **kw)


def test_every_budget_gets_a_branch_and_a_trunk_reading(settings, acts):
    res = cell(settings, acts)
    assert res["budgets"] == [3_200, 6_400, 12_800] and res["tokens"][0] == 0
    assert res["tokens"][-1] == 12_800 and res["distances"]["hungarian"].shape == (len(res["tokens"]), 3, 3)
    assert len(res["branch"]) == len(res["trunk"]) == 3
    assert res["branch"][0]["dictionaries"].shape == (3, 32, 32)
    # the trunk's losses: every step of the largest budget, none of a branch's
    assert len(res["loss"]) == 12_800 // settings.sae_batch_size


def test_a_branch_leaves_the_trunk_unchanged_and_ends_as_a_run_decayed_to_its_budget(settings, acts):
    res = cell(settings, acts)
    steps = schedule.budget_steps(settings.sae_budget, settings.n_budgets, settings.sae_batch_size)
    kw = dict(shift=acts[:2000].mean(0), clip_grad=settings.clip_grad, dead_penalty=settings.dead_penalty,
              progress=False, device="cpu")
    models, _, _ = grid.build_cell("ra-random-points", "centered", acts[:2000], [0, 1, 2], settings)
    flat = train.train_saes(models, acts, [0, 1, 2], settings.sae_budget, settings.sae_batch_size,
                            settings.sae_lr, steps, **kw)  # the trunk alone: no branch at all
    for i in range(len(steps)):
        assert torch.equal(flat["dictionaries"][i], res["trunk"][i]["dictionaries"]), i
    for i, s in enumerate(steps):  # a run of that budget with its decay, trained from scratch
        models, _, _ = grid.build_cell("ra-random-points", "centered", acts[:2000], [0, 1, 2], settings)
        alone = train.train_saes(models, acts, [0, 1, 2], s * settings.sae_batch_size, settings.sae_batch_size,
                                 settings.sae_lr, [s], lr_decay=settings.lr_decay, **kw)
        assert torch.allclose(alone["dictionaries"][-1], res["branch"][i]["dictionaries"], atol=1e-5), i
        assert not torch.allclose(res["branch"][i]["dictionaries"], res["trunk"][i]["dictionaries"], atol=1e-5)


def test_an_interrupted_cell_resumes_bit_for_bit(settings, acts, tmp_path, monkeypatch):
    whole = cell(settings, acts)
    advance, calls = train.SAETrainer.advance, []

    def interrupted(self, to_step, lr_at):
        calls.append(to_step)
        if to_step > 60:  # past the checkpoints of the first budget
            raise KeyboardInterrupt
        advance(self, to_step, lr_at)
    monkeypatch.setattr(train.SAETrainer, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cell(settings, acts, tmp_path)
    monkeypatch.setattr(train.SAETrainer, "advance", advance)
    saved = torch.load(tmp_path / "cell.ckpt", weights_only=True)
    assert 0 < saved["trainer"]["step"] <= 60 and saved["taken"]["branch"][0] is not None
    resumed = cell(settings, acts, tmp_path)
    assert resumed["tokens"] == whole["tokens"] and torch.equal(resumed["loss"], whole["loss"])
    for part in ("branch", "trunk"):
        for a, b in zip(resumed[part], whole[part]):
            assert torch.equal(a["dictionaries"], b["dictionaries"])
    for m in whole["distances"]:
        assert np.array_equal(resumed["distances"][m], whole["distances"][m], equal_nan=True)
    for part in ("branch", "trunk"):
        for a, b in zip(resumed["states"][part], whole["states"][part]):
            assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_checkpoint_of_another_cell_is_not_resumed(settings, acts, tmp_path):
    models, _, _ = grid.build_cell("ra-random-points", "centered", acts[:2000], [0], settings)
    grid._save_checkpoint(tmp_path / "cell.ckpt", {"cell": "another"},
                          train.SAETrainer(models, acts, [0], 128, progress=False), {"done": 9})
    assert grid._load_checkpoint(tmp_path / "cell.ckpt", {"cell": "test"}) is None
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "cell.ckpt").read_bytes()[:100])
    assert grid._load_checkpoint(tmp_path / "cut.ckpt", {"cell": "another"}) is None


def test_delta_is_a_share_of_the_candidates_median_norm_unless_set_absolutely(settings, acts):
    sample = acts[:2000]
    centered = sample - sample.mean(0)
    models, _, delta = grid.build_cell("ra-kmeans-independent", "centered", sample, [0], settings)
    assert delta == pytest.approx(0.1 * float(centered.norm(dim=1).median()))
    assert models[0].delta == pytest.approx(delta)
    raw = grid.build_cell("ra-random-points", "raw", sample, [0], settings)[2]
    assert raw == pytest.approx(0.1 * float(sample.norm(dim=1).median())) and raw > delta  # raw sits farther out
    assert grid.build_cell("ra-random-points", "raw", sample, [0], replace(settings, delta=0.25))[2] == 0.25
    # a TopK cell reads no delta: its record's key leaves it out, an RA cell's keeps it
    assert "delta_share" not in settings.identity("topk") and settings.identity("ra")["delta_share"] == 0.1


def test_a_cell_job_trains_once_records_and_is_then_found_by_its_key(tmp_path):
    cache = write_cache(tmp_path / "cache")
    params = smoke_params(run_dir=str(cache))
    job = grid.cell_jobs(params, ["topk-random"], ["centered"], tmp_path / "run", [tmp_path / "cells"])[0]
    first = grid.run_cell(job)
    rec = first["record"]
    assert first["found"] is None and rec["key"] == job.key
    p = rec["payload"]
    assert p["budgets"] == [3_200, 6_400, 12_800] and len(p["branch_at_budget"]) == 3
    assert len(p["branch_at_budget"][-1]["pairs"]["hungarian_alive"]) == 3  # 3 runs: 3 pairs
    assert set(p["branch_at_budget"][-1]["runs"]) == {"fvu", "fvu_train", "l0", "dead_fraction"}
    assert grid.cell_file(tmp_path / "run", "topk-random", "centered").is_file()  # the weights stay here
    again = grid.run_cell(job)
    assert again["found"] is not None and again["record"] == rec
    fresh = grid.run_cell(replace(job, fresh=True))  # retrained: the same numbers on this machine
    assert fresh["found"] is None and fresh["record"]["payload"] == p
    other = grid.cell_jobs({**params, "sae_lr": 0.004}, ["topk-random"], ["centered"], tmp_path / "run",
                           [tmp_path / "cells"])[0]
    assert records.find_record(other.records, "topk-random", "centered", other.key) == (None, None)
