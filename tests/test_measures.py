"""One table of measures (forgetless.stats.MEASURES): the report's results table, paired tables, Holm family
and plots are drawn from it, so a measure added there (and computed by evaluate) is shown everywhere."""

import json
from pathlib import Path

import matplotlib.image
import pytest

from forgetless import stats
from forgetless.compare import (_diff, _fmt, mark_comparisons, paired_differences, plot, render_markdown,
                                shown_differences, summarise_results)
from forgetless.evaluate import measure

TOY = stats.Measure("toy_items", "mean", "points", 0.0, 1.0, key="toy_score", header="toy score",
                    label="toy score", digits=2, change=True, diff="Δ toy", vs=("base", "sft"))


def evaluation(shift: float) -> dict:
    """What evaluate would record for a model: target accuracy and the toy measure, from their items."""
    items = {"target_acc": [float((i + int(10 * shift)) % 3 == 0) for i in range(30)],
             "toy_items": [min(1.0, 0.01 * i + shift) for i in range(30)]}
    results = {"target_acc": measure(items, "target_acc", 30)}
    if "toy_score" in stats.MEASURES:
        results["toy_score"] = measure(items, "toy_score", 30)
    return {**results, "items": items}


def fake_report() -> dict:
    """A comparison of sft and lfu (one seed) with the base, each paired with the base, sft and lfu."""
    methods, paired_with = ["sft", "lfu"], ["sft", "lfu"]
    results = {"base": evaluation(0.0), "sft": {1: evaluation(0.2)}, "lfu": {1: evaluation(0.1)}}
    report = {
        "base_model": "tiny", "methods": methods, "seeds": [1], "paired_with": paired_with,
        "runs": {name: {"global_steps": 3, "step_time_s": 0.1, "peak_mem_bytes": 2**30} for name in methods},
        "results": {"base": summarise_results({1: results["base"]}),
                    **{name: summarise_results(results[name]) for name in methods}},
        "paired": paired_differences(results, methods, paired_with),
        "settings": {"seed": 1, "train_data": "train.jsonl", "finetune": "lora", "batch_size": 4},
    }
    return mark_comparisons(report)


def measures_plot_width(report: dict, folder: Path) -> int:
    folder.mkdir()
    plot(report, folder)
    return matplotlib.image.imread(folder / "measures.png").shape[1]


def test_a_measure_added_to_the_table_is_shown_everywhere(monkeypatch, tmp_path):
    with monkeypatch.context() as patch:
        patch.setitem(stats.MEASURES, "toy_score", TOY)
        report = fake_report()
        md = render_markdown(report)
        res, paired = report["results"], report["paired"]

        # the results table: its column (value [interval], 2 decimals) and its change against the base
        assert "| clean end | toy score | Δ toy (points) | step s | peak mem GiB |" in md
        change = 100 * (res["lfu"]["toy_score"]["value"] - res["base"]["toy_score"]["value"])
        assert f"| {_fmt(res['lfu']['toy_score'], 2)} | {change:+.1f} | 0.10 | 1.00 |" in md
        # its paired differences, against the base and sft in the main table, and against lfu in its own
        assert {"vs_base", "vs_sft"} <= set(paired["lfu"]["toy_score"]) and "vs_lfu" in paired["sft"]["toy_score"]
        # (the measures paired with sft lead the main table: the toy joins them, before the base-only ones)
        assert "| Δ robust std vs sft | Δ toy vs base | Δ toy vs sft | Δ MMLU vs base |" in md
        assert (f" | {_diff(paired['lfu']['toy_score']['vs_base'])} | {_diff(paired['lfu']['toy_score']['vs_sft'])}"
                in md)
        assert "| Δ robust std vs lfu | Δ toy vs lfu |" in md
        assert f" | {_diff(paired['sft']['toy_score']['vs_lfu'])} |\n" in md
        # in the one Holm family, with its mark
        main, _ = shown_differences(report)
        toy_entries = [paired["lfu"]["toy_score"]["vs_base"], paired["lfu"]["toy_score"]["vs_sft"],
                       paired["sft"]["toy_score"]["vs_base"], paired["sft"]["toy_score"]["vs_lfu"]]
        assert all(any(e is m for m in main) and "p_holm" in e for e in toy_entries)
        assert "vs_sft" not in paired["sft"]["toy_score"]  # a run is never paired with itself
        # and its own bar chart: one more panel of 3 inches at 110 dpi
        with_toy = measures_plot_width(report, tmp_path / "with")

    assert "toy_score" not in stats.MEASURES
    report = fake_report()
    md = render_markdown(report)
    assert "toy" not in md and "toy_score" not in report["paired"]["lfu"]
    assert with_toy - measures_plot_width(report, tmp_path / "without") == 330
    with pytest.raises(KeyError, match="not declared in forgetless.stats.MEASURES"):
        measure({"toy_items": [0.5, 0.5]}, "toy_score", 2)


