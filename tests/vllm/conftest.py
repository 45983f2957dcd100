"""tests/vllm run in vLLM's environment only (``.venv-vllm``); elsewhere there is nothing to collect."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") is not None else ["*.py"]
