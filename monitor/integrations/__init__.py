"""Engine adapters that run inside an inference server and feed the sidecar (vLLM today).

Nothing here is imported by the sidecar or by ``monitor.client``: an adapter is loaded by its
engine (vLLM loads ``monitor.integrations.vllm`` through its plugin entry point).
"""
