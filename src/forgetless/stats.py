"""Intervals, p-values and multiple-comparison marks for every figure of a report: one machinery.

What a measure is
-----------------
A per-item array x[s, i, k] (seed s of a run; item i: a question, an answer, a group of text blocks;
k a few per-item features) and a statistic: a smooth function g of the item means m_k = mean_i x[s, i, k],
one number per seed:

    mean            g(m) = m                    accuracy, NLL per answer token, KL per block, ...
    template_mean   g(m) = mean_t m_t           robustness: accuracy averaged over prompt templates
    template_spread sqrt(max(0, v)), v below    robustness: spread of the templates' own accuracies
    ratio           g(m) = m_sum / m_count      text blocks taken in contiguous groups (below)

A figure is the mean over seeds of D_s, with D_s = g(x_s) - g(y_s) for a paired difference (y the
reference: the base, one seed serving every seed, or a compared run, seed s with seed s; for a mean this
is the mean of the per-item differences) and y = 0 for a single model's own value. The printed value, its
interval and every paired difference are this one statistic of the same items, so a paired difference is
the difference of the two values it pairs. A run is paired with a reference only on the same seeds.

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
    C = [sum_s J(D_s) - S B] / (S (S-1)), at least 0  E[C] = se²/(S n)            df (S-1)(n-1)
    V = A + B - C

V is floored at max(A, B, C): sa²/S-part A - C, sb²/n-part B - C and se²/(S n)-part C, each counted as zero
when estimated below it, sum to exactly that. Degrees of freedom: Satterthwaite's,
df = V² / (A²/(S-1) + B²/(n-1) + C²/((S-1)(n-1))), those of the floor's component when floored.

The interval is the hull of mean ± t_{df, 0.975} sqrt(V) and of the t interval over seeds alone,
mean ± t_{S-1, 0.975} sqrt(A). The seeds-alone interval is exact (normal D_s) for the mean given these items;
the unconditional one should be no narrower, and Satterthwaite's df, estimated from few seeds, comes out too
large exactly when A comes out small by chance: with 3 seeds and seeds dominating, coverage is 92% without
the hull, 95% with it. The p-value of a difference is the larger of the two intervals' two-sided t p-values
(each with its own df), so p < 0.05 exactly when the 95% interval excludes zero; and it stays calibrated in
the far tail where Holm's thresholds lie (alpha / 210 ~ 2e-4 in the stored report). Under a true null with
3 seeds and seeds dominating, the two-level t's p-value alone falls below 0.003 2.8 times and below 3e-4 18
times as often as it should (its df, estimated from 3 seeds, is too large exactly when A is small); the
larger of the two: 0.8 and 0.7 times (5 seeds: 1.2 and 1.3). The price: with 3 seeds the t over seeds has
2 df, so a difference that interval sets survives Holm over ~200 comparisons only at |mean| / se above ~60
(the report says so). (With 2 seeds t_{1, 0.975} = 12.7: the hull makes intervals wide, 98-99% coverage
when items dominate; 3 seeds or more are the useful setting.) The t quantile and p-value both switch to the
normal's beyond _NORMAL_DF degrees of freedom.

With one seed, V = J(D_1) and df = n-1: the interval covers item sampling only, the expectation given that
one training run; the entry says so ("covers": "items only") and so does the report.

0/1 items
---------
Accuracies and clean-end rates (target_acc, mc_acc, mc_acc_norm, instr_clean_end; robust_acc_mean's
per-template correctness) are 0/1 per item, where a symmetric interval from the items' own spread
under-covers near 0 and 1 (one seed, n = 100: 87% at p = 0.02, 80% at 0.97) and has zero width when every
item agrees. One model's value on one seed gets Wilson's score interval (t_{n-1} for z). Otherwise the item
part B is floored at the jackknife variance of the mean of the pooled S n items with pseudo-observations
added: for a value Agresti–Coull's 2 right and 2 wrong answers, for a paired difference Agresti–Min's half a
pair in each cell of the 2 x 2 table (differences 0, +1, -1, 0). The centre stays the items' own mean (a
paired difference is still the difference of its two values); a zero-variance difference gets a p-value above
0. With several seeds the seed part dominates and is left as it is.

The robustness spread
---------------------
The std over templates of each template's accuracy counts question noise, p(1-p)/n per template, which grows
with accuracy: two models without any template spread at accuracies 3% and 21% differ by -2.2 points and
the interval excluded zero 16% of the time. robust std is instead the template component of a two-way ANOVA
of the question x template 0/1 table, v = (MS_template - MS_question x template) / n (an unbiased estimate of
the variance of the templates' true accuracies, ddof 1), shown as sqrt(max(0, v)): the spread of accuracy
over prompt templates beyond question noise. Its target is that of the templates' population accuracies
(given the seed; with several seeds its mean over seeds). The root has a kink at 0, where a jackknife of
sqrt(max(0, .)) sees no variation at all (coverage 87% with one seed when question noise dominates): the
deleted values are those of the root's linearisation at the estimate, slope 1 / (2 max(root, kappa)), kappa =
sqrt(z se_v) / 2 (se_v the jackknife se of v, z = 1.96), so that at a root of 0 the interval reaches
sqrt(z se_v), as far as the root of the variance's own interval. In the same accuracy-3%-vs-21% simulation
the difference is now -0.6 points on average and its interval excludes zero 2.0% (one seed) / 0.3% (3 seeds)
of the time. The root's remaining bias (upwards at a spread of 0, downwards by Jensen above) is small
against its interval at these sizes (simulation below).

Coverage (tests/test_stats.py; `python tests/test_stats.py` prints the table)
----------------------------------------------------------------------------
5000 replicate experiments a case (one standard error ± 0.003), computed as the report computes them: per-item
dicts as evaluate stores them -> stack -> values_of / differences_of, the functions value() and
item_difference() call (the perplexity change: every replicate through dicts, blocks grouped and jackknifed by
domain by item_tensor and item_strata; the others: 200 replicates through dicts, checked to agree with the
rest computed from the same tensors). Seeds dominating / items dominating, 1, 3, 5 seeds:

    paired mean difference     94.4/94.9/94.8  and 95.2/98.3/96.5%
    perplexity change          94.2/94.6/95.4  and 94.3/97.4/95.8%
    robust std difference      95.1/94.9/95.6  and 96.6/97.8/95.7%  (target: the population template std)
    single model's value       95.3/95.1/94.6  and 95.1/96.6/96.1%
    robust std value           94.7/94.8/94.1  and 98.5/99.1/98.5%  (not asserted)

0/1 items (probit model: seed sd 0.3, question sd 0.5), one seed / 3 seeds: one model's accuracy at p = 0.02
95.8/94.1%, 0.5 95.4/95.1%, 0.97 96.2/94.0%; its paired difference with the base at p = 0.02 98.7/98.2%,
0.5 94.5/95.2%, 0.97 96.8/97.7%, most pairs agreeing (22% vs 20%, latent correlation 0.97) 95.2/94.2%.
Robust std of two models without template spread at 3% and 21%: covers 0 98.0/99.7%. With strongly skewed
seed effects near 0 or 1 (seed sd 0.6 on the probit scale at 2%) the t over 3 seeds falls to ~83%: the
seed part, which no item adjustment mends.

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
freedom: a domain's interval alone rests on 4 items (t_{3, 0.975} = 3.18); a domain of fewer than 6 blocks
has 2 items, 1 df (the report says so).

The pooled measure's domains are fixed (the report's four, not a sample of domains): its jackknife is
stratified by domain, item i deleted from its domain and the domain's other groups reweighted n_h / (n_h - 1),
J = sum_h (n_h - 1) / n_h sum_{i in h} (deleted value - its domain's mean)², df n - domains. (Treating the
groups of all domains as exchangeable counted the domains' different levels as sampling noise: wide.)

Many comparisons
----------------
holm() adjusts a family's p-values (Holm–Bonferroni, family-wise error 5%); the report stars a paired
difference only when it survives over one family: every cell the report shows and may star (the paired
tables and the per-domain table together). Entries report.json holds but the report does not show carry no
significance mark.
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


def _template_features(x: torch.Tensor) -> torch.Tensor:
    """[..., n, T] correct-ness per question and template -> [..., n, T + 2]: the templates, the question's
    sum of squares over templates and its squared mean (what the two-way ANOVA's residual needs)."""
    return torch.cat([x, x.pow(2).sum(-1, keepdim=True), x.mean(-1, keepdim=True).pow(2)], -1)


def _template_var(m: torch.Tensor, n: int) -> torch.Tensor:
    """(MS_template - MS_question x template) / n of the question x template table whose item means are
    m [..., T + 2] (_template_features) over n questions: the variance component of the templates' own
    accuracies, question noise removed (unbiased; below zero by chance when there is little spread).
    var_t(m_t) = MS_template / n; SS_residual / n = M1 - T M2 - (T-1) var_t(m_t)."""
    T = m.shape[-1] - 2
    if T < 2 or n < 2:
        return torch.zeros_like(m[..., 0])
    templates = m[..., :T]
    spread = (templates - templates.mean(-1, keepdim=True)).pow(2).sum(-1) / (T - 1)  # var_t (ddof 1)
    noise = (m[..., T] - T * m[..., T + 1] - (T - 1) * spread) / ((n - 1) * (T - 1))  # MS_qt / n
    return spread - noise


@dataclass(frozen=True)
class Statistic:
    g: Callable[[torch.Tensor, int], torch.Tensor]  # item means [..., k'] and the item count -> [...]
    features: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # per-item rows [..., n, k] -> [..., n, k']
    root: bool = False  # the statistic is sqrt(max(0, g)): g a variance component (module docstring)


STATISTICS: dict[str, Statistic] = {
    "mean": Statistic(lambda m, n: m[..., 0]),
    "template_mean": Statistic(lambda m, n: m.mean(-1)),
    "template_spread": Statistic(_template_var, _template_features, root=True),
    # the raw std over templates of each template's accuracy (ddof 1): question noise included, so it grows
    # with accuracy; not a report measure (robust_acc_std is template_spread), kept for callers
    "template_std": Statistic(lambda m, n: m.std(-1) if m.shape[-1] > 1 else torch.zeros_like(m[..., 0])),
    "ratio": Statistic(lambda m, n: m[..., 0] / m[..., 1]),
}
ROOT_Z = NormalDist().inv_cdf(0.975)  # the root's slope cap (module docstring)


def per_seed(x: torch.Tensor, statistic: str, strata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., S, n, k] -> (the statistic of the item means [..., S], its value with item i deleted
    [..., S, n]). With strata (one label per item), item i is deleted from its stratum and the stratum's
    other items take its weight (n_h / (n_h - 1) each): every stratum keeps its share, as a stratified
    jackknife needs. A root statistic's deleted values are its linearisation (module docstring)."""
    stat = STATISTICS[statistic]
    f = stat.features(x)
    n = f.shape[-2]
    total = f.sum(-2, keepdim=True)
    if strata is None:
        full, loo = stat.g(total.squeeze(-2) / n, n), stat.g((total - f) / (n - 1), n - 1)
    else:
        onehot = torch.nn.functional.one_hot(strata).to(f.dtype)  # [n, H]
        counts = onehot.sum(0)[strata][:, None]  # n_h of each item's stratum, [n, 1]
        own = torch.einsum("nh,...nk->...hk", onehot, f)[..., strata, :]  # each item's stratum total
        full, loo = stat.g(total.squeeze(-2) / n, n), stat.g((total - own + (own - f) * counts / (counts - 1)) / n, n)
    if not stat.root:
        return full, loo
    # sqrt(max(0, v)); deleted values on the line through it with slope 1 / (2 max(root, kappa)),
    # kappa = sqrt(z se_v) / 2: at a root of 0 the interval reaches sqrt(z se_v), as the variance's does
    root = full.clamp_min(0).sqrt()
    kappa = (ROOT_Z * _jackknife(loo, strata).sqrt()).sqrt() / 2
    slope = 1 / (2 * torch.maximum(root, kappa))
    return root, root[..., None] + (loo - full[..., None]) * torch.where(torch.isfinite(slope), slope, 0.0)[..., None]


# pseudo-observations of a 0/1 measure's item-part floor, (value, weight) pairs: for one model's value
# Agresti–Coull's 2 right and 2 wrong answers; for a paired difference Agresti–Min's half a pair in each
# cell of the 2 x 2 table (run right/wrong x reference right/wrong: differences 0, +1, -1, 0)
PSEUDO_VALUE = ((1.0, 2.0), (0.0, 2.0))
PSEUDO_DIFFERENCE = ((0.0, 0.5), (1.0, 0.5), (-1.0, 0.5), (0.0, 0.5))


def _pseudo_floor(d: torch.Tensor, pseudo: Sequence[tuple[float, float]]) -> torch.Tensor:
    """The variance of the mean of d [..., N] with the pseudo-observations (value, weight) added: the
    jackknife variance of a mean, sum of squares about the mean / (N' (N' - 1)), N' = N + their weight."""
    values = torch.tensor([v for v, _ in pseudo], dtype=d.dtype)
    weights = torch.tensor([w for _, w in pseudo], dtype=d.dtype)
    total = d.shape[-1] + weights.sum()
    mean = (d.sum(-1) + (weights * values).sum()) / total
    ss = (d - mean[..., None]).pow(2).sum(-1) + (weights * (values - mean[..., None]).pow(2)).sum(-1)
    return ss / (total * (total - 1))


def _jackknife(v: torch.Tensor, strata: torch.Tensor | None) -> torch.Tensor:
    """Delete-one jackknife variance over the last (item) axis; with strata (one label per item), the
    stratified one: sum over strata h of (n_h - 1) / n_h sum_{i in h} (v_i - mean_h v)²."""
    n = v.shape[-1]
    if strata is None:
        return (n - 1) / n * (v - v.mean(-1, keepdim=True)).pow(2).sum(-1)
    onehot = torch.nn.functional.one_hot(strata).to(v.dtype)  # [n, H]
    counts = onehot.sum(0)
    dev = v - ((v @ onehot) / counts)[..., strata]
    return (((counts - 1) / counts)[strata] * dev.pow(2)).sum(-1)


def variance(D: torch.Tensor, loo: torch.Tensor, strata: torch.Tensor | None = None,
             item_floor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Var(mean_s D_s) and its degrees of freedom from the per-seed statistics D [..., S] and their
    delete-one-item values loo [..., S, n] (the module docstring has the formula); strata: the items'
    strata, for a stratified jackknife (item df: n - strata); item_floor: a floor on the item part B."""
    S, n = loo.shape[-2:]
    item_df = n - (1 if strata is None else int(strata.max()) + 1)
    B = _jackknife(loo.mean(-2), strata)  # items deleted from every seed at once
    B_floored = B if item_floor is None else torch.maximum(B, item_floor)
    if S == 1:
        return B_floored, torch.full_like(B, float(item_df))
    A = D.var(-1) / S
    C = ((_jackknife(loo, strata).sum(-1) - S * B) / (S * (S - 1))).clamp_min(0)
    B = B_floored
    dfs = (S - 1.0, float(item_df), (S - 1.0) * item_df)
    V = A + B - C
    df = V.pow(2) / (A.pow(2) / dfs[0] + B.pow(2) / dfs[1] + C.pow(2) / dfs[2])
    # at least each component (one estimated below zero counts as zero), with that component's df
    parts = torch.stack([A, B, C])
    floor, which = parts.max(0)
    floored = (V < floor) | (floor <= 0)  # (no spread at all: the seeds' df)
    floor_df = torch.tensor(dfs, dtype=V.dtype)[which]
    return torch.where(floored, floor, V), torch.where(floored, floor_df, df)


def estimate(x: torch.Tensor, y: torch.Tensor | None = None, statistic: str = "mean",
             level: float = LEVEL, p_value: bool = True, binary: bool = False,
             strata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """mean_s [g(x_s) - g(y_s)] with its standard error, df, interval and two-sided p-value, vectorised
    over leading axes. x [..., S, n, k]; y None (a single model's value), [..., 1, n, k] (one reference
    seed for every seed) or [..., S, n, k] (seed s paired with seed s).

    With several seeds the interval is the hull of the two-level one (mean ± t_df sqrt(V)) and the t
    interval over seeds alone (mean ± t_{S-1} sqrt(A)), p the larger of their p-values (so p < 1 - level
    exactly when the interval excludes zero), se and df those of the wider one (module docstring).
    binary: 0/1 items under a linear statistic (mean, template_mean): the item part is floored at the
    variance of the pooled items' mean with pseudo-observations added (PSEUDO_VALUE, PSEUDO_DIFFERENCE), and
    one model's value on one seed with a mean statistic gets Wilson's score interval. strata: [n] labels of
    a stratified jackknife (not with binary)."""
    strata = None if binary else strata
    D, loo = per_seed(x, statistic, strata)
    if y is not None:
        Dy, loo_y = per_seed(y, statistic, strata)
        D, loo = D - Dy, loo - loo_y
    S, n = x.shape[-3], x.shape[-2]
    floor = None
    if binary:  # the item part at least that of the pooled items with pseudo-observations added
        g = STATISTICS[statistic].g  # linear (mean, template_mean): item by item
        d = g(x, 1) if y is None else g(x, 1) - g(y, 1)
        d = d.expand(*D.shape, n).flatten(-2)
        floor = _pseudo_floor(d, PSEUDO_VALUE if y is None else PSEUDO_DIFFERENCE)
    mean = D.mean(-1)
    var, df = variance(D, loo, strata, floor)
    se = var.clamp_min(0).sqrt()
    quantile = 0.5 + level / 2

    def half_width(se: torch.Tensor, df: torch.Tensor) -> torch.Tensor:  # no spread (identical models): 0
        return torch.where(se > 0, t_quantile(quantile, df) * se, torch.zeros_like(se))

    if binary and y is None and S == 1 and statistic == "mean":  # Wilson's score interval
        q = t_quantile(quantile, df)
        shrink = 1 + q * q / n
        centre = (mean + q * q / (2 * n)) / shrink
        half = q / shrink * (mean * (1 - mean) / n + q * q / (4 * n * n)).clamp_min(0).sqrt()
        lo, hi = torch.minimum(centre - half, mean), torch.maximum(centre + half, mean)  # (rounding at 0, 1)
        out = {"mean": mean, "se": half / q, "df": df, "lo": lo, "hi": hi}
        if p_value:
            out["p"] = _p(mean, out["se"], df)
        return out
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
    """The p-quantile of Student's t (0.5 < p < 1; real df, at least 1): the normal's beyond _NORMAL_DF (as
    t_two_sided_p), else Cornish–Fisher's expansion as the start, then (df < 100) Newton steps on the exact
    tail."""
    df = torch.as_tensor(df, dtype=torch.float64).clamp_min(1.0)
    p = torch.as_tensor(p, dtype=torch.float64)
    if max(p.numel(), df.numel()) <= _FEW:
        def one(p: float, nu: float) -> float:
            z = NormalDist().inv_cdf(p)
            if nu > _NORMAL_DF:
                return z
            t = _cornish_fisher(z, nu)
            return _newton(t, nu, 1 - p, math, _betainc_float) if nu < 100 else t
        return _elementwise(one, p, df)
    if p.numel() == 1 and df.numel() > _FEW:  # one level: each distinct df once
        distinct, inverse = torch.unique(df, return_inverse=True)
        if distinct.numel() < df.numel():
            return t_quantile(p, distinct)[inverse]
    p, df = torch.broadcast_tensors(p, df)
    z = torch.special.ndtri(p)
    t = _cornish_fisher(z, df)
    small = df < 100
    if bool(small.any()):
        t = t.clone()
        t[small] = _newton(t[small], df[small], 1 - p[small], torch, betainc)
    return torch.where(df > _NORMAL_DF, z, t)


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
    """One measure of the report: how its statistic is computed from evaluate's per-item values (items to
    binary) and how the report shows it (key to first_vs_runs). MEASURES is the one declaration of each:
    evaluate records its result under `key`; compare's tables, Holm family and plots are drawn from it."""

    items: str               # evaluate's per-item key
    statistic: str           # STATISTICS key
    unit: str                # a paired difference shown in "points", "nats" or "percent" (of perplexity)
    low: float = 0.0         # the range of the value: its interval is clipped to it
    high: float = math.inf
    exp: bool = False        # the value is exp(statistic): a perplexity
    binary: bool = False     # 0/1 items: pseudo-items in the item part, Wilson for one seed's value
    key: str = ""            # evaluate's result key (report.json's too)
    header: str = ""         # its column in the results table; "": in neither that table nor the plot
    label: str = ""          # its plot's title
    higher: bool = True      # higher is better (the plot's arrow)
    digits: int = 3          # decimals of its value and interval in the results table
    change: bool = False     # the results table also shows its change against the base, in its unit
    diff: str = ""           # the paired tables' header of its differences ("Δ acc" -> "Δ acc vs base")
    # the references its paired differences are shown against in the main paired table: "base" and/or "sft"
    # (the plain fine-tuning run); with "sft" also against each further reference run (compare.paired_with)
    vs: tuple[str, ...] = ()
    first_vs_runs: bool = False  # its column leads the tables against further reference runs (their order)


# In the order of the results table, the plot and report.json's paired differences. A new measure is an entry
# here and its per-item values with `measure(items, key, n)` in the evaluate function that computes them.
MEASURES: dict[str, Measure] = {m.key: m for m in [
    Measure("target_acc", "mean", "points", 0.0, 1.0, binary=True, key="target_acc", header="target acc",
            label="target accuracy", change=True, diff="Δ acc", vs=("base", "sft")),
    # NLL per answer token, averaged over answers (each answer counts once, whatever its length), in nats
    Measure("target_nll", "mean", "nats", key="target_nll", header="target NLL",
            label="target NLL per answer token (nats)", higher=False, diff="Δ target NLL", vs=("base", "sft"),
            first_vs_runs=True),
    Measure("general_nll", "ratio", "percent", exp=True, key="general_ppl", header="general ppl",
            label="general-text perplexity", higher=False, digits=2, change=True, diff="Δ ppl", vs=("base", "sft")),
    Measure("general_drift_kl", "ratio", "nats", key="general_drift_kl", header="drift KL",
            label="drift KL(base‖model)", higher=False, digits=4, diff="drift KL", vs=("sft",)),
    Measure("mc_acc", "mean", "points", 0.0, 1.0, binary=True, key="mc_acc"),  # recorded, not shown
    Measure("mc_acc_norm", "mean", "points", 0.0, 1.0, binary=True, key="mc_acc_norm", header="MMLU acc_norm",
            label="MMLU acc_norm", change=True, diff="Δ MMLU", vs=("base",)),
    Measure("robust_correct", "template_mean", "points", 0.0, 1.0, binary=True, key="robust_acc_mean",
            header="robust acc mean", label="robustness: mean acc"),
    # the spread of the templates' accuracies beyond question noise (module docstring)
    Measure("robust_correct", "template_spread", "points", key="robust_acc_std", header="robust std",
            label="robustness: template spread beyond noise", higher=False, diff="Δ robust std", vs=("sft",)),
    Measure("instr_nll", "mean", "nats", key="instr_nll", header="instr NLL",
            label="NLL per token of the base's answers (nats)", higher=False, diff="Δ instr NLL", vs=("base",)),
    Measure("instr_clean_end", "mean", "points", 0.0, 1.0, binary=True, key="instr_clean_end",
            header="clean end", label="answers ending cleanly", digits=2, diff="Δ clean end", vs=("base",)),
]}


def domain_measures(items: dict) -> dict[str, Measure]:
    """general_ppl@<domain> / general_drift_kl@<domain> for each general-text domain measured."""
    out = {}
    for key in items:
        if key.startswith("general_nll@"):
            domain = key.split("@", 1)[1]
            out[f"general_ppl@{domain}"] = Measure(key, "ratio", "percent", exp=True, key=f"general_ppl@{domain}")
            out[f"general_drift_kl@{domain}"] = Measure(f"general_drift_kl@{domain}", "ratio", "nats",
                                                        key=f"general_drift_kl@{domain}")
    return out


def block_groups(blocks: Sequence[float], size: int = BLOCK_GROUP) -> list[list[float]]:
    """Consecutive blocks of one text as contiguous groups, each [sum, count]: len // size groups (at least
    2 when there are 2 blocks), sizes differing by at most one."""
    n = len(blocks)
    groups = min(n, max(n // size, 2))
    bounds = [round(j * n / groups) for j in range(groups + 1)] if groups else [0]
    return [[float(sum(blocks[lo:hi])), float(hi - lo)] for lo, hi in zip(bounds, bounds[1:])]


def _domain_parts(items: dict, measure: Measure) -> list[list[float]] | None:
    """The pooled general-text measure's blocks split by domain, or None (no split stored: one text)."""
    values = items.get(measure.items)
    parts = [v for k, v in items.items() if k.startswith(measure.items + "@")]
    if not values or not parts or sum(len(p) for p in parts) != len(values):
        return None
    return parts


def item_tensor(items: dict, measure: Measure) -> torch.Tensor | None:
    """A measure's items [n, k] from evaluate's per-item values; None when it has none to compute from.
    General text: each domain's blocks in contiguous groups (the pooled measure: every domain's groups)."""
    values = items.get(measure.items)
    if not values:
        return None
    if measure.statistic != "ratio":
        x = torch.tensor(values, dtype=torch.float64)
        return x[:, None] if x.dim() == 1 else x
    if "@" in measure.items:
        return torch.tensor(block_groups(values), dtype=torch.float64)
    parts = _domain_parts(items, measure) or [values]
    return torch.tensor([group for part in parts for group in block_groups(part)], dtype=torch.float64)


def item_rows(items: dict, measure: Measure) -> list | None:
    """item_tensor as nested lists [n][k]."""
    x = item_tensor(items, measure)
    return None if x is None else x.tolist()


def item_strata(items: dict, measure: Measure) -> list[int] | None:
    """The stratum of each of item_tensor's items for a stratified jackknife: the pooled general-text
    measure's groups by domain (every domain with at least 2 groups); None: one stratum."""
    if measure.statistic != "ratio" or "@" in measure.items:
        return None
    parts = _domain_parts(items, measure)
    sizes = [len(block_groups(part)) for part in parts or []]
    if len(sizes) < 2 or min(sizes) < 2:
        return None
    return [h for h, size in enumerate(sizes) for _ in range(size)]


def aligned(dicts: Sequence[dict], measure: Measure) -> list[dict]:
    """The per-item dicts with the measure's items paired by identity: a measure whose items are a per-model
    subset (instr_nll: the base answers that ended, which a process regenerating them may find otherwise) has
    their ids under `<items>_ids`; every dict then keeps the ids all of them have, in one order. Dicts without
    ids are returned as they are (their items are the same list for every model by construction)."""
    key = f"{measure.items}_ids"
    ids = [one.get(key) for one in dicts]
    if any(i is None for i in ids) or all(i == ids[0] for i in ids):
        return list(dicts)
    shared = set(ids[0]).intersection(*map(set, ids[1:]))
    common = [item for item in ids[0] if item in shared]  # in the first one's order
    out = []
    for one, own in zip(dicts, ids):
        where = {item: n for n, item in enumerate(own)}
        out.append({**one, measure.items: [one[measure.items][where[c]] for c in common], key: common})
    return out


def stack(items: Sequence[Sequence[dict]], measure: Measure) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """evaluate's per-item dicts [R][S] (R experiments of S seeds each) -> the measure's items
    x [R, S, n, k] and their strata (item_strata; None: one), or None when one lacks the measure's items
    or their shapes differ. Items with ids are paired by them (aligned)."""
    flat = aligned([one for seeds in items for one in seeds], measure)
    rows = [item_tensor(one, measure) for one in flat]
    if any(r is None for r in rows) or len({r.shape for r in rows}) != 1:
        return None
    strata = item_strata(items[0][0], measure)
    return (torch.stack(rows).view(len(items), -1, *rows[0].shape),
            None if strata is None else torch.tensor(strata, dtype=torch.long))


def values_of(x: torch.Tensor, measure: Measure, strata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A single model's value over its seeds and its 95% interval (one seed: over items only), clipped to
    the measure's range and exp-transformed for a perplexity, vectorised: x [..., S, n, k] -> [...]."""
    if x.shape[-2] < 2:  # one item: nothing to tell its spread by
        v = per_seed(x, measure.statistic)[0].mean(-1)
        nan = torch.full_like(v, math.nan)
        e = {"mean": v, "lo": nan, "hi": nan, "df": nan}
    else:
        e = estimate(x, statistic=measure.statistic, p_value=False, binary=measure.binary, strata=strata)
    v, lo, hi = e["mean"], e["lo"].clamp(measure.low, measure.high), e["hi"].clamp(measure.low, measure.high)
    if measure.exp:
        v, lo, hi = v.exp(), lo.exp(), hi.exp()
    return {"value": v, "lo": lo, "hi": hi, "df": e["df"]}


def differences_of(x: torch.Tensor, y: torch.Tensor, measure: Measure,
                   strata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The paired difference mean_s [g(x_s) - g(y_s)] in the measure's unit, its 95% interval, two-sided
    p-value and df, vectorised: x [..., S, n, k], y [..., S or 1, n, k] -> [...]."""
    if x.shape[-2] < 2:  # one item: nothing to tell its spread by
        mean = (per_seed(x, measure.statistic)[0] - per_seed(y, measure.statistic)[0]).mean(-1)
        nan = torch.full_like(mean, math.nan)
        e = {"mean": mean, "lo": nan, "hi": nan, "p": nan, "df": nan}
    else:
        e = estimate(x, y, measure.statistic, binary=measure.binary, strata=strata)
    mean, lo, hi = e["mean"], e["lo"], e["hi"]
    if measure.unit == "percent":  # a mean NLL difference shown as the relative perplexity change it is
        mean, lo, hi = (100 * torch.expm1(v) for v in (mean, lo, hi))
    elif measure.unit == "points":
        mean, lo, hi = (100 * v for v in (mean, lo, hi))
    return {"mean": mean, "lo": lo, "hi": hi, "p": e["p"], "df": e["df"], "n": torch.full_like(mean, x.shape[-2])}


def value(items_by_seed: list[dict], measure: Measure) -> dict[str, Any] | None:
    """A single model's value over its seeds and its 95% interval (one seed: over items only), or None
    when its items are missing. items_by_seed: evaluate's per-item dicts, one per seed."""
    stacked = stack([items_by_seed], measure)
    if stacked is None:
        return None
    x, strata = stacked
    e = {k: v[0].item() for k, v in values_of(x, measure, strata).items()}
    return {"value": e["value"], "ci95": [e["lo"], e["hi"]], "df": e["df"], "covers": _covers(len(items_by_seed)),
            "seeds": len(items_by_seed)}


def item_difference(runs: list[dict], refs: list[dict], measure: Measure) -> dict[str, Any] | None:
    """The paired difference of a measure between a run and a reference, from evaluate's per-item dicts:
    runs one per seed, refs the same seeds in the same order, or one seed for every seed (the base). Its mean
    in its unit, 95% interval, two-sided p-value and df; None when either lacks the items or their counts
    differ."""
    both = aligned([*runs, *refs], measure)  # the run and its reference paired item by item
    runs, refs = both[:len(runs)], both[len(runs):]
    x, y = stack([runs], measure), stack([refs], measure)
    if x is None or y is None or x[0].shape[-2] != y[0].shape[-2]:
        return None
    return _entry(differences_of(x[0], y[0], measure, x[1]), measure.unit, len(runs))


def difference(runs: list, refs: list, statistic: str, unit: str, binary: bool = False) -> dict[str, Any]:
    """item_difference from item rows: runs [S][n][k] (or [S][n]), refs the same or one seed for every
    seed, a STATISTICS key and a unit (binary: 0/1 items)."""
    x, y = torch.tensor(runs, dtype=torch.float64), torch.tensor(refs, dtype=torch.float64)
    if x.dim() == 2:
        x, y = x[..., None], y[..., None]
    return _entry(differences_of(x[None], y[None], Measure("", statistic, unit, binary=binary)), unit, x.shape[0])


def _entry(e: dict[str, torch.Tensor], unit: str, seeds: int) -> dict[str, Any]:
    e = {k: v[0].item() for k, v in e.items()}
    return {"mean": e["mean"], "ci95": [e["lo"], e["hi"]], "unit": unit, "p": e["p"], "df": e["df"],
            "excludes_zero": e["lo"] > 0 or e["hi"] < 0, "n": int(e["n"]), "seeds": seeds, "covers": _covers(seeds)}


def _covers(seeds: int) -> str:
    return "seeds and items" if seeds > 1 else "items only"
