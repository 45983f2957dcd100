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
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=1, help="generate the whole set this many times (timed each)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens (random-weight models)")
    ns = p.parse_args()

    from vllm import LLM, SamplingParams

    kwargs: dict = {}
    if ns.sidecar:
        from monitor.integrations.vllm import AdapterSettings, engine_config, resolve_settings

        settings = resolve_settings(AdapterSettings(sidecar=ns.sidecar, projected=not ns.full_rows))
        kwargs = engine_config(settings)
    llm = LLM(
        model=ns.model,
        dtype=ns.dtype,
        enforce_eager=ns.eager,
        max_model_len=2048,
        max_num_seqs=32,
        seed=0,
        **kwargs,
    )
    prompts = json.loads(Path(ns.prompts).read_text())
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=0.0, ignore_eos=ns.ignore_eos)
    # Warm-up, not timed: the whole batch once, short (the first full batch runs ~20 % slower).
    warm = SamplingParams(max_tokens=8, temperature=0.0)
    llm.chat([[{"role": "user", "content": q}] for q in prompts], warm, use_tqdm=False)
    runs = []
    outputs = []
    for _ in range(ns.repeats):
        t0 = time.perf_counter()
        outputs = llm.chat([[{"role": "user", "content": q}] for q in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        runs.append({"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)})
    result = {
        "monitored": bool(ns.sidecar),
        "runs": runs,
        "requests": [
            {
                "request_id": o.request_id,
                "prompt_ids": list(o.prompt_token_ids or []),
                "output_ids": list(o.outputs[0].token_ids),
                "text": o.outputs[0].text,
                "finish_reason": o.outputs[0].finish_reason,
                "stop_reason": o.outputs[0].stop_reason,
            }
            for o in outputs
        ],
    }
    Path(ns.out).write_text(json.dumps(result))
    del llm  # shut the engine down (and with it the adapter's streams) before exiting
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
