"""Benchmark: vLLM's output tokens/s with the safety-monitor adapter on vs off, in one run.

The sidecar runs as its own process (``monitor serve``) on the same machine, as in a pod. Each
mode is a fresh ``LLM(...)`` in vLLM's environment (``scripts/vllm_generate.py``) generating the
same prompts (the demo's 48, greedy, ``--max-tokens``) ``--repeats`` times after a warm-up; modes
alternate ``--rounds`` times so drift hits both. "off" is vLLM with no plugin loaded; "on" adds
extract_hidden_states capture, the connector and the per-step streams (projected mode).
tokens/s = output tokens / generation seconds; the ratio is on / off (goal >= 0.95 on CPU).

Run: ``python bench/vllm_overhead.py [--eager] [--rounds 2 --repeats 2 --max-tokens 64]``.
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


def run_mode(python: Path, work: Path, prompts: Path, sidecar: str | None, ns: argparse.Namespace) -> list[float]:
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
        cmd += ["--sidecar", sidecar]
    proc = subprocess.run(cmd, env=vllm_env(work / "cache"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"vllm_generate failed:\n{proc.stderr[-3000:]}")
    runs = json.loads(out.read_text())["runs"]
    return [r["output_tokens"] / r["seconds"] for r in runs]


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
    ns = p.parse_args()
    load_default_model()  # converts the model folder once if needed
    python = find_vllm_python()
    prompts_src = [json.loads(x)["prompt"] for x in (ROOT / "data/demo/prompts.jsonl").read_text().splitlines() if x]
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(prompts_src))
    audit = work / "audit.jsonl"
    sidecar = start_sidecar(ns.port, audit)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    coverage: list[float] = []
    try:
        for r in range(ns.rounds):
            for mode in ("off", "on"):
                before = audited(audit)
                got = run_mode(python, work, prompts, f"127.0.0.1:{ns.port}" if mode == "on" else None, ns)
                rates[mode] += got
                line = f"round {r + 1} {mode:>3}: " + ", ".join(f"{x:.1f}" for x in got) + " tok/s"
                if mode == "on":  # every request of the run (warm-up + repeats) must have its verdict
                    deadline = time.monotonic() + 30
                    want = (1 + ns.repeats) * len(prompts_src)
                    while audited(audit) - before < want and time.monotonic() < deadline:
                        time.sleep(0.2)
                    coverage.append((audited(audit) - before) / want)
                    line += f"; {audited(audit) - before} of {want} requests have a verdict"
                print(line, flush=True)
    finally:
        sidecar.terminate()
        sidecar.wait(30)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    mode = "eager" if ns.eager else "torch.compile"
    print(f"\n{len(prompts_src)} prompts x {ns.max_tokens} tokens, {ns.dtype}, {mode}, vLLM CPU")
    print(f"| mode | output tok/s (median of {len(rates['off'])}) |\n|---|---|")
    print(f"| off (no plugin) | {off:.1f} |\n| on (adapter, projected) | {on:.1f} |")
    print(f"on / off = {on / off:.3f}")
    print(f"monitoring coverage in the 'on' runs: {min(coverage):.1%} (lowest run)")
    return 0 if min(coverage) == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
