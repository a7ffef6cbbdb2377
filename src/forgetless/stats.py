"""Intervals, p-values and multiple-comparison marks for every figure of a report: one machinery.

What a measure is
-----------------
A per-item array x[s, i, k] (seed s of a run; item i: a question, an answer, a group of text blocks;
k a few per-item features) and a statistic: a smooth function g of the item means m_k = mean_i x[s, i, k],
one number per seed:

    mean            g(m) = m                    accuracy, NLL per answer token, KL per block, ...
    template_mean   g(m) = mean_t m_t           robustness: accuracy averaged over prompt templates
    template_std    g(m) = std_t m_t (ddof 1)   robustness: spread of accuracy over prompt templates
    ratio           g(m) = m_sum / m_count      text blocks taken in contiguous groups (below)

A figure is the mean over seeds of D_s, with D_s = g(x_s) - g(y_s) for a paired difference (y the
reference: the base, one seed serving every seed, or a compared run, seed s with seed s; for a mean this
is the mean of the per-item differences) and y = 0 for a single model's own value. The printed value, its
interval and every paired difference are this one statistic of the same items, so a paired difference is
the difference of the two values it pairs.

What the interval covers
------------------------
The target is E[D_s] over training seeds and over items drawn like these. Seeds and items are crossed
(every seed answers the same items), the two-level model

    d[s, i] = mu + a_s + b_i + e_si,  a: seed (training randomness), b: item, e: seed x item,
    Var(mean_s D_s) = sa²/S + sb²/n + se²/(S n).

(A bootstrap resampling seeds and items with replacement gives, with 3 seeds, a percentile interval about
the span of the three per-seed values: ~73% coverage when seeds dominate.) The variance is estimated by the
two-way ANOVA combination, written with delete-one-item jackknife variances J(.) so that the same formula
serves a non-linear statistic (for a mean, J is var_i / n and S n V = MS_seed + MS_item - MS_error):

    A = var_s(D_s) / S                                E[A] = sa²/S + se²/(S n)    df S-1
    B = J(Dbar), item i deleted from every seed       E[B] = sb²/n + se²/(S n)    df n-1
    C = [sum_s J(D_s) - S B] / (S (S-1))              E[C] = se²/(S n)            df (S-1)(n-1)
    V = A + B - C

V is floored at max(A, B): the variance of the mean is at least its seed part and at least its item
part (a variance component estimated below zero counts as zero). Without the floor the simulation's coverage
is nearer 95% on average but dips to 93% (robustness std, 5 seeds, items dominating); with it, 94-98.5%.
Degrees of freedom: Satterthwaite's, df = V² / (A²/(S-1) + B²/(n-1) + C²/((S-1)(n-1))), those of the
floor's component when floored.

The interval is the hull of mean ± t_{df, 0.975} sqrt(V) and of the t interval over seeds alone,
mean ± t_{S-1, 0.975} sqrt(A). The seeds-alone interval is exact (normal D_s) for the mean given these items;
the unconditional one should be no narrower, and Satterthwaite's df, estimated from few seeds, comes out too
large exactly when A comes out small by chance: with 3 seeds and seeds dominating, coverage is 92% without
the hull, 95% with it. The p-value of a difference is the larger of the two intervals' two-sided t p-values
(each with its own df), so p < 0.05 exactly when the 95% interval excludes zero; and it stays calibrated in
the far tail where Holm's thresholds lie (alpha / 166 ~ 3e-4 in the stored report). Under a true null with
3 seeds and seeds dominating, the two-level t's p-value alone falls below 0.003 2.8 times and below 3e-4 18
times as often as it should (its df, estimated from 3 seeds, is too large exactly when A is small); the
larger of the two: 0.8 and 0.7 times (5 seeds: 1.2 and 1.0). (With 2 seeds t_{1, 0.975} = 12.7: the hull makes
intervals wide, 98-99% coverage when items dominate; 3 seeds or more are the useful setting.)

With one seed, V = J(D_1) and df = n-1: the interval covers item sampling only, the expectation given that
one training run; the entry says so ("covers": "items only") and so does the report.

A non-linear statistic's target is its own expectation at this number of items: for the robustness std,
E[std over templates of each template's accuracy on n questions], which question noise lifts above the std
of the templates' population accuracies (an upward bias no interval around the measured std can undo).

tests/test_stats.py checks coverage by simulation (2000 replicate experiments a case; seeds dominating /
items dominating; 1, 3, 5 seeds): paired mean difference 95.4/94.6/94.1 and 94.9/98.2/96.5%, perplexity
change 94.9/94.7/95.3 and 95.0/97.2/95.8%, robustness std 95.8/95.8/94.0 and 98.2/98.5/95.8%, a single
model's value 95.5/95.1/94.5 and 94.9/96.7/95.5%.

Transforms, after the interval: perplexity is exp(mean NLL) and its change 100 expm1(Δ mean NLL), both
monotone, so the interval on the mean NLL carries over. A single model's interval is clipped to the range
of its value (an accuracy to [0, 1], an NLL to [0, inf)): the clipped part holds no possible value.

Text blocks are not independent items
-------------------------------------
The general-text yardstick cuts each domain's text into consecutive blocks; neighbouring blocks share a
document and its topic, so they are not independent draws. Each domain's blocks are taken as contiguous
groups of BLOCK_GROUP (3) blocks, the group the item (features: sum over its blocks, block count; the
statistic their ratio, so the value is still the mean over blocks): 12 blocks of a domain are 4 items.
This is the batch-means remedy; it holds while dependence does not reach past a group (the stored reports
show lag-1 autocorrelations of block NLL differences around zero, -0.07 on average, which 12 blocks cannot
pin down, so the grouping is the cautious side). Simulated with one seed and AR(1) blocks, groups of 3 keep
coverage at 94% for a lag-1 autocorrelation of 0.1, 93% at 0.2, 92-93% at 0.3. Groups cost degrees of
freedom: a domain's interval alone rests on 4 items (t_{3, 0.975} = 3.18).

Many comparisons
----------------
holm() adjusts a family's p-values (Holm–Bonferroni, family-wise error 5%); the report stars a paired
difference only when it survives over the whole family of differences it shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Sequence

import torch

LEVEL = 0.95
BLOCK_GROUP = 3  # consecutive text blocks per item of the general-text measures

# ---------------------------------------------------------------- statistics of the item means

# g: item means [..., k] -> [...]
STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda m: m[..., 0],
    "template_mean": lambda m: m.mean(-1),
    # ddof 1, as evaluate; one template has no spread
    "template_std": lambda m: m.std(-1) if m.shape[-1] > 1 else torch.zeros_like(m[..., 0]),
    "ratio": lambda m: m[..., 0] / m[..., 1],
}


def per_seed(x: torch.Tensor, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., S, n, k] -> (g of the item means [..., S], g with item i deleted [..., S, n])."""
    g = STATISTICS[statistic]
    n = x.shape[-2]
    total = x.sum(-2, keepdim=True)
    return g(total.squeeze(-2) / n), g((total - x) / (n - 1))


