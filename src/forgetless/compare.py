"""`forgetless compare`: train each method from the same base, data, seed and step budget, evaluate
the base and every result with the same suite, and write report.md, report.json and PNG plots.

OUTPUT_DIR/<method>/   one training run per method (reused when finished with the same config)
OUTPUT_DIR/report.md   the table;  report.json   every figure with its n and 95% interval
OUTPUT_DIR/tradeoff.png, OUTPUT_DIR/measures.png
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from forgetless.config import ForgetlessConfig, validate
from forgetless.data import source_spec, train_sources
from forgetless.evaluate import check_disjoint, evaluate_base_and_runs
from forgetless.memory import peak_memory
from forgetless.model import resolve_model_path
from forgetless.train import SUMMARY, train

logger = logging.getLogger(__name__)

# (key, label, higher is better)
MEASURES = [
    ("target_acc", "target accuracy", True),
    ("target_nll", "target NLL", False),
    ("general_ppl", "general-text perplexity", False),
    ("general_drift_kl", "drift KL(base‖model)", False),
    ("mc_acc_norm", "MMLU acc_norm", True),
    ("robust_acc_mean", "robustness: mean acc", True),
    ("robust_acc_std", "robustness: std across prompts", False),
]


def method_config(config: ForgetlessConfig, method: str, root: Path) -> ForgetlessConfig:
    cfg = copy.deepcopy(config)
    cfg.method = method
    cfg.regularizers = []
    cfg.output_dir = str(root / method)
    validate(cfg)  # fills regularizers from the preset
    return cfg


def _same_finished_run(cfg: ForgetlessConfig) -> dict | None:
    out = Path(cfg.output_dir)
    if not (out / SUMMARY).exists() or not (out / "config.yaml").exists():
        return None
    # what the run was trained with; the evaluation and the list of compared methods do not matter
    def training_part(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in ("evaluation", "compare", "budget")}

    saved = yaml.safe_load((out / "config.yaml").read_text())
    if training_part(saved) != training_part(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))):
        return None
    return json.loads((out / SUMMARY).read_text())


def run_compare(config: ForgetlessConfig, overwrite: bool = False) -> dict[str, Any]:
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(config.compare.methods))
    configs = {m: method_config(config, m, root) for m in methods}
    replay_specs = sorted({opts["data"] if opts and "data" in opts else "builtin:replay/kjv.txt.gz"
                           for cfg in configs.values() for e in cfg.regularizers for name, opts in e.items()
                           if name == "replay"})
    check_disjoint(config.evaluation, config.data, [source_spec(s) for s in train_sources(config.data)], replay_specs)

    runs: dict[str, dict] = {}
    for i, (method, cfg) in enumerate(configs.items(), start=1):
        reused = None if overwrite else _same_finished_run(cfg)
        if reused is not None and "peak_mem_bytes" in reused:
            logger.info("[%d/%d] %s: reusing the finished run in %s", i, len(configs), method, cfg.output_dir)
            runs[method] = reused
            continue
        logger.info("[%d/%d] training %s -> %s", i, len(configs), method, cfg.output_dir)
        mem: dict = {}
        with peak_memory(mem):
            result = train(cfg, overwrite=True)
        summary = dict(result.summary)
        summary["step_time_s"] = summary["train_seconds"] / max(summary["global_steps"], 1)
        summary["peak_mem_bytes"] = mem["peak_bytes"]
        (Path(cfg.output_dir) / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        runs[method] = summary

    logger.info("evaluating the base model and %d fine-tuned models", len(runs))
    results = evaluate_base_and_runs(config, {method: configs[method].output_dir for method in runs})
    path = resolve_model_path(config.model.name_or_path, config.model.revision)

    report = {"base_model": str(path), "methods": methods, "runs": runs, "results": results,
              "settings": {"seed": config.train.seed, "max_steps": config.train.max_steps,
                           "epochs": config.train.epochs, "batch_size": config.train.batch_size,
                           "finetune": config.model.finetune, "train_data": ", ".join(f"{source_spec(s)} x{s.weight:g}" if s.weight != 1 else source_spec(s)
                                                     for s in train_sources(config.data))}}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "report.md").write_text(render_markdown(report))
    plot(report, root)
    return report


# ---------------------------------------------------------------- report


def _value(results: dict, key: str) -> float:
    entry = results.get(key)
    return entry["value"] if isinstance(entry, dict) else math.nan


def _fmt(entry: dict | None, digits: int = 3) -> str:
    if not isinstance(entry, dict):
        return "–"
    text = f"{entry['value']:.{digits}f}"
    if "ci95" in entry and all(math.isfinite(x) for x in entry["ci95"]):
        lo, hi = entry["ci95"]
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def render_markdown(report: dict) -> str:
    res, runs = report["results"], report["runs"]
    base = res["base"]
    s = report["settings"]
    lines = [
        "# forgetless compare",
        "",
        f"Base model: `{report['base_model']}`; training data `{s['train_data']}`; {s['finetune']} fine-tuning, "
        f"seed {s['seed']}, {runs[report['methods'][0]]['global_steps']} steps of batch {s['batch_size']} for every method.",
        "Each cell: value [95% bootstrap interval]; Δ is against the base model. Sample counts are in report.json.",
        "",
        "| method | target acc | Δ acc | target NLL | general ppl | Δ ppl | drift KL | MMLU acc_norm | Δ MMLU "
        "| robust acc mean ± std | step s | peak mem GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ["base"] + report["methods"]:
        r = res[name]
        run = runs.get(name, {})
        d_acc = _value(r, "target_acc") - _value(base, "target_acc")
        d_ppl = 100 * (_value(r, "general_ppl") / _value(base, "general_ppl") - 1)
        d_mc = _value(r, "mc_acc_norm") - _value(base, "mc_acc_norm")
        robust = f"{_value(r, 'robust_acc_mean'):.3f} ± {_value(r, 'robust_acc_std'):.3f}"
        step = f"{run['step_time_s']:.2f}" if run else "–"
        mem = f"{run['peak_mem_bytes'] / 2**30:.2f}" if run else "–"
        lines.append(
            f"| {name} | {_fmt(r.get('target_acc'))} | {d_acc:+.3f} | {_fmt(r.get('target_nll'))} | "
            f"{_fmt(r.get('general_ppl'), 2)} | {d_ppl:+.1f}% | {_fmt(r.get('general_drift_kl'), 4)} | "
            f"{_fmt(r.get('mc_acc_norm'))} | {d_mc:+.3f} | {robust} | {step} | {mem} |"
        )
    n = {k: base[k]["n"] for k in ("target_acc", "general_ppl", "mc_acc_norm") if k in base}
    lines += [
        "",
        f"n: target {n.get('target_acc')} questions ({len(base.get('robust_acc_per_template', []))} prompt templates "
        f"for robustness), general text {n.get('general_ppl')} tokens, MMLU {n.get('mc_acc_norm')} questions.",
        "Peak memory is the process's (CPU: resident set size, including the Python runtime and libraries).",
        "",
        "![trade-off](tradeoff.png)",
        "",
        "![measures](measures.png)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, methods = report["results"], report["methods"]
    base = res["base"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.scatter([0], [0], color="black", marker="s")
    ax.annotate("base", (0, 0), textcoords="offset points", xytext=(5, 5))
    points = {m: (100 * (_value(res[m], "target_acc") - _value(base, "target_acc")),
                  100 * (_value(res[m], "general_ppl") / _value(base, "general_ppl") - 1)) for m in methods}
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    near_x, near_y = 0.05 * (max(xs + [0]) - min(xs + [0]) or 1), 0.05 * (max(ys + [0]) - min(ys + [0]) or 1)
    for m, (x, y) in points.items():
        ax.scatter([x], [y], s=60)
        # a label goes below its point when a close neighbour sits just above, so both stay readable
        below = any(abs(x2 - x) < near_x and 0 < y2 - y < near_y for n, (x2, y2) in points.items() if n != m)
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, -13 if below else 5))
    ax.set_xlabel("target accuracy gain over base (points)")
    ax.set_ylabel("general-text perplexity change (%)  ↓ better")
    ax.set_title("What each method gained vs what it broke")
    fig.tight_layout()
    fig.savefig(root / "tradeoff.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.0 * len(MEASURES), 3.6))
    names = ["base"] + methods
    for ax, (key, label, higher) in zip(axes, MEASURES):
        values = [_value(res[n], key) for n in names]
        ax.bar(range(len(names)), values, color=["black"] + [f"C{i}" for i in range(len(methods))])
        for i, n in enumerate(names):
            ci = res[n].get(key, {}).get("ci95") if isinstance(res[n].get(key), dict) else None
            if ci and all(math.isfinite(c) for c in ci):
                ax.plot([i, i], ci, color="grey", lw=1.5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{label} {'↑' if higher else '↓'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(root / "measures.png", dpi=110)
    plt.close(fig)
