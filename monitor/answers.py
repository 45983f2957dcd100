"""A model's own greedy answers to a JSONL of prompts: HF ``generate`` in-process, or vLLM offline.

Detectors are fitted and calibrated on the *served* model's answers (the "complying" side of the
refusal set, the confusable-safe requests, ordinary traffic), so generating them is the first long
step of building a bundle for any model (``monitor bundle build``). Resumable: rows whose ``id`` is
already in the output are skipped, and answers are appended batch by batch, so an interrupted run
goes on where it stopped.

This module runs in vLLM's environment too (``.venv-vllm/bin/python -m monitor.answers ...``,
where only the thin package is installed): nothing but the standard library at module level;
torch, transformers and vLLM are imported inside the functions that use them.

    .venv-vllm/bin/python -m monitor.answers --engine vllm --model DIR --prompts P.jsonl --out A.jsonl
    python -m monitor.answers --engine hf --model DIR --prompts P.jsonl --out A.jsonl

``--prompts`` rows: ``{"id", "prompt", ...}``, optionally ``max_new_tokens`` (the row's answer
length; ``--max-new-tokens`` otherwise); every key is copied to the output row, which gains
``response`` (the decoded answer, special tokens skipped, stripped), ``finish_reason``
(``stop`` / ``length``) and ``max_new_tokens``. An answer of another length than the prompt asks
for does not count as done: changing the length regenerates, it never silently reuses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["answers_prompt", "append_answers", "generate_hf", "generate_vllm", "main", "pending", "read_prompts"]


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """Rows of a prompts JSONL; each needs ``id`` and ``prompt`` (``ValueError`` naming the line otherwise)."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    for n, r in enumerate(rows, 1):
        if "id" not in r or "prompt" not in r:
            raise ValueError(f"{path}:{n}: expected keys 'id' and 'prompt', got {sorted(r)}")
        if "max_new_tokens" in r:
            try:
                _length(r, 1)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
    return rows


def answers_prompt(answer: dict[str, Any], prompt: dict[str, Any]) -> bool:
    """Whether ``answer`` is the answer ``prompt`` asks for: the same id and, when the prompt sets
    ``max_new_tokens``, generated with that length (an answer without the field predates it: no)."""
    if answer.get("id") != prompt["id"]:
        return False
    return "max_new_tokens" not in prompt or answer.get("max_new_tokens") == prompt["max_new_tokens"]


def pending(rows: Sequence[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """The rows without an answer in ``out`` yet (see ``answers_prompt``; a torn last line counts as none)."""
    latest: dict[Any, dict[str, Any]] = {}
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                answer = json.loads(line)
                latest[answer["id"]] = answer
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from an interrupted run: that row is generated again
    return [r for r in rows if r["id"] not in latest or not answers_prompt(latest[r["id"]], r)]


def _length(row: dict[str, Any], default: int) -> int:
    """The row's answer length: its own ``max_new_tokens``, else the run's."""
    value = row.get("max_new_tokens", default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"prompt {row.get('id')!r}: max_new_tokens: expected an integer >= 1, got {value!r}")
    return value


def append_answers(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append answered rows to ``out`` (one JSON object per line)."""
    with out.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (Llama 3 has several)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list | tuple) else [gen])
    return {int(i) for i in ids if i is not None}


def generate_hf(
    model: Any,
    tokenizer: Any,
    todo: Sequence[dict[str, Any]],
    out: Path,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = True,
) -> None:
    """Greedy answers with transformers ``generate``, left-padded batches of similar length, appended to ``out``.

    ``max_new_tokens`` is the length of rows without their own; a batch holds rows of one length.

    The inputs go to the device of the model's input embeddings (CPU, one GPU, or the first shard
    of a ``device_map="auto"`` model).
    """
    import torch
    from tqdm import tqdm

    device = model.get_input_embeddings().weight.device
    stops = _stop_ids(model, tokenizer)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    by_length: dict[int, list[dict[str, Any]]] = {}
    for r in todo:
        by_length.setdefault(_length(r, max_new_tokens), []).append(r)
    batches = []
    for length, rows_of_length in sorted(by_length.items()):
        ordered = sorted(rows_of_length, key=lambda r: len(r["prompt"]))  # little padding per batch
        batches += [(length, ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]
    try:
        with torch.no_grad():
            for length, batch in tqdm(batches, desc="answers (hf)", unit=" batches", disable=not progress):
                texts = [
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
                    )
                    for r in batch
                ]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                gen = model.generate(
                    **enc,
                    max_new_tokens=length,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
                rows = []
                for r, ids in zip(batch, gen[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
                    end = next((k for k, t in enumerate(ids) if t in stops), None)
                    text = tokenizer.decode(ids if end is None else ids[:end], skip_special_tokens=True).strip()
                    rows.append(
                        {
                            **r,
                            "response": text,
                            "finish_reason": "length" if end is None else "stop",
                            "max_new_tokens": length,
                        }
                    )
                append_answers(out, rows)
    finally:
        tokenizer.padding_side = old_side


def generate_vllm(
    model: str,
    todo: Sequence[dict[str, Any]],
    out: Path,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 256,
    dtype: str = "float32",
    max_model_len: int = 2048,
    tensor_parallel_size: int = 1,
) -> None:
    """Greedy answers with vLLM's offline ``LLM.chat`` (the model's own chat template), appended to ``out``.

    ``max_new_tokens`` is the length of rows without their own (one ``SamplingParams`` per row).
    """
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=0,
        enforce_eager=True,
        tensor_parallel_size=tensor_parallel_size,
    )
    lengths = [_length(r, max_new_tokens) for r in todo]
    for i in tqdm(range(0, len(todo), batch_size), desc="answers (vllm)", unit=" batches"):
        batch, batch_lengths = todo[i : i + batch_size], lengths[i : i + batch_size]
        params = [SamplingParams(max_tokens=n, temperature=0.0) for n in batch_lengths]
        outs = llm.chat([[{"role": "user", "content": r["prompt"]}] for r in batch], params, use_tqdm=False)
        append_answers(
            out,
            [
                {
                    **r,
                    "response": o.outputs[0].text.strip(),
                    "finish_reason": o.outputs[0].finish_reason,
                    "max_new_tokens": n,
                }
                for r, n, o in zip(batch, batch_lengths, outs, strict=True)
            ],
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monitor.answers``: answer the pending prompts of ``--prompts`` into ``--out``."""
    p = argparse.ArgumentParser(
        prog="python -m monitor.answers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--model", required=True, help="a transformers folder or HF id (hf also takes a .gguf file)")
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length of rows without their own")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 (vllm), 32 (hf)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm only")
    ns = p.parse_args(argv)
    try:
        todo = pending(read_prompts(ns.prompts), ns.out)
    except ValueError as exc:
        print(f"monitor.answers: {exc}", file=sys.stderr)
        return 2
    print(f"{len(todo)} prompts to answer ({ns.out})", file=sys.stderr)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    if not todo:
        return 0
    if ns.engine == "vllm":
        generate_vllm(
            ns.model,
            todo,
            ns.out,
            max_new_tokens=ns.max_new_tokens,
            batch_size=ns.batch_size or 256,
            dtype=ns.dtype,
            max_model_len=ns.max_model_len,
            tensor_parallel_size=ns.tensor_parallel_size,
        )
    else:
        from monitor.models import load_model

        model, tokenizer = load_model(ns.model, dtype=ns.dtype)
        generate_hf(model, tokenizer, todo, ns.out, max_new_tokens=ns.max_new_tokens, batch_size=ns.batch_size or 32)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
