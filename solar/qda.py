"""MaskGen's threshold: the equal-density point of two 1-D Gaussians (a QDA boundary).

True-pair local-to-global similarities ~ N(mu1, var1), negative-pair ones ~ N(mu0, var0).
Equal priors: tau solves  log N(x; mu1, var1) = log N(x; mu0, var0), i.e.

    a x^2 + b x + c = 0,   a = 1/(2 var0) - 1/(2 var1)
                           b = mu1/var1 - mu0/var0
                           c = mu0^2/(2 var0) - mu1^2/(2 var1) + log(sigma0/sigma1)

Cases, each handled explicitly (`qda_threshold` returns which one applied):

* ``"equal_var"``: |a| negligible -> the linear boundary; with equal variances it is the
  midpoint (mu0 + mu1) / 2.
* ``"root"``: two roots; the one between the means is the boundary that separates them
  (the other root lies in a tail, where the wider Gaussian wins again).
* ``"upper_root"``: no root between the means and var1 > var0.  This is the usual stage-1
  picture: true-pair similarities are a mixture of intersection positions (high) and
  difference positions (distributed like negatives), so their Gaussian is wide and its mean
  sits only a little above the negatives' mean, still inside the region where the negative
  density is higher.  True pairs win again above the upper root: tau = the larger root
  (our choice; the midpoint-like fallback would mark most difference positions).
* ``"no_crossing"``: no real root (only through rounding), or no root between the means with
  var1 < var0.  Fallback (our choice): the point equally many standard deviations from both
  means, (mu0 sigma1 + mu1 sigma0) / (sigma0 + sigma1).
* ``"not_separated"``: mu1 <= mu0, true pairs are not more similar than negatives (early in
  training).  Returns +inf: nothing is marked as intersection yet (the evolutionary mask
  keeps everything while rho is high).

`mixture_threshold` (stage 1's default, ``Stage1Config.qda_mode="mixture"``) first takes the
true-pair Gaussian apart: true-pair similarities are a mixture pi * N(mu_I, var_I) +
(1 - pi) * N(mu0, var0) of intersection positions and difference positions, and difference
positions score like negative pairs (same mean and variance).  With var_I = var0 (our
assumption; two moments cannot give three unknowns), the true-pair moments (mu1, var1) give

    d = mu1 - mu0 = pi * D,   var1 - var0 = pi (1 - pi) D^2   =>   D = (var1 - var0 + d^2) / d,
    pi = d / D,  mu_I = mu0 + D,

and tau is the equal-density point of N(mu_I, var0) and N(mu0, var0): mu0 + D / 2.  Measured on
the tiny ShapesWorld run: the direct ``qda_threshold`` of the (wide) mixture Gaussian sits far
below the intersection (image masks kept ~3x the true patch count); the decomposed boundary
kept ~2x fewer patches and raised the held-out image-mask IoU (docs/EXPERIMENTS.md).

`RunningGaussian` keeps exponential moving averages of the mean and variance of a stream
of similarity values (population statistics, stored with the model as buffers).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["qda_threshold", "mixture_threshold", "RunningGaussian", "batch_moments", "global_moments"]


def qda_threshold(mu1: float, var1: float, mu0: float, var0: float, *, rel_eps: float = 1e-6) -> Tuple[float, str]:
    """Equal-density point between N(mu1, var1) (true pairs) and N(mu0, var0) (negatives).

    Returns (tau, case) with case in {"equal_var", "root", "upper_root", "no_crossing",
    "not_separated"}
    (see the module docstring).  Variances must be positive (ValueError otherwise).
    """
    mu1, var1, mu0, var0 = float(mu1), float(var1), float(mu0), float(var0)
    for name, v in (("mu1", mu1), ("var1", var1), ("mu0", mu0), ("var0", var0)):
        if not math.isfinite(v):
            raise ValueError(f"qda_threshold: {name} must be finite, got {v}")
    if var1 <= 0 or var0 <= 0:
        raise ValueError(f"qda_threshold: variances must be > 0, got var1={var1}, var0={var0}")
    if mu1 <= mu0:
        return math.inf, "not_separated"
    s1, s0 = math.sqrt(var1), math.sqrt(var0)
    a = 0.5 / var0 - 0.5 / var1
    b = mu1 / var1 - mu0 / var0
    c = 0.5 * mu0 * mu0 / var0 - 0.5 * mu1 * mu1 / var1 + math.log(s0 / s1)
    if abs(var1 - var0) <= rel_eps * max(var1, var0):
        # linear boundary; b > 0 because mu1 > mu0 and the variances are (almost) equal
        return -c / b, "equal_var"
    disc = b * b - 4 * a * c
    fallback = (mu0 * s1 + mu1 * s0) / (s0 + s1)
    if disc < 0:
        return fallback, "no_crossing"
    sq = math.sqrt(disc)
    # numerically stable pair of roots
    q = -0.5 * (b + math.copysign(sq, b))
    roots = [q / a] + ([c / q] if q != 0 else [])
    between = [r for r in roots if mu0 <= r <= mu1]
    if between:
        return min(between, key=lambda r: abs(r - 0.5 * (mu0 + mu1))), "root"
    if var1 > var0:
        # the wide true-pair Gaussian (a mixture of intersection and difference positions)
        # holds the negatives' peak and its own mean inside the negatives' region: it wins
        # again above the upper root, which is where the intersection starts
        return max(roots), "upper_root"
    return fallback, "no_crossing"


def mixture_threshold(mu1: float, var1: float, mu0: float, var0: float) -> Tuple[float, str, float]:
    """Equal-density point between the intersection component of the true-pair mixture and the
    negatives (see the module docstring): returns (tau, case, pi).

    case "mixture": tau = mu0 + D / 2 with D = (var1 - var0 + d^2) / d, d = mu1 - mu0, and pi = d / D
    the estimated intersection share.  When the moments admit no such mixture (var1 < var0, so
    pi would exceed 1) it falls back to ``qda_threshold`` (its case, pi = nan); mu1 <= mu0 gives
    (inf, "not_separated", 0.0).  Variances must be positive.
    """
    mu1, var1, mu0, var0 = float(mu1), float(var1), float(mu0), float(var0)
    for name, v in (("mu1", mu1), ("var1", var1), ("mu0", mu0), ("var0", var0)):
        if not math.isfinite(v):
            raise ValueError(f"mixture_threshold: {name} must be finite, got {v}")
    if var1 <= 0 or var0 <= 0:
        raise ValueError(f"mixture_threshold: variances must be > 0, got var1={var1}, var0={var0}")
    d = mu1 - mu0
    if d <= 0:
        return math.inf, "not_separated", 0.0
    excess = var1 - var0
    if excess < 0:
        tau, case = qda_threshold(mu1, var1, mu0, var0)
        return tau, case, math.nan
    D = (excess + d * d) / d
    return mu0 + 0.5 * D, "mixture", d / D


def batch_moments(values: torch.Tensor, weights: torch.Tensor) -> Tuple[float, float, float]:
    """(count, mean, variance) of `values` at positions where `weights` (bool/float) is set."""
    w = weights.to(torch.float64)
    v = values.detach().to(torch.float64)
    n = float(w.sum())
    if n <= 0:
        return 0.0, 0.0, 0.0
    mean = float((w * v).sum() / n)
    var = float((w * (v - mean) ** 2).sum() / n)
    return n, mean, var


class RunningGaussian:
    """EMA estimate of a 1-D Gaussian, stored in a 2-element tensor view [mean, var].

    ``update(mean, var)`` blends a batch's moments in with ``momentum`` (the first update
    copies them).  The law of total variance is used, so the spread of the batch means over
    time is part of the variance.
    """

    def __init__(self, storage: torch.Tensor, momentum: float = 0.05, min_var: float = 1e-8):
        if storage.numel() != 2:
            raise ValueError(f"RunningGaussian: storage must have 2 elements, got {storage.numel()}")
        if not 0 < momentum <= 1:
            raise ValueError(f"RunningGaussian: momentum must lie in (0, 1], got {momentum}")
        self.s = storage
        self.momentum = momentum
        self.min_var = min_var

    @property
    def mean(self) -> float:
        """Current mean estimate."""
        return float(self.s[0])

    @property
    def var(self) -> float:
        """Current variance estimate (at least ``min_var``)."""
        return max(float(self.s[1]), self.min_var)

    @torch.no_grad()
    def update(self, mean: float, var: float, first: bool = False) -> None:
        """Blend in one batch's (mean, var)."""
        if first:
            self.s[0], self.s[1] = mean, max(var, self.min_var)
            return
        m = self.momentum
        old_mean, old_var = float(self.s[0]), float(self.s[1])
        new_mean = (1 - m) * old_mean + m * mean
        new_var = (1 - m) * (old_var + (old_mean - new_mean) ** 2) + m * (var + (mean - new_mean) ** 2)
        self.s[0], self.s[1] = new_mean, max(new_var, self.min_var)


@torch.no_grad()
def global_moments(pairs, group) -> list:
    """(mean, var) over every rank of `group` of each (values, weights) pair, two passes like
    `batch_moments` (the per-rank weighted sums are all-reduced in float64)."""
    import torch.distributed as dist
    ws = [w.to(torch.float64) for _, w in pairs]
    vs = [v.detach().to(torch.float64) for v, _ in pairs]
    first = torch.stack([torch.stack([w.sum(), (w * v).sum()]) for v, w in zip(vs, ws)])
    dist.all_reduce(first, group=group)
    cnt = first[:, 0]
    mean = torch.where(cnt > 0, first[:, 1] / cnt.clamp_min(1e-300), torch.zeros_like(cnt))
    sq = torch.stack([(w * (v - m) ** 2).sum() for v, w, m in zip(vs, ws, mean)])
    dist.all_reduce(sq, group=group)
    var = torch.where(cnt > 0, sq / cnt.clamp_min(1e-300), torch.zeros_like(cnt))
    return [(float(m), float(s)) for m, s in zip(mean, var)]
