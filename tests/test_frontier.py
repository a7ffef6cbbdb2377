"""`forgetless frontier`: the choice rules and Pareto sets on made-up numbers, the validation split kept apart
from training and from what the evaluation reports, every registered grid valid, and a short run of the
command that writes frontier.json / frontier.png and, run again, trains nothing."""

import json

import pytest
import torch

from forgetless.errors import ConfigError
from forgetless.frontier import (choose, keep_earlier, matches_sft, pareto, sft_threshold, weakest_first,
                                 within_bound)
from forgetless.sections import FrontierConfig

from conftest import budget_args, write_jsonl

BASE_NLL = 2.0


def point(name, nll, drop, drift, value=None):
    return {"method": name, "value": value, "target_nll": nll, "target_gain": BASE_NLL - nll,
            "general_drop": drop, "drift_kl": drift}


# ---------------------------------------------------------------- (a) the rules on a hand-made frontier


def test_within_bound_picks_the_best_target_inside_the_bound_ties_to_less_forgetting_then_weakest():
    pts = [point("kl", 1.0, 0.05, 0.10, 0.01),   # best target, over the bound
           point("kl", 1.2, 0.008, 0.05, 0.1),   # inside, ties on target with the next ...
           point("kl", 1.2, 0.005, 0.04, 1.0),   # ... which forgets less: chosen
           point("kl", 1.5, 0.001, 0.01, 10.0)]  # inside, worse target
    assert within_bound(pts, 0.01, None) is pts[2]
    assert within_bound(pts, 0.005, None) is pts[2]  # the bound is inclusive: 0.005 <= 0.005
    assert within_bound(pts, 0.0049, None) is pts[3]
    assert within_bound(pts, None, None) is pts[0]  # no bound: the best target
    assert within_bound(pts, None, 0.02) is pts[3]  # drift alone
    assert within_bound(pts, 0.01, 0.045) is pts[2]  # both bounds at once
    assert within_bound(pts, 0.0001, None) is None  # nothing passes
    assert within_bound([], 0.01, None) is None
    twins = [point("a", 1.3, 0.002, 0.02, 1.0), point("a", 1.3, 0.002, 0.02, 2.0)]  # a full tie: the weakest
    assert within_bound(twins, 0.01, None) is twins[0]
    nan = [point("a", float("nan"), 0.0, 0.0, 1.0), point("a", 1.9, 0.0, 0.0, 2.0)]  # NaN never passes
    assert within_bound(nan, 0.01, None) is nan[1]


def test_matches_sft_picks_the_least_forgetting_within_the_tolerance_of_sfts_target():
    sft = point("sft", 1.0, 0.06, 0.12)  # gain 1.0: threshold 1.0 + 0.02 x 1.0
    assert sft_threshold(sft, 0.02) == pytest.approx(1.02)
    pts = [point("kl", 1.0, 0.05, 0.10, 0.01),
           point("kl", 1.02, 0.03, 0.20, 0.1),   # exactly at the threshold, forgets least on general text
           point("kl", 1.021, 0.001, 0.01, 1.0)]  # just above: not a match
    assert matches_sft(pts, sft, 0.02) is pts[1]
    assert matches_sft(pts, sft, 0.02, ("drift_kl", "general_drop")) is pts[0]  # least drift instead
    assert matches_sft(pts, sft, 0.05) is pts[2]  # a wider tolerance lets the strongest in
    assert matches_sft(pts[2:], sft, 0.0) is None  # nothing reaches SFT's target
    ties = [point("kl", 1.01, 0.03, 0.05, 0.1), point("kl", 1.0, 0.03, 0.05, 1.0), point("kl", 1.0, 0.03, 0.05, 2.0)]
    assert matches_sft(ties, sft, 0.02) is ties[1]  # equal forgetting: the lower NLL, then the weakest
    worse = point("sft", 2.5, 0.0, 0.0)  # SFT lost target (gain -0.5): |gain| sets the tolerance
    assert sft_threshold(worse, 0.1) == pytest.approx(2.55)


