"""forgetless.stats: every kind of interval the report prints covers what it claims on draws from known
models (seeds crossed with items; continuous and 0/1 items), computed by the report's own code path (per-item
dicts as evaluate stores them -> stats.stack -> stats.values_of / stats.differences_of, which stats.value
and stats.item_difference call); Student's t against table values; Holm by hand; the stored reports re-rendered
are consistent (each value in its interval, each paired difference the difference of the two values it
pairs, a star only where Holm keeps it, one family over every starred cell).

`python tests/test_stats.py` prints every case's coverage (the figures in stats.py's docstring)."""

import importlib.util
import json
import math
import zlib
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

from forgetless import stats
from forgetless.compare import shared_training
from forgetless.config import ForgetlessConfig

ROOT = Path(__file__).resolve().parent.parent
R = 5000  # replicates per case: a coverage near 95% is measured to about ± 0.003 (one standard error)
F64 = torch.float64
BAND = (0.93, 0.99)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is faster, and does not fight a busy machine's other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def normal(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def phi(v: torch.Tensor | float) -> torch.Tensor:
    return 0.5 * torch.erfc(-torch.as_tensor(v, dtype=F64) / math.sqrt(2))


def ar1(g: torch.Generator, shape: tuple, rho: float) -> torch.Tensor:
    """Unit-variance AR(1) along the last axis: consecutive text blocks that are not independent."""
    z = normal(g, *shape)
    out = z.clone()
    for j in range(1, shape[-1]):
        out[..., j] = rho * out[..., j - 1] + math.sqrt(1 - rho**2) * z[..., j]
    return out


# ---------------------------------------------------------------- the report's code path


def as_items(key: str, x: torch.Tensor) -> list[list[dict]]:
    """[R, S, n] (or [R, S, n, T]) per-item values -> R experiments of S per-item dicts, as evaluate stores
    them (items[key]: a list of floats, or of per-template lists)."""
    return [[{key: seed} for seed in rep] for rep in x.numpy().tolist()]


def general_items(blocks: torch.Tensor) -> list[list[dict]]:
    """[R, S, domains, blocks] block NLLs -> per-item dicts as evaluate stores them: each domain's blocks
    under general_nll@<domain>, all of them (domain after domain) under general_nll."""
    out = []
    for rep in blocks.numpy().tolist():
        out.append([{**{f"general_nll@d{j}": text for j, text in enumerate(seed)},
                     "general_nll": [b for text in seed for b in text]} for seed in rep])
    return out


CHECKED = 200  # replicates that go through per-item dicts when the rest need not (below)


def report_value(key: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A single model's value as the report computes it (stats.value: per-item dicts -> stats.stack ->
    stats.values_of) for the first CHECKED replicates; the rest straight from the tensor the dicts hold
    (the measure has no grouping: stack only lists its items), checked to agree."""
    measure = stats.MEASURES[key]
    x4 = x if x.dim() == 4 else x[..., None]
    out = stats.values_of(x4, measure)
    stacked, strata = stats.stack(as_items(measure.items, x[:CHECKED]), measure)
    assert strata is None and torch.equal(stacked, x4[:CHECKED])
    for k, v in stats.values_of(stacked, measure).items():
        assert torch.allclose(v, out[k][:CHECKED], rtol=1e-9, atol=1e-12, equal_nan=True), k
    return out


def report_difference(key: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """A paired difference as the report computes it (stats.item_difference, which compare.paired_differences
    calls), as report_value."""
    measure = stats.MEASURES[key]
    x4, y4 = (x, y) if x.dim() == 4 else (x[..., None], y[..., None])
    out = stats.differences_of(x4, y4, measure)
    sx, strata = stats.stack(as_items(measure.items, x[:CHECKED]), measure)
    sy, _ = stats.stack(as_items(measure.items, y[:CHECKED]), measure)
    assert strata is None and torch.equal(sx, x4[:CHECKED]) and torch.equal(sy, y4[:CHECKED])
    for k, v in stats.differences_of(sx, sy, measure).items():
        assert torch.allclose(v, out[k][:CHECKED], rtol=1e-9, atol=1e-12, equal_nan=True), k
    return out


def report_general_difference(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pooled perplexity change as the report computes it, every replicate through per-item dicts
    (stats.item_tensor groups each domain's blocks, stats.item_strata labels the domains)."""
    measure = stats.MEASURES["general_ppl"]
    (sx, strata), (sy, _) = stats.stack(general_items(x), measure), stats.stack(general_items(y), measure)
    assert strata is not None
    return stats.differences_of(sx, sy, measure, strata)


# Each model draws r replicate experiments of S seeds and returns (interval lo, hi, target), all [r], in the
# unit the report prints. With several seeds the target is the expectation over seeds and items; with ONE seed
# it is that seed's own conditional expectation (its seed effects held fixed, items drawn afresh): a one-seed
# interval covers item sampling only, and says so ("covers": "items only").

REGIMES = {  # (seed sd, item sd) of each kind's model
    "mean difference": {"seeds dominate": (0.5, 1.0), "items dominate": (0.02, 1.0)},
    "perplexity change": {"seeds dominate": (0.05, 0.02), "items dominate": (0.002, 0.05)},
    "robustness std": {"seeds dominate": (0.05, 0.01), "items dominate": (0.005, 0.045)},
    "single-model value": {"seeds dominate": (0.5, 1.0), "items dominate": (0.02, 1.0)},
}


def mean_difference(g, S: int, sa: float, sb: float, n: int = 100):
    """A run's answer NLLs, d[s, i] = 0.3 + a_s + b_i + e_si, against the base (one seed serving every
    seed), which shares the item effects b_i and has its own item noise: the paired mean difference."""
    a, b = sa * normal(g, R, S, 1), sb * normal(g, R, 1, n)
    x = 3.3 + a + b + normal(g, R, S, n)
    y = 3.1 + b + 0.5 * normal(g, R, 1, n)
    e = report_difference("target_nll", x, y)
    return e["lo"], e["hi"], 0.2 + (a[:, 0, 0] if S == 1 else 0.0)


DOMAIN_SHIFT = torch.tensor([0.02, -0.03, 0.06, 0.0], dtype=F64)  # fixed per-domain run - compared run


