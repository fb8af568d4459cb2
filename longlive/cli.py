"""The ``longlive`` command: ``config`` shows a resolved preset, ``stage`` runs one DVC stage's body."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from longlive.config import PRESET_ENV, ConfigError, load_preset

STAGES = ("synth", "base", "encode", "validate")


def _config(args: argparse.Namespace) -> int:
    try:
        preset = load_preset(args.preset, args.params)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    out = preset.model_dump(by_alias=True)
    out["derived"] = {"latent_shape": preset.latent_shape, "head_dim": preset.dit.head_dim}
    print(json.dumps(out, indent=2))
    return 0


def _stage(args: argparse.Namespace) -> int:
    if args.preset:
        os.environ[PRESET_ENV] = args.preset
    importlib.import_module(f"stages.{args.name}").main()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longlive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the resolved, validated preset as JSON")
    p.add_argument("--preset", help="preset name (default: params.yaml's `preset`)")
    p.add_argument("--params", help="path to params.yaml")
    p.set_defaults(func=_config)
    p = sub.add_parser("stage", help="run one pipeline stage directly (dvc repro runs these)")
    p.add_argument("name", choices=STAGES)
    p.add_argument("--preset")
    p.set_defaults(func=_stage)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