def test_pareto_sets_and_choices_over_every_method():
    sft = point("sft", 1.0, 0.06, 0.12)
    methods = {
        "sft": {"points": [sft]},
        "kl": {"points": [point("kl", 1.05, 0.02, 0.15, 0.1), point("kl", 1.4, 0.004, 0.02, 1.0)]},
        "l2sp": {"points": [point("l2sp", 1.05, 0.02, 0.09, 1.0),  # equal to kl 0.1 on general_drop: both kept
                            point("l2sp", 1.6, 0.01, 0.01, 10.0)]},  # dominated on general_drop, not on drift
    }
    every = [p for m in methods.values() for p in m["points"]]
    assert pareto(every, "general_drop") == [0, 1, 2, 3]
    assert pareto(every, "drift_kl") == [0, 2, 3, 4]  # kl 0.1 (0.15) loses to l2sp 1.0 (0.09) on drift
    f = FrontierConfig(max_general_drop=0.01, sft_tolerance=0.1)
    out = choose(methods, sft, f)
    assert out["pareto"]["general_drop"] == [["sft", None], ["kl", 0.1], ["kl", 1.0], ["l2sp", 1.0]]
    assert out["pareto"]["drift_kl"] == [["sft", None], ["kl", 1.0], ["l2sp", 1.0], ["l2sp", 10.0]]
    assert methods["kl"]["choices"]["within_bound"]["value"] == 1.0
    assert methods["l2sp"]["choices"]["within_bound"]["value"] == 10.0  # 0.01 <= 0.01
    assert methods["sft"]["choices"]["within_bound"] is None and methods["sft"]["choices"]["matches_sft"] is sft
    assert methods["kl"]["choices"]["matches_sft"]["value"] == 0.1  # 1.05 <= 1.1
    assert methods["l2sp"]["choices"]["matches_sft"]["value"] == 1.0
    assert out["overall"]["within_bound"]["method"] == "kl"  # 1.4 beats l2sp's 1.6
    assert methods["l2sp"]["points"][1]["pareto_drift_kl"] and not methods["l2sp"]["points"][1]["pareto_general_drop"]
    assert pareto([point("a", 1.0, 0.01, 0.01), point("a", 1.0, 0.01, 0.01)], "general_drop") == [0, 1]  # tie

    # frontier.md: one row per point, with its Pareto marks and the rules' choices
    from forgetless.frontier import render_markdown, sft_threshold
    for m in methods.values():
        for p in m["points"]:
            p["option"] = "coef" if p["value"] is not None else None
    report = {"validation": {"examples": 8, "blocks": 4, "base": {"target_nll": BASE_NLL, "general_ppl": 9.0}},
              "rules": {"max_general_drop": 0.01, "max_drift_kl": None, "sft_threshold": sft_threshold(sft, 0.1)},
              "methods": methods, "runs": {"trained_now": 5, "reused": 0}}
    rows = [line for line in render_markdown(report).splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| sft |  | 1.0000 | +1.0000 | +6.00% | 0.1200 | PP | S |",
                    "| kl | coef=0.1 | 1.0500 | +0.9500 | +2.00% | 0.1500 | P- | S |",
                    "| kl | coef=1 | 1.4000 | +0.6000 | +0.40% | 0.0200 | PP | B |",
                    "| l2sp | coef=1 | 1.0500 | +0.9500 | +2.00% | 0.0900 | PP | S |",
                    "| l2sp | coef=10 | 1.6000 | +0.4000 | +1.00% | 0.0100 | -P | B |"]


# ---------------------------------------------------------------- (d) every registered grid


def _report(points: dict[str, list[tuple]], base_ppl: float = 20.0) -> dict:
    return {"validation": {"examples": 16, "blocks": 4, "base": {"general_ppl": base_ppl, "target_nll": 2.0}},
            "methods": {m: {"points": [{"value": v, "run": f"f/{m}/{v}", "target_nll": t, "general_drop": g,
                                        "drift_kl": 0.01} for v, t, g in pts]} for m, pts in points.items()}}


