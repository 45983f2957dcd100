"""Feature analysis: what each latent responds to, saved with the SAE so alerts can explain.

Per latent: activation frequency, mean activation when active, max activation, decoder norm,
and the top-k max-activating token contexts from the corpus (the feature report of the seed
document's "Interpretability analysis").
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from monitor.sae._base import SAE

FEATURES_FILE = "features.json.gz"


@dataclass
class FeatureExample:
    activation: float
    token: str
    context: str  # the tokens before it, then the token in [[ ]]


@dataclass
class FeatureReport:
    latent: int
    frequency: float  # fraction of tokens where the latent is active
    mean_activation: float  # mean over the tokens where it is active
    max_activation: float
    decoder_norm: float
    top_examples: list[FeatureExample] = field(default_factory=list)

    @property
    def label(self) -> str:
        """A short label: the tokens of its strongest examples."""
        toks = []
        for e in self.top_examples:
            t = e.token.strip()
            if t and t not in toks:
                toks.append(t)
        return " / ".join(toks[:3])


@torch.no_grad()
def analyze_features(
    sae: SAE,
    acts: torch.Tensor,
    token_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    tokenizer: Any,
    *,
    top_k: int = 5,
    context_tokens: int = 10,
    batch: int = 8192,
    progress: bool = True,
) -> list[FeatureReport]:
    """Reports for every latent of ``sae`` over ``acts`` (with the token and document of each row)."""
    d_sae = sae.cfg.d_sae
    count = torch.zeros(d_sae, dtype=torch.float64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    top_val = torch.full((top_k, d_sae), -1.0)
    top_idx = torch.zeros((top_k, d_sae), dtype=torch.long)
    n = acts.shape[0]
    for i in tqdm(range(0, n, batch), desc="features", disable=not progress, unit="batch"):
        z = sae.encode(acts[i : i + batch].float())
        count += (z > 0).sum(0).double()
        total += z.sum(0).double()
        k = min(top_k, z.shape[0])
        v, ix = z.topk(k, dim=0)
        cat_v = torch.cat([top_val, v])
        cat_i = torch.cat([top_idx, ix + i])
        best = cat_v.topk(top_k, dim=0).indices
        top_val = cat_v.gather(0, best)
        top_idx = cat_i.gather(0, best)
    dec_norm = sae.W_dec.norm(dim=1)
    reports = []
    for j in range(d_sae):
        examples = []
        for r in range(top_k):
            val = float(top_val[r, j])
            if val <= 0:
                break
            row = int(top_idx[r, j])
            examples.append(_example(row, val, token_ids, doc_ids, tokenizer, context_tokens))
        c = float(count[j])
        reports.append(
            FeatureReport(
                latent=j,
                frequency=c / n,
                mean_activation=float(total[j]) / c if c else 0.0,
                max_activation=max(float(top_val[0, j]), 0.0),
                decoder_norm=float(dec_norm[j]),
                top_examples=examples,
            )
        )
    return reports


def _example(
    row: int, val: float, token_ids: torch.Tensor, doc_ids: torch.Tensor, tokenizer: Any, context_tokens: int
) -> FeatureExample:
    doc = int(doc_ids[row])
    start = row
    while start > 0 and row - start < context_tokens and int(doc_ids[start - 1]) == doc:
        start -= 1
    before = tokenizer.decode(token_ids[start:row].tolist())
    token = tokenizer.decode([int(token_ids[row])])
    return FeatureExample(activation=round(val, 4), token=token, context=f"{before}[[{token}]]")


def save_reports(reports: list[FeatureReport], folder: str | Path) -> Path:
    path = Path(folder) / FEATURES_FILE
    rows = [{**asdict(r), "label": r.label} for r in reports]
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(json.dumps(rows, ensure_ascii=False).encode())
    return path


def load_reports(folder: str | Path) -> dict[int, FeatureReport]:
    """Feature reports saved beside an SAE, by latent id (empty when there are none)."""
    path = Path(folder) / FEATURES_FILE
    if not path.is_file():
        return {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = json.load(f)
    out = {}
    for r in rows:
        r.pop("label", None)
        r["top_examples"] = [FeatureExample(**e) for e in r["top_examples"]]
        out[int(r["latent"])] = FeatureReport(**r)
    return out
