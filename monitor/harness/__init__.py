"""Start the sidecar and ``vllm serve`` as child processes: for the demo, the tests, the benches
and ``monitor bundle build``, never for the runtime packages (``monitor.server`` serves,
``monitor.integrations.vllm`` runs inside vLLM; neither imports this)."""
