"""Grid cells in parallel on Dask: local worker processes, or any scheduler's address."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from .grid import CellJob, run_cell

CONNECT_TIMEOUT_S = 10  # how long a scheduler's address gets to answer before the run stops


def local_workers(workers: int) -> int:
    """Worker processes of a local cluster: workers, or one per CPU core when 0."""
    return workers or os.cpu_count() or 1


@contextmanager
def cell_runner(scheduler: str, workers: int = 0) -> Iterator[object | None]:
    """A Dask client for the scheduler while the block runs: None for "serial" (this process,
    cell after cell), a LocalCluster of single-threaded worker processes for "local", else the
    scheduler at that address; an unreachable address stops the run within CONNECT_TIMEOUT_S."""
    if scheduler == "serial":
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    if scheduler == "local":
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's adaptive
        # mmap threshold: every large tensor is then mapped and faulted in afresh, and a cell
        # trains 1.6x slower than in this process. The workers trim their heap instead as every
        # stage does (memory.trim_heap_every, from run_cell); the thread counts stay at 1.
        environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
                   if k != "MALLOC_TRIM_THRESHOLD_"}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), \
                LocalCluster(n_workers=local_workers(workers), threads_per_worker=1, processes=True,
                          dashboard_address=None, memory_limit=0) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError) as err:
        raise ConnectionError(f"scheduler={scheduler!r}: no Dask scheduler answered there within "
                              f"{CONNECT_TIMEOUT_S} s ({type(err).__name__}). Start one (dask "
                              "scheduler, or dask-jobqueue on a cluster), or use scheduler=\"local\" "
                              "or \"serial\"") from None
    with client:
        yield client


def worker_threads(client: object | None) -> int:
    """Torch threads per cell: each worker's own thread count on a cluster, 0 (as is) in process."""
    return 0 if client is None else min(client.nthreads().values())


def map_cells(jobs: Sequence[CellJob], client: object | None) -> list[dict]:
    """run_cell of every job, in process (client None) or on the client's workers, in the jobs'
    order; a progress bar and one printed line per finished cell (papermill's log shows them)."""
    threads = worker_threads(client)
    jobs = [replace(j, threads=threads) if threads else j for j in jobs]
    bar = tqdm(total=len(jobs), desc="cells")
    done: dict[int, dict] = {}

    def report(i: int, out: dict) -> None:
        """Record a finished cell and say so."""
        made = out["record"]["made"]
        done[i] = out
        bar.update()
        how = (f"reused ({made['commit']}, {made['machine']}, {made['date'][:10]}: "
               f"{made['seconds']['train']:.0f} s of training there)" if out["found"] else
               f"trained in {made['seconds']['train']:.0f} s, evaluated in {made['seconds']['evaluate']:.0f} s")
        print(f"{jobs[i].name} / {jobs[i].prep}: {how}", flush=True)

    if client is None:
        for i, job in enumerate(jobs):
            report(i, run_cell(job))
    else:
        from distributed import as_completed

        futures = {client.submit(run_cell, job, key=f"cell-{job.name}__{job.prep}-{i}", pure=False): i
                   for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            report(futures[fut], fut.result())
    bar.close()
    return [done[i] for i in range(len(jobs))]
