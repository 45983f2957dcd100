"""The ``monitor`` command line: ``serve`` runs the sidecar; more commands join as they land."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from monitor import __version__
from monitor.errors import MonitorError


def _serve(ns: argparse.Namespace) -> int:
    from monitor.config import load_config
    from monitor.server import serve

    config = load_config(
        ns.config,
        overrides={
            "host": ns.host,
            "port": ns.port,
            "metrics_host": ns.metrics_host,
            "metrics_port": ns.metrics_port,
            "bundle": ns.bundle,
            "log_level": ns.log_level,
        },
    )
    logging.getLogger().setLevel(config.log_level.upper())
    return asyncio.run(serve(config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitor", description="Safety-monitoring sidecar for LLM servers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve",
        help="run the gRPC sidecar with /metrics",
        description="Run the sidecar. Settings: defaults < --config YAML < SAFETY_MONITOR_* env < flags.",
    )
    p.add_argument("--config", help="YAML file of ServerConfig keys (see docs/operations.md)")
    p.add_argument("--host", help="gRPC bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--metrics-host", help="/metrics bind address (default 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, help="/metrics port (default 9464; 0 picks a free one)")
    p.add_argument("--bundle", help="detector bundle folder (default: the embedded default)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    p.set_defaults(func=_serve)

    from monitor import demo

    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except MonitorError as exc:
        print(f"monitor {ns.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
