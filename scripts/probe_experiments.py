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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from monitor.architectures import decoder_layers
from monitor.detectors._activations import response_tokens
from monitor.detectors._metrics import auroc

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

        handles.append(decoder_layers(model)[layer].register_forward_hook(hook))
    tok.padding_side = "right"
    for behaviour in BEHAVIOURS:
        path = out / f"{behaviour}.pt"
        if path.is_file():
            continue
        rows = [r for r in load_rows(behaviour) if r.source not in SKIP_SOURCES]
        items = []
        for i, r in enumerate(rows):
            prefix = tok.apply_chat_template(
                [{"role": "user", "content": r.prompt}], tokenize=False, add_generation_prompt=True
            )
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
        self.y = np.array([m["label"] for m in blob["meta"]])
        self.source = np.array([m["source"] for m in blob["meta"]])
        # converted to float32 once: every try reads them again
        self._tokens = {k: [response_tokens(a) for a in v] for k, v in blob["acts"].items()}
        self._decision = {k: np.stack([a[0].float().numpy() for a in v]) for k, v in blob["acts"].items()}

    def pooled(self, layer: int, how: str = "mean") -> np.ndarray:
        """``[rows, d_model]``: the mean of the response tokens, or the decision row."""
        if how == "mean":
            return np.stack([t.mean(0) for t in self._tokens[layer]])
        if how == "decision":
            return self._decision[layer]
        raise ValueError(f"how: expected 'mean' or 'decision', got {how!r}")

    def tokens(self, layer: int) -> list[np.ndarray]:
        """Each row's response-token activations (the decision row when it has no response)."""
        return self._tokens[layer]


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """Logistic regression on standardised inputs, folded back to raw weights ``(w, b)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(x), y)
    w = clf.coef_[0] / sc.scale_
    return w, float(clf.intercept_[0] - (sc.mean_ / sc.scale_) @ clf.coef_[0])


def _window_max(scores: np.ndarray, w: int) -> float:
    if len(scores) <= w:
        return float(scores.mean())
    c = np.cumsum(np.concatenate([[0.0], scores]))
    return float(((c[w:] - c[:-w]) / w).max())


def _k_consistent(scores: np.ndarray, k: int) -> float:
    """The k-th largest per-token score: >= thr exactly when k tokens are above thr."""
    s = np.sort(scores)[::-1]
    return float(s[min(k, len(s)) - 1])


@dataclass(frozen=True)
class Try:
    """One variant of the recipe: what it is fitted on, what it reads, how it aggregates."""

    behaviour: str
    name: str
    fit: tuple[str, ...]
    held_out: tuple[str, ...]
    layers: tuple[int, ...] = (16,)
    feature: str = "mean"  # "mean" (response tokens), "decision" (last prompt-template token), or both
    aggregation: str = "mean"  # mean | max | window<N> | k<N>
    refusal_negatives: bool = False
    harm_negatives: bool = False  # the harmfulness set's fitting prompts as negatives too (decision row)
    c: float = 0.1


def _tries() -> list[Try]:
    dec, syc, harm = "deception", "sycophancy", "harmfulness"
    d_pool, tqa = ("repe", "gsm8k_roleplay"), ("truthfulqa_roleplay",)
    three = ("repe", "gsm8k_roleplay", "truthfulqa_roleplay")
    s_pool, typ = ("truthfulqa_opinion", "gsm8k_opinion"), ("typology",)
    neg = {"refusal_negatives": True}
    out = [
        Try(dec, "shipped recipe", ("repe",), (*tqa, "gsm8k_roleplay"), **neg),
        Try(dec, "no refusal negatives", ("repe",), (*tqa, "gsm8k_roleplay")),
        Try(dec, "pooled sources", d_pool, tqa, **neg),
        *(Try(dec, f"layer {la}", d_pool, tqa, (la,), **neg) for la in LAYERS),
        Try(dec, "several layers (concat)", d_pool, tqa, LAYERS, **neg),
        Try(dec, "decision row", d_pool, tqa, feature="decision", **neg),
        Try(dec, "mean + decision row", d_pool, tqa, feature="mean+decision", **neg),
        *(
            Try(dec, f"aggregation {a}", d_pool, tqa, aggregation=a, **neg)
            for a in ("max", "window4", "window8", "k2", "k4")
        ),
        Try(dec, "decision row, one source", ("repe",), (*tqa, "gsm8k_roleplay"), feature="decision", **neg),
        Try(dec, "decision row, no refusal negatives", d_pool, tqa, feature="decision"),
        Try(
            dec,
            "decision row, + harmfulness prompts as negatives",
            d_pool,
            tqa,
            feature="decision",
            **neg,
            harm_negatives=True,
        ),
        *(Try(dec, f"decision row, layer {la}", d_pool, tqa, (la,), "decision", **neg) for la in (12, 20, 24)),
    ]
    for held in three:
        rest = tuple(x for x in three if x != held)
        out.append(Try(dec, f"decision row, leave {held} out", rest, (held,), feature="decision", **neg))
        out.append(Try(dec, f"leave {held} out", rest, (held,), **neg))
    out += [
        Try(syc, "shipped recipe", ("truthfulqa_opinion",), (*typ, "gsm8k_opinion")),
        Try(syc, "pooled agreement sources", s_pool, typ),
        *(Try(syc, f"layer {la}", s_pool, typ, (la,)) for la in LAYERS),
        Try(syc, "several layers (concat)", s_pool, typ, LAYERS),
        Try(syc, "decision row", s_pool, typ, feature="decision"),
        Try(syc, "mean + decision row", s_pool, typ, feature="mean+decision"),
        *(Try(syc, f"aggregation {a}", s_pool, typ, aggregation=a) for a in ("max", "window4", "k2")),
        Try(syc, "agreement probe on flattery", s_pool, ("flattery_math", "flattery_code")),
        Try(syc, "flattery probe", ("flattery_math",), ("flattery_code", *typ, "truthfulqa_opinion")),
        *(Try(syc, f"flattery probe, layer {la}", ("flattery_math",), ("flattery_code",), (la,)) for la in LAYERS),
        Try(syc, "one probe for both", (*s_pool, "flattery_math"), (*typ, "flattery_code")),
        Try(
            syc,
            "one probe for both, GSM8K agreement held out",
            ("truthfulqa_opinion", "flattery_math"),
            (*typ, "gsm8k_opinion", "flattery_code"),
        ),
    ]
    h_held = ("rd_val_confusable", "hh_rlhf_tqa")
    for layers in ((16,), (8,), (12,), (20,), (24,), (12, 16, 20), LAYERS):
        for c in (0.01, 0.1):
            out.append(Try(harm, f"decision row, C={c}", ("harm_fit",), h_held, layers, "decision", c=c))
    for layers in ((16,), (24,), (16, 24)):
        name = "pooled with HH-RLHF openers of other dialogues"
        out.append(Try(harm, name, ("harm_fit", "hh_fit"), h_held, layers, "decision", c=0.01))
    return out


def _features(d: Data, t: Try) -> np.ndarray:
    parts = []
    for layer in t.layers:
        for how in t.feature.split("+"):
            parts.append(d.pooled(layer, how))
    return np.concatenate(parts, axis=1)


def _held_out_scores(d: Data, t: Try, sel: np.ndarray, x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """Scores of the selected rows under the try's aggregation (per-token for max/window/k)."""
    if t.aggregation == "mean":
        return x[sel] @ w + b
    assert len(t.layers) == 1 and t.feature == "mean", "token aggregations are tried on one layer's response"
    per = [tok @ w + b for tok, m in zip(d.tokens(t.layers[0]), sel, strict=True) if m]
    if t.aggregation == "max":
        return np.array([p.max() for p in per])
    if t.aggregation.startswith("window"):
        return np.array([_window_max(p, int(t.aggregation[6:])) for p in per])
    return np.array([_k_consistent(p, int(t.aggregation[1:])) for p in per])


