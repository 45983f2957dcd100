"""SAE training (``monitor train-sae``), following the recipe of the seed document.

Adam on reconstruction MSE plus an L1 penalty on latent activations; decoder rows renormalised
to unit norm after each step; gradients clipped at norm 1.0; a linear learning-rate warm-up
(and an L1 warm-up, so latents are not killed before they find a direction); dead latents are
tracked and resampled toward badly reconstructed inputs (Anthropic, "Towards Monosemanticity").
Activations are scaled so their mean norm is sqrt(d_in) (SAELens's expected_average_only_in),
and the factor is folded into the weights when training ends, so the saved SAE reads raw
activations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from monitor.sae._base import SAE, sae_class
from monitor.sae._config import SAEConfig, SAEError

log = logging.getLogger("monitor.sae")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    d_sae: number of latents. architecture: "relu" or "jumprelu" (JumpReLU thresholds are fit
        after training from each latent's activation distribution) or "topk" (with ``k``).
    l1_coefficient: weight of the L1 penalty (per token, in normalised units).
    lr: Adam learning rate; ``lr_warmup_steps`` ramp it up linearly, and it decays linearly to 0
        over the last ``lr_decay_fraction`` of the steps.
    l1_warmup_steps: steps over which the L1 weight ramps from 0 to ``l1_coefficient``.
    batch_size: tokens per step. steps: optimizer steps.
    grad_clip: maximum gradient norm (1.0 as in the recipe).
    dead_after_tokens: a latent that has not fired for this many tokens counts as dead.
    resample_at: steps at which dead latents are resampled (empty: never).
    target_l0: when set, the L1 weight is nudged every 25 steps toward this mean L0 during the
        first ``target_l0_until`` fraction of training, then held.
    """

    d_sae: int
    architecture: str = "relu"
    k: int | None = None
    l1_coefficient: float = 5.0
    lr: float = 4e-4
    lr_warmup_steps: int = 100
    lr_decay_fraction: float = 0.2
    l1_warmup_steps: int = 200
    batch_size: int = 4096
    steps: int = 2000
    grad_clip: float = 1.0
    dead_after_tokens: int = 500_000
    resample_at: tuple[int, ...] = ()
    target_l0: float | None = None
    target_l0_until: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ("relu", "jumprelu", "topk"):
            raise SAEError(f"architecture: expected relu, jumprelu or topk, got {self.architecture!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise SAEError(f"steps, batch_size: expected >= 1, got {self.steps}, {self.batch_size}")


@dataclass
class TrainReport:
    """Figures of a finished run (on the held-out tokens where given, else the training set)."""

    steps: int
    tokens_seen: int
    seconds: float
    mse: float
    fve: float
    l0: float
    dead_fraction: float
    l1_coefficient: float
    norm_scaling_factor: float
    history: list[dict[str, float]] = field(default_factory=list)


def scaling_factor(acts: torch.Tensor) -> float:
    """Factor that makes the mean activation norm sqrt(d_in)."""
    sample = acts[torch.randperm(acts.shape[0])[:100_000]].float()
    return float(math.sqrt(acts.shape[1]) / sample.norm(dim=1).mean())


def _init_sae(cfg: SAEConfig, data: torch.Tensor, gen: torch.Generator) -> SAE:
    arch = "relu" if cfg.architecture == "jumprelu" else cfg.architecture
    sae = sae_class(arch)(SAEConfig.from_dict({**cfg.to_dict(), "architecture": arch}))
    w = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)  # unit-norm rows
        sae.W_enc.copy_(w.T * 0.1)
        sae.b_dec.copy_(data[:50_000].mean(0))  # geometric median is better; mean is close enough
    return sae


