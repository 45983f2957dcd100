"""Fuzz a running sidecar over all four RPCs with random and mutated requests; print the status table.

Every request is built from a valid one and then broken (bytes flipped, truncated or spliced,
invalid UTF-8 in a string field, hostile numbers, shapes and labels, streams with chunks after
the final one, ...), or is random bytes. A correct sidecar answers only OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or UNAUTHENTICATED, never UNKNOWN or INTERNAL, logs no traceback, and
counts every call in ``safety_monitor_requests_total``.

    python scripts/fuzz_server.py --requests 100000          # starts `monitor serve` itself
    python scripts/fuzz_server.py --target 127.0.0.1:50051 --metrics-url http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from monitor._proto import monitor_pb2 as pb
from monitor.server import SidecarProcess

SERVICE = "/safety_monitor.v1.SafetyMonitor/"
ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"}
_IDENTITY: Callable[[bytes], bytes] = lambda b: b  # noqa: E731


class Fuzzer:
    """Builds hostile payloads from a catalog (model, hook point, d_model) and a seed."""

    def __init__(self, catalog: pb.DetectorCatalog, seed: int) -> None:
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.model = catalog.model
        self.hook = catalog.hook_points[0].name
        self.d_model = int(catalog.hook_points[0].d_model)
        sl = catalog.hook_points[0].encoder_slice
        self.k = len(sl.latent_ids) + int(sl.dense_columns) if sl.latent_ids else 0

    # -- valid building blocks ------------------------------------------------------------------
    def block(self, tokens: int | None = None, projected: bool = False) -> pb.ActivationBlock:
        n = self.rng.randint(1, 6) if tokens is None else tokens
        width = self.k if projected and self.k else self.d_model
        x = self.np.normal(size=(n, width)).astype(np.float32)
        t = pb.Tensor(shape=[n, width], dtype=pb.DTYPE_F32, data=x.tobytes())
        return pb.ActivationBlock(hook_point=self.hook, activations=t, projected=projected and bool(self.k))

    def request(self, rid: str) -> pb.ScoreRequest:
        return pb.ScoreRequest(
            request_id=rid,
            model=self.model,
            prompt="What is the capital of France?",
            output="Paris is the capital of France.",
            activations=[self.block(projected=self.rng.random() < 0.3)],
            labels={"tenant": "fuzz"},
        )

    def chunk(self, rid: str, index: int, final: bool) -> pb.ScoreChunk:
        return pb.ScoreChunk(
            request_id=rid if index == 0 or self.rng.random() < 0.5 else "",
            model=self.model if index == 0 else "",
            prompt="Hi" if index == 0 else "",
            text_delta=f"tok{index} ",
            activations=[self.block()],
            final=final,
        )

    # -- breaking them --------------------------------------------------------------------------
    def break_message(self, msg: pb.ScoreRequest | pb.ScoreChunk) -> bytes:
        """One semantic or byte-level corruption of a valid message."""
        kind = self.rng.randrange(16)
        m = type(msg)()
        m.CopyFrom(msg)
        blk = m.activations[0] if len(m.activations) else None
        if kind == 0 and blk is not None:  # hostile numbers
            x = np.frombuffer(blk.activations.data, dtype="<f4").copy()
            x[self.rng.randrange(len(x))] = self.rng.choice([np.nan, np.inf, -np.inf, 3e38, -1e30, 1e7])
            blk.activations.data = x.tobytes()
        elif kind == 1 and blk is not None:  # shapes that lie
            blk.activations.shape[:] = self.rng.choice(
                [[0, self.d_model], [-1, self.d_model], [2**40, self.d_model], [1], [1, 2, 3], [3, 7], []]
            )
        elif kind == 2 and blk is not None:  # wrong byte count / dtype
            if self.rng.random() < 0.5:
                blk.activations.data = blk.activations.data[: self.rng.randrange(len(blk.activations.data))]
            else:
                blk.activations.dtype = self.rng.choice([0, 2, 3, 7, 1 << 20])  # type: ignore[assignment]
        elif kind == 3 and blk is not None:
            blk.hook_point = self.rng.choice(["", "blocks.99.hook_resid_post", "x" * 5000, self.hook + " "])
        elif kind == 4:
            m.request_id = self.rng.choice(["", "x" * 129, "\u0000", "é" * 200])
        elif kind == 5:
            m.model = self.rng.choice(["", "gpt-4", self.model.upper()])
        elif kind == 6:
            for i in range(self.rng.choice([1, 9, 40])):
                m.labels[self.rng.choice(["Tenant", "1x", "a-b", "", f"k{i}", "k" * 40])] = "v" * self.rng.choice(
                    [1, 200]
                )
        elif kind == 7 and blk is not None:  # the same hook point twice, or projected without a slice
            if self.rng.random() < 0.5:
                m.activations.append(blk)
            else:
                blk.projected = True
        elif kind == 8:  # no activations at all
            del m.activations[:]
        raw = m.SerializeToString()
        if kind == 9:
            return self._bad_utf8(m)
        if kind == 10 and raw:  # flip bytes
            b = bytearray(raw)
            for _ in range(self.rng.randint(1, 8)):
                b[self.rng.randrange(len(b))] = self.rng.randrange(256)
            return bytes(b)
        if kind == 11 and raw:
            return raw[: self.rng.randrange(len(raw))]
        if kind == 12:  # splice random bytes in
            at = self.rng.randrange(len(raw) + 1)
            return raw[:at] + self.rng.randbytes(self.rng.randint(1, 32)) + raw[at:]
        if kind == 13:
            return self.rng.randbytes(self.rng.randint(0, 256))
        if kind == 14:  # an unknown field, a group wire type, an oversize length
            tag = self.rng.choice([b"\xf8\x07\x01", b"\x0b", b"\x2a\xff\xff\xff\xff\x0f", b"\x00\x00"])
            return raw + tag
        return raw  # kinds without a corruption above: a valid (or semantically broken) message

    def _bad_utf8(self, m: pb.ScoreRequest | pb.ScoreChunk) -> bytes:
        """Invalid UTF-8 in one string field, written on the wire by hand (protobuf refuses to).

        ``m`` is the caller's copy: the chosen field is cleared and re-sent with bad bytes."""
        bad = self.rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xf8\x88\x80\x80\x80"])
        text = "text_delta" if isinstance(m, pb.ScoreChunk) else "output"
        field = self.rng.choice(["request_id", "prompt", "model", "label_key", "label_value", "hook", text])
        if field in ("label_key", "label_value"):
            entry = _ld(1, bad if field == "label_key" else b"k") + _ld(2, b"v" if field == "label_key" else bad)
            return m.SerializeToString() + _ld(6, entry)
        if field == "hook":
            return m.SerializeToString() + _ld(5, _ld(1, bad))
        m.ClearField(field)
        return m.SerializeToString() + _ld(m.DESCRIPTOR.fields_by_name[field].number, bad)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# -- running ------------------------------------------------------------------------------------
