"""Grid cells on Dask: a local cluster gives the serial run's numbers, a killed worker loses
nothing, two processes never train one cell at once, a bad scheduler stops the run at once."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ablation import cluster, grid, parameters, synthetic
from ablation.store import cell_lock, load_result

CELL_KEYS = grid.TRAIN_KEYS  # train_cell's settings, as notebook 02 passes them


@pytest.fixture(scope="module")
def smoke() -> dict:
    """The smoke profile's training parameters, as notebook 02 resolves them."""
    return parameters.resolve_parameters({n: None for n in ("profile", *CELL_KEYS)} | {"profile": "smoke"})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A small activation cache on disk, as notebook 01 leaves one."""
    path = tmp_path_factory.mktemp("acts") / "acts_train.npy"
    np.save(path, synthetic.galaxy_toy_data(4000, 32, 5.0, seed=1).numpy())
    return path


def job(smoke: dict, cache: Path, run_dir: Path, name: str, **over) -> grid.CellJob:
    """A smoke cell of 3 runs as notebook 02 builds it (over: train_cell keywords changed)."""
    train = {k: smoke[k] for k in CELL_KEYS} | over
    return grid.CellJob(str(run_dir), name, "centered", str(cache), (0, 1, 2),
                        {"cell": name, **{k: v for k, v in train.items() if k != "device"}}, train,
                        n_fit_tokens=2000)


def saved(run_dir: Path, name: str) -> dict:
    """The trained state of every run of a saved cell."""
    cell = load_result(grid.cell_file(run_dir, name, "centered"), {})
    assert cell is not None
    return cell["state_dicts"]


def same(a: dict | list, b: dict | list) -> bool:
    """Bit-for-bit equality of two nested containers of tensors."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def test_two_local_workers_give_the_serial_numbers_bit_for_bit(smoke, cache, tmp_path):
    names = ("topk-random", "ra-random-points")
    serial = [replace(job(smoke, cache, tmp_path / "serial", n), threads=1) for n in names]
    out_serial = cluster.map_cells(serial, None)
    assert torch.get_num_threads() > 0
    with cluster.cell_runner("local", 2) as client:
        assert len(client.nthreads()) == 2 and set(client.nthreads().values()) == {1}
        out_dask = cluster.map_cells([job(smoke, cache, tmp_path / "dask", n) for n in names], client)
    for name, a, b in zip(names, out_serial, out_dask):
        assert same(saved(tmp_path / "serial", name), saved(tmp_path / "dask", name))
        assert torch.equal(a["loss"], b["loss"]) and a["convergence"] == b["convergence"]
    again = cluster.map_cells(serial, None)  # saved: found, not retrained
    assert all(torch.equal(a["loss"], b["loss"]) for a, b in zip(again, out_serial))
    # a reused cell says so, and keeps the training seconds of the run that trained it
    assert not any(a["reused"] for a in out_serial) and all(a["reused"] for a in again)
    assert [a["train_seconds"] for a in again] == [a["train_seconds"] for a in out_serial]
    assert all(0 < a["train_seconds"] <= a["seconds"] for a in out_serial)


def test_a_killed_worker_loses_nothing(smoke, cache, tmp_path):
    long = dict(converge_tolerance=1e-9, max_sae_tokens=smoke["min_sae_tokens"] * 64)  # to the cap
    whole = cluster.map_cells([replace(job(smoke, cache, tmp_path / "whole", "ra-random-points", **long),
                                       threads=1)], None)[0]
    ckpt = grid.cell_file(tmp_path / "killed", "ra-random-points", "centered", ".ckpt")
    with cluster.cell_runner("local", 2) as client:
        fut = client.submit(grid.run_cell, replace(job(smoke, cache, tmp_path / "killed",
                                                       "ra-random-points", **long), threads=1),
                            pure=False)
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline:  # the cell is halfway through
            time.sleep(0.005)
        busy = [w for w, keys in client.processing().items() if fut.key in keys]
        assert ckpt.exists() and len(busy) == 1, "the cell finished before it could be interrupted"
        pid = client.run(os.getpid, workers=busy)[busy[0]]
        os.kill(pid, signal.SIGKILL)
        out = fut.result(timeout=300)
    assert same(saved(tmp_path / "whole", "ra-random-points"), saved(tmp_path / "killed", "ra-random-points"))
    assert torch.equal(out["loss"], whole["loss"]) and not ckpt.exists()
    assert out["resumed"] and not whole["resumed"]  # finished from the killed worker's checkpoint


def test_a_cell_is_trained_by_one_process_at_a_time(tmp_path):
    path = tmp_path / "saes" / "x__raw.safetensors"
    order = []
    with cell_lock(path):
        pid = os.fork()
        if pid == 0:  # a second process wants the same cell: it must wait for the first
            with cell_lock(path):
                (tmp_path / "child").write_text(str(time.monotonic()))
            os._exit(0)
        time.sleep(0.5)
        order.append(time.monotonic())
        assert not (tmp_path / "child").exists()
    os.waitpid(pid, 0)
    assert float((tmp_path / "child").read_text()) >= order[0]


def test_an_unreachable_scheduler_fails_fast_and_names_itself():
    t = time.monotonic()
    with pytest.raises(ConnectionError, match=r"scheduler='tcp://127\.0\.0\.1:9'"):
        with cluster.cell_runner("tcp://127.0.0.1:9"):
            pass
    assert time.monotonic() - t < cluster.CONNECT_TIMEOUT_S + 20
    with pytest.raises(ValueError, match="scheduler"):
        parameters.check_parameters({"scheduler": "my-laptop"})
