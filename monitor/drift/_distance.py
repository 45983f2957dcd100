"""Distances between a reference sample and a current sample of one statistic.

PSI and Jensen-Shannon are computed on bins cut at the reference's quantiles (so every bin holds
about the same share of the reference); KS and Wasserstein on the raw samples. Each one is checked
against scipy in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-4  # share given to an empty bin, so PSI stays finite (the usual convention)


def quantile_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (duplicates removed for discrete data)."""
    qs = np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin of ``edges`` (right-closed bins: (e_i-1, e_i])."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


@dataclass(frozen=True)
class BinnedReference:
    """What every distance needs from a (frozen) reference, computed once: sorted values, the
    quantile bin edges and the reference's share per bin. A scrape then costs O(window) per metric."""

    sorted: np.ndarray
    edges: np.ndarray
    shares: np.ndarray

    @classmethod
    def of(cls, reference: np.ndarray, bins: int = 10) -> BinnedReference:
        ref = np.asarray(reference, dtype=np.float64)
        edges = quantile_edges(ref, bins)
        return cls(np.sort(ref), edges, shares(ref, edges))

    def distances(self, current: np.ndarray) -> tuple[float, float, float, float]:
        """(PSI, KS, JS, Wasserstein) of ``current`` against this reference."""
        cur = np.sort(np.asarray(current, dtype=np.float64))
        q = shares(cur, self.edges)
        return (
            _psi(self.shares, q),
            _ks_sorted(self.sorted, cur),
            _js(self.shares, q),
            _wasserstein_sorted(self.sorted, cur),
        )


def _psi(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np.clip(p, EPS, None), np.clip(q, EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def _js(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return float(np.sqrt(max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)))


def _ks_sorted(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) or not len(b):
        return 0.0
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _wasserstein_sorted(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) or not len(b):
        return 0.0
    grid = np.sort(np.concatenate([a, b]))
    deltas = np.diff(grid)
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * deltas))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index: sum (q - p) ln(q / p) over reference-quantile bins.

    >>> rng = np.random.default_rng(0)
    >>> psi(rng.normal(size=5000), rng.normal(size=5000)) < 0.01
    True
    """
    edges = quantile_edges(reference, bins)
    return _psi(shares(reference, edges), shares(current, edges))


def js_distance(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the binned distributions."""
    edges = quantile_edges(reference, bins)
    return _js(shares(reference, edges), shares(current, edges))


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    return _ks_sorted(np.sort(np.asarray(reference, dtype=np.float64)), np.sort(np.asarray(current, dtype=np.float64)))


def wasserstein(reference: np.ndarray, current: np.ndarray) -> float:
    """First Wasserstein distance between the two empirical distributions (in the statistic's units)."""
    a = np.sort(np.asarray(reference, dtype=np.float64))
    return _wasserstein_sorted(a, np.sort(np.asarray(current, dtype=np.float64)))
