"""Generalisation experiments for the deception and sycophancy probes (issue 12, item 3).

Two steps, so the slow one runs once:

    python scripts/probe_experiments.py collect --out runs/probe-exp      # activations, ~40 min on 2 cores
    python scripts/probe_experiments.py run --acts runs/probe-exp         # every try, a markdown table

``collect`` runs each labeled row of ``data/detectors/`` teacher-forced through the default model
once and keeps, for several layers, the decision row (last prompt-template token) and the response
rows (float16). ``run`` fits dense logistic probes (the kind that generalised best in issue 4) on
one source or several, and scores every other source: the figure is always *cross-source* AUROC,
on a source no fitted row came from. Each try changes one thing against the shipped recipe
(layer 16, mean over response tokens, fitted on one source): pooled sources, other layers, several
layers, the decision row, max over a short window, k consistent tokens.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (8, 12, 16, 20, 24)
BEHAVIOURS = ("deception", "sycophancy", "refusal", "harmfulness")
SKIP_SOURCES = {"truthfulqa"}  # diagnostic, out of scope: not needed for the tries


def collect(out: Path, max_response_tokens: int = 64, batch_size: int = 16) -> None:
    """Per behaviour: ``{layer: [rows]}`` of float16 ``[1 + T, d_model]`` (decision row first)."""
    import torch
    from tqdm import tqdm

    from monitor.detectors._activations import load_rows
    from monitor.models import load_default_model

    model, tok = load_default_model()
    model.eval()
    torch.set_grad_enabled(False)
    out.mkdir(parents=True, exist_ok=True)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in LAYERS:

        def hook(module: object, inputs: object, output: object, layer: int = layer) -> None:
            captured[layer] = (output[0] if isinstance(output, tuple) else output).detach()  # type: ignore[index]

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    tok.padding_side = "right"
    for behaviour in BEHAVIOURS:
        path = out / f"{behaviour}.pt"
        if path.is_file():
            continue
        rows = [r for r in load_rows(behaviour) if r.source not in SKIP_SOURCES]
        items = []
        for i, r in enumerate(rows):
            prefix = tok.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False, add_generation_prompt=True)
            p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
            r_ids = tok(r.response, add_special_tokens=False)["input_ids"][:max_response_tokens]
            items.append((len(p_ids) + len(r_ids), i, p_ids + r_ids, len(p_ids)))
        items.sort()
        acts: dict[int, list[torch.Tensor | None]] = {layer: [None] * len(rows) for layer in LAYERS}
        for b in tqdm(range(0, len(items), batch_size), desc=behaviour):
            batch = items[b : b + batch_size]
            width = max(n for n, *_ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, (n, _, seq, _) in enumerate(batch):
                ids[j, :n] = torch.tensor(seq)
                mask[j, :n] = 1
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            for j, (n, i, _, n_prefix) in enumerate(batch):
                for layer in LAYERS:
                    acts[layer][i] = captured[layer][j, n_prefix - 1 : n].to(torch.float16).clone()
        meta = [{"source": r.source, "group": r.group, "label": r.label} for r in rows]
        torch.save({"meta": meta, "acts": acts}, path)
        print(f"{behaviour}: {len(rows)} rows -> {path}")
    for h in handles:
        h.remove()


# --- the tries ------------------------------------------------------------------------------------


class Data:
    """One behaviour's collected rows: labels, sources, and pooled features per layer."""

    def __init__(self, path: Path) -> None:
        import torch

        blob = torch.load(path)
        self.meta = blob["meta"]
        self.acts = {k: [a.float().numpy() for a in v] for k, v in blob["acts"].items()}
        self.y = np.array([m["label"] for m in self.meta])
        self.source = np.array([m["source"] for m in self.meta])
        self.group = np.array([m["group"] for m in self.meta])

    def pooled(self, layer: int, how: str = "mean") -> np.ndarray:
        out = []
        for a in self.acts[layer]:
            resp = a[1:] if a.shape[0] > 1 else a[:1]
            if how == "mean":
                out.append(resp.mean(0))
            elif how == "decision":
                out.append(a[0])
            else:
                raise ValueError(how)
        return np.stack(out)

    def tokens(self, layer: int) -> list[np.ndarray]:
        return [a[1:] if a.shape[0] > 1 else a[:1] for a in self.acts[layer]]


def _fit(x: np.ndarray, y: np.ndarray, c: float = 0.1) -> tuple[Callable[[np.ndarray], np.ndarray], object]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(x), y)
    w = clf.coef_[0] / sc.scale_
    b = float(clf.intercept_[0] - (sc.mean_ / sc.scale_) @ clf.coef_[0])
    return (lambda z: z @ w + b), (w, b)


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def _window_max(scores: np.ndarray, w: int) -> float:
    if len(scores) <= w:
        return float(scores.mean())
    c = np.cumsum(np.concatenate([[0.0], scores]))
    return float(((c[w:] - c[:-w]) / w).max())