@torch.no_grad()
def measure(sae: SAE, acts: torch.Tensor, batch: int = 8192) -> dict[str, float]:
    """MSE (per element), FVE, mean L0 and never-fired fraction of ``sae`` on ``acts`` (raw scale)."""
    sq, l0, n = 0.0, 0.0, 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mean = acts.mean(0)
    total = 0.0
    for i in range(0, acts.shape[0], batch):
        x = acts[i : i + batch].float()
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sq += float((x - x_hat).pow(2).sum())
        total += float((x - mean).pow(2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0)
        n += x.shape[0]
    return {
        "mse": sq / (n * acts.shape[1]),
        "fve": 1 - sq / total,
        "l0": l0 / n,
        "dead_fraction": float((~fired).float().mean()),
    }


def train_sae(
    acts: torch.Tensor,
    cfg: TrainConfig,
    *,
    hook_point: str = "",
    model_id: str = "",
    eval_acts: torch.Tensor | None = None,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[SAE, TrainReport]:
    """Train an SAE on ``acts [n, d_in]`` (raw scale); returns the SAE (reading raw activations)."""
    if acts.ndim != 2 or acts.shape[0] < cfg.batch_size:
        raise SAEError(f"activations: expected [n >= batch_size={cfg.batch_size}, d_in], got {list(acts.shape)}")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    s = scaling_factor(acts)
    n, d_in = acts.shape
    sae_cfg = SAEConfig(
        d_in=d_in, d_sae=cfg.d_sae, architecture=cfg.architecture, k=cfg.k, hook_point=hook_point, model_id=model_id
    )
    sae = _init_sae(sae_cfg, acts[:50_000].float() * s, gen)
    sae.train().requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    decay_start = int(cfg.steps * (1 - cfg.lr_decay_fraction))

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / max(cfg.lr_warmup_steps, 1))
        decay = 1.0 if step < decay_start else max(0.0, (cfg.steps - step) / max(cfg.steps - decay_start, 1))
        return cfg.lr * warm * decay

    l1 = cfg.l1_coefficient
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.long)  # tokens seen when each latent last fired
    tokens = 0
    history: list[dict[str, float]] = []
    order = torch.randperm(n, generator=gen)
    cursor = 0
    window_l0: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train-sae", disable=not progress, unit="step")
    for step in bar:
        if cursor + cfg.batch_size > n:
            order = torch.randperm(n, generator=gen)
            cursor = 0
        x = acts[order[cursor : cursor + cfg.batch_size]].float() * s
        cursor += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        z = sae.activation(sae.pre_activations(x))
        x_hat = z @ sae.W_dec + sae.b_dec
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l1_weight = l1 * min(1.0, (step + 1) / max(cfg.l1_warmup_steps, 1))
        sparsity = (z * sae.W_dec.norm(dim=1)).sum(-1).mean() if cfg.architecture != "topk" else z.new_zeros(())
        loss = mse + l1_weight * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            active = (z > 0).any(0)
            tokens += x.shape[0]
            last_fired[active] = tokens
            l0 = float((z > 0).float().sum(-1).mean())
            window_l0.append(l0)
        if cfg.target_l0 and step % 25 == 24 and step < cfg.steps * cfg.target_l0_until:
            mean_l0 = sum(window_l0[-25:]) / 25
            l1 *= math.exp(0.15 * math.tanh(math.log(mean_l0 / cfg.target_l0)))
        if step + 1 in cfg.resample_at:
            dead = (tokens - last_fired) >= min(cfg.dead_after_tokens, tokens)
            if dead.any():
                _resample(sae, opt, dead, acts, s, gen)
                last_fired[dead] = tokens
        if step % 50 == 0 or step == cfg.steps - 1:
            with torch.no_grad():
                var = (x - x.mean(0)).pow(2).sum(-1).mean()
                row = {
                    "step": float(step),
                    "mse": float(mse),
                    "fve": float(1 - mse / var),
                    "l0": l0,
                    "l1": l1,
                    "lr": lr_at(step),
                    "dead": float(((tokens - last_fired) >= min(cfg.dead_after_tokens, tokens)).float().mean()),
                }
            history.append(row)
            bar.set_postfix(fve=f"{row['fve']:.3f}", l0=f"{l0:.1f}", dead=f"{row['dead']:.3f}", l1=f"{l1:.2f}")
            if on_log:
                on_log(row)
    sae.eval().requires_grad_(False)
    if cfg.architecture == "jumprelu":
        sae = _to_jumprelu(sae, acts, s)
    # Fold the normalisation into the weights: the saved SAE reads raw activations.
    sae.cfg = SAEConfig.from_dict(
        {**sae.cfg.to_dict(), "normalize_activations": "expected_average_only_in", "norm_scaling_factor": s}
    )
    sae.fold_input_scale()
    figures = measure(sae, eval_acts if eval_acts is not None else acts[:200_000])
    report = TrainReport(
        steps=cfg.steps,
        tokens_seen=tokens,
        seconds=time.perf_counter() - start,
        l1_coefficient=l1,
        norm_scaling_factor=s,
        history=history,
        **figures,
    )
    return sae, report


@torch.no_grad()
def _resample(
    sae: SAE, opt: torch.optim.Optimizer, dead: torch.Tensor, acts: torch.Tensor, s: float, gen: torch.Generator
) -> None:
    """Point dead latents at inputs the SAE reconstructs worst (probability ~ squared error)."""
    idx = torch.randint(0, acts.shape[0], (min(acts.shape[0], 65_536),), generator=gen)
    x = acts[idx].float() * s
    err = (sae.decode(sae.encode(x)) - x).pow(2).sum(-1)
    n_dead = int(dead.sum())
    pick = torch.multinomial(err / err.sum(), n_dead, replacement=n_dead > x.shape[0], generator=gen)
    dirs = x[pick] - sae.b_dec
    dirs /= dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else torch.tensor(1.0)
    ids = dead.nonzero().squeeze(1)
    sae.W_dec[ids] = dirs
    sae.W_enc[:, ids] = dirs.T * alive_norm * 0.2
    sae.b_enc[ids] = 0.0
    for p in (sae.W_enc, sae.b_enc, sae.W_dec):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                if p is sae.W_enc:
                    st[key][:, ids] = 0
                else:
                    st[key][ids] = 0
    log.info("resampled %d dead latents", n_dead)


@torch.no_grad()
def _to_jumprelu(sae: SAE, acts: torch.Tensor, s: float) -> SAE:
    """Turn a trained ReLU SAE into JumpReLU: threshold = each latent's 1st-percentile positive activation."""
    cfg = SAEConfig.from_dict({**sae.cfg.to_dict(), "architecture": "jumprelu"})
    x = acts[: min(acts.shape[0], 100_000)].float() * s
    pre = sae.pre_activations(x)
    thr = torch.zeros(cfg.d_sae)
    for j in range(cfg.d_sae):
        pos = pre[:, j][pre[:, j] > 0]
        thr[j] = torch.quantile(pos, 0.01) if pos.numel() > 10 else 0.0
    state = {**sae.state(), "threshold": thr}
    return SAE.from_state(cfg, state)