def perplexity_change(g, S: int, sa: float, sc: float, domains: int = 4, blocks: int = 12, rho: float = 0.1):
    """Block NLLs of a run and of a compared run (seed s with seed s) on 4 domains of 12 consecutive blocks,
    block effects AR(1) along each text, fixed domain effects (the domains are the report's, not a sample);
    the report groups 3 blocks into an item, jackknifes within domains and shows 100 expm1(Δ)."""
    shape = (R, S, domains, blocks)
    shared = 0.3 * ar1(g, (R, 1, domains, blocks), rho)  # both models find the same blocks hard
    ax, ay = sa * normal(g, R, S, 1, 1), sa * normal(g, R, S, 1, 1)
    level = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=F64)[:, None]  # the domains' own difficulty
    x = 3.0 + level + DOMAIN_SHIFT[:, None] + ax + shared + sc * ar1(g, (R, 1, domains, blocks), rho) \
        + sc * ar1(g, shape, rho)
    y = 2.95 + level + ay + shared + sc * ar1(g, shape, rho)
    e = report_general_difference(x, y)
    delta = 0.05 + DOMAIN_SHIFT.mean() + ((ax - ay)[:, 0, 0, 0] if S == 1 else torch.zeros(R, dtype=F64))
    return e["lo"], e["hi"], 100 * torch.expm1(delta)


M_X = torch.tensor([0.20, 0.24, 0.18, 0.22, 0.21], dtype=F64)
M_Y = torch.tensor([0.25, 0.20, 0.22, 0.27, 0.19], dtype=F64)


def robustness_std(g, S: int, su: float, tau: float, n: int = 100, T: int = 5):
    """Correct-ness x[s, q, t] = m_t + u_st + b_q + c_qt + e_sqt of a run and of a compared run (same
    questions q and templates t, each its own seeds): the difference of the spread of the templates' own
    accuracies (m + u). Per template, the question noise (c and e) of the mean over questions is N(0, tau²).
    Target: the population template std, std_t(m_t + u_st), given the seed (one seed) or its expectation
    over seeds (several)."""
    r = R
    u_x, u_y = su * normal(g, r, S, 1, T), su * normal(g, r, S, 1, T)
    b, c = 0.4 * normal(g, r, 1, n, 1), tau * math.sqrt(n / 2) * normal(g, r, 1, n, T)
    x = M_X + u_x + b + c + tau * math.sqrt(n / 2) * normal(g, r, S, n, T)
    y = M_Y + u_y + b + c + tau * math.sqrt(n / 2) * normal(g, r, S, n, T)
    e = report_difference("robust_acc_std", x, y)
    if S == 1:
        target = (M_X + u_x[:, 0, 0]).std(-1) - (M_Y + u_y[:, 0, 0]).std(-1)
    else:  # by Monte Carlo
        target = (M_X + su * normal(g, 200_000, T)).std(-1).mean() - (M_Y + su * normal(g, 200_000, T)).std(-1).mean()
    return e["lo"], e["hi"], 100 * target


def single_value(g, S: int, sa: float, sb: float, n: int = 100):
    """One model's answer NLL over its seeds, x[s, i] = 3 + a_s + b_i + e_si."""
    a = sa * normal(g, R, S, 1)
    x = 3.0 + a + sb * normal(g, R, 1, n) + normal(g, R, S, n)
    e = report_value("target_nll", x)
    return e["lo"], e["hi"], 3.0 + (a[:, 0, 0] if S == 1 else 0.0)


MODELS = {"mean difference": mean_difference, "perplexity change": perplexity_change,
          "robustness std": robustness_std, "single-model value": single_value}


# 0/1 items: a probit model, right[s, i] = 1[mu + a_s + b_i + e_si > 0] (seed effect a, question
# difficulty b, unit noise e), mu set so that the expected accuracy is p.
BERNOULLI_SEED, BERNOULLI_ITEM = 0.3, 0.5


def bernoulli_value(g, S: int, p: float, n: int = 100):
    """One model's accuracy (target_acc) over its seeds."""
    sa, sb = BERNOULLI_SEED, BERNOULLI_ITEM
    mu = NormalDist().inv_cdf(p) * math.sqrt(1 + sa * sa + sb * sb)
    a = sa * normal(g, R, S, 1)
    right = (mu + a + sb * normal(g, R, 1, n) + normal(g, R, S, n) > 0).to(F64)
    e = report_value("target_acc", right)
    target = phi((mu + a[:, 0, 0]) / math.sqrt(1 + sb * sb)) if S == 1 else torch.full((R,), p, dtype=F64)
    return e["lo"], e["hi"], target


def bernoulli_difference(g, S: int, p_run: float, p_base: float, rho: float, n: int = 100):
    """A run's accuracy against the base's (one seed serving every seed) on the same questions: latent
    rho L_i + sqrt(1 - rho²) e (+ a_s for the run) below a threshold, L_i shared, so that pairs agree
    more often the larger rho. In points."""
    sa = BERNOULLI_SEED
    t_run, t_base = NormalDist().inv_cdf(p_run) * math.sqrt(1 + sa * sa), NormalDist().inv_cdf(p_base)
    shared, a = rho * normal(g, R, 1, n), sa * normal(g, R, S, 1)
    noise = math.sqrt(1 - rho * rho)
    run = (shared + noise * normal(g, R, S, n) + a < t_run).to(F64)
    base = (shared + noise * normal(g, R, 1, n) < t_base).to(F64)
    e = report_difference("target_acc", run, base)
    target = (phi(t_run - a[:, 0, 0]) if S == 1 else torch.full((R,), p_run, dtype=F64)) - p_base
    return e["lo"], e["hi"], 100 * target


BERNOULLI = {  # name -> (model, its arguments after the seed count)
    "value p=0.02": (bernoulli_value, (0.02,)), "value p=0.5": (bernoulli_value, (0.5,)),
    "value p=0.97": (bernoulli_value, (0.97,)),
    "difference p=0.02": (bernoulli_difference, (0.02, 0.02, 0.8)),
    "difference p=0.5": (bernoulli_difference, (0.5, 0.5, 0.8)),
    "difference p=0.97": (bernoulli_difference, (0.97, 0.97, 0.8)),
    # most pairs agree: 0.22 vs 0.20 with rho 0.97, about 4 discordant pairs in 100
    "difference, pairs agree": (bernoulli_difference, (0.22, 0.20, 0.97)),
}


