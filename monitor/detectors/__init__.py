"""Detector bundles and the detectors in them.

A bundle names its model, the hook points it reads (with d_model), its SAE and its detectors;
the embedded default ships in ``monitor/assets/default``. ``DetectorSet`` scores activations
with a bundle's detectors on the sliced path; fitting and evaluation live beside it.
"""

from monitor.detectors._bundle import Bundle, BundleError, HookPoint, default_bundle_path
from monitor.detectors._scoring import Contribution, DetectorResult, DetectorSet, DetectorSpec, RunningScores

__all__ = [
    "Bundle",
    "BundleError",
    "Contribution",
    "DetectorResult",
    "DetectorSet",
    "DetectorSpec",
    "HookPoint",
    "RunningScores",
    "default_bundle_path",
]
