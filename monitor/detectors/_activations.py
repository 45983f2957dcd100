"""Labeled activations: conversations run teacher-forced through the model, response tokens kept.

A row is rendered with the model's chat template as (user: prompt, assistant: response). The
activations kept for it are the hook point's rows from the last token before the response (the
position that "decides" how to answer) through the last response token, so detectors can pool
over the response and also read the decision position.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from monitor.architectures import decoder_layer

DATA = Path(__file__).resolve().parents[2] / "data" / "detectors"


@dataclass(frozen=True)
class LabeledRow:
    """One labeled conversation; ``group`` ties together the rows of one prompt."""

    behaviour: str
    source: str
    group: str
    prompt: str
    response: str
    label: int


EVALUATION_ONLY = "evaluation_only_groups.txt"


def evaluation_only_groups(data: Path = DATA) -> frozenset[str]:
    """Groups no detector may be fitted or tuned on (HarmBench-derived prompts), whatever file they are in."""
    path = data / EVALUATION_ONLY
    if not path.is_file():
        return frozenset()
    lines = (x.split("#", 1)[0].strip() for x in path.read_text().splitlines())
    return frozenset(x for x in lines if x)


def load_rows(behaviour: str, data: Path = DATA) -> list[LabeledRow]:
    """Rows of ``data/detectors/<behaviour>.jsonl``."""
    path = data / f"{behaviour}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"labeled data: expected {path} (see data/detectors/SOURCE.md to rebuild it)")
    keys = LabeledRow.__dataclass_fields__
    return [LabeledRow(**{k: v for k, v in json.loads(x).items() if k in keys}) for x in path.read_text().splitlines()]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass: layers past the hook point are not needed."""


@torch.no_grad()
def response_activations(
    model: Any,
    tokenizer: Any,
    rows: Sequence[LabeledRow],
    hook_point: str,
    *,
    max_response_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Per row, ``[1 + response_tokens, d_model]`` float32: decision position, then response tokens.

    Rows are batched in order of length (little padding) and the forward pass stops at the hook
    point's layer; the result is in the rows' order, on the CPU whatever device the model is on.
    """
    layer = decoder_layer(model, hook_point)
    device = model.get_input_embeddings().weight.device
    captured: dict[str, torch.Tensor] = {}

    def hook(module: Any, inputs: Any, output: Any) -> None:
        captured["h"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _Captured

    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for r in rows:
        user = [{"role": "user", "content": r.prompt}]
        prefix = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        resp_ids = tokenizer(r.response, add_special_tokens=False)["input_ids"][:max_response_tokens]
        n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        texts.append(prefix + tokenizer.decode(resp_ids))
        spans.append((n_prefix - 1, n_prefix + len(resp_ids)))
    order = sorted(range(len(rows)), key=lambda i: spans[i][1])
    handle = layer.register_forward_hook(hook)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    out: list[torch.Tensor | None] = [None] * len(rows)
    try:
        for i in tqdm(range(0, len(rows), batch_size), desc="activations", disable=not progress):
            idx = order[i : i + batch_size]
            enc = tokenizer([texts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with contextlib.suppress(_Captured):
                model.model(
                    input_ids=enc["input_ids"].to(device),
                    attention_mask=enc["attention_mask"].to(device),
                    use_cache=False,
                )
            h = captured["h"]
            for k, j in enumerate(idx):
                a, b = spans[j]
                b = min(b, int(enc["attention_mask"][k].sum()))
                out[j] = h[k, a:b].float().cpu().clone()
    finally:
        handle.remove()
        tokenizer.padding_side = old_side
    return [t for t in out if t is not None]


def cached_response_activations(
    behaviour: str,
    hook_point: str,
    cache_dir: Path,
    load_model: Any,
    *,
    data: Path = DATA,
    max_response_tokens: int = 64,
) -> tuple[list[LabeledRow], list[torch.Tensor]]:
    """Rows of a behaviour and their activations, cached under ``cache_dir`` by content hash.

    ``load_model`` is called (returning ``(model, tokenizer)``) only when the cache misses.
    """
    import hashlib

    rows = load_rows(behaviour, data)
    key = hashlib.sha256(
        (data / f"{behaviour}.jsonl").read_bytes() + f"|{hook_point}|{max_response_tokens}".encode()
    ).hexdigest()[:16]
    path = cache_dir / f"{behaviour}-{key}.pt"
    if path.is_file():
        return rows, torch.load(path)
    model, tokenizer = load_model()
    acts = response_activations(model, tokenizer, rows, hook_point, max_response_tokens=max_response_tokens)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(acts, path)
    return rows, acts


def response_tokens(acts: torch.Tensor) -> np.ndarray:
    """The response-token rows of one row's activations (the decision position when it has none)."""
    part = acts[1:] if acts.shape[0] > 1 else acts[:1]
    return part.float().numpy()
