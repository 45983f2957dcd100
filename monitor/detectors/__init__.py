"""Detector bundles: what a trained detector set is on disk and what it expects on the wire.

A bundle names its model, the hook points it reads (with d_model) and its detectors; the
embedded default ships in ``monitor/assets/default``.
"""

from monitor.detectors._bundle import Bundle, BundleError, HookPoint, default_bundle_path

__all__ = ["Bundle", "BundleError", "HookPoint", "default_bundle_path"]
