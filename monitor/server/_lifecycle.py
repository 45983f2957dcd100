"""Start, serve and drain: the whole lifecycle of one sidecar process."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from monitor import __version__
from monitor._proto import monitor_pb2 as pb
from monitor.audit import AuditLog
from monitor.config import ServerConfig
from monitor.critique import Constitution, Critic, CritiquePolicy, CritiqueService, OpenAIChatBackend
from monitor.debate import DebateService
from monitor.detectors import Bundle
from monitor.errors import ConfigError
from monitor.metrics import MonitorMetrics
from monitor.pipeline import Limits, Pipeline
from monitor.server._auth import BearerTokenInterceptor
from monitor.server._drift_restore import restore_drift
from monitor.server._metrics_http import MetricsServer
from monitor.server._servicer import Admission, SafetyMonitorServicer, add_to_server
from monitor.server._tls import TlsFiles, metrics_context, server_credentials
from monitor.telemetry import OtlpEvents

log = logging.getLogger("monitor.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SafetyMonitor"].full_name


class SidecarServer:
    """A running sidecar: gRPC (with health and reflection) plus the ``/metrics`` HTTP port.

    Use ``await start()``, then ``await stop()``; ``port`` and ``metrics_port`` are the bound
    ports (useful when the config asked for port 0).
    """

    def __init__(self, config: ServerConfig, bundle: Bundle | None = None) -> None:
        self.config = config
        self.bundle = bundle if bundle is not None else Bundle.load(config.bundle)
        restored = restore_drift(config, self.bundle.identity)
        self.drift = restored.monitor
        self.metrics = MonitorMetrics(drift=self.drift)
        if restored.moved_aside is not None:
            self.metrics.drift_state_corrupt.inc()
        self.pipeline = Pipeline(
            self.bundle, Limits(max_tokens=config.max_tokens, max_stream_tokens=config.max_stream_tokens)
        )
        self._saver: asyncio.Task[None] | None = None
        self.critique: CritiqueService | None = None
        self.debate: DebateService | None = None
        self.audit = self._open_audit(config.audit_log) if config.audit_log else None
        self.events: OtlpEvents | None = None
        if config.otlp_endpoint:
            self.events = OtlpEvents(
                config.otlp_endpoint,
                service_name=config.otel_service_name,
                count=lambda outcome, n: self.metrics.otel_events.labels(outcome).inc(n),
            )
        self._tls_watch: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port = 0
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="score")
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._http: MetricsServer | None = None

    def _open_audit(self, path: str) -> AuditLog:
        """The audit log, opened now: a path that cannot be appended to stops the start-up (it
        used to report SERVING and then fail every call UNAVAILABLE)."""
        cfg = self.config
        try:
            return AuditLog(
                path,
                on_result=lambda r: self.metrics.audit_records.labels(r).inc(),
                fsync=cfg.audit_fsync,
                max_bytes=cfg.audit_max_bytes,
                backups=cfg.audit_backups,
                max_age_seconds=cfg.audit_max_age_seconds,
            )
        except OSError as exc:
            raise ConfigError(
                f"audit_log: expected a file that can be appended to, got {path!r} ({exc.strerror or exc})"
            ) from None

    async def start(self) -> None:
        cfg = self.config
        interceptors = []
        if cfg.auth_token:
            interceptors.append(
                BearerTokenInterceptor(
                    cfg.auth_token, on_reject=lambda rpc: self.metrics.record_rpc(rpc, "UNAUTHENTICATED", 0.0)
                )
            )
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # BDP probing grows each stream's receive window to megabytes, so a refused (e.g.
            # unauthenticated) 60 MiB body still had ~1.3 MiB per call buffered and RSS crept up;
            # with the fixed 64 KiB window RSS stays flat and a 9 MiB Score got no slower
            # (53 vs 66 ms median on loopback, docs/reliability.md).
            ("grpc.http2.bdp_probe", 0),
            # One connection cannot open more calls than the server would admit at once.
            ("grpc.max_concurrent_streams", cfg.max_in_flight + cfg.max_streams),
            # Ping idle connections: a vanished peer's connection, and any stream it left behind
            # (a stream ended by send_timeout_seconds lingers in gRPC until then), is closed.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        self.critique = await self._start_critique()
        self.debate = await self._start_debate()
        admission = Admission(
            max_in_flight=cfg.max_in_flight,
            max_streams=cfg.max_streams,
            stream_idle_seconds=cfg.stream_idle_seconds,
            max_stream_chunks=cfg.max_stream_chunks,
            send_timeout_seconds=cfg.send_timeout_seconds,
        )
        servicer = SafetyMonitorServicer(
            self.pipeline,
            self.metrics,
            self._executor,
            admission,
            self.audit,
            self.critique,
            self.debate,
            drift=self.drift,
            events=self.events,
        )
        add_to_server(servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        # Asked of the OS first: grpc says only "Failed to bind" (and logs a line of its own).
        problem = bind_problem(cfg.host, cfg.port)
        if problem is None:
            try:
                if cfg.tls_cert and cfg.tls_key:
                    self.port = server.add_secure_port(
                        address, server_credentials(TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
                    )
                else:
                    self.port = server.add_insecure_port(address)
            except RuntimeError:  # the TLS files were parsed with the config: the port was taken since
                self.port = 0
        if self.port == 0:
            raise ConfigError(f"port: cannot bind gRPC to {address}: {problem or 'refused by grpc'}")
        self.metrics.build_info.labels(__version__, self.bundle.name, self.bundle.model).set(1)
        metrics_tls = TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert and cfg.tls_key else None
        try:
            self._http = MetricsServer(
                cfg.metrics_host,
                cfg.metrics_port,
                self.metrics.registry,
                context=metrics_context(metrics_tls) if metrics_tls is not None else None,
                token=cfg.metrics_auth,
                on_reject=lambda reason: self.metrics.metrics_rejected.labels(reason).inc(),
            )
        except OSError as exc:
            where = f"{cfg.metrics_host}:{cfg.metrics_port}"
            raise ConfigError(f"metrics_port: cannot serve /metrics on {where}: {exc.strerror or exc}") from None
        self.metrics_port = int(self._http.server_port)
        if metrics_tls is not None:
            self._tls_watch = asyncio.get_running_loop().create_task(self._watch_metrics_tls(metrics_tls))
        await server.start()
        self._server = server
        if cfg.drift_state:
            self._saver = asyncio.get_running_loop().create_task(self._save_drift_periodically())
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.events is not None:
            log.info("evaluation events: gen_ai.evaluation.result over OTLP/gRPC to %s", self.events.endpoint)
        log.info(
            "serving %s on %s:%d (metrics on http://%s:%d/metrics), bundle %s for %s",
            SERVICE_NAME,
            cfg.host,
            self.port,
            cfg.metrics_host,
            self.metrics_port,
            self.bundle.name,
            self.bundle.model,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new RPCs, let in-flight ones finish within ``grace`` s."""
        grace = self.config.drain_seconds if grace is None else grace
        if self._server is not None:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
        if self._http is not None:
            self._http.stop()
            self._http = None
        self._executor.shutdown(wait=True)
        if self.critique is not None:
            await self.critique.stop()
            await self.critique.critic.backend.aclose()
            self.critique = None
        if self.debate is not None:
            await self.debate.stop()
            await self.debate.backend.aclose()
            self.debate = None
        if self._saver is not None:
            self._saver.cancel()
            self._saver = None
        if self._tls_watch is not None:
            self._tls_watch.cancel()
            self._tls_watch = None
        try:
            self.save_drift()
        except OSError as exc:  # a full disk at shutdown: keep the last saved state, still exit cleanly
            log.error(
                "drift_state: could not save to %s at shutdown (%s); the state saved before is kept",
                self.config.drift_state,
                exc.strerror or exc,
            )
        finally:
            if self.audit is not None:
                self.audit.close()
            if self.events is not None:
                self.events.close()
                self.events = None

    async def _start_critique(self) -> CritiqueService | None:
        cfg = self.config
        if not cfg.critic_url:
            return None
        backend = OpenAIChatBackend(cfg.critic_url, cfg.critic_model, timeout=cfg.critique_timeout)
        critic = Critic(backend, Constitution.load(cfg.constitution), cfg.critique_mode, cfg.critique_timeout)
        service = CritiqueService(
            critic,
            CritiquePolicy(sample_rate=cfg.critique_sample_rate),
            max_queue=cfg.critique_queue,
            concurrency=cfg.critique_concurrency,
            metrics=self.metrics,
            on_result=self._background if self.audit is not None else None,
        )
        await service.start()
        log.info("critiques: %s in %s mode via %s", "on", cfg.critique_mode, cfg.critic_url)
        return service

    def _background(self, record: dict[str, Any]) -> None:
        """Critique and debate results go to the audit log too, and debates out as evaluation
        events (nothing waits for them: no reply acknowledges them)."""
        if self.audit is not None:
            self.audit.write(record)
        if self.events is not None:
            self.events.record(record)

    async def _start_debate(self) -> DebateService | None:
        cfg = self.config
        if not cfg.debate_url:
            return None
        service = DebateService(
            OpenAIChatBackend(cfg.debate_url, cfg.debate_model, timeout=cfg.debate_timeout),
            rounds=cfg.debate_rounds,
            max_tokens=cfg.debate_max_tokens,
            timeout=cfg.debate_timeout,
            max_queue=cfg.debate_queue,
            metrics=self.metrics,
            on_result=self._background if self.audit is not None or self.events is not None else None,
        )
        await service.start()
        log.info("debates: critical alerts are debated via %s (%d rounds)", cfg.debate_url, cfg.debate_rounds)
        return service

    def save_drift(self) -> None:
        """Write the drift state to ``drift_state`` (no-op when none is configured)."""
        if self.config.drift_state:
            self.drift.save(self.config.drift_state)

    async def _save_drift_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.drift_save_seconds)
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.save_drift)
            except OSError as exc:  # a full disk must not take the sidecar down
                log.warning("drift_state: could not save to %s: %s", self.config.drift_state, exc)

    async def _watch_metrics_tls(self, files: TlsFiles, every: float = 2.0) -> None:
        """Give ``/metrics`` a fresh context when a certificate, key or client-CA file changes."""
        while self._http is not None:
            await asyncio.sleep(every)
            if not files.changed():
                continue
            try:
                context = metrics_context(files)
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "tls: could not reload /metrics certificate %s: %s; keeping the previous one", files.cert, exc
                )
                continue
            if self._http is not None:
                self._http.set_context(context)
                log.info("tls: reloaded /metrics certificate from %s", files.cert)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (None: it can), bound as grpc binds (SO_REUSEADDR)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {host!r} ({exc.strerror or exc})"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            return str(exc.strerror or exc)
    return None


