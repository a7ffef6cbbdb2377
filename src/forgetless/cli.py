"""The `forgetless` command line: `forgetless train CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from forgetless.errors import ForgetlessError

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a config that ships with forgetless (e.g. `default`)."""
    path = Path(name)
    if path.exists() or path.suffix:
        return path
    packaged = PACKAGED_CONFIGS / f"{name}.yaml"
    return packaged if packaged.exists() else path


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

    p = sub.add_parser("config", help="print the resolved config (after overrides) and exit",
                       description="Validate CONFIG with its overrides and print the full resolved config.")
    _add_config_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Imported here so `--help` stays fast.
    from forgetless.config import load_config

    try:
        config = load_config(resolve_config_path(args.config), args.overrides)
        if args.command == "config":
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        from forgetless.train import train

        result = train(config, overwrite=args.overwrite, resume=args.resume)
        print(f"done: {result.output_dir}")
        for key, value in result.summary.items():
            print(f"  {key}: {value}")
        return 0
    except ForgetlessError as exc:
        print(f"forgetless: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
