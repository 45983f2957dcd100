"""Stream-level calibration: the fraction of ordinary chat streams that fire or HALT each detector.

Replays the ordinary generations captured by ``scripts/ordinary_streams.py`` (the default model's
own answers to chat-corpus prompts, activations captured while generating) through the pipeline's
stream scorer, the code behind ``ScoreStream``: the decision row and the first chunk together,
then ``--chunk-tokens`` tokens per chunk, the last one final. A stream *fires* a detector when any
of its verdicts fires; it is *halted* when the pipeline advises HALT. ``--write`` records the rates
in the bundle's ``ordinary_streams:`` section (the model card shows them).

With ``--set-threshold NAME`` the threshold of conjunction ``NAME`` is raised, if needed, to the
lowest value at which at most ``--max-rate`` of the streams would fire it (never lowered).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from monitor.detectors import Bundle, DetectorSet, default_bundle_path
from monitor.detectors._evaluate import write_manifest_detectors
from monitor.pipeline import ActivationInput, ChunkInput, Pipeline
from monitor.tensors import encode

CACHE = Path.home() / ".cache" / "safety-monitor" / "work-issue12" / "ordinary_streams.pt"
MODEL = "SmolLM2-135M-Instruct"


def replay(
    pipeline: Pipeline, hook: str, acts: np.ndarray, chunk_tokens: int
) -> tuple[dict[str, float], set[str], str]:
    """One stream: (detector -> highest score over its verdicts, detectors fired, HALT reason or "")."""
    stream = pipeline.open_stream()
    decision = [ActivationInput(hook, encode(acts[:1]))]
    toks = acts[1:]
    starts = list(range(0, max(len(toks), 1), chunk_tokens))
    best: dict[str, float] = {}
    fired: set[str] = set()
    v = None
    for n, a in enumerate(starts):
        part = toks[a : a + chunk_tokens]
        v = stream.update(
            ChunkInput(
                request_id="ordinary",
                model=MODEL,
                activations=[ActivationInput(hook, encode(part))] if len(part) else [],
                decision=decision if n == 0 else [],
                final=n == len(starts) - 1,
            )
        )
        for r in v.detectors:
            best[r.name] = max(best.get(r.name, -np.inf), r.score)
            if r.fired:
                fired.add(r.name)
    assert v is not None
    return best, fired, v.reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=Path, default=CACHE)
    parser.add_argument("--bundle", type=Path, default=default_bundle_path())
    parser.add_argument("--chunk-tokens", type=int, default=16)
    parser.add_argument("--set-threshold", action="append", default=[])
    parser.add_argument("--max-rate", type=float, default=0.005)
    parser.add_argument("--write", action="store_true")
    ns = parser.parse_args()
    data = torch.load(ns.streams)
    bundle = Bundle.load(ns.bundle)
    hook = bundle.hook_points[0].name
    if ns.set_threshold:
        raw = yaml.safe_load((ns.bundle / "bundle.yaml").read_text())
        pipeline = Pipeline(bundle)
        best = [replay(pipeline, hook, d["acts"].float().numpy(), ns.chunk_tokens)[0] for d in data]
        for name in ns.set_threshold:
            top = np.sort([b.get(name, 0.0) for b in best])
            allowed = int(np.floor(ns.max_rate * len(top)))
            need = float(np.nextafter(top[len(top) - allowed - 1], np.inf))
            for e in raw["detectors"]:
                if e["name"] == name and need > e["threshold"]:
                    print(
                        f"{name}: threshold {e['threshold']} -> {need:.6g} ({allowed} of {len(top)} streams may fire)"
                    )
                    e["threshold"] = float(f"{need:.6g}")
        write_manifest_detectors(ns.bundle, raw["detectors"])
        bundle = Bundle.load(ns.bundle)
    pipeline = Pipeline(bundle, detectors=DetectorSet.from_bundle(bundle))
    fired = {s.name: 0 for s in pipeline.detectors.specs}
    halted_by = dict(fired)
    crit = {s.name for s in pipeline.detectors.specs if s.critical}
    any_crit = halted = 0
    for d in data:
        _, names, reason = replay(pipeline, hook, d["acts"].float().numpy(), ns.chunk_tokens)
        for name in names:
            fired[name] += 1
        any_crit += bool(names & crit)
        if reason:
            halted += 1
            halted_by[reason.split(" ", 1)[0]] += 1
    n = len(data)
    rec = {
        "streams": n,
        "source": "GSM8K + GPTeacher prompts of data/chat_corpus, the default model's greedy answers, "
        f"at most {max(len(d['acts']) for d in data) - 1} response tokens scored per stream",
        "chunk_tokens": ns.chunk_tokens,
        "command": "python scripts/ordinary_streams.py && python scripts/stream_rates.py " + " ".join(sys.argv[1:]),
        "any_critical_fired": any_crit / n,
        "halted": halted / n,
        "detectors": {k: {"fired": fired[k] / n, "halted": halted_by[k] / n} for k in fired},
    }
    print(yaml.safe_dump(rec, sort_keys=False))
    if ns.write:
        raw = yaml.safe_load((ns.bundle / "bundle.yaml").read_text())
        write_manifest_detectors(ns.bundle, raw["detectors"], ordinary_streams=rec)


if __name__ == "__main__":
    main()