def robust_std_unequal_accuracy(g, S: int, p_run: float = 0.03, p_ref: float = 0.21, n: int = 100, T: int = 5):
    """Two models with NO template spread at all (every template has the same true accuracy) at different
    accuracy levels, 0/1 items (question difficulty shared): the robust std difference's target is 0."""
    r, sa, sb = R, 0.2, 0.5
    b = sb * normal(g, r, 1, n, 1)

    def right(p: float) -> torch.Tensor:
        mu = NormalDist().inv_cdf(p) * math.sqrt(1 + sa * sa + sb * sb)
        return (mu + sa * normal(g, r, S, 1, 1) + b + normal(g, r, S, n, T) > 0).to(F64)

    e = report_difference("robust_acc_std", right(p_run), right(p_ref))
    return e["lo"], e["hi"], torch.zeros(r, dtype=F64)


CASES = {**{f"{kind}, {regime}": (MODELS[kind], args) for kind, regimes in REGIMES.items()
            for regime, args in regimes.items()},
         **{f"0/1 {name}": case for name, case in BERNOULLI.items()},
         "robust std, no template spread, accuracy 3% vs 21%": (robust_std_unequal_accuracy, ())}


def coverage(case: str, seeds: int) -> float:
    model, args = CASES[case]
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}/{seeds}".encode()))
    lo, hi, target = model(g, seeds, *args)
    return ((lo <= target) & (target <= hi)).double().mean().item()


@pytest.mark.parametrize("seeds", [1, 3, 5])
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith(("0/1", "robust std,"))])
def test_intervals_cover_what_they_claim(case, seeds):
    """Empirical coverage of the 95% interval over R replicate experiments lies in [0.93, 0.99]. With one
    seed the target is that seed's own conditional expectation: coverage over items only."""
    assert BAND[0] <= (c := coverage(case, seeds)) <= BAND[1], f"{case}, {seeds} seeds: coverage {c:.3f}"


@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("0/1")])
def test_intervals_cover_on_0_1_items(case, seeds):
    """0/1 items near 0, 1/2 and 1: one model's accuracy (one seed: Wilson's interval), its paired difference
    with the base (pseudo-observations floor the item part), one where most pairs agree."""
    assert BAND[0] <= (c := coverage(case, seeds)) <= BAND[1], f"{case}, {seeds} seeds: coverage {c:.3f}"


@pytest.mark.parametrize("seeds", [1, 3])
def test_robust_std_does_not_confuse_accuracy_with_spread(seeds):
    """Two models without any template spread at accuracies 3% and 21%: their robust std difference's
    interval covers 0 (the std over templates of per-template accuracy excluded it 16% of the time). With
    3 seeds the hull with the t over seeds (2 df) makes it conservative (0.997): only the lower end is held."""
    c = coverage("robust std, no template spread, accuracy 3% vs 21%", seeds)
    assert BAND[0] <= c <= (BAND[1] if seeds == 1 else 1.0), f"{seeds} seeds: coverage {c:.3f}"


def test_0_1_intervals_never_collapse():
    """A clean-end rate of 1.00 on every item gets Wilson's interval, not [1, 1]; identical non-zero paired
    differences (every answer right, the reference's every answer wrong) get a p-value above 0."""
    all_right = stats.value([{"instr_clean_end": [1.0] * 40}], stats.MEASURES["instr_clean_end"])
    q = stats.t_quantile(0.975, 39).item()
    assert all_right["ci95"] == pytest.approx([40 / (40 + q * q), 1.0])
    for seeds in (1, 3):
        d = stats.item_difference([{"target_acc": [1.0] * 40}] * seeds, [{"target_acc": [0.0] * 40}],
                             stats.MEASURES["target_acc"])
        assert d["mean"] == 100 and 0 < d["p"] < 1e-6 and d["ci95"][0] < 100 < d["ci95"][1], d
    same = stats.item_difference([{"target_acc": [1.0, 0.0] * 20}], [{"target_acc": [1.0, 0.0] * 20}],
                            stats.MEASURES["target_acc"])
    assert same["mean"] == 0 and same["p"] == 1 and same["ci95"][0] < 0 < same["ci95"][1]


def test_robust_std_is_the_template_component_of_a_two_way_anova():
    """robust std = sqrt(max(0, (MS_template - MS_question x template) / n)) of the question x template
    table: by hand, and zero for a table whose templates differ only by question noise's chance."""
    g = torch.Generator().manual_seed(1)
    n, T = 40, 5
    x = (normal(g, n, T) + torch.linspace(-0.5, 0.5, T, dtype=F64) > 0.3).to(F64)
    col, row, grand = x.mean(0), x.mean(1, keepdim=True), x.mean()
    ms_template = n * ((col - grand) ** 2).sum() / (T - 1)
    ms_residual = ((x - row - col + grand) ** 2).sum() / ((n - 1) * (T - 1))
    want = math.sqrt(max(0.0, (ms_template - ms_residual).item() / n))
    got = stats.value([{"robust_correct": x.tolist()}], stats.MEASURES["robust_acc_std"])
    assert want > 0 and got["value"] == pytest.approx(want, rel=1e-12)
    assert got["ci95"][0] <= got["value"] <= got["ci95"][1]
    flat = [[float(t == q % T) for t in range(T)] for q in range(n)]  # each template right on 20%: no spread
    assert stats.value([{"robust_correct": flat}], stats.MEASURES["robust_acc_std"])["value"] == 0


