"""Detector bundles and the detectors in them.

A bundle names its model, the hook points it reads (with d_model), its SAE and its detectors;
the embedded default ships in ``monitor/assets/default``. ``DetectorSet`` scores activations
with a bundle's detectors on the sliced path (``_scoring``; the manifest schema and weight files are
``_manifest``); fitting and evaluation live beside it. Serving needs numpy only: the SAE encoder is
sliced from its weight file without torch.
"""

from monitor.detectors._bundle import Bundle, BundleError, HookPoint, default_bundle_path
from monitor.detectors._manifest import DetectorSpec
from monitor.detectors._scoring import Contribution, DetectorResult, DetectorSet, LinearDetector, RunningScores

__all__ = [
    "Bundle",
    "BundleError",
    "Contribution",
    "DetectorResult",
    "DetectorSet",
    "DetectorSpec",
    "HookPoint",
    "LinearDetector",
    "RunningScores",
    "default_bundle_path",
]