def variance(D: torch.Tensor, loo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Var(mean_s D_s) and its degrees of freedom from the per-seed statistics D [..., S] and their
    delete-one-item values loo [..., S, n] (the module docstring has the formula)."""
    S, n = loo.shape[-2:]
    jack = (n - 1) / n

    def J(v: torch.Tensor) -> torch.Tensor:  # jackknife variance over the last (item) axis
        return jack * (v - v.mean(-1, keepdim=True)).pow(2).sum(-1)

    B = J(loo.mean(-2))  # items deleted from every seed at once
    if S == 1:
        return B, torch.full_like(B, n - 1.0)
    A = D.var(-1) / S
    C = (J(loo).sum(-1) - S * B) / (S * (S - 1))
    V = A + B - C
    df = V.pow(2) / (A.pow(2) / (S - 1) + B.pow(2) / (n - 1) + C.pow(2) / ((S - 1) * (n - 1)))
    # at least the seed part and at least the item part, with that part's df
    floored = V < torch.maximum(A, B)
    seed_part = A >= B
    floor_V = torch.where(seed_part, A, B)
    floor_df = torch.where(seed_part, torch.full_like(df, S - 1.0), torch.full_like(df, n - 1.0))
    return torch.where(floored, floor_V, V), torch.where(floored, floor_df, df)


def estimate(x: torch.Tensor, y: torch.Tensor | None = None, statistic: str = "mean",
             level: float = LEVEL, p_value: bool = True) -> dict[str, torch.Tensor]:
    """mean_s [g(x_s) - g(y_s)] with its standard error, df, interval and two-sided p-value, vectorised
    over leading axes. x [..., S, n, k]; y None (a single model's value), [..., 1, n, k] (one reference
    seed for every seed) or [..., S, n, k] (seed s paired with seed s).

    With several seeds the interval is the hull of the two-level one (mean ± t_df sqrt(V)) and the t
    interval over seeds alone (mean ± t_{S-1} sqrt(A)), p the larger of their p-values (so p < 1 - level
    exactly when the interval excludes zero), se and df those of the wider one (module docstring)."""
    D, loo = per_seed(x, statistic)
    if y is not None:
        Dy, loo_y = per_seed(y, statistic)
        D, loo = D - Dy, loo - loo_y
    S = D.shape[-1]
    mean = D.mean(-1)
    var, df = variance(D, loo)
    se = var.clamp_min(0).sqrt()
    quantile = 0.5 + level / 2

    def half_width(se: torch.Tensor, df: torch.Tensor) -> torch.Tensor:  # no spread (identical models): 0
        return torch.where(se > 0, t_quantile(quantile, df) * se, torch.zeros_like(se))

    half = half_width(se, df)
    candidates = [(se, df)]
    if S > 1:
        se_seeds, df_seeds = (D.var(-1) / S).sqrt(), torch.full_like(df, S - 1.0)
        half_seeds = half_width(se_seeds, df_seeds)
        wider = half_seeds > half
        # the reported (se, df): the pair that sets the interval
        se, df = torch.where(wider, se_seeds, se), torch.where(wider, df_seeds, df)
        half = torch.maximum(half, half_seeds)
        candidates.append((se_seeds, df_seeds))
    out = {"mean": mean, "se": se, "df": df, "lo": mean - half, "hi": mean + half}
    if p_value:
        out["p"] = torch.stack([_p(mean, s, d) for s, d in candidates]).max(0).values
    return out


def _p(mean: torch.Tensor, se: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
    """Two-sided t p-value; no spread at all (identical items or models): 1 at zero, else 0."""
    return torch.where(se > 0, t_two_sided_p(mean / torch.where(se > 0, se, 1.0), df), (mean == 0).to(mean.dtype))


# ---------------------------------------------------------------- Student's t

_TINY = 1e-300
_NORMAL_DF = 1e6  # beyond: the normal distribution
_FEW = 8  # up to this many values: plain Python floats (a report's scalars), else vectorised torch


def _lentz(a, b, x, guard, converged, steps: int = 5000):
    """The continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4), on
    floats or tensors alike."""
    c, d = x * 0 + 1, 1 / guard(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, steps + 1):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1 / guard(1 + aa * d), guard(1 + aa / c)
            h = h * d * c
        if converged(d * c):
            break
    return h


def betainc(a: float | torch.Tensor, b: float | torch.Tensor, x: float | torch.Tensor) -> torch.Tensor:
    """Regularized incomplete beta I_x(a, b), float64, vectorised: the continued fraction on the side of x
    where it converges, I_x(a, b) = 1 - I_{1-x}(b, a) on the other."""
    a, b, x = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (a, b, x)))
    flip = x > (a + 1) / (a + b + 2)
    a, b, x = torch.where(flip, b, a), torch.where(flip, a, b), torch.where(flip, 1 - x, x)
    front = torch.exp(torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)
                      + a * torch.log(x.clamp_min(_TINY)) + b * torch.log1p(-x)) / a
    h = _lentz(a, b, x, lambda v: torch.where(v.abs() < _TINY, torch.full_like(v, _TINY), v),
               lambda r: bool(((r - 1).abs() < 1e-15).all()))
    out = torch.where(x <= 0, torch.zeros_like(x), front * h)
    return torch.where(flip, 1 - out, out)


def _betainc_float(a: float, b: float, x: float) -> float:
    """betainc on plain floats (a report's few values: no tensor overhead per step)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    flip = x > (a + 1) / (a + b + 2)
    if flip:
        a, b, x = b, a, 1 - x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    out = front * _lentz(a, b, x, lambda v: v if abs(v) >= _TINY else _TINY, lambda r: abs(r - 1) < 1e-15)
    return 1 - out if flip else out


def _elementwise(f, *args) -> torch.Tensor:
    """f over plain floats, element by element of the broadcast tensors."""
    args = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in args))
    return torch.tensor([f(*vs) for vs in zip(*(a.flatten().tolist() for a in args))],
                        dtype=torch.float64).view(args[0].shape)


