"""Building a detector bundle for the operator's own model (``monitor bundle build``).

The default bundle was made for SmolLM2-135M-Instruct by a chain of commands and scripts; this
package runs the same chain for any supported model (``monitor.architectures``): preflight
checks, the model's own answers, the labeled data rebuilt from them, the SAE (pretrained or
trained), the detectors fitted, calibrated and evaluated, and the model card. Each step resumes
from its intermediate files. docs/your-model.md is the operator's recipe.
"""

from __future__ import annotations

from monitor.bundling._build import BuildResult, build_bundle
from monitor.bundling._config import BuildConfig, SAETraining
from monitor.bundling._preflight import BuildError, Preflight, preflight

__all__ = ["BuildConfig", "BuildError", "BuildResult", "Preflight", "SAETraining", "build_bundle", "preflight"]
