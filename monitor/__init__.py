"""Safety-monitoring sidecar for LLM inference servers.

Scores each generation's activations and output, tracks drift and exports metrics and alerts;
see README.md and docs/architecture.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