def t_two_sided_p(t: float | torch.Tensor, df: float | torch.Tensor) -> torch.Tensor:
    """P(|T| >= |t|) for Student's t with df degrees of freedom (real df, at least 1): I_{df/(df+t²)}(df/2, 1/2)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    df = torch.as_tensor(df, dtype=torch.float64).clamp_min(1.0)
    if max(t.numel(), df.numel()) <= _FEW:
        return _elementwise(lambda t, nu: math.erfc(abs(t) / math.sqrt(2)) if nu > _NORMAL_DF
                            else _betainc_float(nu / 2, 0.5, nu / (nu + t * t)), t, df)
    t, df = torch.broadcast_tensors(t, df)
    big = df > _NORMAL_DF
    nu = torch.where(big, torch.ones_like(df), df)
    return torch.where(big, torch.erfc(t.abs() / math.sqrt(2)), betainc(nu / 2, 0.5, nu / (nu + t * t)))


def _cornish_fisher(z, nu):
    """The t quantile from the normal one z (Abramowitz & Stegun 26.7.5): within 1e-10 from df 100 on."""
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / nu + g2 / nu**2 + g3 / nu**3 + g4 / nu**4


def _newton(t, nu, q, ops, incbeta):
    """Newton steps on log P(T > t) = log q in log t, nearly linear in the heavy tail of a small df (ops: the
    math module or torch)."""
    log_norm = ops.lgamma((nu + 1) / 2) - ops.lgamma(nu / 2) - 0.5 * ops.log(nu * math.pi)
    for _ in range(8):
        tail = incbeta(nu / 2, 0.5, nu / (nu + t * t)) / 2
        density = ops.exp(log_norm - (nu + 1) / 2 * ops.log1p(t * t / nu))
        t = t * ops.exp((ops.log(tail) - ops.log(q)) * tail / (t * density))
    return t


def t_quantile(p: float | torch.Tensor, df: float | torch.Tensor) -> torch.Tensor:
    """The p-quantile of Student's t (0.5 < p < 1; real df, at least 1): Cornish–Fisher's expansion as the
    start, then (df < 100) Newton steps on the exact tail."""
    df = torch.as_tensor(df, dtype=torch.float64).clamp_min(1.0)
    p = torch.as_tensor(p, dtype=torch.float64)
    if max(p.numel(), df.numel()) <= _FEW:
        def one(p: float, nu: float) -> float:
            t = _cornish_fisher(NormalDist().inv_cdf(p), nu)
            return _newton(t, nu, 1 - p, math, _betainc_float) if nu < 100 else t
        return _elementwise(one, p, df)
    p, df = torch.broadcast_tensors(p, df)
    t = _cornish_fisher(torch.special.ndtri(p), df)
    small = df < 100
    if bool(small.any()):
        t = t.clone()
        t[small] = _newton(t[small], df[small], 1 - p[small], torch, betainc)
    return t


# ---------------------------------------------------------------- many comparisons


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values: sorted ascending, p_(k) -> max_{j <= k} min(1, (m - j + 1) p_(j)).
    A comparison survives at family-wise level alpha when its adjusted p <= alpha. NaN stays NaN and is
    not counted in the family (m)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


# ---------------------------------------------------------------- the report's measures


@dataclass(frozen=True)
class Measure:
    items: str               # evaluate's per-item key
    statistic: str           # STATISTICS key
    unit: str                # a paired difference shown in "points", "nats" or "percent" (of perplexity)
    low: float = 0.0         # the range of the value: its interval is clipped to it
    high: float = math.inf
    exp: bool = False        # the value is exp(statistic): a perplexity


MEASURES: dict[str, Measure] = {
    "target_acc": Measure("target_acc", "mean", "points", 0.0, 1.0),
    # NLL per answer token, averaged over answers (each answer counts once, whatever its length), in nats
    "target_nll": Measure("target_nll", "mean", "nats"),
    "general_ppl": Measure("general_nll", "ratio", "percent", exp=True),
    "general_drift_kl": Measure("general_drift_kl", "ratio", "nats"),
    "mc_acc": Measure("mc_acc", "mean", "points", 0.0, 1.0),
    "mc_acc_norm": Measure("mc_acc_norm", "mean", "points", 0.0, 1.0),
    "robust_acc_mean": Measure("robust_correct", "template_mean", "points", 0.0, 1.0),
    "robust_acc_std": Measure("robust_correct", "template_std", "points"),
    "instr_nll": Measure("instr_nll", "mean", "nats"),
    "instr_clean_end": Measure("instr_clean_end", "mean", "points", 0.0, 1.0),
}


def domain_measures(items: dict) -> dict[str, Measure]:
    """general_ppl@<domain> / general_drift_kl@<domain> for each general-text domain measured."""
    out = {}
    for key in items:
        if key.startswith("general_nll@"):
            domain = key.split("@", 1)[1]
            out[f"general_ppl@{domain}"] = Measure(key, "ratio", "percent", exp=True)
            out[f"general_drift_kl@{domain}"] = Measure(f"general_drift_kl@{domain}", "ratio", "nats")
    return out


def block_groups(blocks: Sequence[float], size: int = BLOCK_GROUP) -> list[list[float]]:
    """Consecutive blocks of one text as contiguous groups, each [sum, count]: len // size groups (at least
    2 when there are 2 blocks), sizes differing by at most one."""
    n = len(blocks)
    groups = min(n, max(n // size, 2))
    bounds = [round(j * n / groups) for j in range(groups + 1)] if groups else [0]
    return [[float(sum(blocks[lo:hi])), float(hi - lo)] for lo, hi in zip(bounds, bounds[1:])]


def item_rows(items: dict, measure: Measure) -> list | None:
    """A measure's items [n][k] from evaluate's per-item values; None when it has none to compute from.
    General text: each domain's blocks in contiguous groups (the pooled measure: every domain's groups)."""
    values = items.get(measure.items)
    if not values:
        return None
    if measure.statistic != "ratio":
        return [row if isinstance(row, list) else [row] for row in values]
    if "@" in measure.items:
        return block_groups(values)
    parts = [v for k, v in items.items() if k.startswith(measure.items + "@")]
    if not parts or sum(len(p) for p in parts) != len(values):  # no domain split stored: one text
        parts = [values]
    return [group for part in parts for group in block_groups(part)]


def _tensor(rows_by_seed: list) -> torch.Tensor:
    return torch.tensor(rows_by_seed, dtype=torch.float64)


def value(items_by_seed: list[dict], measure: Measure) -> dict[str, Any] | None:
    """A single model's value over its seeds and its 95% interval (one seed: over items only), or None
    when its items are missing. items_by_seed: evaluate's per-item dicts, one per seed."""
    rows = [item_rows(items, measure) for items in items_by_seed]
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    x = _tensor(rows)
    if x.shape[-2] < 2:
        v = per_seed(x, measure.statistic)[0].mean().item()
        return {"value": math.exp(v) if measure.exp else v, "ci95": [math.nan, math.nan], "df": math.nan,
                "covers": _covers(len(rows)), "seeds": len(rows)}
    e = {k: v.item() for k, v in estimate(x, statistic=measure.statistic, p_value=False).items()}
    lo, hi = max(e["lo"], measure.low), min(e["hi"], measure.high)
    v = e["mean"]
    if measure.exp:
        v, lo, hi = math.exp(v), math.exp(lo), math.exp(hi)
    return {"value": v, "ci95": [lo, hi], "df": e["df"], "covers": _covers(len(rows)), "seeds": len(rows)}


