"""The ``longlive`` command: ``config`` shows a resolved preset, ``stage`` runs one DVC stage's body,
``generate`` streams a video, ``eval-quality`` scores a model's prompt following on a held-out prompt set,
``publish`` uploads a versioned release and ``pull`` downloads and verifies one, ``regress`` gates the
evaluate stage's metrics against a committed baseline, ``bench`` measures streaming FPS with random weights.

Refusals of bad input (bad arguments, missing files, impossible settings) are one line on stderr,
``longlive <command>: <problem and fix>``, and exit 2; Ctrl-C is one line and exit 130. Anything else is a
bug and keeps its traceback; ``--debug`` (or ``LONGLIVE_DEBUG=1``) keeps it for every error. Each
subcommand imports its heavy dependencies (torch, diffusers, Prefect, DVC, ...) only when it runs."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from longlive.config import PRESET_ENV, ConfigError, load_preset
from longlive.secrets import redact, redact_options

STAGES = ("synth", "base", "encode", "validate", "publish")
DEBUG_ENV = "LONGLIVE_DEBUG"

# Exceptions that refuse a user's input, each raised with a message naming the problem and the fix, as
# (module, class): a class counts only if its module was imported, so this list imports nothing heavy.
USER_ERRORS = (
    ("longlive.errors", "UsageError"),
    ("longlive.config", "ConfigError"),  # DeviceError is one
    ("longlive.secrets", "SecretInParamsError"),
    ("longlive.io", "UnsafeStateError"),
    ("longlive.publish.manifest", "ReleaseError"),
    ("longlive.data.shards", "ShardError"),
    ("longlive.models.lora", "LoRAError"),
    ("longlive.parallel.mesh", "ParallelError"),
    ("longlive.eval.suite", "EvaluateError"),
    ("longlive.eval.regress", "RegressError"),
    ("pydantic", "ValidationError"),
    ("builtins", "FileNotFoundError"),
)


def is_user_error(e: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


def error_line(e: BaseException) -> str:
    """An error's message on one line, credentials redacted (messages quote URLs and options)."""
    if hasattr(e, "errors") and type(e).__module__.startswith("pydantic"):
        text = "; ".join(f"{'.'.join(map(str, err['loc'])) or type(e).__name__}: {err['msg']}" for err in e.errors())
    elif isinstance(e, FileNotFoundError) and e.filename is not None:
        text = f"{e.strerror or 'not found'}: {e.filename}"
    else:
        text = str(e) or type(e).__name__
    return redact(" ".join(text.split()))


