"""The trainer recovers known sparse features of a synthetic problem (runs in seconds)."""

from __future__ import annotations

import torch

from monitor.sae import SlicedEncoder
from monitor.sae._train import TrainConfig, measure, train_sae


def synthetic(n: int, d: int, n_feat: int, per_sample: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that are sparse non-negative combinations of ``n_feat`` known unit directions."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feat, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    on = torch.rand(n, n_feat, generator=g) < per_sample / n_feat
    mags = torch.rand(n, n_feat, generator=g) * 2 + 0.5
    return (on * mags) @ feats, feats


def test_trainer_recovers_ground_truth_features() -> None:
    x, truth = synthetic(40_000, 32, 48, per_sample=3, seed=0)
    cfg = TrainConfig(
        d_sae=96,
        l1_coefficient=1.0,
        lr=3e-3,
        lr_warmup_steps=20,
        l1_warmup_steps=50,
        batch_size=512,
        steps=1200,
        resample_at=(300, 600),
        dead_after_tokens=20_000,
        seed=0,
    )
    sae, report = train_sae(x, cfg, progress=False)
    dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (truth @ dec.T).max(dim=1).values
    recovered = float((best > 0.9).float().mean())
    assert recovered >= 0.9, f"only {recovered:.0%} of true features found (cosines {best.sort().values[:8]})"
    assert report.fve > 0.85 and report.l0 < 12  # ~3 true features per sample
    # The saved SAE reads raw activations: normalisation is folded in.
    assert sae.cfg.normalize_activations == "none"
    assert abs(measure(sae, x[:5000])["fve"] - report.fve) < 0.05
    ids = best.argsort()[-5:].tolist()
    torch.testing.assert_close(
        SlicedEncoder(sae, ids).encode(x[:100]), sae.encode(x[:100])[:, ids], atol=1e-5, rtol=1e-5
    )
