"""A cell's record: everything later stages read from a trained cell, small enough to commit,
keyed by what made it, checksummed, and reused by identity like a build cache.

A record is one JSON file, report/<profile>/cells/<configuration>__<preprocessing>.json: its
``key`` (the code, every setting and the activation cache's definition), ``made`` (when, where,
from which commit, in how many seconds), ``payload`` (the numbers) and ``sha256`` over the rest.
Pair matrices are stored as their upper triangles, every number rounded to 6 decimals, and every
later stage computes from the record as read back, so a reused record and a fresh one give the
same numbers. Weights stay in the run folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import ContextManager, Sequence

import numpy as np

from .store import cell_lock, temp_path

DIGITS = 6  # decimals a record keeps


def record_path(cells_dir: str | os.PathLike, name: str, prep: str) -> Path:
    """Where one cell's record lives in a folder of records."""
    return Path(cells_dir) / f"{name}__{prep}.json"


def triangle(m: np.ndarray) -> list[float]:
    """The upper triangle (i < j, row by row) of a run-by-run matrix."""
    m = np.asarray(m, dtype=float)
    return m[np.triu_indices(len(m), 1)].tolist()


def square(values: Sequence[float | None], n: int) -> np.ndarray:
    """The symmetric run-by-run matrix (NaN diagonal) of an upper triangle; None reads as NaN."""
    m = np.full((n, n), np.nan)
    i, j = np.triu_indices(n, 1)
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    m[i, j] = m[j, i] = v
    return m


def rounded(obj: object) -> object:
    """obj with every float rounded to DIGITS decimals and NaN or infinity as None (JSON null)."""
    if isinstance(obj, float):
        return round(obj, DIGITS) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return rounded(obj.tolist())
    if isinstance(obj, np.generic):
        return rounded(obj.item())
    return obj


def _canonical(obj: object) -> str:
    """The one text of a JSON-able object its checksum is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def key_digest(key: dict) -> str:
    """A short identity of a record's key."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]


def made_by(seconds: dict, device: str) -> dict:
    """Where and how a record was made: the commit (with '+changes' when the tracked tree was
    edited), the machine, the versions, the date and the seconds each part took."""
    import torch

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "ablation"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"commit": commit + ("+changes" if dirty else ""),
            "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} cores",
            "device": device, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def write_record(path: str | os.PathLike, key: dict, payload: dict, made: dict) -> dict:
    """Write a record atomically (a temporary file, then a rename) and return it as read back."""
    body = {"key": key, "key_digest": key_digest(key), "made": made, "payload": rounded(payload)}
    body = json.loads(_canonical(body))  # exactly what a reader will see
    record = {**body, "sha256": hashlib.sha256(_canonical(body).encode()).hexdigest()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_text(_canonical(record) + "\n")
    os.replace(tmp, path)
    return record


def _key_differences(found: dict, key: dict, where: str = "") -> list[str]:
    """The names of the key entries that differ between a found key and the requested one."""
    out = []
    for k in sorted(set(found) | set(key)):
        a, b = found.get(k), key.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _key_differences(a, b, f"{where}{k}.")
        elif a != b:
            out.append(f"{where}{k}")
    return out


def read_record(path: str | os.PathLike, key: dict | None = None) -> dict | None:
    """The record at path when it is whole, passes its checksum and (given ``key``) was made for
    exactly that key; else None, and what was wrong with a record that exists is said on stderr,
    so that retraining it is never silent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        body = {k: v for k, v in record.items() if k != "sha256"}
        ok = hashlib.sha256(_canonical(body).encode()).hexdigest() == record["sha256"]
    except (ValueError, KeyError, TypeError, AttributeError):
        print(f"{path}: unreadable (truncated or corrupt); not used", file=sys.stderr)
        return None
    if not ok:
        print(f"{path}: fails its checksum (edited or corrupt); not used", file=sys.stderr)
        return None
    if key is not None and record.get("key") != key:
        differ = _key_differences(record.get("key") or {}, key)
        print(f"{path}: made for another cell definition (differs in {', '.join(differ[:6])}"
              f"{', ...' if len(differ) > 6 else ''}); not used", file=sys.stderr)
        return None
    return record


def find_record(folders: Sequence[str | os.PathLike], name: str, prep: str,
                key: dict) -> tuple[dict | None, Path | None]:
    """The first record of the cell made for ``key`` in the folders, in order, and its path."""
    for folder in folders:
        path = record_path(folder, name, prep)
        record = read_record(path, key)
        if record is not None:
            return record, path
    return None, None


def record_lock(path: str | os.PathLike) -> ContextManager[None]:
    """An exclusive lock for one record while a block runs (``store.cell_lock`` on a hidden
    .<name>.lock beside it): two renders never train or write the same record at once; the
    second waits, then finds it."""
    path = Path(path)
    return cell_lock(path.with_name(f".{path.name}"))
