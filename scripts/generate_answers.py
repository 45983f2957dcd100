"""Generate a model's own greedy answers to a JSONL of prompts: vLLM offline (fast) or HF ``generate``.

A thin wrapper: the code is ``monitor.answers`` (importable in vLLM's environment), which
``monitor bundle build`` also runs. Resumable: rows whose ``id`` is already in ``--out`` are skipped.

    .venv-vllm/bin/python scripts/generate_answers.py --engine vllm --model DIR --prompts P.jsonl --out A.jsonl
    python scripts/generate_answers.py --engine hf --model DIR --prompts P.jsonl --out A.jsonl

(the same as ``python -m monitor.answers ...``; ``--help`` lists the options).
"""

from __future__ import annotations

from monitor.answers import main

if __name__ == "__main__":
    raise SystemExit(main())
