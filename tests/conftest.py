"""Test-wide setup: no hub access (kernels inherit it), and one smoke run of the whole pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ablation import starts, synthetic, train

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one test process per core:
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread each, and for the kernels and makes they start
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def tracked_copy(dest: Path, outputs: bool = False) -> Path:
    """A copy of the repository's files (mtimes kept) sharing this checkout's .venv.

    The committed report/ and figures/ come along only with ``outputs=True``.
    """
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and (outputs or not f.startswith(("report/", "figures/"))):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    os.symlink(ROOT / ".venv", dest / ".venv")
    return dest


def run(cmd: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command in cwd (a copy of the repository) with the project's Python first on PATH and
    the copy's own code first on the import path (the shared .venv's editable install points at
    this checkout); check its status if ok."""
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
           "PYTHONPATH": str(cwd)}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="session")
def made(tmp_path_factory) -> Path:
    """A repository copy (committed report included, as in a clone) after `make report
    PROFILE=smoke`, as a user runs it (its terminal output in runs/make-report-smoke.log);
    readme.py made newer so that README.md is regenerated."""
    repo = tracked_copy(tmp_path_factory.mktemp("repo"), outputs=True)
    os.utime(repo / "readme.py")
    done = run(["make", "report", "PROFILE=smoke"], repo)
    (repo / "runs" / "make-report-smoke.log").write_text(done.stdout)  # what a user's terminal shows
    return repo


@pytest.fixture(scope="session")
def smoke(made) -> Path:
    """The smoke profile's run folder of that pipeline run."""
    return made / "runs" / "smoke"


@pytest.fixture
def run_copy(smoke, tmp_path) -> Path:
    """A copy of the smoke run folder (mtimes kept) with the profile's cell records in its own
    cells/ (where a stage run on another folder keeps them), for tests that re-run or break stages."""
    copy = Path(shutil.copytree(smoke, tmp_path / "run", symlinks=True))
    shutil.copytree(smoke.parent.parent / "report" / "smoke" / "cells", copy / "cells")
    return copy


# ----------------------------------------------------------------------------- shared by the unit tests


def random_dict(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def stacked(models, kind: str) -> dict:
    """Parameters (kind='parameters') or buffers of same-shape models, stacked over runs."""
    named = [dict(getattr(m, f"named_{kind}")()) for m in models]
    return {n: torch.stack([d[n].detach() for d in named]) for n in named[0]}


@pytest.fixture(scope="module")
def toy() -> torch.Tensor:
    return synthetic.galaxy_toy_data(4096, 64, 20.0, seed=0)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return synthetic.galaxy_toy_data(4096, 16, 8.0, seed=3)


def train_runs(arch, init, data, seeds=(0, 1, 2), steps=12, lr=3e-3, **kw):
    train_kw = {k: kw.pop(k) for k in ("clip_grad", "lr_decay", "dead_penalty", "precision") if k in kw}
    models = [starts.make_sae(arch, init, data, 24, 4, seed=s, **kw) for s in seeds]
    out = train.train_saes(models, data, list(seeds), 64 * steps, 64, lr=lr, progress=False,
                       device="cpu", **train_kw)
    return models, out


def pair_matrix(values: np.ndarray) -> np.ndarray:
    """A symmetric run-by-run matrix with NaN diagonal whose pair (i, j) is values[i] + values[j]."""
    m = values[:, None] + values[None, :]
    np.fill_diagonal(m, np.nan)
    return m


def write_cache(folder: Path, d: int = 32, n_train: int = 4000, n_heldout: int = 600) -> Path:
    """A small pair of activation caches with their metadata, as notebook 01 leaves them (toy data
    far from the origin); returns the folder."""
    from ablation import store

    folder.mkdir(parents=True, exist_ok=True)
    data = synthetic.galaxy_toy_data(n_train + n_heldout, d, 5.0, seed=1).numpy()
    for split, arr in (("train", data[:n_train]), ("heldout", data[n_train:])):
        np.save(folder / f"acts_{split}.npy", arr)
        store.write_json_atomic(folder / f"acts_{split}.json", {
            "model_name": "toy", "hook": "blocks.0.hook_resid_post", "split": split, "n_tokens": len(arr),
            "shape": list(arr.shape), "sha256": store.file_sha256(folder / f"acts_{split}.npy")})
    return folder


def smoke_params(**over) -> dict:
    """The smoke profile's parameters as notebook 02 resolves them, for a cache of write_cache."""
    from ablation import grid, parameters

    names = ("profile", *grid.TRAIN_KEYS, "seeds", "train_tokens", "n_fit_tokens", "n_eval_tokens", "seed")
    params = parameters.resolve_parameters({n: None for n in names} | {"profile": "smoke"})
    return {**params, "seeds": [0, 1, 2], "n_fit_tokens": 2000, "n_eval_tokens": 500, **over}