def _k_consistent(scores: np.ndarray, thr: float, k: int) -> float:
    """The k-th largest per-token score: >= thr exactly when k tokens are above thr."""
    s = np.sort(scores)[::-1]
    return float(s[min(k, len(s)) - 1])


def run(acts: Path, out: Path | None) -> None:
    data = {b: Data(acts / f"{b}.pt") for b in BEHAVIOURS if (acts / f"{b}.pt").is_file()}
    lines = ["| behaviour | try | fitted on | layer(s) | features | aggregation | " + "cross AUROC per source | mean |",
             "|---|---|---|---|---|---|---|---|"]
    results: list[dict[str, object]] = []
    ref = data.get("refusal")

    def evaluate(
        b: str, name: str, fit_sources: Sequence[str], layers: Sequence[int], feature: str = "mean",
        aggregation: str = "mean", refusal_negatives: bool = False, eval_sources: Sequence[str] | None = None,
        c: float = 0.1,
    ) -> dict[str, float]:
        d = data[b]
        def feats(dd: Data, how: str) -> np.ndarray:
            parts = []
            for layer in layers:
                if how in ("mean", "decision"):
                    parts.append(dd.pooled(layer, how))
                elif how == "mean+decision":
                    parts += [dd.pooled(layer, "mean"), dd.pooled(layer, "decision")]
            return np.concatenate(parts, axis=1)
        x = feats(d, feature)
        fit = np.isin(d.source, list(fit_sources))
        xf, yf = x[fit], d.y[fit]
        if refusal_negatives and ref is not None:
            rsel = ref.source == "refusal_direction"
            xf = np.concatenate([xf, feats(ref, feature)[rsel]])
            yf = np.concatenate([yf, np.zeros(int(rsel.sum()), dtype=int)])
        score, (w, bias) = _fit(xf, yf, c)
        others = eval_sources or sorted(set(d.source) - set(fit_sources))
        res = {}
        for src in others:
            sel = d.source == src
            if aggregation == "mean":
                s = score(x[sel])
            else:
                assert len(layers) == 1 and feature == "mean"
                toks = [t for t, m in zip(d.tokens(layers[0]), sel, strict=True) if m]
                per = [t @ w + bias for t in toks]
                if aggregation.startswith("window"):
                    s = np.array([_window_max(p, int(aggregation[6:])) for p in per])
                elif aggregation.startswith("k"):
                    # threshold: 1 % FPR of the fitting rows' mean scores (the shipped calibration)
                    s = np.array([_k_consistent(p, 0.0, int(aggregation[1:])) for p in per])
                else:
                    s = np.array([p.max() for p in per])
            res[src] = _auroc(d.y[sel], s)
        cells = ", ".join(f"{k} {v:.3f}" for k, v in res.items())
        mean = float(np.mean(list(res.values())))
        lines.append(
            f"| {b} | {name} | {'+'.join(fit_sources)}{' +refusal neg.' if refusal_negatives else ''} | "
            f"{','.join(map(str, layers))} | {feature} | {aggregation} | {cells} | {mean:.3f} |"
        )
        results.append({"behaviour": b, "try": name, "fit": list(fit_sources), "layers": list(layers),
                        "feature": feature, "aggregation": aggregation, "auroc": res, "mean": mean})
        print(lines[-1], flush=True)
        return res

    if "deception" in data:
        b = "deception"
        tqa = ["truthfulqa_roleplay"]
        evaluate(b, "shipped recipe", ["repe"], [16], refusal_negatives=True, eval_sources=tqa + ["gsm8k_roleplay"])
        evaluate(b, "no refusal negatives", ["repe"], [16], eval_sources=tqa + ["gsm8k_roleplay"])
        evaluate(b, "pooled sources", ["repe", "gsm8k_roleplay"], [16], refusal_negatives=True, eval_sources=tqa)
        for layer in LAYERS:
            evaluate(b, f"layer {layer}", ["repe", "gsm8k_roleplay"], [layer], refusal_negatives=True, eval_sources=tqa)
        evaluate(b, "several layers (concat)", ["repe", "gsm8k_roleplay"], list(LAYERS), refusal_negatives=True, eval_sources=tqa)
        evaluate(b, "decision row", ["repe", "gsm8k_roleplay"], [16], feature="decision", refusal_negatives=True, eval_sources=tqa)
        evaluate(b, "mean + decision row", ["repe", "gsm8k_roleplay"], [16], feature="mean+decision", refusal_negatives=True, eval_sources=tqa)
        for agg in ("max", "window4", "window8", "k2", "k4"):
            evaluate(b, f"aggregation {agg}", ["repe", "gsm8k_roleplay"], [16], aggregation=agg, refusal_negatives=True, eval_sources=tqa)
        evaluate(b, "decision row, one source", ["repe"], [16], feature="decision", refusal_negatives=True, eval_sources=tqa + ["gsm8k_roleplay"])
        evaluate(b, "decision row, no refusal negatives", ["repe", "gsm8k_roleplay"], [16], feature="decision", eval_sources=tqa)
        for layer in (12, 20, 24):
            evaluate(b, f"decision row, layer {layer}", ["repe", "gsm8k_roleplay"], [layer], feature="decision", refusal_negatives=True, eval_sources=tqa)
        for held in ("repe", "gsm8k_roleplay", "truthfulqa_roleplay"):
            fit = [s for s in ("repe", "gsm8k_roleplay", "truthfulqa_roleplay") if s != held]
            evaluate(b, f"decision row, leave {held} out", fit, [16], feature="decision", refusal_negatives=True, eval_sources=[held])
        # leave one source out over the three
        for held in ("repe", "gsm8k_roleplay", "truthfulqa_roleplay"):
            fit = [s for s in ("repe", "gsm8k_roleplay", "truthfulqa_roleplay") if s != held]
            evaluate(b, f"leave {held} out", fit, [16], refusal_negatives=True, eval_sources=[held])
    if "sycophancy" in data:
        b = "sycophancy"
        agree_eval = ["typology", "gsm8k_opinion"]
        evaluate(b, "shipped recipe", ["truthfulqa_opinion"], [16], eval_sources=agree_eval)
        evaluate(b, "pooled agreement sources", ["truthfulqa_opinion", "gsm8k_opinion"], [16], eval_sources=["typology"])
        for layer in LAYERS:
            evaluate(b, f"layer {layer}", ["truthfulqa_opinion", "gsm8k_opinion"], [layer], eval_sources=["typology"])
        evaluate(b, "several layers (concat)", ["truthfulqa_opinion", "gsm8k_opinion"], list(LAYERS), eval_sources=["typology"])
        evaluate(b, "decision row", ["truthfulqa_opinion", "gsm8k_opinion"], [16], feature="decision", eval_sources=["typology"])
        evaluate(b, "mean + decision row", ["truthfulqa_opinion", "gsm8k_opinion"], [16], feature="mean+decision", eval_sources=["typology"])
        for agg in ("max", "window4", "k2"):
            evaluate(b, f"aggregation {agg}", ["truthfulqa_opinion", "gsm8k_opinion"], [16], aggregation=agg, eval_sources=["typology"])
        evaluate(b, "agreement probe on flattery", ["truthfulqa_opinion", "gsm8k_opinion"], [16], eval_sources=["flattery_math", "flattery_code"])
        evaluate(b, "flattery probe", ["flattery_math"], [16], eval_sources=["flattery_code", "typology", "truthfulqa_opinion"])
        for layer in LAYERS:
            evaluate(b, f"flattery probe, layer {layer}", ["flattery_math"], [layer], eval_sources=["flattery_code"])
        evaluate(b, "one probe for both", ["truthfulqa_opinion", "gsm8k_opinion", "flattery_math"], [16],
                 eval_sources=["typology", "flattery_code"])
        evaluate(b, "one probe for both, GSM8K agreement held out", ["truthfulqa_opinion", "flattery_math"], [16],
                 eval_sources=["typology", "gsm8k_opinion", "flattery_code"])
    if "harmfulness" in data:
        b = "harmfulness"
        held = ["rd_val_confusable", "hh_rlhf_tqa"]
        for layers in ([16], [8], [12], [20], [24], [12, 16, 20], list(LAYERS)):
            for c in (0.01, 0.1):
                evaluate(b, f"decision row, C={c}", ["harm_fit"], layers, feature="decision", eval_sources=held, c=c)
        for layers in ([16], [24], [16, 24]):
            evaluate(b, "pooled with HH-RLHF openers of other dialogues", ["harm_fit", "hh_fit"], layers,
                     feature="decision", eval_sources=held, c=0.01)
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="activations of every labeled row at several layers")
    c.add_argument("--out", type=Path, default=ROOT / "runs" / "probe-exp")
    r = sub.add_parser("run", help="fit and score every try; print the table")
    r.add_argument("--acts", type=Path, default=ROOT / "runs" / "probe-exp")
    r.add_argument("--out", type=Path, help="markdown file for the table (a .json beside it)")
    ns = parser.parse_args()
    if ns.cmd == "collect":
        collect(ns.out)
    else:
        run(ns.acts, ns.out)


if __name__ == "__main__":
    main()
