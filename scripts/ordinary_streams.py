"""Ordinary chat traffic for stream-level calibration: the default model's own answers, captured.

Generates greedy answers (``--max-new-tokens``) to chat-corpus prompts (GSM8K and GPTeacher; the
HH-RLHF red-team openers are left out: they are not ordinary traffic) in batches, and captures the
hook point's activations *during generation*: the decision position (last prompt-template token)
and every generated token that was fed back (the last generated token never is). Cached as one
``.pt`` file outside git; ``monitor.detectors.stream_rates`` replays it through the stream scorer.
About 20 minutes on 2 busy CPU cores for 1 050 prompts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from monitor.hook_points import layer_of
from monitor.models import load_default_model

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "safety-monitor" / "work-issue12"


def ordinary_prompts(n: int, seed: int = 12, max_chars: int = 300) -> list[dict[str, str]]:
    """``n`` prompts of the chat corpus (GSM8K + GPTeacher) drawn at random, sorted by length
    (batches then need little padding: the prefill dominates the cost on CPU)."""
    with gzip.open(ROOT / "data/chat_corpus/conversations.jsonl.gz", "rt") as f:
        rows = [json.loads(x) for x in f]
    ok = [r for r in rows if r["source"] != "hh_rlhf_harmless" and len(r["messages"][0]["content"]) <= max_chars]
    random.Random(seed).shuffle(ok)
    picked = [{"source": r["source"], "prompt": r["messages"][0]["content"]} for r in ok[:n]]
    return sorted(picked, key=lambda r: len(r["prompt"]))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1050)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--hook-point", default="blocks.16.hook_resid_post")
    parser.add_argument("--out", type=Path, default=CACHE / "ordinary_streams.pt")
    ns = parser.parse_args()
    torch.set_num_threads(2)
    prompts = ordinary_prompts(ns.n)
    model, tok = load_default_model()
    tok.padding_side = "left"
    steps: list[torch.Tensor] = []
    handle = model.model.layers[layer_of(ns.hook_point)].register_forward_hook(
        lambda m, i, o: steps.append((o[0] if isinstance(o, tuple) else o)[:, -1].detach().to(torch.float16))
    )
    out = []
    try:
        for i in tqdm(range(0, len(prompts), ns.batch_size), desc="generate"):
            batch = prompts[i : i + ns.batch_size]
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
                )
                for r in batch
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            steps.clear()
            gen = model.generate(
                **enc,
                max_new_tokens=ns.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
            acts = torch.stack(steps, 1)  # [batch, 1 + fed tokens, d]: decision row, then each fed token
            for j, (r, ids) in enumerate(zip(batch, gen[:, enc["input_ids"].shape[1] :], strict=True)):
                ids = ids.tolist()
                n = len(ids)
                for stop in (tok.eos_token_id, tok.pad_token_id):
                    if stop is not None and stop in ids:
                        n = min(n, ids.index(stop))
                text = tok.decode(ids[:n], skip_special_tokens=True).strip()
                out.append({**r, "response": text, "acts": acts[j, : 1 + max(n - 1, 0)].clone()})
            ns.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(out, ns.out)  # after every batch: a partial run is still usable
    finally:
        handle.remove()
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, ns.out)
    print(f"wrote {len(out)} streams to {ns.out}")


if __name__ == "__main__":
    main()