class Runner:
    def __init__(
        self, target: str, catalog: pb.DetectorCatalog, seed: int, timeout: float = 20.0, token: str | None = None
    ) -> None:
        self.token = token
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 128 << 20)])
        self.catalog = catalog
        self.seed = seed
        self.timeout = timeout
        ch = self.channel
        self.score = ch.unary_unary(SERVICE + "Score", request_serializer=_IDENTITY, response_deserializer=_IDENTITY)
        self.get = ch.unary_unary(
            SERVICE + "GetDetectors", request_serializer=_IDENTITY, response_deserializer=_IDENTITY
        )
        self.stream = ch.stream_stream(
            SERVICE + "ScoreStream", request_serializer=_IDENTITY, response_deserializer=_IDENTITY
        )
        self.ingest = ch.stream_unary(SERVICE + "Ingest", request_serializer=_IDENTITY, response_deserializer=_IDENTITY)

    def _metadata(self, rng: random.Random) -> tuple[tuple[str, str], ...] | None:
        """With a token: right most of the time; else missing, wrong, repeated or another scheme."""
        if self.token is None:
            return None
        right = ("authorization", f"Bearer {self.token}")
        if rng.random() < 0.9:
            return (right,) if rng.random() < 0.5 else (("authorization", f"bEaReR {self.token}"),)
        return rng.choice(
            [
                (),
                (("authorization", "Bearer wrong"),),
                (right, right),
                (("authorization", f"Basic {self.token}"),),
                (("authorization", "Bearer"),),
            ]
        )

    def one(self, i: int) -> tuple[str, str]:
        """Request number ``i`` (deterministic for a seed): (rpc, status code name)."""
        f = Fuzzer(self.catalog, self.seed * 1_000_003 + i)
        pick = f.rng.random()
        md = self._metadata(f.rng)
        try:
            if pick < 0.45:
                payload = f.break_message(f.request(f"fz-{i}")) if f.rng.random() < 0.85 else f.request(f"ok-{i}")
                if not isinstance(payload, bytes):
                    payload = payload.SerializeToString()
                self.score(payload, timeout=self.timeout, metadata=md)
                return "Score", "OK"
            if pick < 0.75:
                rpc = "ScoreStream"
                n = f.rng.randint(0, 5)
                chunks = [f.chunk(f"st-{i}", j, final=j == n - 1) for j in range(n)]
                raw = [c.SerializeToString() for c in chunks]
                if raw and f.rng.random() < 0.8:
                    j = f.rng.randrange(len(raw))
                    raw[j] = f.break_message(chunks[j])
                if f.rng.random() < 0.1:  # a chunk after the final one
                    raw.append(f.chunk(f"st-{i}", n, final=True).SerializeToString())
                for _ in self.stream(iter(raw), timeout=self.timeout, metadata=md):
                    pass
                return rpc, "OK"
            if pick < 0.95:
                rpc = "Ingest"
                items = [f.request(f"in-{i}-{j}") for j in range(f.rng.randint(0, 6))]
                raw = [f.break_message(it) if f.rng.random() < 0.5 else it.SerializeToString() for it in items]
                self.ingest(iter(raw), timeout=self.timeout, metadata=md)
                return rpc, "OK"
            payload = b"" if f.rng.random() < 0.5 else f.rng.randbytes(f.rng.randint(1, 64))
            self.get(payload, timeout=self.timeout, metadata=md)
            return "GetDetectors", "OK"
        except grpc.RpcError as exc:
            rpc = (
                "Score"
                if pick < 0.45
                else "ScoreStream"
                if pick < 0.75
                else "Ingest"
                if pick < 0.95
                else "GetDetectors"
            )
            return rpc, exc.code().name  # type: ignore[attr-defined]