def test_an_earlier_frontier_with_points_the_new_one_lacks_is_kept_aside_never_written_over(tmp_path):
    earlier = _report({"sft": [(None, 1.0, 0.05)], "ewc": [(0.1, 1.1, 0.02), (1.0, 1.3, 0.01)]})

    def write(report):
        (tmp_path / "frontier.json").write_text(json.dumps(report))
        (tmp_path / "frontier.png").write_bytes(b"png")

    assert keep_earlier(tmp_path, earlier) is None  # nothing there yet
    write(earlier)
    # the same points measured again (float noise) and one more: written over
    again = _report({"sft": [(None, 1.0 + 1e-7, 0.05)], "ewc": [(0.1, 1.1, 0.02), (1.0, 1.3, 0.01), (3.0, 1.5, 0.0)]})
    assert keep_earlier(tmp_path, again) is None and not list(tmp_path.glob("*.replaced-*"))
    # fewer points, or the same point measuring otherwise (another base, another run behind the folder): kept
    for n, later in enumerate([_report({"sft": [(None, 1.0, 0.05)], "ewc": [(0.1, 1.1, 0.02)]}),
                               _report({"sft": [(None, 1.0, 0.05)], "ewc": [(0.1, 1.2, 0.02), (1.0, 1.3, 0.01)]}),
                               _report({"sft": [(None, 1.0, 0.05)], "ewc": [(0.1, 1.1, 0.02), (1.0, 1.3, 0.01)]},
                                       base_ppl=21.0)], start=1):
        write(earlier)
        assert keep_earlier(tmp_path, later) == tmp_path / f"frontier.replaced-{n}.json"
        assert json.loads((tmp_path / f"frontier.replaced-{n}.json").read_text()) == earlier
        assert (tmp_path / f"frontier.replaced-{n}.png").read_bytes() == b"png"
        assert not (tmp_path / "frontier.json").exists()


def test_every_registered_strength_grid_is_in_its_range_and_weakest_first():
    from types import SimpleNamespace

    from forgetless.registry import strengths
    from forgetless.schema import out_of_range

    assert strengths()
    for name, strength in strengths().items():
        grid = list(strength.grid)
        assert grid, name
        assert out_of_range(SimpleNamespace(grid=grid), {"grid": strength.range}) == {}, name
        assert grid == weakest_first(strength, grid), (name, grid)  # distinct, and in the search's order
    assert weakest_first(strengths()["wise_ft"], [0.5, 1.0]) == [1.0, 0.5]  # alpha 1: the fine-tune, no mix