def test_stratified_jackknife_over_domains():
    """The pooled general-text measure's jackknife is stratified by domain: item i deleted from its domain,
    the domain's other items reweighted n_h / (n_h - 1) (it keeps its share), and the variance the sum over
    domains of (n_h - 1) / n_h sum (leave-one-out - its domain mean)²; a fixed offset between domains adds
    nothing; for a mean it is the stratified sample's variance, sum_h W_h² s_h² / n_h."""
    g = torch.Generator().manual_seed(2)
    blocks = normal(g, 3, 12) * 0.1 + torch.tensor([[1.0], [3.0], [5.0]], dtype=F64)
    items = {**{f"general_nll@d{j}": blocks[j].tolist() for j in range(3)}, "general_nll": blocks.flatten().tolist()}
    measure = stats.MEASURES["general_ppl"]
    assert stats.item_strata(items, measure) == [0] * 4 + [1] * 4 + [2] * 4
    x = torch.tensor(stats.item_rows(items, measure), dtype=F64)
    strata = torch.tensor(stats.item_strata(items, measure))
    total, domains = x.sum(0), [slice(0, 4), slice(4, 8), slice(8, 12)]
    own = torch.cat([x[h].sum(0).expand(4, 2) for h in domains])
    kept = total - own + (own - x) * 4 / 3
    loo = kept[:, 0] / kept[:, 1]
    want = sum(3 / 4 * ((loo[h] - loo[h].mean()) ** 2).sum() for h in domains)
    e = stats.estimate(x[None], statistic="ratio", strata=strata)
    assert e["se"].item() ** 2 == pytest.approx(want.item(), rel=1e-10) and e["df"].item() == 12 - 3
    unstratified = stats.estimate(x[None], statistic="ratio")
    assert unstratified["se"].item() > 5 * e["se"].item()  # the domains' levels are not sampling noise
    # equal-size groups (the ratio is a mean of group means): the stratified sample's variance
    means = x[:, 0] / x[:, 1]
    assert e["se"].item() ** 2 == pytest.approx(sum((1 / 3) ** 2 * means[h].var() / 4 for h in domains).item(),
                                                rel=1e-10)


