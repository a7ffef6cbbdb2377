"""The `forgetless` command line: `forgetless train CONFIG [key=value ...]`.

Each subcommand imports what it runs when it runs (none of those imports avoids a loop): `forgetless
--help` and an argument argparse refuses answer without loading torch; a config check loads torch, not
transformers."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from forgetless.console import quiet_third_party_noise
from forgetless.errors import ConfigError, ForgetlessError
from forgetless.schema import closest

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a config that ships with forgetless (e.g. `default`); a name that is neither,
    but close to a packaged one, is a ConfigError that says so (`defualt`)."""
    path = Path(name)
    if path.exists() or path.suffix:
        return path
    packaged = PACKAGED_CONFIGS / f"{name}.yaml"
    if packaged.exists():
        return packaged
    close = closest(name, [p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")])
    if close:
        raise ConfigError(f"config file {name} does not exist (did you mean the packaged '{close}'?)")
    return path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config file, or 'default' for the embedded offline default")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any config key, e.g. train.learning_rate=3e-4 model.lora.r=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgetless",
        description="Fine-tune language models on small task data without losing what they already know.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model as a config describes",
                       description="Fine-tune a model as CONFIG describes; writes OUTPUT_DIR (see README).")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_DIR")

    p = sub.add_parser("eval", help="evaluate the base model (and a fine-tuned run) with the evaluation suite",
                       description="Run the `evaluation` suite of CONFIG on the base model and, with --run, on a "
                                   "fine-tuned output folder (with drift measured against the base). Writes eval.json.")
    _add_config_args(p)
    p.add_argument("--run", help="a forgetless output folder (adapter or full model) to evaluate against the base")

    p = sub.add_parser("compare", help="train several methods and report what each gained and broke",
                       description="Train every method in compare.methods from the same base, data, seed and steps, "
                                   "evaluate base and results with the same suite, and write OUTPUT_DIR/report.md, "
                                   "report.json and PNG plots. Finished identical runs and their evaluations are "
                                   "reused unless --overwrite.")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="retrain every method even if a finished run exists")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train and evaluate N runs at a time in worker processes (for small models on a GPU; "
                        "step times then include the contention)")

    p = sub.add_parser("frontier", help="train each method across its strengths and map gain against forgetting",
                       description="For each method of frontier.methods and each strength of its grid, train on the "
                                   "training set less budget's validation examples and measure target gain, "
                                   "general-text perplexity change and drift on the validation split (never the test "
                                   "split); write OUTPUT_DIR/frontier.json (points, Pareto sets, each method's choices) "
                                   "and frontier.png; with frontier.evaluate_chosen, compare the chosen points on the "
                                   "test split in OUTPUT_DIR/chosen. Finished runs are reused unless --overwrite.")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="retrain every point even if a finished run exists")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N points at a time in worker processes, then measure them; the chosen points' "
                        "comparison also runs N at a time (for small models on a GPU; each run's step time then "
                        "includes the contention)")

    p = sub.add_parser("config", help="print the resolved config (after overrides) and exit",
                       description="Validate CONFIG with its overrides and print the full resolved config.")
    _add_config_args(p)
    return parser


def run_eval(config, run_dir: str | None) -> int:
    from forgetless.cache import write_json_atomic
    from forgetless.data import source_spec, train_sources
    from forgetless.evaluate import check_disjoint, evaluate_base_and_runs
    from forgetless.run_folder import EVAL_FILE, check_same_base

    if run_dir:
        check_same_base(Path(run_dir), config)
    check_disjoint(config.evaluation, config.data, [source_spec(s) for s in train_sources(config.data)], [])
    results = evaluate_base_and_runs(config, {run_dir: run_dir} if run_dir else {})
    out = Path(run_dir or config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / EVAL_FILE, results, indent=2)
    for name, res in results.items():
        print(name)
        for key, entry in res.items():
            if isinstance(entry, dict) and "value" in entry:
                ci = entry.get("ci95")
                extra = f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
                print(f"  {key:18s} {entry['value']:.4f}{extra}  (n={entry['n']})")
    print(f"wrote {out / 'eval.json'}")
    return 0


