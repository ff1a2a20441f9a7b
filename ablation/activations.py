"""Stage 01: text to token windows, the verified activation cache, activation statistics."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .lm import encode_texts, split_documents, stdlib_python_files, stdlib_texts
from .parameters import check_choice, check_finite
from .store import code_hash, file_sha256, meta_matches, read_meta, temp_path, write_json_atomic


def text_tokens(source: str, tokenizer, split: str, n_tokens: int,
                heldout_every: int = 20, name: str = "n_tokens") -> np.ndarray:
    """n_tokens token ids of one split of 'stdlib' text or of a hub text dataset.

    Both sources are split by document (every heldout_every-th held out), so training and
    held-out tokens never overlap. For the stdlib, a request beyond the corpus fails before any
    tokenizing (a byte-level token covers at least one byte); ``name`` is the parameter blamed.
    """
    if source == "stdlib":
        files = list(split_documents(stdlib_python_files(), split, heldout_every))
        bound = sum(f.stat().st_size + 1 for f in files)
        if n_tokens > bound:
            raise ValueError(f"{name}={n_tokens:,} needs more {split} text than the stdlib holds "
                             f"(at most {bound:,} tokens in {len(files)} files); lower {name}")
    docs = stdlib_texts(split, heldout_every) if source == "stdlib" else \
        split_documents(hub_texts(source), split, heldout_every)
    out, have = [], 0
    for chunk in iter(lambda: list(itertools.islice(docs, 64)), []):
        out.append(encode_texts(tokenizer, chunk))
        have += len(out[-1])
        if have >= n_tokens:
            return np.concatenate(out)[:n_tokens]
    raise ValueError(f"{name}={n_tokens:,} needs more {split} text than {source!r} holds "
                     f"({have:,} tokens); lower {name}")


def hub_texts(dataset: str, text_field: str = "text") -> Iterator[str]:
    """Documents streamed from a hub text dataset's train split (a clear error when offline)."""
    try:
        from datasets import load_dataset

        for row in load_dataset(dataset, split="train", streaming=True):
            yield row[text_field]
    except (OSError, ConnectionError) as err:
        raise RuntimeError(f"could not stream dataset {dataset!r} from the hub "
                           f"({type(err).__name__}); offline, use text_source='stdlib'") from err


def hook_layer(hook: str) -> int:
    """Layer number of a 'blocks.L.<name>' hook."""
    parts = hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"hook={hook!r} must look like 'blocks.<layer>.hook_resid_post'")
    return int(parts[1])


def token_windows(tokens: np.ndarray, n_ctx: int, n_vectors: int, drop_first: bool) -> np.ndarray:
    """Consecutive (n_windows, n_ctx) windows holding at least n_vectors cached positions."""
    per = n_ctx - int(drop_first)
    n_windows = -(-n_vectors // per)
    if n_windows * n_ctx > len(tokens):
        raise ValueError(f"n_tokens={n_vectors} needs {n_windows * n_ctx} text tokens at "
                         f"n_ctx={n_ctx}; the text source has only {len(tokens)}")
    return tokens[:n_windows * n_ctx].reshape(n_windows, n_ctx)


def cache_code() -> str:
    """Identity of the code that makes an activation cache (text, windows, caching)."""
    return code_hash(text_tokens, token_windows, cache_activations)


@torch.no_grad()
def cache_activations(bridge, windows: np.ndarray, path: str | os.PathLike, meta: dict,
                      hook: str, n_vectors: int, batch_size: int = 32, drop_first: bool = True,
                      dtype: str = "float32") -> np.ndarray:
    """Write the hook's activations for the windows to an .npy memmap, atomically and verified.

    Every batch is checked for NaN or infinity before it is written (an error names the rows).
    The array goes to a temporary name and is renamed when complete; the JSON beside it (path
    with .json: meta, shape, SHA-256 of the file) is written last, so a half-written or modified
    cache is never taken as whole.
    """
    check_choice("dtype", dtype, ("float32", "float16"))
    path = Path(path)
    stop = hook_layer(hook) + 1
    first = int(drop_first)
    dev = next(bridge.parameters()).device
    tmp = temp_path(path)
    path.with_suffix(".json").unlink(missing_ok=True)
    out, row = None, 0
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc=f"cache {hook}"):
            toks = torch.from_numpy(windows[i:i + batch_size].astype(np.int64)).to(dev)
            _, cache = bridge.run_with_cache(toks, names_filter=[hook], stop_at_layer=stop)
            acts = cache[hook][:, first:].reshape(-1, cache[hook].shape[-1])[:n_vectors - row]
            acts = acts.float().cpu().numpy().astype(dtype)
            if not np.isfinite(acts).all():
                raise ValueError(f"the model produced non-finite activations at {hook} for cache "
                                 f"rows {row}..{row + len(acts) - 1} of {path}")
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                shape=(n_vectors, acts.shape[1]))
            out[row:row + len(acts)] = acts
            row += len(acts)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(path.with_suffix(".json"), {**meta, "shape": [n_vectors, int(acts.shape[1])],
                                                  "sha256": file_sha256(path)})
    return np.load(path, mmap_mode="r")


