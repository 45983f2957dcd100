"""Compare the recorded figures of two bundles: a rebuild against the shipped one.

``make bundle`` rebuilds the default bundle from scratch with ``monitor bundle build`` (its own
answers, SAE and fits); this prints, for every detector and baseline both bundles record, the
AUROC, recall and false-alarm rate at the shipped threshold per held-out split, the ordinary-stream
HALT rates, and the largest differences, so "equal within the noise of refitting" is a
measurement, not a glance at two model cards.

    python scripts/compare_bundles.py monitor/assets/default runs/bundle-default [--markdown]

Exit status 0 always: what counts as noise is for the reader (the note of issue 21 says what
was compared and why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

FIGURES = ("auroc", "recall_at_threshold", "fpr_at_threshold", "ece")


def recorded(folder: Path) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
    """(figures per detector or baseline per split, the ordinary-stream section) of ``bundle.yaml``."""
    path = folder / "bundle.yaml"
    if not path.is_file():
        raise SystemExit(f"compare_bundles: no bundle.yaml in {folder}")
    raw = yaml.safe_load(path.read_text()) or {}
    out = {str(d["name"]): dict(d.get("metrics") or {}) for d in raw.get("detectors") or []}
    out.update({str(k): dict(v.get("metrics") or {}) for k, v in (raw.get("baselines") or {}).items()})
    return out, dict(raw.get("ordinary_streams") or {})


def compare(a: Path, b: Path, markdown: bool = False) -> list[str]:
    """The comparison as lines of text (a Markdown table with ``markdown``)."""
    fa, sa = recorded(a)
    fb, sb = recorded(b)
    lines = []
    sep = " | " if markdown else "  "
    head = ["detector", "split", "AUROC a", "AUROC b", "Δ", "recall@thr a", "recall@thr b", "FPR@thr a", "FPR@thr b"]
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append(sep.join(head))
    deltas: list[tuple[float, str, str]] = []
    for name in sorted(set(fa) & set(fb)):
        for split in sorted(set(fa[name]) & set(fb[name])):
            if split == "sample":
                continue
            x, y = fa[name][split], fb[name][split]
            d = float(y["auroc"]) - float(x["auroc"])
            deltas.append((abs(d), name, split))
            cells = [name, split, f"{x['auroc']:.3f}", f"{y['auroc']:.3f}", f"{d:+.3f}"]
            cells += [f"{x['recall_at_threshold']:.3f}", f"{y['recall_at_threshold']:.3f}"]
            cells += [f"{x['fpr_at_threshold']:.3f}", f"{y['fpr_at_threshold']:.3f}"]
            lines.append(("| " + " | ".join(cells) + " |") if markdown else sep.join(cells))
    only = sorted(set(fa) ^ set(fb))
    if only:
        lines.append(f"\nin one bundle only: {', '.join(only)}")
    if deltas:
        deltas.sort(reverse=True)
        mean = sum(d for d, _, _ in deltas) / len(deltas)
        lines.append(f"\n{len(deltas)} (detector, split) AUROC pairs: mean |Δ| {mean:.4f}, largest:")
        lines += [f"  {d:.3f}  {n}  {s}" for d, n, s in deltas[:8]]
    for key in ("ordinary_streams", "ordinary_halted"):
        if key in sa or key in sb:
            lines.append(f"ordinary streams, {key}: a {sa.get(key)}  b {sb.get(key)}")
    for kind in sorted(set(sa.get("kinds", {})) | set(sb.get("kinds", {}))):
        ka, kb = sa.get("kinds", {}).get(kind, {}), sb.get("kinds", {}).get(kind, {})
        lines.append(f"ordinary streams, {kind}: halted a {ka.get('halted')}  b {kb.get('halted')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="a bundle folder (e.g. the shipped monitor/assets/default)")
    p.add_argument("b", type=Path, help="another bundle folder (e.g. runs/bundle-default)")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = p.parse_args(argv)
    print("\n".join(compare(args.a, args.b, args.markdown)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