def test_frontier_settings_are_checked_naming_the_key():
    from forgetless.config import load_config

    for override, key in [("frontier.methods=[sft, nope]", "frontier.methods[1]"),
                          ("frontier.grids={sft: [1.0]}", "frontier.grids.sft: sft has no strength \\(none"),
                          ("frontier.grids={kl: [0.1, -1.0]}", "frontier.grids.kl[1]: kl.coef must be >= 0"),
                          ("frontier.grids={wise-ft: [1.5]}", "frontier.grids.wise-ft[0]: wise_ft.alpha must be in"),
                          ("frontier.grids={replay: [0.5]}", "frontier.grids.replay: 'replay' is not in frontier.methods"),
                          ("frontier.grids={kl: [0.1, 0.1]}", "frontier.grids.kl: give distinct values"),
                          ("frontier.methods=[]", "frontier.methods: give at least one"),
                          ("frontier.max_drift_kl=-0.1", "frontier.max_drift_kl: must be >= 0"),
                          ("frontier.knobs={kl: lfu.alpha}", "frontier.knobs.kl: kl's knobs are kl \\(its"),
                          ("frontier.knobs={replay: replay.weight}", "frontier.knobs.replay: 'replay' is not in"),
                          ("budget.knob=lfu.alpha", "budget.knob: lfu.alpha is a knob to tune"),
                          ("budget.knob=neftune", "budget.knob: neftune is a knob to tune"),
                          ("budget.knob=replay.weight && budget.max_drift_kl=0.1",
                           "budget.knob: replay.weight claims to hold the general-text NLL"),
                          ("frontier.methods=[sft, lfx] && frontier.knobs={lfx: kl}", "frontier.methods[1]: unknown method 'lfx'"),
                          ("frontier.methods=[lfu-fast] && frontier.knobs={lfu-fast: lfu.bogus} && frontier.grids={lfu-fast: [1.0]}",
                           "frontier.knobs.lfu-fast: lfu-fast's knobs are lfu, lfu.alpha"),
                          ("frontier.methods=[kl] && compare.runs={kl: {train: {learning_rate: 1.0e-4}}}",
                           "frontier.methods[0]: 'kl' is both a preset and a compare.runs entry"),
                          ("budget.knob=lfu", "budget.knob: lfu is a knob to tune"),
                          ("frontier.methods=[dft] && frontier.grids={dft: [1.0]}",
                           "frontier.grids.dft: dft has no strength \\(none of its methods registers one\\)")]:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, override.split(" && "))  # several overrides: joined by &&
    cfg = load_config(None, ["frontier.methods=[kl+replay, dft, wise-ft]", "frontier.grids={kl+replay: [0.1]}"])
    from forgetless.frontier import grid

    assert grid(cfg) == {"sft": (None, [None]), "kl+replay": ("kl", [0.1]), "dft": (None, [None]),
                         "wise-ft": ("wise_ft", [1.0, 0.75, 0.5, 0.25])}
    # a second knob of a preset's method, by frontier.knobs; its main one by either name
    cfg = load_config(None, ["frontier.methods=[lfu-fast, arr]", "frontier.knobs={lfu-fast: lfu.alpha, "
                             "arr: replay.weight}", "frontier.grids={lfu-fast: [0.3, 0.01]}"])
    assert grid(cfg) == {"sft": (None, [None]), "lfu-fast": ("lfu.alpha", [0.01, 0.3]),
                         "arr": ("replay.weight", [0.3, 1.0, 3.0])}
    cfg = load_config(None, ["frontier.methods=[lfu-fast]", "frontier.knobs={lfu-fast: lfu.lam}"])
    assert grid(cfg)["lfu-fast"] == ("lfu", [1.0, 5.0, 20.0])
    # a knob to tune (NEFTune's alpha, LfU's lam: no stronger-keeps-more claim) is mapped all the same when it
    # is the preset's only kind; a knob that claims to hold the model comes first
    assert grid(load_config(None, ["frontier.methods=[neftune]"]))["neftune"] == ("neftune", [1.0, 5.0, 15.0])
    assert grid(load_config(None, ["frontier.methods=[lfu-fast]"]))["lfu-fast"] == ("lfu", [1.0, 5.0, 20.0])
    assert grid(load_config(None, ["frontier.methods=[lfu-kl]", "compare.runs={lfu-kl: {regularizers: "
                                   "[{lfu: {}}, {kl: {coef: 0.1}}]}}"]))["lfu-kl"] == ("kl", [0.01, 0.1, 1.0, 10.0])
    # two knobs of one preset never share a run folder (a run trained for one would be overwritten by the other)
    from pathlib import Path

    from forgetless.frontier import point_config
    folders = {point_config(cfg, Path("r"), "kl+replay", knob, 0.1).output_dir
               for knob in ("kl", "replay", "replay.weight")}
    assert folders == {"r/frontier/kl+replay/0.1", "r/frontier/kl+replay/replay-0.1",
                       "r/frontier/kl+replay/replay.weight-0.1"}
    from forgetless.config import as_preset, with_strength
    (lfu,) = with_strength(as_preset(cfg, "lfu-fast"), "lfu.alpha", 0.03).regularizers
    assert (lfu.alpha, lfu.lam, lfu.every) == (0.03, 5.0, 4)  # only that option changes; the preset's others stay