def run_try(data: dict[str, Data], t: Try) -> dict[str, float]:
    """Fit the try's probe and return the AUROC on each held-out source."""
    d = data[t.behaviour]
    x = _features(d, t)
    fit = np.isin(d.source, list(t.fit))
    xf, yf = x[fit], d.y[fit]
    if t.refusal_negatives:
        ref = data["refusal"]
        keep = ref.source == "refusal_direction"
        xf = np.concatenate([xf, _features(ref, t)[keep]])
        yf = np.concatenate([yf, np.zeros(int(keep.sum()), dtype=int)])
    if t.harm_negatives:
        harm = data["harmfulness"]
        keep = harm.source == "harm_fit"
        xf = np.concatenate([xf, _features(harm, t)[keep]])
        yf = np.concatenate([yf, np.zeros(int(keep.sum()), dtype=int)])
    w, b = _fit(xf, yf, t.c)
    return {src: auroc(d.y[d.source == src], _held_out_scores(d, t, d.source == src, x, w, b)) for src in t.held_out}


def run(acts: Path, out: Path | None) -> None:
    """Every try on the collected activations; a markdown table (and JSON beside it)."""
    data = {b: Data(acts / f"{b}.pt") for b in BEHAVIOURS if (acts / f"{b}.pt").is_file()}
    lines = [
        "| behaviour | try | fitted on | layer(s) | features | aggregation | held-out AUROC per source | mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = []
    for t in _tries():
        if t.behaviour not in data or (t.refusal_negatives and "refusal" not in data):
            continue
        res = run_try(data, t)
        mean = float(np.mean(list(res.values())))
        cells = ", ".join(f"{k} {v:.3f}" for k, v in res.items())
        negs = (" +refusal neg." if t.refusal_negatives else "") + (" +harmfulness neg." if t.harm_negatives else "")
        lines.append(
            f"| {t.behaviour} | {t.name} | {'+'.join(t.fit)}{negs} | {','.join(map(str, t.layers))} | "
            f"{t.feature} | {t.aggregation} | {cells} | {mean:.3f} |"
        )
        results.append({**asdict(t), "auroc": res, "mean": mean})
        print(lines[-1], flush=True)
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
