"""Activation collection (``monitor collect``): a causal LM's residual stream over a chat corpus.

Conversations are rendered with the model's chat template, run in padded batches, and the
outputs of the chosen decoder layers are captured with forward hooks. The forward pass stops
after the last needed layer. Special-token positions (BOS, ``<|im_start|>``, ``<|im_end|>``), padding
and the template's injected default system prompt are skipped. Shards are written atomically,
and a manifest records progress, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from monitor.architectures import check_chat_template, check_hook_points, decoder_layers
from monitor.hook_points import layer_of
from monitor.sae._config import DEFAULT_CORPUS, SAEError

log = logging.getLogger("monitor.sae")

MANIFEST = "manifest.json"


class _StopForward(Exception):
    """Raised by the last needed layer's hook to skip the rest of the model."""


@dataclass(frozen=True)
class CollectConfig:
    """What to collect.

    hook_points: residual-stream hook points (``blocks.L.hook_resid_post``).
    max_tokens: stop after this many kept positions.
    context_size: tokens per conversation at most (longer ones are truncated).
    batch_size: conversations per forward pass.
    shard_tokens: kept positions per shard file.
    dtype: storage dtype of the activations ("float16" or "float32").
    """

    hook_points: tuple[str, ...]
    max_tokens: int = 1_000_000
    context_size: int = 256
    batch_size: int = 16
    shard_tokens: int = 131_072
    dtype: str = "float16"
    corpus: str = str(DEFAULT_CORPUS)
    model_id: str = ""

    def __post_init__(self) -> None:
        if not self.hook_points:
            raise SAEError("hook_points: expected at least one, got none")
        for hp in self.hook_points:
            layer_of(hp)
        if self.dtype not in ("float16", "float32"):
            raise SAEError(f"dtype: expected float16 or float32, got {self.dtype!r}")


@dataclass
class _Manifest:
    config: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)
    next_conversation: int = 0
    done: bool = False

    @property
    def tokens(self) -> int:
        return sum(int(s["tokens"]) for s in self.shards)


def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``{"messages": [...]}`` JSONL file (gzipped or not)."""
    p = Path(path)
    opener: Any = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _system_prefix_tokens(tokenizer: Any) -> int:
    """Length of a default system block the template injects (0 when it injects none)."""
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    if "system" not in probe:
        return 0
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return ids.index(end) + 2 if end in ids else 0  # through <|im_end|> and the newline after it


def encode_conversations(tokenizer: Any, conversations: list[dict[str, Any]], context_size: int) -> Any:
    """Chat-template-rendered, right-padded, truncated token batch (``input_ids``, ``attention_mask``)."""
    texts = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in conversations]
    return tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=context_size, add_special_tokens=False
    )


def keep_mask(input_ids: torch.Tensor, attention: torch.Tensor, special: set[int], prefix: int) -> torch.Tensor:
    """Positions worth an SAE's attention: real, non-special, past the injected system prompt."""
    keep = attention.bool().clone()
    for sid in special:
        keep &= input_ids != sid
    keep[:, :prefix] = False
    return keep