def test_a_compare_run_is_a_frontier_method_with_its_own_corpus_and_settings(tmp_path, monkeypatch):
    """frontier.methods may name a compare.runs entry: its own replay corpus, options and settings (a preset
    would reset them), its knobs from its own entries; its chosen point keeps its other overrides."""
    from pathlib import Path

    from forgetless.config import load_config
    from forgetless.frontier import chosen_compare_config, grid, point_config

    corpus = tmp_path / "mine.txt"
    corpus.write_text("my own general text, a paragraph of it.\n")
    runs = (f"compare.runs={{mine: {{train: {{learning_rate: 5.0e-4}}, replay: {{data: {corpus}, weight: 0.0}}, "
            "regularizers: [{lfu: {consistency: relative}}, {kl: {on: replay}}]}}")
    cfg = load_config(None, ["frontier.methods=[mine, kl]", runs, "frontier.knobs={mine: replay.ratio}"])
    assert grid(cfg) == {"sft": (None, [None]), "mine": ("replay", [0.01, 0.03, 0.1, 0.3]),
                         "kl": ("kl", [0.01, 0.1, 1.0, 10.0])}
    point = point_config(cfg, Path("r"), "mine", "replay", 0.1)
    assert point.output_dir == "r/frontier/mine/replay-0.1"  # its default knob is kl's coef (it holds; lfu's lam does not claim to)
    assert (point.replay.data, point.replay.ratio, point.replay.weight) == (str(corpus), 0.1, 0.0)
    assert point.train.learning_rate == 5e-4 and point.regularizers[0].consistency == "relative"
    assert grid(load_config(None, ["frontier.methods=[mine]", runs]))["mine"] == ("kl", [0.01, 0.1, 1.0, 10.0])
    report = {"methods": {"sft": {"knob": None, "choices": {"within_bound": {"value": None}}},
                          "mine": {"knob": "replay", "choices": {"within_bound": {"value": 0.1}}}}}
    cmp, compared = chosen_compare_config(cfg, report)
    assert compared["mine-0.1"] == {"method": "mine", "value": 0.1}
    run = cmp.compare.runs["mine-0.1"]
    assert run["train"] == {"learning_rate": 5e-4} and run["replay"]["ratio"] == 0.1 and run["replay"]["data"] == str(corpus)

    # over seeds: compare.seeds carries into the chosen points' comparison (each trained once per seed), and
    # --jobs into its run_compare
    cfg = load_config(None, ["frontier.methods=[mine, kl]", runs, "compare.seeds=[1, 2]"])
    cmp, _ = chosen_compare_config(cfg, report)
    assert cmp.compare.seeds == [1, 2] and cmp.compare.methods == ["sft"] and cmp.output_dir.endswith("chosen")
    import forgetless.frontier
    from forgetless.frontier import evaluate_chosen
    calls = []
    monkeypatch.setattr(forgetless.frontier, "run_compare", lambda c, overwrite=False, jobs=1: calls.append((c.compare.seeds, jobs)))
    assert evaluate_chosen(cfg, report, jobs=3)["runs"]["mine-0.1"] == {"method": "mine", "value": 0.1}
    assert calls == [([1, 2], 3)]

    # a run with only other settings: one point, compared as plain SFT with them
    fast = "compare.runs={fastlr: {train: {learning_rate: 1.0e-3}}, mywise: {train: {learning_rate: 1.0e-3}, regularizers: [{wise_ft: {}}]}, sft: {train: {learning_rate: 1.0e-3}}}"
    cfg = load_config(None, ["frontier.methods=[fastlr, mywise]", "compare.methods=[kl]", fast])
    assert grid(cfg)["fastlr"] == (None, [None])
    cmp, _ = chosen_compare_config(cfg, {"methods": {"fastlr": {"knob": None, "choices": {"within_bound": {"value": None}}}}})
    assert cmp.compare.runs["fastlr"]["method"] == "sft" and cmp.compare.runs["fastlr"]["train"] == {"learning_rate": 1e-3}
    # a WiSE-FT run that trains unlike sft mixes its own fine-tune, not sft's run
    from forgetless.frontier import point_runs
    runs = point_runs(cfg, Path("r"), grid(cfg))
    assert {c.output_dir for _, c in runs["mywise"]} == {"r/frontier/mywise/tuned"}
    assert runs["sft"][0][1].train.learning_rate == 1e-4  # the reference is the preset, never a run named sft
    # a frontier method trains on the frontier's data, model and seed (its validation examples are held out of those)
    for bad, key in [("{data: {limit: 10}}", "data"), ("{model: {finetune: full}}", "model"), ("{train: {seed: 3}}", "train.seed")]:
        with pytest.raises(ConfigError, match=f"compare.runs.odd.{key}: a frontier method trains on the frontier's own"):
            load_config(None, ["frontier.methods=[odd]", f"compare.runs={{odd: {bad}}}"])


# ---------------------------------------------------------------- (b) the validation split is apart


