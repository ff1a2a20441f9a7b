"""Grid cells on Dask: a local cluster gives the serial run's numbers, a killed worker loses
nothing, two processes never train one cell at once, a bad scheduler stops the run at once."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ablation import cluster, grid, parameters
from ablation.store import cell_lock
from conftest import smoke_params, write_cache

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A small pair of activation caches on disk, as notebook 01 leaves them."""
    return write_cache(tmp_path_factory.mktemp("acts"))


def job(cache: Path, run_dir: Path, name: str, **over) -> grid.CellJob:
    """A smoke cell of 3 runs as notebook 02 builds it (over: parameters changed)."""
    return grid.cell_jobs(smoke_params(run_dir=str(cache), **over), [name], ["centered"], run_dir,
                          [run_dir / "cells"])[0]


def test_two_local_workers_give_the_serial_numbers_bit_for_bit(cache, tmp_path):
    names = ("topk-random", "ra-random-points")
    serial = [replace(job(cache, tmp_path / "serial", n), threads=1) for n in names]
    out_serial = cluster.map_cells(serial, None)
    assert torch.get_num_threads() > 0
    with cluster.cell_runner("local", 2) as client:
        assert len(client.nthreads()) == 2 and set(client.nthreads().values()) == {1}
        out_dask = cluster.map_cells([job(cache, tmp_path / "dask", n) for n in names], client)
    for a, b in zip(out_serial, out_dask):
        assert a["record"]["payload"] == b["record"]["payload"] and a["record"]["key"] == b["record"]["key"]
    again = cluster.map_cells(serial, None)  # recorded: found, not retrained
    assert [a["record"] for a in again] == [a["record"] for a in out_serial]
    # a reused cell says where it was found, and keeps the seconds of the run that trained it
    assert not any(a["found"] for a in out_serial) and all(a["found"] for a in again)
    assert all(0 < a["record"]["made"]["seconds"]["train"] <= a["seconds"] for a in out_serial)


def test_a_killed_worker_loses_nothing(cache, tmp_path):
    long = dict(sae_budget=12_800 * 8)
    whole = cluster.map_cells([replace(job(cache, tmp_path / "whole", "ra-random-points", **long),
                                       threads=1)], None)[0]
    ckpt = grid.cell_file(tmp_path / "killed", "ra-random-points", "centered", ".ckpt")
    with cluster.cell_runner("local", 2) as client:
        fut = client.submit(grid.run_cell, replace(job(cache, tmp_path / "killed", "ra-random-points", **long),
                                                   threads=1), pure=False)
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline:  # the cell is partway through
            time.sleep(0.005)
        busy = [w for w, keys in client.processing().items() if fut.key in keys]
        assert ckpt.exists() and len(busy) == 1, "the cell finished before it could be interrupted"
        pid = client.run(os.getpid, workers=busy)[busy[0]]
        os.kill(pid, signal.SIGKILL)
        out = fut.result(timeout=300)
    assert out["record"]["payload"] == whole["record"]["payload"] and not ckpt.exists()
    assert out["record"]["made"]["resumed"] and not whole["record"]["made"]["resumed"]


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