def difference(runs: list, refs: list, statistic: str, unit: str) -> dict[str, Any]:
    """The paired difference mean_s [g(run_s) - g(ref_s)] in its unit, its 95% interval, two-sided p-value
    and df. runs [S][n][k] (or [S][n]); refs the same, or one seed for every seed."""
    x, y = _tensor(runs), _tensor(refs)
    if x.dim() == 2:
        x, y = x[..., None], y[..., None]
    S, n = x.shape[:2]
    if n < 2:  # one item: nothing to tell its spread by
        e = {"mean": (per_seed(x, statistic)[0] - per_seed(y, statistic)[0]).mean().item(),
             "lo": math.nan, "hi": math.nan, "p": math.nan, "df": math.nan}
    else:
        e = {k: v.item() for k, v in estimate(x, y, statistic).items()}
    mean, lo, hi = e["mean"], e["lo"], e["hi"]
    if unit == "percent":  # a mean NLL difference shown as the relative perplexity change it is
        mean, lo, hi = (100 * math.expm1(v) for v in (mean, lo, hi))
    elif unit == "points":
        mean, lo, hi = (100 * v for v in (mean, lo, hi))
    return {"mean": mean, "ci95": [lo, hi], "unit": unit, "p": e["p"], "df": e["df"],
            "excludes_zero": lo > 0 or hi < 0, "n": n, "seeds": S, "covers": _covers(S)}


def _covers(seeds: int) -> str:
    return "seeds and items" if seeds > 1 else "items only"