def fuzz(
    target: str,
    requests: int,
    seed: int = 0,
    workers: int = 8,
    progress: bool = False,
    token: str | None = None,
) -> Counter[tuple[str, str]]:
    """Send ``requests`` fuzzed calls to ``target``; returns a Counter of (rpc, status code)."""
    ch = grpc.insecure_channel(target)
    get = ch.unary_unary(
        SERVICE + "GetDetectors",
        request_serializer=pb.GetDetectorsRequest.SerializeToString,
        response_deserializer=pb.DetectorCatalog.FromString,
    )
    md = (("authorization", f"Bearer {token}"),) if token else None
    catalog = get(pb.GetDetectorsRequest(), timeout=30, metadata=md)
    ch.close()
    runner = Runner(target, catalog, seed, token=token)
    counts: Counter[tuple[str, str]] = Counter({("GetDetectors", "OK"): 1})  # the catalog call above
    start = time.time()
    with ThreadPoolExecutor(workers) as pool:
        for done, result in enumerate(pool.map(runner.one, range(requests), chunksize=64), 1):
            counts[result] += 1
            if progress and done % 2000 == 0:
                rate = done / (time.time() - start)
                print(f"\r{done}/{requests} requests ({rate:.0f}/s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    runner.channel.close()
    return counts


def server_counts(metrics_url: str) -> Counter[tuple[str, str]]:
    """``safety_monitor_requests_total`` as the server counted it."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: Counter[tuple[str, str]] = Counter()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "safety_monitor_requests_total":
                out[(s.labels["rpc"], s.labels["code"])] += int(s.value)
    return out


def table(client: Counter[tuple[str, str]], server: Counter[tuple[str, str]] | None) -> str:
    rows = ["| RPC | status | client saw | server counted |", "|---|---|---:|---:|"]
    for key in sorted(set(client) | set(server or {})):
        srv = str(server.get(key, 0)) if server is not None else "-"
        rows.append(f"| {key[0]} | {key[1]} | {client.get(key, 0)} | {srv} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--target", help="host:port of a running sidecar (default: start `monitor serve`)")
    ap.add_argument("--metrics-url", help="its /metrics URL, to compare the server's counts")
    ap.add_argument("--token", help="the sidecar's bearer token (started with it); 10 %% of calls get a bad header")
    ns = ap.parse_args(argv)
    server: SidecarProcess | None = None
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    log_path = folder / "server.log"
    target, metrics_url = ns.target, ns.metrics_url
    if target is None:
        env = {"SAFETY_MONITOR_AUTH_TOKEN": ns.token} if ns.token else {}
        server = SidecarProcess("--audit-log", str(folder / "audit.jsonl"), log_path=log_path, env=env).wait()
        target, metrics_url = server.target, server.metrics_url
    try:
        t0 = time.time()
        client = fuzz(target, ns.requests, ns.seed, ns.workers, progress=True, token=ns.token)
        seconds = time.time() - t0
        counted = server_counts(metrics_url) if metrics_url else None
    finally:
        if server is not None:
            server.stop()
    print(table(client, counted))
    bad = {k: v for k, v in client.items() if k[1] not in ALLOWED}
    print(f"\n{sum(client.values())} requests in {seconds:.0f} s, seed {ns.seed}; codes outside the design: {bad or 0}")
    if server is not None:
        text = log_path.read_text(errors="replace")
        print(f"server log: {text.count('Traceback')} tracebacks, {len(text.splitlines())} lines ({log_path})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
