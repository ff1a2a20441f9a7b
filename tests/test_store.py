"""Files: atomic JSON, checksummed results, code identity, run-folder locks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ablation import grid, stats, store


def test_json_refuses_nan_and_names_where(tmp_path):
    with pytest.raises(ValueError, match=r"endpoint.fvu\[1\]"):
        store.write_json_atomic(tmp_path / "a.json", {"endpoint": {"fvu": [0.1, float("nan")]}})
    assert not list(tmp_path.iterdir())


def test_results_round_trip_and_corruption_is_named_and_recomputed(tmp_path, capsys):
    calls = []
    result = {"dictionaries": torch.randn(3, 4, 5), "seeds": [0, 1, 2],
              "state_dicts": [{"W": torch.ones(2, 2)}, {"W": torch.zeros(2, 2)}]}
    compute = lambda: calls.append(1) or result  # noqa: E731
    path = tmp_path / "cell.safetensors"
    a = store.cached_result(path, {"k": 1}, compute)
    b = store.cached_result(path, {"k": 1}, compute)
    assert len(calls) == 1 and torch.equal(b["dictionaries"], result["dictionaries"])
    assert b["seeds"] == [0, 1, 2] and torch.equal(b["state_dicts"][1]["W"], torch.zeros(2, 2))
    store.cached_result(path, {"k": 2}, compute)  # other metadata: recomputed
    assert len(calls) == 2
    raw = bytearray(path.read_bytes())
    raw[-64:] = np.arange(16, dtype=np.float32).tobytes()  # finite garbage in the tensor data
    path.write_bytes(bytes(raw))
    assert store.load_result(path, {"k": 2}) is None
    err = capsys.readouterr().err
    assert f"{path}: checksum mismatch" in err
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert store.load_result(path, {"k": 2}) is None
    import pickle

    path.write_bytes(pickle.dumps({"evil": 1}))  # a pickle in place of the tensors: never unpickled
    assert store.load_result(path, {"k": 2}) is None
    assert a["meta"] == {"k": 1}


def test_code_identity_follows_exactly_the_functions_used():
    train = store.code_sources(grid.train_cell)
    assert {"SAETrainer", "make_sae", "kmeans_centroids", "sae_grads", "kernels.c", "cooldown",
            "pair_matrices", "TrainSettings"} <= set(train)
    assert "fvu" not in train and "cell_trajectory" not in train and "write_record" not in train
    assert "train_cell" not in store.code_sources(stats.cell_trajectory)
    assert store.code_hash(grid.train_cell) != store.code_hash(stats.cell_trajectory)


def _package_copy(dest: Path) -> Path:
    """A copy of the ablation package to edit, imported fresh under its own name."""
    shutil.copytree(Path(store.__file__).parent, dest / "ablation", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _hash_in(root: Path, qualname: str) -> str:
    """code_hash of module.function in the package copy at root, in a fresh interpreter."""
    module, name = qualname.rsplit(".", 1)
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import ablation.{module} as m, "
            f"ablation.store as s; print(s.code_hash(m.{name}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_code_identity_survives_a_move_and_follows_a_callee_across_modules(tmp_path):
    root = _package_copy(tmp_path / "pkg")
    before = _hash_in(root, "grid.train_cell")
    assert before == store.code_hash(grid.train_cell)
    train_py, grid_py = root / "ablation" / "train.py", root / "ablation" / "grid.py"
    src = train_py.read_text()  # move snapshot_steps, unchanged, from train.py to grid.py
    start = src.index("def snapshot_steps(")
    moved = src[start:src.index("\n\n\n", start)]
    train_py.write_text(src.replace(moved + "\n\n\n", ""))
    grid_py.write_text(grid_py.read_text() + "\n\n" + moved + "\n")
    assert _hash_in(root, "grid.train_cell") == before  # moved, not changed: nothing goes stale
    sae_py = root / "ablation" / "sae.py"  # a callee two modules away: grid -> starts -> sae
    sae_py.write_text(sae_py.read_text().replace("bound = 1.0 / math.sqrt(d_in)",
                                                 "bound = 0.5 / math.sqrt(d_in)"))
    assert _hash_in(root, "grid.train_cell") != before  # changed: every cell it trained is stale


def test_a_second_run_on_one_folder_is_refused_naming_the_lock(tmp_path):
    held = store.lock_run_dir(tmp_path)
    import subprocess
    import sys

    other = subprocess.run([sys.executable, "-c", f"from ablation import store; store.lock_run_dir({str(tmp_path)!r})"],
                           capture_output=True, text=True)
    assert other.returncode != 0 and ".lock is locked by pid" in other.stderr
    held.close()
    store.lock_run_dir(tmp_path).close()  # free again once the holder is gone


def test_the_heap_trimmer_starts_once_and_runs():
    from ablation import memory

    assert memory.trim_heap_every(0.05) is True  # glibc, as on every machine of this project
    assert memory.trim_heap_every(0.05) is True and len(memory._STARTED) == 1
    assert memory._STARTED[0].is_alive() and memory._STARTED[0].daemon