def test_validation_split_is_disjoint_from_training_and_from_the_reported_test_items_and_blocks(pretrained, tmp_path):
    from forgetless.config import load_config
    from forgetless.data import build_training_dataset, general_blocks, load_records, split_holdout, training_records
    from forgetless.frontier import make_validator, point_config, validation_records

    # general text of distinct sentences, so that equal blocks would be the same text, not a coincidence
    (tmp_path / "general.txt").write_text(" ".join(f"line {i} says {i * 7 % 1000} and {i * 13 % 997}."
                                                   for i in range(300)))
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"Calculate 9 + {i}.", "response": f"{9 + i}"}
                                                  for i in range(6)])
    args = budget_args(pretrained, tmp_path / "out", f"evaluation.general_text={tmp_path / 'general.txt'}",
                       "evaluation.general_blocks=6", "budget.validation_blocks=8", f"evaluation.task={test}")
    cfg = load_config(None, args[2:])
    validator = make_validator(cfg)
    tokenizer = validator.tokenizer

    # target: the validation questions are the ones scored, and none is trained on or reported
    val = [r.messages[-2]["content"] for r in validation_records(cfg)]
    assert len(set(val)) == len(val) == len(validator.pairs)
    assert all(prompt in rendered for prompt, (rendered, _) in zip(val, validator.pairs))
    point = point_config(cfg, tmp_path / "out", "kl", "kl", 0.1)
    mixture = training_records(point.data, point.train.seed)
    trained = build_training_dataset(split_holdout(mixture, cfg.budget.validation_examples)[0], tokenizer, point.data)
    texts = [tokenizer.decode(ids) for ids in trained["input_ids"]]
    assert all(prompt not in text for prompt in val for text in texts)
    assert sum(any(f"Calculate {i} + {j}." in t for t in texts) for i in range(8) for j in range(8)) == 64 - len(val)
    reported = {r.messages[-2]["content"] for r in load_records(cfg.evaluation.task, cfg.data)}
    assert reported and not reported & set(val)
    # the points never read test data while training
    assert point.data.eval is None and point.evaluation.every_steps == 0

    # general text: every validation block is a held-out block, none a reported one
    (reported_blocks, held), = general_blocks(cfg.evaluation.general_text, tokenizer, 32, 6).values()
    assert len({tuple(b.tolist()) for b in reported_blocks}) == len(reported_blocks)  # distinct: the test means it
    for block in validator.blocks:
        assert not any(torch.equal(block, r) for r in reported_blocks)
        assert any(torch.equal(block, h) for h in held)


# ---------------------------------------------------------------- (c) the command, then again


def test_frontier_command_writes_the_frontier_then_reuses_every_run(pretrained, tmp_path, monkeypatch, capsys):
    import forgetless.compare as compare_mod
    import forgetless.frontier as frontier_mod
    import forgetless.train as train_mod
    from forgetless.cli import main

    out = tmp_path / "f"
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"Calculate 9 + {i}.", "response": f"{9 + i}"}
                                                  for i in range(4)])
    args = ["frontier", *budget_args(pretrained, out, "train.max_steps=6", "frontier.methods=[l2sp, wise-ft]",
                                     "frontier.grids={l2sp: [1000.0, 0.0], wise-ft: [0.5, 1.0]}",
                                     "frontier.max_general_drop=1000", f"evaluation.task={test}",
                                     "evaluation.task_limit=4", "evaluation.templates=['{prompt}']",
                                     "evaluation.max_new_tokens=3", "evaluation.instructions=null")[1:]]
    assert main(args) == 0
    report = json.loads((out / "frontier.json").read_text())
    assert list(report["methods"]) == ["sft", "l2sp", "wise-ft"]
    values = {m: [p["value"] for p in report["methods"][m]["points"]] for m in report["methods"]}
    assert values == {"sft": [None], "l2sp": [0.0, 1000.0], "wise-ft": [1.0, 0.5]}  # weakest first
    sft = report["sft"]
    wise = report["methods"]["wise-ft"]["points"]
    assert all(p["run"] == sft["run"] for p in wise)  # WiSE-FT mixes sft's own run: no run of its own
    assert wise[0]["target_nll"] == pytest.approx(sft["target_nll"], rel=1e-5)  # alpha 1 is that run
    assert report["runs"] == {"trained_now": 3, "reused": 0, "at_a_time": 1}
    for p in [sft, *report["methods"]["l2sp"]["points"]]:
        summary = json.loads((tmp_path / p["run"] / "train_summary.json").read_text())
        assert summary["inputs"]["holdout"] == 16 and summary["train_examples"] == 64 - 16
    assert report["validation"]["examples"] == 16
    assert report["pareto"]["general_drop"] and report["pareto"]["drift_kl"]
    chosen = report["methods"]["l2sp"]["choices"]["within_bound"]
    assert chosen is not None and chosen["target_nll"] == min(p["target_nll"] for p in report["methods"]["l2sp"]["points"])
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "frontier.md").read_text().count("\n| l2sp |") == 2
    # the chosen points, trained on the whole training set and compared on the test split by compare
    evaluated = report["chosen_evaluation"]
    cmp = json.loads((out / "chosen" / "report.json").read_text())
    assert cmp["methods"] == list(evaluated["runs"]) and cmp["methods"][0] == "sft" and len(cmp["methods"]) == 3
    assert "vs_sft" in cmp["paired"][cmp["methods"][1]]["target_nll"]
    assert "frontier on validation" in capsys.readouterr().out

    def must_not_train(*a, **k):
        raise AssertionError("a finished run was trained again")

    for module in (train_mod, compare_mod, frontier_mod):
        monkeypatch.setattr(module, "train", must_not_train)
    summaries = sorted(out.rglob("train_summary.json"))
    assert len(summaries) == 6  # 3 frontier points + sft and the 2 chosen runs of the comparison
    stamps = [p.stat().st_mtime_ns for p in summaries]
    # a frontier setting that changes no run (the choice's tolerance) keeps every run reusable
    assert main(args + ["frontier.sft_tolerance=0.5"]) == 0
    again = json.loads((out / "frontier.json").read_text())
    assert again["runs"] == {"trained_now": 0, "reused": 3, "at_a_time": 1}
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert again["sft"]["target_nll"] == pytest.approx(sft["target_nll"], rel=1e-6)
    assert not list(out.glob("frontier.replaced-*"))  # the same points measured again: written over
    # a call with fewer points keeps the earlier frontier beside the new one
    assert main(args + ["frontier.methods=[l2sp]", "frontier.grids={l2sp: [0.0]}",
                                     "frontier.evaluate_chosen=false"]) == 0
    kept = json.loads((out / "frontier.replaced-1.json").read_text())
    assert list(kept["methods"]) == ["sft", "l2sp", "wise-ft"] and (out / "frontier.replaced-1.png").exists()
    assert list(json.loads((out / "frontier.json").read_text())["methods"]) == ["sft", "l2sp"]