def _batches(convs: list[dict[str, Any]], start: int, size: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    for i in range(start, len(convs), size):
        yield i, convs[i : i + size]


def collect(model: Any, tokenizer: Any, cfg: CollectConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Collect activations into ``out`` (resuming a partial run there); returns ``out``."""
    check_hook_points(model.config, cfg.hook_points)  # one-line errors before the long run
    check_chat_template(tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / MANIFEST
    cfg_dict = asdict(cfg)
    cfg_dict["hook_points"] = list(cfg.hook_points)
    if mpath.is_file():
        m = _Manifest(**json.loads(mpath.read_text()))
        if m.config != cfg_dict:
            raise SAEError(f"{mpath}: an earlier run used other settings ({m.config}); use a new folder")
        if m.done or m.tokens >= cfg.max_tokens:
            return out
        log.info("resuming at conversation %d with %d tokens collected", m.next_conversation, m.tokens)
    else:
        m = _Manifest(config=cfg_dict)
    convs = load_conversations(cfg.corpus)
    layers = {hp: layer_of(hp) for hp in cfg.hook_points}
    last = max(layers.values())
    blocks = decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    captured: dict[str, torch.Tensor] = {}

    def make_hook(hp: str, stop: bool) -> Any:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            captured[hp] = (output[0] if isinstance(output, tuple) else output).detach()
            if stop:
                raise _StopForward

        return hook

    by_layer: dict[int, list[str]] = {}
    for hp, layer in layers.items():
        by_layer.setdefault(layer, []).append(hp)
    handles = []
    for layer, hps in by_layer.items():
        for j, hp in enumerate(hps):
            handles.append(blocks[layer].register_forward_hook(make_hook(hp, layer == last and j == len(hps) - 1)))
    special = set(tokenizer.all_special_ids)
    prefix = _system_prefix_tokens(tokenizer)
    store = torch.float16 if cfg.dtype == "float16" else torch.float32
    buf: dict[str, list[torch.Tensor]] = {hp: [] for hp in cfg.hook_points}
    meta: dict[str, list[torch.Tensor]] = {"token_ids": [], "doc_ids": [], "positions": []}
    buffered = 0
    bar = tqdm(
        total=cfg.max_tokens,
        initial=m.tokens,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc="collect",
        smoothing=0.05,
    )
    start = time.perf_counter()
    try:
        for i, batch in _batches(convs, m.next_conversation, cfg.batch_size):
            enc = encode_conversations(tokenizer, batch, cfg.context_size)
            captured.clear()
            with torch.no_grad(), contextlib.suppress(_StopForward):
                model.model(
                    input_ids=enc["input_ids"].to(device),
                    attention_mask=enc["attention_mask"].to(device),
                    use_cache=False,
                )
            keep = keep_mask(enc["input_ids"], enc["attention_mask"], special, prefix)
            for hp in cfg.hook_points:
                buf[hp].append(captured[hp].cpu()[keep].to(store))
            rows, cols = keep.nonzero(as_tuple=True)
            meta["token_ids"].append(enc["input_ids"][keep].to(torch.int32))
            meta["doc_ids"].append((rows + i).to(torch.int32))
            meta["positions"].append(cols.to(torch.int32))
            n = int(keep.sum())
            buffered += n
            bar.update(min(n, cfg.max_tokens - bar.n))
            m.next_conversation = i + len(batch)
            if buffered >= cfg.shard_tokens or m.tokens + buffered >= cfg.max_tokens:
                _write_shard(out, m, buf, meta, cfg.max_tokens)
                buffered = 0
                mpath.write_text(json.dumps(asdict(m), indent=1))
                if m.tokens >= cfg.max_tokens:
                    break
        else:
            if buffered:
                _write_shard(out, m, buf, meta, cfg.max_tokens)
        m.done = True
        mpath.write_text(json.dumps(asdict(m), indent=1))
    finally:
        bar.close()
        for h in handles:
            h.remove()
    secs = time.perf_counter() - start
    log.info("collected %d tokens in %d shards (%.0f tok/s this run)", m.tokens, len(m.shards), bar.n / max(secs, 1e-9))
    return out


def _write_shard(
    out: Path, m: _Manifest, buf: dict[str, list[torch.Tensor]], meta: dict[str, list[torch.Tensor]], max_tokens: int
) -> None:
    room = max_tokens - m.tokens
    tensors = {hp: torch.cat(parts)[:room] for hp, parts in buf.items()}
    tensors.update({k: torch.cat(parts)[:room] for k, parts in meta.items()})
    name = f"shard_{len(m.shards):05d}.safetensors"
    tmp = out / (name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.rename(out / name)
    m.shards.append({"file": name, "tokens": int(tensors["token_ids"].shape[0])})
    for parts in (*buf.values(), *meta.values()):
        parts.clear()


class ActivationStore:
    """Reads a collection folder: shards of one hook point, with token and document ids."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        mpath = self.folder / MANIFEST
        if not mpath.is_file():
            raise SAEError(
                f"activations: expected a folder made by `monitor collect` with {MANIFEST}, got {self.folder}"
            )
        self.manifest = _Manifest(**json.loads(mpath.read_text()))
        self.hook_points: list[str] = list(self.manifest.config["hook_points"])

    @property
    def tokens(self) -> int:
        return self.manifest.tokens

    def load(self, hook_point: str, *, with_meta: bool = False) -> dict[str, torch.Tensor]:
        """All of ``hook_point``'s activations (float32) in one tensor, plus ids when asked."""
        if hook_point not in self.hook_points:
            raise SAEError(f"hook_point: expected one of {self.hook_points}, got {hook_point!r}")
        parts: dict[str, list[torch.Tensor]] = {"acts": [], "token_ids": [], "doc_ids": [], "positions": []}
        for s in self.manifest.shards:
            t = load_file(str(self.folder / s["file"]))
            parts["acts"].append(t[hook_point])
            if with_meta:
                for k in ("token_ids", "doc_ids", "positions"):
                    parts[k].append(t[k])
        out = {"acts": torch.cat(parts["acts"]).float()}
        if with_meta:
            out.update({k: torch.cat(parts[k]) for k in ("token_ids", "doc_ids", "positions")})
        return out
