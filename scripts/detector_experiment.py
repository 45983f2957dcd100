"""Exploratory measurement for the detector work: which features and probes separate each behaviour.

For each behaviour: fit on the training source (grouped 5-fold validation there), then fit on all
of it and score the other source. Prints AUROC and recall at 1 % FPR for a dense linear probe
(mean-pooled raw activations), an SAE probe (<= 32 latents, mean+max-pooled) and their average.
Caches activations in runs/detector-acts/. Not a test; figures go to the model card when the
detectors land.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from monitor.detectors import Bundle
from monitor.detectors._activations import load_rows, response_activations
from monitor.models import load_default_model

SPLITS = {
    "deception": ("repe", "truthfulqa"),
    "sycophancy": ("typology_conservative_bio", "typology_liberal_bio"),
    "refusal": ("refusal_direction", "hh_rlhf_tqa"),
}


def recall_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float = 0.01) -> float:
    thr = np.quantile(s[y == 0], 1 - fpr)
    return float((s[y == 1] > thr).mean())


def features(acts: list[torch.Tensor], sae: object, pooling: str) -> tuple[np.ndarray, np.ndarray]:
    dense, latents = [], []
    for a in acts:
        resp = a[1:] if a.shape[0] > 1 else a
        base = {"mean": resp.mean(0), "decision": a[0], "last": a[-1]}[pooling]
        dense.append(base.numpy())
        z = sae.encode(resp)  # type: ignore[attr-defined]
        latents.append(torch.cat([z.mean(0), z.max(0).values]).numpy())
    return np.stack(dense), np.stack(latents)


def top_latents(z: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    mu1, mu0 = z[y == 1].mean(0), z[y == 0].mean(0)
    sd = z.std(0) + 1e-6
    return np.argsort(-np.abs(mu1 - mu0) / sd)[:k]


def fit_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, c: float) -> np.ndarray:
    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(xtr), ytr)
    return clf.decision_function(sc.transform(xte))


def evaluate(
    d_tr: np.ndarray, z_tr: np.ndarray, y_tr: np.ndarray, d_te: np.ndarray, z_te: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    dense = fit_predict(d_tr, y_tr, d_te, 0.01)
    ids = top_latents(z_tr, y_tr, k)
    sae = fit_predict(z_tr[:, ids], y_tr, z_te[:, ids], 0.1)
    ens = (dense - dense.mean()) / dense.std() + (sae - sae.mean()) / sae.std()
    return {"linear_probe": dense, "sae_probe": sae, "ensemble": ens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--behaviours", nargs="*", default=list(SPLITS))
    parser.add_argument("--pooling", default="mean", choices=["mean", "decision", "last"])
    parser.add_argument("--latents", type=int, default=32)
    ns = parser.parse_args()
    bundle = Bundle.load()
    sae = bundle.load_sae()
    hook = bundle.hook_points[0].name
    cache = Path("runs/detector-acts")
    cache.mkdir(parents=True, exist_ok=True)
    model = tok = None
    for beh in ns.behaviours:
        rows = load_rows(beh)
        path = cache / f"{beh}.pt"
        if path.is_file():
            acts = torch.load(path)
        else:
            if model is None:
                model, tok = load_default_model()
            acts = response_activations(model, tok, rows, hook)
            torch.save(acts, path)
        train_src, other_src = SPLITS[beh]
        dense, lat = features(acts, sae, ns.pooling)
        y = np.array([r.label for r in rows])
        groups = np.array([r.group for r in rows])
        tr = np.array([r.source == train_src for r in rows])
        te = np.array([r.source == other_src for r in rows])
        val_scores: dict[str, np.ndarray] = {}
        for fold_tr, fold_te in GroupKFold(5).split(dense[tr], y[tr], groups[tr]):
            out = evaluate(
                dense[tr][fold_tr], lat[tr][fold_tr], y[tr][fold_tr], dense[tr][fold_te], lat[tr][fold_te], ns.latents
            )
            for k_, v in out.items():
                val_scores.setdefault(k_, np.zeros(tr.sum()))[fold_te] = v
        cross = evaluate(dense[tr], lat[tr], y[tr], dense[te], lat[te], ns.latents)
        for kind in ("linear_probe", "sae_probe", "ensemble"):
            yv, yc = y[tr], y[te]
            print(
                f"{beh:10} {kind:12} val n={tr.sum():4d} AUROC {roc_auc_score(yv, val_scores[kind]):.3f} "
                f"R@1% {recall_at_fpr(yv, val_scores[kind]):.2f} | cross n={te.sum():4d} "
                f"AUROC {roc_auc_score(yc, cross[kind]):.3f} R@1% {recall_at_fpr(yc, cross[kind]):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