@pytest.mark.slow
def test_jobs_train_the_points_side_by_side_with_the_figures_of_one_at_a_time(pretrained, tmp_path):
    """--jobs 2: the points train in two worker processes, then are measured here; the figures are those of
    the one-at-a-time frontier (to float rounding: a worker computes with its own thread count), and a rerun
    reuses every run."""
    from forgetless.cli import main

    def args(out, *extra):
        return ["frontier", *budget_args(pretrained, out, "train.max_steps=4", "frontier.methods=[l2sp, wise-ft]",
                                         "frontier.grids={l2sp: [0.0, 1000.0], wise-ft: [0.5]}",
                                         "frontier.evaluate_chosen=false")[1:], *extra]

    assert main(args(tmp_path / "one")) == 0
    assert main(args(tmp_path / "two", "--jobs", "2")) == 0
    one, two = (json.loads((tmp_path / d / "frontier.json").read_text()) for d in ("one", "two"))
    assert one["runs"] == {"trained_now": 3, "reused": 0, "at_a_time": 1}
    assert two["runs"] == {"trained_now": 3, "reused": 0, "at_a_time": 2}
    for method in one["methods"]:
        for a, b in zip(one["methods"][method]["points"], two["methods"][method]["points"]):
            assert (a["value"], a["run"].replace("/one/", "/two/")) == (b["value"], b["run"])
            for key in ("target_nll", "general_drop", "drift_kl"):
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (method, key)
    assert main(args(tmp_path / "two", "--jobs", "2")) == 0
    assert json.loads((tmp_path / "two" / "frontier.json").read_text())["runs"] == {"trained_now": 0, "reused": 3, "at_a_time": 2}


