"""Files: atomic JSON, checksummed results keyed by the identity of their code, run locks."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch


_DEFINITIONS: dict[str, str] = {}  # name -> source of the package's functions and classes


def read_meta(path: str | os.PathLike) -> dict | None:
    """The JSON metadata at path, or None when missing or unreadable (an incomplete write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def meta_matches(found: dict | None, meta: dict) -> bool:
    """True when found (saved metadata) agrees with every key of the requested meta."""
    return found is not None and all(found.get(k) == v for k, v in meta.items())


def temp_path(path: str | os.PathLike) -> Path:
    """A unique temporary name beside path (hidden, per process), renamed onto path when complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _nonfinite_paths(obj: object, where: str = "") -> list[str]:
    """Key paths of the NaN or infinite floats inside a JSON-able object."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "<value>"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _nonfinite_paths(v, f"{where}.{k}".strip("."))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _nonfinite_paths(v, f"{where}[{i}]")]
    return []


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write obj as indented JSON through a temporary file and a rename; refuse NaN or infinity."""
    bad = _nonfinite_paths(obj)
    if bad:
        raise ValueError(f"refusing to write {path}: non-finite number(s) at {', '.join(bad[:5])}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _definitions() -> dict[str, str]:
    """Source of every top-level function and class of the package, by name, read once.

    Keyed by name alone, not by module: moving a function from one module to another leaves
    the identity of every result that depends on it unchanged.
    """
    import ast

    if not _DEFINITIONS:
        found: dict[str, str] = {}
        for path in sorted(Path(__file__).parent.glob("*.py")):
            source = path.read_text()
            for node in ast.parse(source).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    if node.name in found:
                        raise RuntimeError(f"{node.name} is defined twice in the package; code "
                                           "identity needs one definition per name")
                    found[node.name] = ast.get_source_segment(source, node)
        _DEFINITIONS.update(found)
    return _DEFINITIONS


def code_sources(*objs: Callable) -> dict[str, str]:
    """The source of objs and of every function or class of the package they use, followed
    transitively across modules (the C kernels' source too, when they are used), by name."""
    import ast

    defs, seen = _definitions(), {}
    todo = [o.__name__ for o in objs]
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen[name] = defs[name]
        todo += [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(ast.parse(defs[name]))
                 if isinstance(n, (ast.Name, ast.Attribute))]
    if "_compiled_kernels" in seen:
        from .kernels import KERNELS_C

        seen["kernels.c"] = KERNELS_C.read_text()
    return seen


def code_hash(*objs: Callable) -> str:
    """Identity of the code behind objs (see code_sources): any change to it changes the hash."""
    sources = code_sources(*objs)
    return hashlib.sha256("".join(sources[n] for n in sorted(sources)).encode()).hexdigest()[:16]


def _split_tensors(obj: object, tensors: dict, key: str = "") -> object:
    """obj with every tensor moved into tensors[key] and replaced by {'__tensor__': key}."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return _split_tensors(torch.from_numpy(np.ascontiguousarray(obj)), tensors, key)
    if isinstance(obj, dict):
        return {k: _split_tensors(v, tensors, f"{key}.{k}".strip(".")) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors, f"{key}.{i}".strip(".")) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: object, tensors: dict) -> object:
    """Inverse of _split_tensors."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_result(path: str | os.PathLike, result: dict, meta: dict) -> None:
    """Save a result as safetensors (its tensors) plus JSON (everything else, meta, checksum).

    The tensors go to ``path`` (.safetensors), the rest to ``path`` with .json, written last: a
    result without its JSON, or whose checksum does not match, is never taken as complete.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(result, tensors)
    path.with_suffix(".json").unlink(missing_ok=True)
    tmp = temp_path(path)
    save_file(tensors, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # safetensors writes 0600; a shared run folder needs the usual mode
    os.replace(tmp, path)
    write_json_atomic(path.with_suffix(".json"), {"meta": meta, "sha256": file_sha256(path),
                                                  "result": skeleton})


def load_result(path: str | os.PathLike, meta: dict) -> dict | None:
    """The result saved at path when its metadata matches meta and its checksum holds, else None.

    A result that is present but corrupt (unreadable JSON, wrong checksum) is named on stderr, so
    the recomputation that follows is never silent. Nothing is unpickled.
    """
    from safetensors.torch import load_file

    path = Path(path)
    info = read_meta(path.with_suffix(".json"))
    if info is None or not path.exists():
        if path.exists() or path.with_suffix(".json").exists():
            print(f"{path}: incomplete or unreadable; recomputing", file=sys.stderr)
        return None
    if not meta_matches(info.get("meta"), meta):
        return None
    if file_sha256(path) != info.get("sha256"):
        print(f"{path}: checksum mismatch (the file was modified or is corrupt); recomputing",
              file=sys.stderr)
        return None
    return {**_join_tensors(info["result"], load_file(str(path))), "meta": info["meta"]}


def cached_result(path: str | os.PathLike, meta: dict, compute: Callable[[], dict]) -> dict:
    """The verified result at path when its meta matches, else compute() saved atomically."""
    found = load_result(path, meta)
    if found is not None:
        return found
    out = compute()
    save_result(path, out, meta)
    return {**out, "meta": meta}


def claim_run_dir(run_dir: str | os.PathLike, profile: str = "default") -> None:
    """Make run_dir this profile's folder (run_dir/profile.json); stop, naming both profiles, when
    it belongs to another, before this run can replace that profile's models, caches or cells."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    owner = read_meta(path / "profile.json")
    if owner is not None and owner.get("profile") != profile:
        raise RuntimeError(
            f"the run folder {run_dir} holds the results of profile {owner.get('profile')!r}; this "
            f"run is profile {profile!r}. Run it in its own folder (run_dir=None gives "
            f"runs/{profile}), or delete {run_dir} to give that folder to {profile!r}")
    if owner is None:
        write_json_atomic(path / "profile.json", {"profile": profile})


def lock_run_dir(run_dir: str | os.PathLike, profile: str = "default"):
    """Claim run_dir for the profile, then hold an exclusive lock on run_dir/.lock for as long as
    the returned file stays open.

    A second run on the same folder fails at once with a message naming the lock and its holder,
    instead of racing the first one. The lock goes when the process ends (the kernel exits).
    Notebook 02 locks cell by cell instead (``cell_lock``), so that several processes or jobs can
    share one folder's grid.
    """
    import fcntl

    claim_run_dir(run_dir, profile)
    path = Path(run_dir) / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RuntimeError(f"the run folder {run_dir} is in use: {path} is locked by {holder}; "
                           "wait for that run to finish, or give this run its own run_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


@contextmanager
def cell_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on path + '.lock' while the block runs: another process (a Dask
    worker, a job on a shared filesystem) that wants the same cell waits for it, then finds it
    saved. The kernel releases the lock when its holder dies, so a killed worker blocks nobody."""
    import fcntl

    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