def _verified_cache(path: Path) -> tuple[np.ndarray | None, dict | None, str]:
    """(memmap, meta, '') for a complete cache that matches its checksum, else (None, meta, why)."""
    found = read_meta(path.with_suffix(".json"))
    if found is None:
        return None, None, f"{path.with_suffix('.json')} is missing or unreadable"
    if not path.exists():
        return None, found, f"{path} is missing"
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        return None, found, f"{path} is unreadable ({err})"
    if list(arr.shape) != found.get("shape") or file_sha256(path) != found.get("sha256"):
        return None, found, f"{path} does not match its recorded shape and checksum (modified or corrupt)"
    return arr, found, ""


def load_cache(path: str | os.PathLike, meta: dict) -> np.ndarray | None:
    """The cached activations at path when complete, unmodified and made with exactly this meta.

    A cache that exists but fails its checksum is named on stderr before it is rebuilt.
    """
    path = Path(path)
    arr, found, why = _verified_cache(path)
    if arr is None and found is not None and meta_matches(found, meta):
        print(f"{why}; rebuilding it", file=sys.stderr)
    return arr if arr is not None and meta_matches(found, meta) else None


def open_cache(path: str | os.PathLike) -> np.ndarray:
    """A verified cache for a later stage to read; a clear error naming the file when it is not."""
    arr, _, why = _verified_cache(Path(path))
    if arr is None:
        raise FileNotFoundError(f"{why}: run notebook 01 (make report rebuilds it) before this stage")
    return arr


def fit_sample(acts: np.ndarray, n_fit_tokens: int, seed: int) -> torch.Tensor:
    """n_fit_tokens rows of the cache drawn with seed (sorted, for locality), as a float32 tensor.

    The one sample every stage uses for k-means, candidate points and the data mean.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(acts), min(n_fit_tokens, len(acts)), replace=False))
    sample = torch.from_numpy(np.array(acts[rows], dtype=np.float32))
    check_finite("the fit sample of the activation cache", sample)
    return sample


def activation_stats(x: torch.Tensor | np.ndarray, n_pairs: int = 20000, seed: int = 0) -> dict:
    """|mu|, RMS distance from mu, and mean cosine of random pairs, raw and centered."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)).double()
    gen = torch.Generator().manual_seed(seed)
    i, j = torch.randint(0, len(x), (2, n_pairs), generator=gen)
    mu = x.mean(0)
    xc = x - mu
    cos = lambda a: float(torch.nn.functional.cosine_similarity(a[i], a[j], dim=-1).mean())
    return {"mean_norm": float(mu.norm()), "rms_from_mean": float(xc.pow(2).sum(-1).mean().sqrt()),
            "cos_raw": cos(x), "cos_centered": cos(xc)}


@torch.no_grad()
def layer_stats(bridge, windows: np.ndarray, drop_first: bool = True) -> list[dict]:
    """activation_stats of hook_resid_post at every layer, on the given token windows."""
    toks = torch.from_numpy(windows.astype(np.int64)).to(next(bridge.parameters()).device)
    _, cache = bridge.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"))
    rows = []
    for layer in range(bridge.cfg.n_layers):
        acts = cache[f"blocks.{layer}.hook_resid_post"][:, int(drop_first):]
        rows.append({"layer": layer, **activation_stats(acts.reshape(-1, acts.shape[-1]).cpu())})
    return rows


def cache_definition(cache_dir: str | os.PathLike) -> dict:
    """What defines a folder's activation caches, not their bits: each cache's metadata without its
    checksums (model, hook, text, windows, tokens, code), and the model's own definition (its
    training settings and code for a model trained here; its source otherwise). Floats cached
    on two machines differ in their last bits; their definitions do not."""
    folder = Path(cache_dir)
    out = {}
    for split in ("train", "heldout"):
        meta = read_meta(folder / f"acts_{split}.json")
        if meta is None:
            raise FileNotFoundError(f"{folder / f'acts_{split}.json'} is missing: run notebook 01 first")
        out[split] = {k: v for k, v in meta.items() if k not in ("sha256", "shape", "model_sha256")}
    model = read_meta(folder / "model" / "meta.json")
    out["model"] = None if model is None else \
        {k: v for k, v in model.items() if k not in ("sha256", "loss_curve")}
    return out