def test_wise_ft_points_are_mixes_of_sfts_own_run_with_full_finetuning(pretrained, tmp_path):
    """A full fine-tune's alpha point measures W0 + alpha (W - W0) of sft's run, computed here by hand."""
    from transformers import AutoModelForCausalLM

    from forgetless.config import load_config
    from forgetless.frontier import make_validator, run_frontier

    args = budget_args(pretrained, tmp_path / "w", "model.finetune=full", "train.learning_rate=1e-3",
                       "train.max_steps=4", "frontier.methods=[wise-ft]", "frontier.grids={wise-ft: [0.5]}",
                       "frontier.evaluate_chosen=false")
    cfg = load_config(None, args[2:])
    report = run_frontier(cfg)
    (point,) = report["methods"]["wise-ft"]["points"]
    assert point["run"] == report["sft"]["run"] and report["runs"] == {"trained_now": 1, "reused": 0, "at_a_time": 1}
    base = dict(AutoModelForCausalLM.from_pretrained(pretrained / "model").named_parameters())
    mixed = AutoModelForCausalLM.from_pretrained(point["run"])
    with torch.no_grad():
        for name, w in mixed.named_parameters():
            w.copy_(base[name] + 0.5 * (w - base[name]))
    by_hand = make_validator(cfg).measure(mixed)
    for key in ("target_nll", "general_drop", "drift_kl"):
        assert point[key] == pytest.approx(by_hand[key], rel=1e-4, abs=1e-6), key
    assert point["drift_kl"] < report["sft"]["drift_kl"]


# ---------------------------------------------------------------- (e) every claim of a strength, on a model


def claimed_knobs() -> dict[str, tuple[str, object]]:
    """knob -> (a preset that varies it, its Strength), for every registered strength that claims to hold the
    model (`holds`), each once under its own name."""
    from forgetless.config import preset_knobs
    from forgetless.registry import PRESETS, main_knob, strengths

    out = {}
    for name, strength in strengths().items():
        if strength.holds is None or main_knob(name) != name:
            continue
        out[name] = (next(p for p in PRESETS if p != "sft" and name in preset_knobs(p)), strength)
    return out


@pytest.mark.slow
def test_every_strength_that_claims_to_hold_the_model_does_so_from_its_weakest_to_its_strongest(
        pretrained, tmp_path, monkeypatch):
    """A short run per grid end on a tiny pretrained model: the strongest value of each registered grid keeps
    what its Strength claims (`holds`: drift KL or general-text NLL on validation) closer to the initial
    model than the weakest. What it shows: the direction of each claim at the grid's ends, on one seed, with a
    learning rate (1e-2) that makes plain fine-tuning forget a lot in 12 steps; not that every step of the grid
    is monotone. Replay's corpus is drawn from the sentences the validation text is made of (the claim is about
    text like the corpus), as another document: its paragraphs are not the validation text's."""
    import random

    from forgetless.config import load_config
    from forgetless.frontier import run_frontier
    from forgetless.registry import PRESETS

    knobs = claimed_knobs()
    assert {"kl", "ewc", "l2sp", "replay", "replay.weight", "wise_ft"} <= set(knobs)
    assert "lfu" not in knobs  # its lam claims nothing (forgetless.regularizers.lfu's registration)
    rng = random.Random(1)
    sentences = sorted(set((pretrained / "general.txt").read_text().split(". ")))
    replay_text = tmp_path / "replay.txt"
    replay_text.write_text(" ".join(rng.choice(sentences) + "." for _ in range(400)))
    for preset in {p for p, _ in knobs.values()}:  # the replay presets replay that text
        if "replay" in PRESETS[preset]:
            monkeypatch.setitem(PRESETS, preset, {**PRESETS[preset], "replay": {
                **PRESETS[preset]["replay"], "data": str(replay_text), "max_length": 32}})
    failures = []
    for name, (preset, strength) in knobs.items():
        ends = [strength.grid[0], strength.grid[-1]]
        args = budget_args(pretrained, tmp_path / "f", "train.learning_rate=1e-2", f"frontier.methods=[{preset}]",
                           f"frontier.knobs={{{preset}: {name}}}", f"frontier.grids={{{preset}: {ends}}}",
                           "frontier.evaluate_chosen=false")
        weakest, strongest = run_frontier(load_config(None, args[2:]))["methods"][preset]["points"]
        measure = {"drift_kl": "drift_kl", "general_nll": "general_nll_change"}[strength.holds]
        shown = f"{name}: {measure} {weakest[measure]:.5f} at {weakest['value']:g} -> {strongest[measure]:.5f} at {strongest['value']:g}"
        print(shown)
        if not strongest[measure] < weakest[measure]:
            failures.append(shown)
    assert not failures, failures