class Parser(argparse.ArgumentParser):
    """argparse that refuses bad arguments in one line, like every other refusal of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {redact(message)} (see {self.prog} --help)\n")


def _config(args: argparse.Namespace) -> int:
    try:
        preset = load_preset(args.preset, args.params)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    out = preset.model_dump(by_alias=True)
    out["derived"] = {"latent_shape": preset.latent_shape, "head_dim": preset.dit.head_dim}
    # load_preset refuses credentials already; redact anyway, since this output lands in logs and CI
    print(json.dumps(redact_options(out), indent=2))
    return 0


def _stage(args: argparse.Namespace) -> int:
    if args.preset:
        os.environ[PRESET_ENV] = args.preset
    importlib.import_module(f"stages.{args.name}").main()
    return 0


def _generate(args: argparse.Namespace) -> int:
    # every check runs before torch and the models load: a typo costs a fraction of a second, not a model load
    from longlive.inference.request import check_generate_args

    request = check_generate_args(args)
    for line in request.warnings:
        print(f"longlive generate: warning: {redact(line)}", file=sys.stderr)
    from longlive.inference.generate import run_request

    return run_request(request)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a video from a prompt (schedule) to mp4 + timings JSON")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt for the whole video")
    src.add_argument("--prompt-schedule", metavar="FILE", help="JSON/YAML list of {start|frame, prompt, shot}")
    p.add_argument("--image", help="I2V: PNG/JPEG first frame (a warning if the checkpoint is T2V)")
    p.add_argument("--seconds", type=float, required=True,
                   help="video length (rounded up to whole blocks; at most inference.max_seconds, default 1 hour)")
    p.add_argument("--out", required=True, help="output mp4 (missing directories are created); timings go to the "
                   "same path with .json")
    p.add_argument("--checkpoint", help="DiT directory (default: <base>/dit); a train_ar export's ar_config.json "
                   "beside it sets block_frames, independent_first_frame, denoising_steps, timestep_shift (and sink_frames, "
                   "window_frames when trained with a window) over the preset's, --set over both; "
                   "or a pulled release's checkpoints/NAME (base models and preset then come from the release)")
    p.add_argument("--base", default="models/base", help="base models directory (vae/, text/)")
    p.add_argument("--preset")
    p.add_argument("--params", help="path to params.yaml")
    p.add_argument("--seed", type=int, help="noise seed (default: the preset's)")
    p.add_argument("--device", help="DiT device (default: the preset's; auto = cuda if available)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference setting, e.g. --set sink_frames=0 --set guidance_scale=3")
    p.set_defaults(func=_generate)


def _eval_quality(args: argparse.Namespace) -> int:
    from longlive.eval.quality import cli_eval_quality

    return cli_eval_quality(args)


def _add_eval_quality(sub) -> None:
    p = sub.add_parser("eval-quality", help="prompt following (T2V, I2V, multi-shot, long-video drift) on held-out prompts")
    p.add_argument("--checkpoint", required=True, help="a train_ar export (models/ar/t2v) or a DiT directory (models/base/dit)")
    p.add_argument("--kind", choices=("t2v", "i2v", "multishot", "drift", "all"), default="all",
                   help="all: t2v (i2v for an I2V checkpoint), multishot and drift")
    p.add_argument("--num-prompts", type=int, default=24, help="held-out prompts for t2v/i2v (and multishot by default)")
    p.add_argument("--num-multishot", type=int, help="two-shot videos (default: --num-prompts)")
    p.add_argument("--num-drift", type=int, default=2, help="long videos per drift setting")
    p.add_argument("--length-factor", type=int, default=10, help="drift video length in training clips")
    p.add_argument("--i2v", action="store_true", help="multishot/drift from the held-out image even if the checkpoint is T2V")
    p.add_argument("--out", help="report JSON (default: reports/quality/<checkpoint name>.json); samples beside it")
    p.add_argument("--samples", type=int, default=2, help="sample mp4s per evaluation (0: none)")
    p.add_argument("--base", default="models/base", help="base models directory (vae/, text/)")
    p.add_argument("--preset")
    p.add_argument("--params", help="path to params.yaml")
    p.add_argument("--seed", type=int, default=0, help="noise seed of prompt 0 (prompt k uses seed + k)")
    p.add_argument("--device", help="DiT device (default: the preset's; auto = cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for tiny models on shared cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference setting, e.g. --set sampler=euler --set denoising_steps=[1000,500]")
    p.set_defaults(func=_eval_quality)


def _publish(args: argparse.Namespace) -> int:
    from longlive.publish.cli import cli_publish

    return cli_publish(args)


def _pull(args: argparse.Namespace) -> int:
    from longlive.publish.cli import cli_pull

    return cli_pull(args)


def _add_publish(sub) -> None:
    p = sub.add_parser("publish", help="build a release (weights, config, metrics, model card, manifest) and upload it "
                       "atomically to a local folder or s3://")
    p.add_argument("--url", help="where releases live (default: publish.url of the preset), e.g. s3://bucket/releases")
    p.add_argument("--version", help="release version (default: publish.version's template, e.g. {preset}-v{n})")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a train_ar export or DiT directory (repeatable; replaces publish.checkpoints)")
    p.add_argument("--nvfp4", action="append", default=[], metavar="NAME=PATH", help="an NVFP4 checkpoint, copied as is")
    p.add_argument("--nvfp4-backend", help="quantization backend to record for --nvfp4 (emulated, triton, native, ...)")
    p.add_argument("--dtype", choices=("bf16", "keep"), help="DiT weights: cast to bf16 (default) or keep as stored")
    p.add_argument("--metrics", action="append", default=[], metavar="NAME=PATH", help="a metrics JSON (repeatable)")
    p.add_argument("--base", help="base models directory (default: publish.base)")
    p.add_argument("--folder", help="upload this already built release folder (e.g. a pulled one) instead of building")
    p.add_argument("--force", action="store_true", help="replace an existing release of the same version")
    p.add_argument("--no-latest", action="store_true", help="leave latest.json as it is")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: LONGLIVE_S3_ENDPOINT / AWS_ENDPOINT_URL)")
    p.add_argument("--work-dir", default=".work/publish", help="where the folder is built before upload")
    p.add_argument("--hub", metavar="REPO", help="then push the release to this Hugging Face model repo (owner/name; "
                   "token from HF_TOKEN or `hf auth login`); created private, main = this release, tag = its version")
    p.add_argument("--hub-public", action="store_true", help="create the --hub repo public (default: private)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--preset")
    p.add_argument("--params", help="path to params.yaml")
    p.set_defaults(func=_publish)

    p = sub.add_parser("pull", help="download a release and verify every file's SHA-256")
    p.add_argument("url", help="a release (<store>/<version>) or a store of releases (its latest.json is followed)")
    p.add_argument("--dest", help="destination folder (default: ./<version>)")
    p.add_argument("--version", help="with a store URL: this version instead of the latest")
    p.add_argument("--force", action="store_true", help="replace an existing --dest")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: LONGLIVE_S3_ENDPOINT / AWS_ENDPOINT_URL)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_pull)


def _regress(args: argparse.Namespace) -> int:
    from longlive.eval.regress import run

    return run(args)


def _add_regress(sub) -> None:
    from longlive.eval.regress import add_arguments

    p = sub.add_parser("regress", help="compare the evaluate stage's metrics with the committed baseline; "
                       "exit 1 naming each regressed metric")
    add_arguments(p)
    p.set_defaults(func=_regress)


def _bench(args: argparse.Namespace) -> int:
    from longlive.bench.run import run

    return run(args)


def _add_bench(sub) -> None:
    from longlive.bench.args import add_arguments

    p = sub.add_parser("bench", help="streaming FPS of a preset with random weights (no downloads): steady FPS, "
                       "first-block latency, DiT / cache pass / VAE / other per block, peak memory, the ceiling; "
                       "writes JSON + markdown")
    add_arguments(p)
    p.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="longlive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=os.environ.get(DEBUG_ENV, "") not in ("", "0"),
                        help=f"show the traceback of every error (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the resolved, validated preset as JSON")
    p.add_argument("--preset", help="preset name (default: params.yaml's `preset`)")
    p.add_argument("--params", help="path to params.yaml")
    p.set_defaults(func=_config)
    p = sub.add_parser("stage", help="run one pipeline stage directly (dvc repro runs these)")
    p.add_argument("name", choices=STAGES)
    p.add_argument("--preset", help="a check: the stage refuses a preset other than the one params.yaml records "
                   "(switch with `dvc exp run -S preset=NAME`)")
    p.set_defaults(func=_stage)
    _add_generate(sub)
    _add_eval_quality(sub)
    _add_publish(sub)  # `publish` and `pull`
    _add_regress(sub)
    _add_bench(sub)
    for p in sub.choices.values():  # `longlive generate --debug ...` works too; SUPPRESS keeps the global value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a refused argument (Parser.error printed its one line) or --help / --version
        return e.code if isinstance(e.code, int) else 2
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: a refusal of its input becomes one line and exit 2, Ctrl-C one line and 130."""
    where = f"longlive {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        print(f"{where}: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
