"""forgetless.stats: every kind of interval the report prints covers what it claims on draws from known
two-level models (seeds crossed with items); Student's t against table values; Holm by hand; the stored
reports re-rendered are consistent (each value in its interval, each paired difference the difference of the
two values it pairs, a star only where Holm keeps it)."""

import importlib.util
import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from forgetless import stats

ROOT = Path(__file__).resolve().parent.parent
R = 2000  # replicates per case: a coverage near 95% is measured to about ± 0.005 (one standard error)
F64 = torch.float64


def normal(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def ar1(g: torch.Generator, shape: tuple, rho: float) -> torch.Tensor:
    """Unit-variance AR(1) along the last axis: consecutive text blocks that are not independent."""
    z = normal(g, *shape)
    out = z.clone()
    for j in range(1, shape[-1]):
        out[..., j] = rho * out[..., j - 1] + math.sqrt(1 - rho**2) * z[..., j]
    return out


# Each model draws R replicate experiments of S seeds and returns (interval lo, hi, target), all [R].
# With several seeds the target is the expectation over seeds and items; with ONE seed it is that seed's own
# conditional expectation (its seed effects held fixed, items drawn afresh): a one-seed interval covers item
# sampling only, and says so ("covers": "items only").

REGIMES = {  # (seed sd, item sd) of each kind's model
    "mean difference": {"seeds dominate": (0.5, 1.0), "items dominate": (0.02, 1.0)},
    "perplexity change": {"seeds dominate": (0.05, 0.02), "items dominate": (0.002, 0.05)},
    "robustness std": {"seeds dominate": (0.05, 0.01), "items dominate": (0.005, 0.045)},
    "single-model value": {"seeds dominate": (0.5, 1.0), "items dominate": (0.02, 1.0)},
}


def mean_difference(g, S: int, sa: float, sb: float, n: int = 100):
    """A run, d[s, i] = 0.3 + a_s + b_i + e_si, against the base (one seed serving every seed), which
    shares the item effects b_i and has its own item noise: the paired mean difference."""
    a, b = sa * normal(g, R, S, 1), sb * normal(g, R, 1, n)
    x = 0.3 + a + b + normal(g, R, S, n)
    y = 0.1 + b + 0.5 * normal(g, R, 1, n)
    e = stats.estimate(x[..., None], y[..., None], "mean", p_value=False)
    return e["lo"], e["hi"], 0.2 + (a[:, 0, 0] if S == 1 else 0.0)


def perplexity_change(g, S: int, sa: float, sc: float, texts: int = 4, blocks: int = 12, rho: float = 0.1):
    """Block NLLs of a run and of a compared run (seed s with seed s) on 4 texts of 12 consecutive blocks,
    block effects AR(1) along each text; items are contiguous groups of 3 blocks, shown as 100 expm1(Δ)."""
    shape = (R, S, texts, blocks)
    shared = 0.3 * ar1(g, (R, 1, texts, blocks), rho)  # both models find the same blocks hard
    ax, ay = sa * normal(g, R, S, 1, 1), sa * normal(g, R, S, 1, 1)
    x = 3.0 + ax + shared + sc * ar1(g, (R, 1, texts, blocks), rho) + sc * ar1(g, shape, rho)
    y = 2.95 + ay + shared + sc * ar1(g, shape, rho)

    def groups(v: torch.Tensor) -> torch.Tensor:  # as stats.block_groups: [sum, count] of 3 blocks
        sums = v.reshape(R, S, texts, blocks // 3, 3).sum(-1).reshape(R, S, -1)
        return torch.stack([sums, torch.full_like(sums, 3.0)], -1)

    e = stats.estimate(groups(x), groups(y), "ratio", p_value=False)
    delta = 0.05 + ((ax - ay)[:, 0, 0, 0] if S == 1 else torch.zeros(R, dtype=F64))
    return 100 * torch.expm1(e["lo"]), 100 * torch.expm1(e["hi"]), 100 * torch.expm1(delta)


def robustness_std(g, S: int, su: float, tau: float, n: int = 100):
    """Correct-ness x[s, q, t] = m_t + u_st + b_q + c_qt + e_sqt of a run and of a compared run (same
    questions q and templates t, each its own seeds): the difference of the std over templates of each
    template's accuracy. Per template, the item noise (c and e) of the mean over questions is N(0, tau²)."""
    T = 5
    m_x = torch.tensor([0.20, 0.24, 0.18, 0.22, 0.21], dtype=F64)
    m_y = torch.tensor([0.25, 0.20, 0.22, 0.27, 0.19], dtype=F64)
    u_x, u_y = su * normal(g, R, S, 1, T), su * normal(g, R, S, 1, T)
    b, c = 0.4 * normal(g, R, 1, n, 1), tau * math.sqrt(n / 2) * normal(g, R, 1, n, T)
    x = m_x + u_x + b + c + tau * math.sqrt(n / 2) * normal(g, R, S, n, T)
    y = m_y + u_y + b + c + tau * math.sqrt(n / 2) * normal(g, R, S, n, T)
    e = stats.estimate(x, y, "template_std", p_value=False)
    # E[std] of template means m + u + N(0, tau²) (b cancels in a std): given the seed effects with one seed,
    # over seeds too with several; by Monte Carlo
    if S == 1:
        def expected(m, u):
            return (m + u[:, 0] + tau * normal(g, R, 512, T)).std(-1).mean(-1)
        target = expected(m_x, u_x) - expected(m_y, u_y)
    else:
        def expected(m, u):
            return (m + su * normal(g, 200_000, T) + tau * normal(g, 200_000, T)).std(-1).mean()
        target = expected(m_x, None) - expected(m_y, None)
    return 100 * e["lo"], 100 * e["hi"], 100 * target


def single_value(g, S: int, sa: float, sb: float, n: int = 100):
    """One model's value over its seeds, x[s, i] = 0.7 + a_s + b_i + e_si (a difference against zero)."""
    a = sa * normal(g, R, S, 1)
    x = 0.7 + a + sb * normal(g, R, 1, n) + normal(g, R, S, n)
    e = stats.estimate(x[..., None], None, "mean", p_value=False)
    return e["lo"], e["hi"], 0.7 + (a[:, 0, 0] if S == 1 else 0.0)


MODELS = {"mean difference": mean_difference, "perplexity change": perplexity_change,
          "robustness std": robustness_std, "single-model value": single_value}


@pytest.mark.parametrize("seeds", [1, 3, 5])
@pytest.mark.parametrize("regime", ["seeds dominate", "items dominate"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_intervals_cover_what_they_claim(kind, regime, seeds):
    """Empirical coverage of the 95% interval over R replicate experiments lies in [0.93, 0.99]. With one
    seed the target is that seed's own conditional expectation: coverage over items only."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{regime}/{seeds}".encode()))
    lo, hi, target = MODELS[kind](g, seeds, *REGIMES[kind][regime])
    coverage = ((lo <= target) & (target <= hi)).double().mean().item()
    assert 0.93 <= coverage <= 0.99, f"{kind}, {regime}, {seeds} seeds: coverage {coverage:.3f}"


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

    one = stats.difference([d[0].tolist()], [[0.0] * n], "mean", "nats")
    half = stats.t_quantile(0.975, n - 1).item() * d[0].std().item() / math.sqrt(n)
    assert one["covers"] == "items only" and one["df"] == n - 1
    assert one["ci95"] == pytest.approx([d[0].mean().item() - half, d[0].mean().item() + half], rel=1e-10)
    several = stats.difference(d.tolist(), [[0.0] * n], "mean", "nats")
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


def rerendered(folder: str) -> dict:
    spec = importlib.util.spec_from_file_location("rerender_report", ROOT / "scripts" / "rerender_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return json.loads(json.dumps(module.rerender(json.loads((ROOT / folder / "report.json").read_text()))))


@pytest.mark.parametrize("folder", ["docs/evidence", "docs/default-report/main-job"])
def test_stored_reports_rerendered_are_consistent(folder):
    """Every measure of the stored report, re-rendered from its items: each value lies in its own interval;
    each paired difference is the difference of the two values it pairs (perplexity % through the mean
    NLL: 100 (ppl_run / ppl_ref - 1)) and lies in its interval; a star only where Holm keeps it."""
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
            assert entry["covers"] == ("items only" if one_seed or name == "base" else "seeds and items")
            checked += 1
    assert checked >= 9 * len(res)

    def value_of(name: str, measure: str) -> float:
        if "@" in measure:
            kind, domain = measure.split("@")
            return res[name]["general_by_domain"][domain]["ppl" if kind == "general_ppl" else "drift_kl"]
        return res[name][measure]["value"]

    pairs = 0
    for name, by_measure in report["paired"].items():
        for measure, entries in by_measure.items():
            for vs, e in entries.items():
                ref = vs.removeprefix("vs_")
                run, other = value_of(name, measure), value_of(ref, measure)
                want = (100 * (run / other - 1) if e["unit"] == "percent"
                        else 100 * (run - other) if e["unit"] == "points" else run - other)
                assert e["mean"] == pytest.approx(want, rel=1e-9, abs=1e-9), (folder, name, measure, vs)
                assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]
                assert (e["p"] < 0.05) == e["excludes_zero"], (folder, name, measure, vs, e)
                pairs += 1
    assert pairs > 20
    main, by_domain = shown_differences(report)
    assert report["comparisons"] == {"paired": len(main), "by_domain": len(by_domain)}
    for e in main + by_domain:
        assert not e["holm"] or e["excludes_zero"]  # Holm only removes stars
    table = render_markdown(report)
    assert f"* = survives Holm correction over {len(main)} comparisons (family-wise 5%)" in table
    assert table.count("] * |") == sum(e["holm"] for e in main + by_domain) > 0
    if one_seed:
        assert "over items only: one seed, so it does not cover training randomness" in table


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
