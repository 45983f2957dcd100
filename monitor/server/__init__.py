"""The gRPC sidecar server: SafetyMonitor service, health checking, reflection and /metrics.

``SidecarServer`` runs one in-process (tests, embedding); ``serve`` is the process lifecycle
behind ``monitor serve`` (SIGTERM drains in-flight RPCs, then exits 0); ``SidecarProcess``
runs ``monitor serve`` as a child process (benches, crash tests).
"""

from monitor.harness.sidecar import SidecarProcess
from monitor.server._lifecycle import SERVICE_NAME, BackgroundSidecar, SidecarServer, serve

__all__ = ["SERVICE_NAME", "BackgroundSidecar", "SidecarProcess", "SidecarServer", "serve"]
