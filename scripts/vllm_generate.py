"""Generate with vLLM's ``LLM(...)``, with or without the safety-monitor adapter; write JSON.

Runs in vLLM's environment (``.venv-vllm/bin/python scripts/vllm_generate.py ...``). Used by
``tests/integration/test_vllm.py`` (the adapter under continuous batching, compared with HF
transformers) and ``bench/vllm_overhead.py`` (tokens/s with the adapter on vs off).

    python scripts/vllm_generate.py --model DIR --prompts prompts.json --out out.json [--sidecar HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (the converted default model, or any supported family)")
    p.add_argument("--prompts", required=True, help="JSON list of user messages")
    p.add_argument("--out", required=True, help="where to write the outputs and timings")
    p.add_argument("--sidecar", help="sidecar host:port; monitoring is off without it")
    p.add_argument("--full-rows", action="store_true", help="ship d_model rows instead of projected K values")
    p.add_argument("--hold-back-tokens", type=int, default=0, help="the adapter's withholding bound (0: off)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=1, help="generate the whole set this many times (timed each)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens (random-weight models)")
    p.add_argument("--max-num-seqs", type=int, help="vLLM's max_num_seqs (default: vLLM's own default)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-blocks", type=int, help="num_gpu_blocks_override: a small KV cache forces preemption")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up pass")
    p.add_argument(
        "--params",
        help="JSON list, one object per prompt, of SamplingParams overrides (e.g. n, max_tokens); default: none",
    )
    ns = p.parse_args()

    from vllm import LLM, SamplingParams

    kwargs: dict = {}
    if ns.sidecar:
        from monitor.integrations.vllm import AdapterSettings, engine_config, resolve_settings

        settings = resolve_settings(
            AdapterSettings(sidecar=ns.sidecar, projected=not ns.full_rows, hold_back_tokens=ns.hold_back_tokens)
        )
        kwargs = engine_config(settings)
    if ns.max_num_seqs is not None:
        kwargs["max_num_seqs"] = ns.max_num_seqs
    if ns.num_blocks is not None:
        kwargs["num_gpu_blocks_override"] = ns.num_blocks
    llm = LLM(
        model=ns.model,
        dtype=ns.dtype,
        enforce_eager=ns.eager,
        max_model_len=ns.max_model_len,
        seed=0,
        disable_log_stats=False,
        **kwargs,
    )
    prompts = json.loads(Path(ns.prompts).read_text())
    base = {"max_tokens": ns.max_tokens, "temperature": 0.0, "ignore_eos": ns.ignore_eos}
    overrides = json.loads(Path(ns.params).read_text()) if ns.params else [{}] * len(prompts)
    params = [SamplingParams(**{**base, **o}) for o in overrides]
    if not ns.no_warmup:
        # Warm-up, not timed: the whole batch once, short (the first full batch runs ~20 % slower).
        warm = SamplingParams(max_tokens=8, temperature=0.0)
        llm.chat([[{"role": "user", "content": q}] for q in prompts], warm, use_tqdm=False)
    runs = []
    outputs = []
    for _ in range(ns.repeats):
        t0 = time.perf_counter()
        outputs = llm.chat([[{"role": "user", "content": q}] for q in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        runs.append({"seconds": seconds, "output_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs)})
    result = {
        "monitored": bool(ns.sidecar),
        "runs": runs,
        "metrics": _counters(llm),
        "requests": [
            {
                # n > 1: each completion is its own engine request, "<index>_<request id>"
                "request_id": o.request_id if len(o.outputs) == 1 else f"{c.index}_{o.request_id}",
                "prompt_ids": list(o.prompt_token_ids or []),
                "output_ids": list(c.token_ids),
                "text": c.text,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for o in outputs
            for c in o.outputs
        ],
    }
    Path(ns.out).write_text(json.dumps(result))
    del llm  # shut the engine down (and with it the adapter's streams) before exiting
    return 0


def _counters(llm: object) -> dict[str, float]:
    """vLLM's own counters (preemptions, the adapter's ``vllm:safety_monitor_*``) and its latency
    histograms as ``<name>:sum`` / ``<name>:count`` (time to first token, inter-token latency)."""
    out: dict[str, float] = {}
    try:
        metrics = llm.get_metrics()  # type: ignore[attr-defined]
    except Exception:
        return out
    for m in metrics:
        name = getattr(m, "name", "")
        value = getattr(m, "value", None)
        if hasattr(m, "sum") and hasattr(m, "count"):
            out[f"{name}:sum"] = out.get(f"{name}:sum", 0.0) + float(m.sum)
            out[f"{name}:count"] = out.get(f"{name}:count", 0.0) + float(m.count)
        elif isinstance(value, (int, float)):
            labels = getattr(m, "labels", {}) or {}
            reason = labels.get("reason")
            key = f"{name}[{reason}]" if reason else name
            out[key] = out.get(key, 0.0) + float(value)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