def return_freed_buffers() -> None:
    """Make glibc give large freed buffers back to the kernel.

    Request bodies reach tens of MiB. glibc raises its mmap threshold to the largest buffer freed
    (up to 32 MiB), after which such buffers come from per-thread heaps that fragment and are
    kept: RSS rose from 84 to 183-319 MiB over 8 passes of bench/amplification.py. A fixed
    256 KiB threshold (and at most 4 arenas) maps every large buffer and unmaps it when freed.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
        libc.mallopt(-8, 4)  # M_ARENA_MAX


def limit_blas_threads(threads: int) -> None:
    """Cap numpy's BLAS thread pool for this process.

    The scoring threads each run small matrix products. A multi-threaded BLAS makes them spin and
    contend with the gRPC threads, which sent the p99 of Score from 1.8 ms to 8.9 ms
    (bench/score.py).
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain in-flight RPCs and return exit status 0."""
    limit_blas_threads(config.blas_threads)
    return_freed_buffers()
    # Hand the GIL over every 1 ms instead of every 5: a scrape or a large request on one thread
    # then delays a Score on another by ~1 ms, not ~5 (bench/scrape.py).
    sys.setswitchinterval(0.001)
    sidecar = SidecarServer(config)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("signal received: draining in-flight RPCs (up to %.1f s)", config.drain_seconds)
    await sidecar.stop()
    log.info("stopped")
    return 0


class BackgroundSidecar:
    """A ``SidecarServer`` on its own event-loop thread, for sync code (demo, tests, embedding)."""

    def __init__(self, config: ServerConfig, bundle: Bundle | None = None) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.server = SidecarServer(config, bundle)
        self._thread = threading.Thread(target=self.loop.run_forever, name="sidecar-loop", daemon=True)
        self._thread.start()
        try:
            self.call(self.server.start())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    @property
    def target(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.server.config.host}:{self.server.port}"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the sidecar's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        """Drain (up to ``grace`` s) and stop the loop thread; safe to call twice."""
        if self._thread.is_alive():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
