"""Benchmark: vLLM's output tokens/s with the safety-monitor adapter on vs off, in one run.

The sidecar runs as its own process (``monitor serve``) on the same machine, as in a pod. Each
mode is a fresh ``LLM(...)`` in vLLM's environment (``scripts/vllm_generate.py``) generating the
same prompts (the demo's 48, greedy, ``--max-tokens``) ``--repeats`` times after a warm-up; modes
alternate ``--rounds`` times so drift hits both. "off" is vLLM with no plugin loaded; "on" adds
extract_hidden_states capture, the connector and the per-step streams (projected mode).
tokens/s = output tokens / generation seconds; the ratio is on / off (goal >= 0.95 on CPU).
With ``--hold-back-tokens N`` a third mode, "withhold", runs the adapter with withholding on, and
every mode reports vLLM's own mean time to first token and inter-token latency (its histograms, as
the client sees them: withheld tokens are counted when they are released).

Run: ``python bench/vllm_overhead.py [--eager] [--rounds 2 --repeats 2 --max-tokens 64] [--hold-back-tokens 16]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from overhead import start_sidecar  # noqa: E402

from monitor.harness.vllm import find_vllm_python, vllm_env  # noqa: E402
from monitor.models import default_model_cache, load_default_model  # noqa: E402

LATENCY = {  # vLLM's histogram names (0.32) -> column
    "vllm:time_to_first_token_seconds": "TTFT",
    "vllm:inter_token_latency_seconds": "ITL",
}


def run_mode(
    python: Path, work: Path, prompts: Path, sidecar: str | None, ns: argparse.Namespace, hold_back: int = 0
) -> tuple[list[float], dict[str, float]]:
    """tokens/s per repeat, and the run's mean TTFT / ITL in seconds (from vLLM's histograms)."""
    out = work / f"out-{'on' if sidecar else 'off'}-{time.monotonic_ns()}.json"
    cmd = [
        str(python),
        str(ROOT / "scripts" / "vllm_generate.py"),
        "--model",
        str(default_model_cache()),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-tokens",
        str(ns.max_tokens),
        "--repeats",
        str(ns.repeats),
        "--dtype",
        ns.dtype,
    ]
    if ns.eager:
        cmd.append("--eager")
    if sidecar:
        cmd += ["--sidecar", sidecar, "--hold-back-tokens", str(hold_back)]
    proc = subprocess.run(cmd, env=vllm_env(work / "cache"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"vllm_generate failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    m = result["metrics"]
    latency = {col: m[f"{name}:sum"] / m[f"{name}:count"] for name, col in LATENCY.items() if m.get(f"{name}:count")}
    return [r["output_tokens"] / r["seconds"] for r in result["runs"]], latency


def audited(path: Path) -> int:
    """ScoreStream verdicts in the sidecar's audit log so far (one per monitored request)."""
    if not path.is_file():
        return 0
    return sum(
        '"rpc": "ScoreStream"' in line and '"type": "halt"' not in line for line in path.read_text().splitlines()
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's torch.compile)")
    p.add_argument("--port", type=int, default=50777)
    p.add_argument("--hold-back-tokens", type=int, default=0, help="also run the adapter with withholding (0: not)")
    ns = p.parse_args()
    load_default_model()  # converts the model folder once if needed
    python = find_vllm_python()
    prompts_src = [json.loads(x)["prompt"] for x in (ROOT / "data/demo/prompts.jsonl").read_text().splitlines() if x]
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(prompts_src))
    modes = ("off", "on", "withhold") if ns.hold_back_tokens > 0 else ("off", "on")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    latencies: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    coverage: list[float] = []
    # A fresh sidecar and audit log per run: LLM(...) numbers its requests from 0 in every run, and
    # the sidecar rightly takes an identical record under a known id for a retry (written once).
    sidecar = None
    try:
        for r in range(ns.rounds):
            for mode in modes:
                audit = work / f"audit-{r}-{mode}.jsonl"
                if mode != "off":
                    sidecar = start_sidecar(ns.port, audit)
                before = audited(audit)
                target = f"127.0.0.1:{ns.port}" if mode != "off" else None
                hold = ns.hold_back_tokens if mode == "withhold" else 0
                got, lat = run_mode(python, work, prompts, target, ns, hold)
                rates[mode] += got
                latencies[mode].append(lat)
                line = f"round {r + 1} {mode:>8}: " + ", ".join(f"{x:.1f}" for x in got) + " tok/s"
                line += "".join(f"; {k} {v * 1000:.0f} ms" for k, v in lat.items())
                if mode != "off":  # every request of the run (warm-up + repeats) must have its verdict
                    deadline = time.monotonic() + 30
                    want = (1 + ns.repeats) * len(prompts_src)
                    while audited(audit) - before < want and time.monotonic() < deadline:
                        time.sleep(0.2)
                    coverage.append((audited(audit) - before) / want)
                    line += f"; {audited(audit) - before} of {want} requests have a verdict"
                if sidecar is not None:
                    sidecar.terminate()
                    sidecar.wait(30)
                    sidecar = None
                print(line, flush=True)
    finally:
        if sidecar is not None:
            sidecar.terminate()
            sidecar.wait(30)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    mode = "eager" if ns.eager else "torch.compile"
    print(f"\n{len(prompts_src)} prompts x {ns.max_tokens} tokens, {ns.dtype}, {mode}, vLLM CPU")
    print(f"| mode | output tok/s (median of {len(rates['off'])}) | mean TTFT | mean ITL |\n|---|---|---|---|")
    names = {
        "off": "off (no plugin)",
        "on": "on (adapter, projected)",
        "withhold": f"on, hold_back_tokens={ns.hold_back_tokens}",
    }
    for m in modes:
        lat = {
            k: statistics.median(d[k] for d in latencies[m] if k in d)
            for k in LATENCY.values()
            if any(k in d for d in latencies[m])
        }
        cells = " | ".join(f"{lat[k] * 1000:.0f} ms" if k in lat else "n/a" for k in ("TTFT", "ITL"))
        print(f"| {names[m]} | {statistics.median(rates[m]):.1f} | {cells} |")
    print(f"on / off = {on / off:.3f}")
    if "withhold" in rates:
        print(f"withhold / off = {statistics.median(rates['withhold']) / off:.3f}")
    print(f"monitoring coverage in the 'on' runs: {min(coverage):.1%} (lowest run)")
    return 0 if min(coverage) == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