@pytest.mark.parametrize("folder", ["docs/evidence", "docs/default-report/main-job", "docs/frontier/default/chosen",
                                    "docs/frontier/default/chosen-seeds"])
def test_stored_reports_render_as_stored(folder):
    """The table reproduces the report's layout exactly: a stored report renders to its stored report.md."""
    root = Path(__file__).resolve().parents[1] / folder
    assert render_markdown(json.loads((root / "report.json").read_text())) == (root / "report.md").read_text()


def test_trade_off_labels_of_close_methods_do_not_overlap():
    """Methods whose figures nearly coincide (the chosen points' replay-kl, kl+replay-kl and EWC did) get
    labels that overlap neither each other nor another method's point once spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from forgetless.compare import spread_labels

    points = [(0.0, 0.0), (20.4, -1.0), (22.0, -0.8), (21.7, -0.25), (21.0, -0.6), (20.8, 4.8), (22.0, 3.3)]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    labels = []
    for i, (x, y) in enumerate(points):
        ax.scatter([x], [y], s=60)
        labels.append(ax.annotate(f"method-{i}-with-a-long-name", (x, y), textcoords="offset points",
                                  xytext=(6, 4), arrowprops=dict(arrowstyle="-")))
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()

    def boxes():
        for label in labels:
            label.update_positions(renderer)
        return [Text.get_window_extent(label, renderer) for label in labels]

    def clashes(found):
        dots = [ax.transData.transform(p) for p in points]
        pairs = [(i, j) for i in range(len(found)) for j in range(i + 1, len(found)) if found[i].overlaps(found[j])]
        on_dots = [(i, k) for i, b in enumerate(found) for k, (x, y) in enumerate(dots)
                   if k != i and b.x0 < x + 7 and x - 7 < b.x1 and b.y0 < y + 7 and y - 7 < b.y1]
        return pairs, on_dots

    assert clashes(boxes()) != ([], [])  # as placed first, they clash: the test can fail
    spread_labels(fig, labels, points)
    assert clashes(boxes()) == ([], [])
    # every label stays near its point: moved vertically only, by less than the figure's height
    assert all(label.xyann[0] == 6 and abs(label.xyann[1]) < 4.5 * 72 for label in labels)
    plt.close(fig)


def test_a_missing_measure_leaves_the_other_labels_on_the_trade_off_plot():
    """A point with a NaN coordinate (a measure a method lacks) is neither drawn nor an obstacle: the
    other labels keep finite places (a NaN once spread to every label, and matplotlib drew none)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forgetless.compare import spread_labels

    points = [(0.0, 0.0), (1.0, 1.0), (float("nan"), 2.0), (2.0, 3.0)]
    fig, ax = plt.subplots()
    labels = [ax.annotate(f"m{i}", p, textcoords="offset points", xytext=(6, 4)) for i, p in enumerate(points)
              if all(map(math.isfinite, p))]
    fig.tight_layout()
    spread_labels(fig, labels, points)
    assert all(math.isfinite(v) for label in labels for v in label.xyann)
    plt.close(fig)


def test_every_method_of_a_long_report_has_its_own_look():
    """Past matplotlib's ten colours a method gets the same colour with another marker and line style, so the
    13 methods of the three-seed report are told apart; reports of up to ten methods look as they did."""
    from forgetless.compare import method_style

    styles = [method_style(i) for i in range(20)]
    assert len(set(styles)) == 20
    assert styles[:10] == [(f"C{i}", "o", "-") for i in range(10)]
    assert styles[12] == ("C2", "^", "--")


def test_a_paired_difference_without_an_interval_says_so_instead_of_printing_nan():
    """One scored item (a smoke run's single instruction answer that ended) has no interval: the cell says so."""
    nan = float("nan")
    one = {"mean": 0.09, "ci95": [nan, nan], "unit": "nats", "p": nan, "n": 1, "p_holm": nan, "holm": False}
    assert _diff(one) == "+0.0900 (no interval: n=1)"
    two = {**one, "ci95": [0.01, 0.17], "holm": True}
    assert _diff(two) == "+0.0900 [+0.0100, +0.1700] *"