def test_variance_is_floored_at_each_component():
    """V = A + B - C, floored at max(A, B, C) with that component's df."""
    D = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)  # no seed spread: A = 0
    loo = torch.tensor([[[1.0, -1.0, 0.0, 0.0]] * 3], dtype=F64)  # identical over seeds: C = 0
    V, df = stats.variance(D, loo)
    B = 3 / 4 * 2.0
    assert V.item() == pytest.approx(B) and df.item() == 3
    loo = torch.tensor([[[1.0, -1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=F64)
    V, df = stats.variance(D, loo)  # B = 0: all interaction, C > 0 = V
    C = (3 / 4 * 2.0 * 2) / 6
    assert V.item() == pytest.approx(C) and df.item() == 2 * 3


def test_t_quantiles_and_p_values_match_tables():
    table = {(1, 0.975): 12.7062047, (2, 0.975): 4.3026527, (3, 0.975): 3.1824463, (4, 0.975): 2.7764451,
             (5, 0.975): 2.5705818, (10, 0.975): 2.2281389, (20, 0.975): 2.0859634, (30, 0.975): 2.0422725,
             (100, 0.975): 1.9839715, (math.inf, 0.975): 1.9599640, (1, 0.995): 63.6567412,
             (5, 0.995): 4.0321430, (10, 0.95): 1.8124611, (2, 0.9): 1.8856181,
             # real degrees of freedom, as Satterthwaite's (scipy.stats.t.ppf)
             (1.4, 0.975): 6.6570026, (2.5, 0.975): 3.5746548, (7.3, 0.975): 2.3450667, (41.7, 0.975): 2.0185119}
    for (df, p), want in table.items():
        assert stats.t_quantile(p, df).item() == pytest.approx(want, abs=1e-4 * max(1, want / 10)), (df, p)
        assert stats.t_two_sided_p(want, df).item() == pytest.approx(2 * (1 - p), abs=1e-6), (df, p)
    # the vectorised path (the simulation's) agrees with the scalar one (a report's)
    dfs = torch.tensor([df for df, _ in table if df < math.inf] * 2, dtype=F64)
    assert torch.allclose(stats.t_quantile(0.975, dfs), torch.stack([stats.t_quantile(0.975, d) for d in dfs]),
                          atol=1e-9)
    # quantile and p-value switch to the normal at the same df, on both paths
    z = NormalDist().inv_cdf(0.975)
    for df in (2 * stats._NORMAL_DF, torch.full((20,), 2 * stats._NORMAL_DF, dtype=F64)):
        assert torch.all(stats.t_quantile(0.975, df) == z)
        assert torch.allclose(stats.t_two_sided_p(torch.full((20,), z, dtype=F64) if torch.is_tensor(df) else z, df),
                              torch.tensor(0.05, dtype=F64), atol=1e-12)
    # closed forms: 1 df (Cauchy) and 2 df
    for t in (0.3, 1.0, 4.0, 30.0):
        assert stats.t_two_sided_p(t, 1).item() == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
        assert stats.t_two_sided_p(t, 2).item() == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    scipy = pytest.importorskip("scipy.stats")
    dfs = torch.linspace(1, 300, 997, dtype=F64)
    assert torch.allclose(stats.t_quantile(0.975, dfs), torch.from_numpy(scipy.t.ppf(0.975, dfs.numpy())), atol=1e-7)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(1 x 0.04, 0.06); NaN is no comparison
    assert stats.holm([0.01, 0.04, 0.03, 0.005, math.nan])[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(stats.holm([0.01, math.nan])[1]) and stats.holm([0.01, math.nan])[0] == 0.01
    # step-down: 0.01 survives 5 comparisons (0.05), 0.013 then needs 4 x 0.013 = 0.052 > 0.05: it and all after fail
    adjusted = stats.holm([0.01, 0.013, 0.02, 0.5, 0.9])
    assert [p <= 0.05 for p in adjusted] == [True, False, False, False, False]
    assert stats.holm([]) == [] and stats.holm([0.3]) == [0.3] and stats.holm([0.6, 0.7]) == [1.0, 1.0]


def test_two_level_variance_is_the_anova_combination_for_a_mean():
    """For a mean, V = A + B - C is (MS_seed + MS_item - MS_error) / (S n); with one seed, the jackknife
    variance of a mean, var / n, with n - 1 df; an interval always holds its own value."""
    g = torch.Generator().manual_seed(0)
    S, n = 4, 30
    d = 0.5 * normal(g, S, 1) + normal(g, 1, n) + 0.7 * normal(g, S, n)
    D, loo = stats.per_seed(d[..., None], "mean")
    V, df = stats.variance(D, loo)
    row, col, grand = d.mean(1, keepdim=True), d.mean(0, keepdim=True), d.mean()
    ms_seed = n * ((row - grand) ** 2).sum() / (S - 1)
    ms_item = S * ((col - grand) ** 2).sum() / (n - 1)
    ms_error = ((d - row - col + grand) ** 2).sum() / ((S - 1) * (n - 1))
    assert V.item() == pytest.approx(((ms_seed + ms_item - ms_error) / (S * n)).item(), rel=1e-12)
    assert (S - 1) <= df.item() <= S * n

    nll = stats.MEASURES["target_nll"]
    zero = [{"target_nll": [0.0] * n}]
    one = stats.item_difference([{"target_nll": d[0].tolist()}], zero, nll)
    half = stats.t_quantile(0.975, n - 1).item() * d[0].std().item() / math.sqrt(n)
    assert one["covers"] == "items only" and one["df"] == n - 1
    assert one["ci95"] == pytest.approx([d[0].mean().item() - half, d[0].mean().item() + half], rel=1e-10)
    several = stats.item_difference([{"target_nll": row} for row in d.tolist()], zero, nll)
    assert several["covers"] == "seeds and items" and several["ci95"][0] < several["mean"] < several["ci95"][1]
    # the interval is never narrower than the t interval over the seeds alone (S - 1 df)
    seeds_alone = stats.t_quantile(0.975, S - 1).item() * D.std().item() / math.sqrt(S)
    assert several["ci95"][1] - several["mean"] >= seeds_alone - 1e-12
    assert (several["p"] < 0.05) == several["excludes_zero"]


def test_block_groups_are_contiguous_and_keep_the_block_mean():
    blocks = [float(i) for i in range(12)]
    assert stats.block_groups(blocks) == [[3.0, 3.0], [12.0, 3.0], [21.0, 3.0], [30.0, 3.0]]
    assert [c for _, c in stats.block_groups([0.0] * 7)] == [4.0, 3.0]  # 7 // 3 groups, sizes within one
    assert [c for _, c in stats.block_groups([1.0, 2.0])] == [1.0, 1.0]
    items = {"general_nll@a": [1.0] * 6, "general_nll@b": [2.0] * 6, "general_nll": [1.0] * 6 + [2.0] * 6}
    value = stats.value([items], stats.MEASURES["general_ppl"])
    assert value["value"] == pytest.approx(math.exp(1.5)) and value["covers"] == "items only"
    assert len(stats.item_rows(items, stats.MEASURES["general_ppl"])) == 4  # 2 groups of 3 blocks per domain


def test_report_legend_warns_of_tiny_domains_and_few_seeds():
    from forgetless.compare import _few_seeds_text, _tiny_domains_text, holm_threshold

    text = _tiny_domains_text({"a": {"blocks": 12}, "b": {"blocks": 4}}, ["a", "b"])
    assert "b (4 blocks, 2 items)" in text and "df tiny" in text and "a (" not in text
    assert _tiny_domains_text({"a": {"blocks": 6}}, ["a"]) == ""
    assert 50 < holm_threshold(3, 200) < 70 and "few seeds: wide intervals, few stars" in _few_seeds_text(3, 200)
    assert _few_seeds_text(1, 200) == "" and _few_seeds_text(8, 200) == ""


def test_pairing_needs_the_same_seeds():
    from forgetless.compare import paired_differences

    one = {"items": {"target_nll": [0.1, 0.2, 0.3]}}
    results = {"base": one, "sft": {1: one, 2: one}, "kl": {1: one, 2: one, 3: one}}
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences(results, ["sft", "kl"], ["sft"])
    assert "vs_sft" in paired_differences({**results, "kl": {2: one, 1: one}}, ["kl"], ["sft"])["kl"]["target_nll"]


def rerender_script():
    spec = importlib.util.spec_from_file_location("rerender_report", ROOT / "scripts" / "rerender_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rerendered(folder: str) -> dict:
    module = rerender_script()
    return json.loads(json.dumps(module.rerender(json.loads((ROOT / folder / "report.json").read_text()))))


def only_runs(report: dict, names: list[str]) -> dict:
    """The stored report as if its comparison had run `names` only."""
    out = json.loads(json.dumps(report))
    out["methods"] = [n for n in report["methods"] if n in names]
    for part in ("run_settings", "runs", "per_seed", "curves", "paired"):
        out[part] = {n: v for n, v in report.get(part, {}).items() if n in names}
    out["results"] = {n: v for n, v in report["results"].items() if n in names or n == "base"}
    return out


def test_two_reports_joined_are_the_report_of_all_their_runs(tmp_path, capsys):
    """scripts/rerender_report.py --add: a comparison split in two (the reference in one, a method in the
    other) and joined again renders what the whole did, figure for figure; runs that would not pair (another
    base evaluation, other seeds, a clashing name) are refused, naming what differs."""
    module = rerender_script()
    stored = json.loads((ROOT / "docs/frontier/default/chosen-seeds/report.json").read_text())
    whole = only_runs(stored, ["sft", "ewc-0.03", "replay-kl-3"])
    # the shared config as compare stores it now (the stored report predates it)
    config = ForgetlessConfig()
    whole["training"], whole["evaluation"] = shared_training(config), config.to_dict()["evaluation"]
    whole["inputs"] = {"forgetless": "0.2.0", "model_files": "f" * 64, "dtype": "float32", "device": "cpu",
                       "train_data": {"builtin:arithmetic/train.jsonl": "a" * 64},
                       "evaluation_data": {"builtin:arithmetic/test.jsonl": "b" * 64}}
    first, second = only_runs(whole, ["sft", "ewc-0.03"]), only_runs(whole, ["replay-kl-3"])
    second["settings"]["runs_at_a_time"] = 1  # how many trained side by side may differ
    second["paired_with"] = []  # no reference among its own runs: the first's pair the added runs too
    expected = module.rerender(json.loads(json.dumps(whole)))
    got = module.rerender(module.joined(first, second))
    assert got["methods"] == ["sft", "ewc-0.03", "replay-kl-3"]
    assert got["paired_with"] == whole["paired_with"] == ["sft"]
    for part in ("results", "paired", "comparisons", "per_seed", "run_settings", "runs", "curves", "settings",
                 "training", "evaluation"):
        assert got[part] == expected[part], part
    assert got["paired"]["replay-kl-3"]["target_acc"]["vs_sft"]
    assert "replay-kl-3" not in first["methods"]  # the inputs are left as they were

    other_lr = json.loads(json.dumps(second))
    other_lr["training"]["train"]["learning_rate"] *= 2
    with pytest.raises(SystemExit, match=r"training\.train\.learning_rate differs"):
        module.joined(first, other_lr)
    other_extractor = json.loads(json.dumps(second))
    other_extractor["evaluation"]["extractor"] = "last_line"
    with pytest.raises(SystemExit, match=r"evaluation\.extractor differs"):
        module.joined(first, other_extractor)
    other_data = json.loads(json.dumps(second))
    other_data["inputs"]["train_data"]["builtin:arithmetic/train.jsonl"] = "c" * 64  # the file edited between
    with pytest.raises(SystemExit, match=r"inputs\.train_data differs: the training data's content"):
        module.joined(first, other_data)
    shared_contexts = json.loads(json.dumps(second))  # multiple choice scored each context once (0.3.0 on)
    shared_contexts["inputs"]["mc_contexts"] = "shared"
    with pytest.raises(SystemExit, match=r"inputs\.mc_contexts differs: how multiple choice was scored"):
        module.joined(first, shared_contexts)
    newer = json.loads(json.dumps(second))
    newer["inputs"]["forgetless"] = "0.3.0"
    assert module.joined(first, newer)["methods"] == got["methods"]
    assert "written by forgetless 0.3.0, the first by 0.2.0" in capsys.readouterr().err
    # an option one report predates counts at its default: joined when the other has the default, not otherwise
    predates = json.loads(json.dumps(second))
    del predates["training"]["train"]["loss_chunk"]
    assert module.joined(first, predates)["methods"] == got["methods"]
    chunked = json.loads(json.dumps(first))
    chunked["training"]["train"]["loss_chunk"] = 64
    with pytest.raises(SystemExit, match=r"training\.train\.loss_chunk differs \(0 vs 64\)"):
        module.joined(chunked, predates)
    older = json.loads(json.dumps(second))
    del older["training"], older["evaluation"], older["inputs"]
    assert module.joined(first, older)["methods"] == got["methods"]
    assert "predate(s) the stored shared config: the learning rate" in capsys.readouterr().err

    # a reference the added report names is the joined report's too: as if one comparison had both
    both_refs = json.loads(json.dumps(whole))
    both_refs["paired_with"] = ["sft", "replay-kl-3"]
    second_refs = json.loads(json.dumps(second))
    second_refs["paired_with"] = ["sft", "replay-kl-3"]
    got_refs = module.rerender(module.joined(first, second_refs))
    expected_refs = module.rerender(both_refs)
    assert got_refs["paired_with"] == ["sft", "replay-kl-3"]
    for part in ("paired", "comparisons"):
        assert got_refs[part] == expected_refs[part], part
    assert "vs_replay-kl-3" in got_refs["paired"]["ewc-0.03"]["general_drift_kl"]
    assert got_refs["comparisons"]["family"] > expected["comparisons"]["family"]

    other_base = json.loads(json.dumps(second))
    other_base["results"]["base"]["items"]["general_nll"][3] += 0.01
    with pytest.raises(SystemExit, match=r"results\.base\.items\.general_nll \(another suite"):
        module.joined(first, other_base)
    other_seeds = json.loads(json.dumps(second))
    other_seeds["seeds"] = [42, 43]
    with pytest.raises(SystemExit, match="other seeds"):
        module.joined(first, other_seeds)
    with pytest.raises(SystemExit, match="run names already in the first report: ewc-0.03"):
        module.joined(first, only_runs(whole, ["ewc-0.03"]))
    longer = json.loads(json.dumps(second))
    longer["settings"]["max_steps"] = 320
    with pytest.raises(SystemExit, match="settings.max_steps differs"):
        module.joined(first, longer)

    for name, part in (("first", first), ("second", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(part))
    assert module.main([str(tmp_path / "first"), str(tmp_path / "out"), "--add", str(tmp_path / "second")]) == 0
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["comparisons"] == expected["comparisons"]
    assert "replay-kl-3" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(SystemExit, match=r"nowhere/report\.json: no such file \(give the output folder"):
        module.main([str(tmp_path / "first"), "--add", str(tmp_path / "nowhere")])


def test_comparisons_of_one_setup_share_their_training_options():
    """What a joined report requires equal is equal for two comparisons of one setup that differ only in
    their output folder, runs, seeds and logging, and differs with the learning rate or LoRA rank."""
    from forgetless.config import load_config

    def shared(*overrides: str) -> dict:
        return shared_training(load_config(None, list(overrides)))

    first = shared("output_dir=runs/a", "compare.methods=[sft, ewc]", "train.seed=1")
    assert first == shared("output_dir=runs/b", "compare.methods=[lfu-fast]", "compare.seeds=[42, 43]",
                           "train.progress_bar=false", "train.logging_steps=1", "train.save_steps=7",
                           "model.name_or_path=/somewhere/else", "compare.runs={x: {method: kl}}")
    assert first != shared("train.learning_rate=0.01")
    assert first != shared("model.lora.r=32")


@pytest.mark.parametrize("folder", ["docs/evidence", "docs/default-report/main-job", "docs/frontier/default/chosen",
                                    "docs/frontier/default/chosen-seeds", "docs/frontier/default/chosen-seeds-5"])
def test_stored_reports_rerendered_are_consistent(folder):
    """Every measure of the stored report, re-rendered from its items: each value lies in its own interval;
    each paired difference is the difference of the two values it pairs (perplexity % through the mean
    NLL: 100 (ppl_run / ppl_ref - 1)) and lies in its interval; one Holm family over every shown cell,
    a star only where Holm keeps it; an entry never shown carries no significance mark."""
    from forgetless.compare import render_markdown, shown_differences

    report = rerendered(folder)
    res, one_seed = report["results"], len(report["seeds"]) == 1
    checked = 0
    for name, r in res.items():
        for key in stats.MEASURES:
            entry = r.get(key)
            if entry is None or not math.isfinite(entry["value"]) or "ci95" not in entry:
                continue
            lo, hi = entry["ci95"]
            assert lo <= entry["value"] <= hi, (folder, name, key, entry)
            assert lo < hi or not stats.MEASURES[key].binary, (folder, name, key, entry)  # 0/1: never [v, v]
            assert entry["covers"] == ("items only" if one_seed or name == "base" else "seeds and items")
            checked += 1
    assert checked >= 9 * len(res)

    def value_of(name: str, measure: str) -> float:
        if "@" in measure:
            kind, domain = measure.split("@")
            return res[name]["general_by_domain"][domain]["ppl" if kind == "general_ppl" else "drift_kl"]
        return res[name][measure]["value"]

    pairs = 0
    shown = {id(e) for e in sum(shown_differences(report), [])}
    for name, by_measure in report["paired"].items():
        for measure, entries in by_measure.items():
            for vs, e in entries.items():
                ref = vs.removeprefix("vs_")
                run, other = value_of(name, measure), value_of(ref, measure)
                want = (100 * (run / other - 1) if e["unit"] == "percent"
                        else 100 * (run - other) if e["unit"] == "points" else run - other)
                assert e["mean"] == pytest.approx(want, rel=1e-9, abs=1e-9), (folder, name, measure, vs)
                assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]
                if id(e) in shown:
                    assert (e["p"] < 0.05) == e["excludes_zero"], (folder, name, measure, vs, e)
                    assert not e["holm"] or e["excludes_zero"]  # Holm only removes stars
                else:
                    assert "excludes_zero" not in e and "holm" not in e
                pairs += 1
    assert pairs > 20
    main, by_domain = shown_differences(report)
    family = len(main) + len(by_domain)
    assert report["comparisons"] == {"family": family, "paired": len(main), "by_domain": len(by_domain)}
    table = render_markdown(report)
    assert f"* = survives Holm correction over all {family} comparisons starred in this report" in table
    assert "same Holm family" in table
    assert "robust std: spread of accuracy over prompt templates beyond question noise" in table
    assert table.count("] * |") == sum(e["holm"] for e in main + by_domain) > 0
    if one_seed:
        assert "over items only: one seed, so it does not cover training randomness" in table
    else:
        assert "few seeds: wide intervals, few stars" in table


@pytest.mark.parametrize("seeds", [3, 5])
def test_p_values_hold_at_holm_thresholds(seeds):
    """Holm compares the smallest p-values with alpha / (number of comparisons): a p-value must not be too
    small in its far tail. Under a true null with seeds dominating, P(p <= 0.003) stays near 0.003 (the
    p-value of the two-level t alone, with its Satterthwaite df, gives 2.8x that with 3 seeds, 18x at 3e-4)."""
    g = torch.Generator().manual_seed(seeds)
    reps, n, alpha = 30_000, 100, 0.003
    x = 0.5 * normal(g, reps, seeds, 1) + normal(g, reps, 1, n) + normal(g, reps, seeds, n)
    p = stats.estimate(x[..., None], None, "mean")["p"]
    rate = (p <= alpha).double().mean().item()
    assert rate <= 1.5 * alpha, f"{seeds} seeds: P(p <= {alpha}) = {rate:.4f}"
    assert (p <= 0.05).double().mean().item() == pytest.approx(0.05, abs=0.012)


def robust_std_value(g, S: int, su: float, tau: float, n: int = 100, T: int = 5):
    """One model's robust std over its seeds (robustness_std's run alone): not a test case (with 3 seeds
    and items dominating it is conservative, 0.99+), in the printed table only."""
    u = su * normal(g, R, S, 1, T)
    x = M_X + u + 0.4 * normal(g, R, 1, n, 1) + tau * math.sqrt(n / 2) * (normal(g, R, 1, n, T) + normal(g, R, S, n, T))
    e = report_value("robust_acc_std", x)
    target = (M_X + u[:, 0, 0]).std(-1) if S == 1 else (M_X + su * normal(g, 200_000, T)).std(-1).mean()
    return e["lo"], e["hi"], target


if __name__ == "__main__":  # the coverage table (stats.py's docstring quotes it)
    torch.set_num_threads(1)
    CASES.update({f"robust std value, {regime}": (robust_std_value, args)
                  for regime, args in REGIMES["robustness std"].items()})
    for case in CASES:
        counts = [1, 3] if case.startswith(("0/1", "robust std,")) else [1, 3, 5]
        print(f"{case:55s} " + "  ".join(f"{s} seeds {coverage(case, s):.3f}" for s in counts), flush=True)


def test_subset_items_are_paired_by_identity_not_position():
    """instr_nll scores only the base answers that ended; two processes that regenerated them may keep other
    subsets. The paired difference then uses the instructions both scored, each against itself."""
    measure = stats.MEASURES["instr_nll"]
    run = {"instr_nll": [1.0, 2.0, 4.0, 8.0], "instr_nll_ids": [0, 2, 3, 5]}
    ref = {"instr_nll": [0.5, 1.5, 3.0, 7.5], "instr_nll_ids": [0, 1, 3, 5]}
    got = stats.item_difference([run], [ref], measure)
    # by hand: ids 0, 3, 5 -> differences 1.0 - 0.5, 4.0 - 3.0, 8.0 - 7.5
    assert got["mean"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert got["n"] == 3
    by_position = stats.item_difference([{"instr_nll": run["instr_nll"]}], [{"instr_nll": ref["instr_nll"]}], measure)
    assert by_position["mean"] == pytest.approx((0.5 + 0.5 + 1.0 + 0.5) / 4)  # no ids: as before, by position
    same = stats.item_difference([run], [dict(run)], measure)
    assert same["mean"] == pytest.approx(0.0) and same["n"] == 4


def test_seeds_added_from_run_folders_are_the_report_of_all_seeds(tmp_path, capsys):
    """scripts/rerender_report.py --add-seeds: a comparison's last seed, given back as the run folders another
    compare stored (its base evaluated on another device: items within 1e-4), joins the first seeds' report and
    renders what all seeds did, figure for figure; a base, a run or a config that would not pair is refused."""
    import yaml

    module = rerender_script()
    stored = json.loads((ROOT / "docs/frontier/default/chosen-seeds/report.json").read_text())
    names = ["sft", "ewc-0.03", "replay-kl-3"]
    whole = only_runs(stored, names)
    whole.pop("notes", None)
    *kept, last = [str(seed) for seed in whole["seeds"]]
    whole["seeds"] = [int(seed) for seed in [*kept, last]]
    first = json.loads(json.dumps(whole))
    first["seeds"] = [int(seed) for seed in kept]
    for name in names:
        first["per_seed"][name] = {seed: v for seed, v in first["per_seed"][name].items() if seed in kept}
        whole["per_seed"][name] = {seed: whole["per_seed"][name][seed] for seed in [*kept, last]}
    config = yaml.safe_load((ROOT / "docs/frontier/default/chosen-seeds/config.yaml").read_text())
    del config["compare"]
    suite = {"evaluation": {"max_new_tokens": 12}, "data": {}, "model": {},
             "inputs": {"dtype": "float32", "device": "cuda", "data": {"test.jsonl": "a" * 64}}}

    def write_runs(folder: Path, base_shift: float = 2e-5) -> None:
        base = json.loads(json.dumps(whole["results"]["base"]))
        base["items"]["general_nll"] = [v + base_shift for v in base["items"]["general_nll"]]
        (folder).mkdir(parents=True)
        (folder / "base_eval.json").write_text(json.dumps({"key": suite, "results": base}))
        for name in names:
            run = folder / name / f"seed-{last}"
            run.mkdir(parents=True)
            summary = {"global_steps": 160, "step_time_s": 0.5}
            (run / "train_summary.json").write_text(json.dumps(summary))
            (run / "compare_eval.json").write_text(json.dumps(
                {"key": {**suite, "run": summary}, "results": whole["per_seed"][name][last]}))
            settings = whole["run_settings"][name]
            (run / "config.yaml").write_text(yaml.safe_dump(
                {**config, "regularizers": settings["regularizers"], "replay": settings["replay"]}))
        # a run compare set aside (another config's, finished): never read
        aside = folder / "sft" / f"seed-{last}.replaced-1"
        aside.mkdir()
        (aside / "compare_eval.json").write_text("{}")

    write_runs(tmp_path / "runs")
    got = module.rerender(module.joined_seeds(first, [tmp_path / "runs"]))
    expected = module.rerender(json.loads(json.dumps(whole)))
    assert got["seeds"] == whole["seeds"]
    for part in ("results", "paired", "comparisons", "per_seed", "runs"):
        assert got[part] == expected[part], part
    note = " ".join(got["notes"])
    assert f"Seeds {last} joined to seeds {', '.join(kept)}" in note and "3 runs on cuda (float32)" in note
    assert "2e-05" in note and "predates the stored shared config" in note
    assert f"Seeds {last} joined" in module.render_markdown(got)
    assert "notes" not in first  # the input is left as it was

    def refused(match: str, folder: Path) -> None:
        with pytest.raises(SystemExit, match=match):
            module.joined_seeds(first, [folder])

    write_runs(tmp_path / "far", base_shift=1e-3)  # another model or suite, not another device's rounding
    refused(r"base's items\.general_nll differ by 0\.001 > 0\.0001", tmp_path / "far")
    write_runs(tmp_path / "flip")
    flipped = json.loads((tmp_path / "flip" / "base_eval.json").read_text())
    flipped["results"]["items"]["target_acc"][0] = 1 - flipped["results"]["items"]["target_acc"][0]
    (tmp_path / "flip" / "base_eval.json").write_text(json.dumps(flipped))
    refused(r"base's items\.target_acc differ \(", tmp_path / "flip")
    write_runs(tmp_path / "missing")
    (tmp_path / "missing" / "ewc-0.03" / f"seed-{last}" / "compare_eval.json").unlink()  # stopped before its evaluation
    refused(rf"runs missing for the added seeds: ewc-0\.03@{last}", tmp_path / "missing")
    write_runs(tmp_path / "other")
    path = tmp_path / "other" / "ewc-0.03" / f"seed-{last}" / "config.yaml"
    changed = yaml.safe_load(path.read_text())
    changed["regularizers"][0]["ewc"]["coef"] *= 10
    path.write_text(yaml.safe_dump(changed))
    refused(r"ewc-0\.03's regularizers or replay differ", tmp_path / "other")
    # a first report from before a regularizer option existed (kl.cache here): its runs, which hold it at its
    # default, join; a run that sets it to something else does not
    older = json.loads(json.dumps(first))
    assert older["run_settings"]["replay-kl-3"]["regularizers"][0]["kl"].pop("cache") == "none"
    assert module.joined_seeds(older, [tmp_path / "runs"])["seeds"] == whole["seeds"]
    write_runs(tmp_path / "cached")
    path = tmp_path / "cached" / "replay-kl-3" / f"seed-{last}" / "config.yaml"
    changed = yaml.safe_load(path.read_text())
    changed["regularizers"][0]["kl"]["cache"] = "topk"
    path.write_text(yaml.safe_dump(changed))
    with pytest.raises(SystemExit, match=r"replay-kl-3's regularizers or replay differ"):
        module.joined_seeds(older, [tmp_path / "cached"])
    write_runs(tmp_path / "stale")  # an evaluation kept from an earlier suite, or of an earlier training
    path = tmp_path / "stale" / "ewc-0.03" / f"seed-{last}" / "compare_eval.json"
    stale = json.loads(path.read_text())
    stale["key"]["evaluation"]["max_new_tokens"] = 16
    path.write_text(json.dumps(stale))
    refused(r"compare_eval\.json: evaluated with another suite", tmp_path / "stale")
    write_runs(tmp_path / "retrained")
    (tmp_path / "retrained" / "sft" / f"seed-{last}" / "train_summary.json").write_text(json.dumps({"global_steps": 80}))
    refused(r"the evaluation of another training than the run there", tmp_path / "retrained")
    write_runs(tmp_path / "torn")  # a file cut short (a machine lost while copying): said, not a traceback
    (tmp_path / "torn" / "sft" / f"seed-{last}" / "compare_eval.json").write_text("{")
    refused(r"compare_eval\.json: not valid JSON", tmp_path / "torn")
    write_runs(tmp_path / "longer")
    for name in names:
        path = tmp_path / "longer" / name / f"seed-{last}" / "config.yaml"
        path.write_text(path.read_text().replace("max_steps: 160", "max_steps: 320"))
    refused(r"settings\.max_steps differs \(320 vs 160\)", tmp_path / "longer")
    with pytest.raises(SystemExit, match=f"seed {last} is already in the first report"):
        module.joined_seeds(whole, [tmp_path / "runs"])
    # a first report whose multiple choice ran each context once, seeds scored pair by pair (an older forgetless)
    shared_first = json.loads(json.dumps(first))
    shared_first["inputs"] = {"dtype": "float32", "mc_contexts": "shared"}
    with pytest.raises(SystemExit, match="scored multiple choice pair by pair, the first report each context once"):
        module.joined_seeds(shared_first, [tmp_path / "runs"])

    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "report.json").write_text(json.dumps(first))
    assert module.main([str(tmp_path / "first"), str(tmp_path / "out"), "--add-seeds", str(tmp_path / "runs")]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["comparisons"] == expected["comparisons"]
