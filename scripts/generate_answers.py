"""Generate a model's own greedy answers to a JSONL of prompts: vLLM offline (fast) or HF ``generate``.

Detectors are fitted and calibrated on the *served* model's answers, so this is the first step of
fitting for any model. Resumable: rows whose ``id`` is already in ``--out`` are skipped, and
answers are appended batch by batch, so an interrupted run goes on where it stopped.

    .venv-vllm/bin/python scripts/generate_answers.py --engine vllm --model DIR --prompts P.jsonl --out A.jsonl
    python scripts/generate_answers.py --engine hf --model DIR --prompts P.jsonl --out A.jsonl

``--prompts`` rows: ``{"id", "prompt", ...}``; every key is copied to the output row, which gains
``response`` (the decoded answer, special tokens skipped) and ``finish_reason`` (``stop`` / ``length``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _pending(prompts: Path, out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in prompts.read_text().splitlines() if x.strip()]
    for n, r in enumerate(rows, 1):
        if "id" not in r or "prompt" not in r:
            raise SystemExit(f"{prompts}:{n}: expected keys 'id' and 'prompt', got {sorted(r)}")
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                continue  # a torn last line from an interrupted run: that row is generated again
    return [r for r in rows if r["id"] not in done]


def _append(out: Path, rows: list[dict[str, Any]]) -> None:
    with out.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _vllm(ns: argparse.Namespace, todo: list[dict[str, Any]]) -> None:
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    llm = LLM(model=ns.model, dtype=ns.dtype, max_model_len=ns.max_model_len, seed=0, enforce_eager=True)
    params = SamplingParams(max_tokens=ns.max_new_tokens, temperature=0.0)
    for i in tqdm(range(0, len(todo), ns.batch_size), desc="answers (vllm)", unit=" batches"):
        batch = todo[i : i + ns.batch_size]
        outs = llm.chat([[{"role": "user", "content": r["prompt"]}] for r in batch], params, use_tqdm=False)
        _append(
            ns.out,
            [
                {**r, "response": o.outputs[0].text.strip(), "finish_reason": o.outputs[0].finish_reason}
                for r, o in zip(batch, outs, strict=True)
            ],
        )


def _hf(ns: argparse.Namespace, todo: list[dict[str, Any]]) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ns.model)
    model = AutoModelForCausalLM.from_pretrained(ns.model, dtype=getattr(torch, ns.dtype)).eval()
    tok.padding_side = "left"
    todo = sorted(todo, key=lambda r: len(r["prompt"]))  # little padding per batch
    with torch.no_grad():
        for i in tqdm(range(0, len(todo), ns.batch_size), desc="answers (hf)", unit=" batches"):
            batch = todo[i : i + ns.batch_size]
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
                )
                for r in batch
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=ns.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
            rows = []
            for r, ids in zip(batch, gen[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
                stopped = tok.eos_token_id in ids
                ids = ids[: ids.index(tok.eos_token_id)] if stopped else ids
                text = tok.decode(ids, skip_special_tokens=True).strip()
                rows.append({**r, "response": text, "finish_reason": "stop" if stopped else "length"})
            _append(ns.out, rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--model", required=True, help="a transformers model folder (for the default: monitor.models)")
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    ns = p.parse_args()
    todo = _pending(ns.prompts, ns.out)
    print(f"{len(todo)} prompts to answer ({ns.out})", file=sys.stderr)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    if todo:
        (_vllm if ns.engine == "vllm" else _hf)(ns, todo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
