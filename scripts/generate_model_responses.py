"""Generate the default model's own answers to the refusal prompts (the "complying" side of refusal).

Greedy decoding, at most ``--max-new-tokens`` tokens, batched with left padding. Writes
``data/detectors/model_responses.jsonl`` rows ``{"group", "prompt", "response"}``; the builder
(`scripts/build_detector_data.py`) turns them into labeled refusal rows. Takes about 5 minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from monitor.models import load_default_model

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=Path, default=ROOT / "data/detectors/refusal_prompts.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "data/detectors/model_responses.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    ns = parser.parse_args()
    rows = [json.loads(x) for x in ns.prompts.read_text().splitlines()]
    model, tok = load_default_model()
    tok.padding_side = "left"
    out = []
    for i in tqdm(range(0, len(rows), ns.batch_size), desc="generate"):
        batch = rows[i : i + ns.batch_size]
        chats = [[{"role": "user", "content": r["prompt"]}] for r in batch]
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc, max_new_tokens=ns.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
        )
        for r, ids in zip(batch, gen[:, enc["input_ids"].shape[1] :], strict=True):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            out.append({"group": r["group"], "prompt": r["prompt"], "response": text})
    ns.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"wrote {len(out)} responses to {ns.out}")


if __name__ == "__main__":
    main()