def run_frontier_command(config, overwrite: bool, jobs: int = 1) -> int:
    import matplotlib

    matplotlib.use("Agg")  # the command line's choice: frontier.png is written with no display
    from forgetless.frontier import run_frontier

    use_cpu_allocator_settings()
    report = run_frontier(config, overwrite=overwrite, jobs=jobs)
    root = Path(config.output_dir)
    rules = report["rules"]
    bound = " and ".join(f"{k} <= {rules[k]:g}" for k in ("max_general_drop", "max_drift_kl") if rules[k] is not None)

    def shown(point) -> str:
        if point is None:
            return "none"
        strength = f"{point['option']}={point['value']:g}: " if point["value"] is not None else ""
        return (f"{strength}gain {point['target_gain']:+.4f}, ppl {100 * point['general_drop']:+.2f}%, "
                f"drift {point['drift_kl']:.4f}")

    print(f"frontier on validation ({report['validation']['examples']} examples, {report['validation']['blocks']} "
          f"blocks); runs trained now {report['runs']['trained_now']}, reused {report['runs']['reused']}")
    print(f"  within bound ({bound or 'no bound'}) | matches SFT (target NLL <= {rules['sft_threshold']:.4f})")
    for method, m in report["methods"].items():
        print(f"  {method:12s} {shown(m['choices']['within_bound'])} | {shown(m['choices']['matches_sft'])}")
    print(f"wrote {root / 'frontier.json'}, frontier.md, frontier.png")
    chosen = report.get("chosen_evaluation")
    if chosen:
        out = Path(chosen["output_dir"])
        print((out / "report.md").read_text().split("\n\nn:")[0])
        print(f"\nwrote {out / 'report.md'}, report.json, tradeoff.png, measures.png")
    return 0


def use_cpu_allocator_settings() -> None:
    """Training on a CPU: glibc keeps freed tensors' pages for reuse (forgetless.memory). Process-wide,
    so the command line does it, never the library's train()."""
    import torch

    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        from forgetless.memory import keep_freed_cpu_memory

        keep_freed_cpu_memory()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags may sit between overrides (`train cfg a=1 --resume b=2`): argparse leaves the later ones over.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from forgetless.config import load_config

    try:
        config = load_config(resolve_config_path(args.config), args.overrides)
        # before torch's neighbours load: lines every run printed that no user can act on
        quiet_third_party_noise(quantized=config.model.quantization is not None)
        if args.command == "config":
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        if args.command == "eval":
            return run_eval(config, args.run)
        if args.command == "compare":
            from forgetless.compare import run_compare

            use_cpu_allocator_settings()
            if args.jobs < 1:
                parser.error(f"--jobs: a number of worker processes >= 1, got {args.jobs}")
            run_compare(config, overwrite=args.overwrite, jobs=args.jobs)
            root = Path(config.output_dir)
            print((root / "report.md").read_text().split("\n\nn:")[0])
            print(f"\nwrote {root / 'report.md'}, report.json, tradeoff.png, measures.png")
            return 0
        if args.command == "frontier":
            if args.jobs < 1:
                parser.error(f"--jobs: a number of worker processes >= 1, got {args.jobs}")
            return run_frontier_command(config, args.overwrite, args.jobs)
        use_cpu_allocator_settings()
        from forgetless.budget import budget_active, train_with_budget
        from forgetless.train import train

        from accelerate import PartialState

        if budget_active(config):
            report = train_with_budget(config, overwrite=args.overwrite, resume=args.resume)
            if not PartialState().is_main_process:  # under accelerate launch: one summary, not one per process
                return 0
            chosen, held = report["chosen"], report["held_out"]
            print(f"done: {config.output_dir} (forgetting budget, knob {report['knob']})")
            print("  chosen: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in chosen.items() if k != "run"))
            if held:
                print(f"  held-out general text: ppl {100 * held['general_drop']:+.2f}%, drift {held['drift_kl']:.4f} "
                      f"({'within' if held['within_bound'] else 'OVER'} the bound)")
            print(f"  every candidate: {Path(config.output_dir) / 'budget.json'}")
            return 0
        result = train(config, overwrite=args.overwrite, resume=args.resume)
        if not PartialState().is_main_process:  # under accelerate launch: one summary, not one per process
            return 0
        print(f"done: {result.output_dir}")
        for key, value in result.summary.items():
            print(f"  {key}: {value}")
        return 0
    except ForgetlessError as exc:
        print(f"forgetless: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
