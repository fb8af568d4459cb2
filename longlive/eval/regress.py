"""Regression gate: the ``evaluate`` stage's metrics against a committed baseline (``longlive regress``).

    python -m longlive.eval.regress                  # reports/evaluate/metrics vs benchmarks/baselines/<preset>.json
    python -m longlive.eval.regress --markdown summary.md --json result.json
    python -m longlive.eval.regress --update         # write the current metrics as the new baseline
    python -m longlive.eval.regress --widen          # fold another machine's honest retraining into the baseline

Exit status: 0 all gated metrics within tolerance, 1 a regression (the table and the last line name each
regressed ``variant.metric``), 2 a usage problem (missing metrics or baseline, bad tolerance).

**What is gated** (:data:`RULES`; anything else in the metrics files is information): each rule knows
its direction and tolerance. Tolerances bound how much *worse* the current value may be:

* ``{"rel": r}``: ``r * |baseline|`` (speed, memory);
* ``{"abs": a}``: ``a``;
* ``{"sigma": k, "abs": a, "max": m}``: ``k * sqrt(sem_baseline**2 + sem_current**2)`` from the
  ``<metric>_sem`` beside the metric, at least ``a`` and at most ``m``: a drop must be significant given
  how many held-out videos produced each figure, and a drop larger than ``m`` fails however few videos
  there were. Without a standard error on either side only the floor ``a`` applies.

  Why a cap of 0.3 on scores: the tiny models are trained from scratch, and a training run's outcome
  moves more than the evaluation's sem says. Measured: the same commit retrained with 2 CPU threads
  instead of 1 (different float reductions, amplified by training) moved the 8 variants' scores by up to
  0.21 (schedule score, sem 0.055; 10 of 32 score figures moved by more than 0.1). Hence the presets pin
  ``cpu_threads``, so CI reproduces the baseline bit for bit, and the cap leaves room for an honest
  retraining elsewhere. A collapsed model is caught regardless by the chance rule below.

* Scores must stay at least :data:`CHANCE_MARGIN` above the variant's ``chance_score`` (an untrained or
  broken model's level) whenever the baseline did: a model at chance fails however noisy its figures.

Speed, latency and peak memory have CPU tolerances of their own (a shared CPU's timing and RSS are noisy;
CUDA events and the allocator's peak are not).

**Several machine classes** (``--widen``): a from-scratch retraining on a CPU with other float arithmetic
(another vendor's BLAS path, another vector width) gives other models from the same code, and on the tiny
preset the difference is not small: the same commit trained on an Intel Xeon (AVX-512) and on an AMD EPYC
(AVX2) scored drift_score 0.42 and 0.24 for ar_t2v. Neither run is wrong, so the baseline is the envelope of
the retrainings of one commit that CI's machine classes produce: ``--widen`` folds the current run in, keeping
for each gated metric the worse of the two values (with that run's standard error) and listing each run under
``runs``. The chance rule follows the envelope: a score that one honest retraining left at chance is not held
above chance, while the headline ``score`` of every variant still is (a collapsed model fails on any machine).

A baseline may override tolerances by metric (``"score"``) or variant and metric (``"ar_t2v.fps"``) in its
``tolerances``. Speed and memory (``hardware`` rules) are compared only when baseline and current ran on
the same device class (``info.device_class``: ``cpu``, or the GPU's name) and measured memory the same way
(``info.memory_kind``); otherwise they show as "not compared" (``--hardware always|never`` overrides).
A variant of the baseline missing from the current metrics, or a gated metric missing from a variant,
fails; a variant without a baseline is listed as new and passes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longlive.io import write_text_atomic as _write

METRICS_DIR = Path("reports/evaluate/metrics")
BASELINE_DIR = Path("benchmarks/baselines")
MARKER = "<!-- longlive-regression -->"  # lets CI find and update its own PR comment


class RegressError(ValueError):
    """Missing or malformed metrics, baseline or tolerance; the message says which file and the fix."""


@dataclass(frozen=True)
class Rule:
    higher_is_better: bool
    tolerance: dict
    hardware: bool = False  # speed/memory: only comparable on the same device class
    cpu_tolerance: dict | None = None  # instead of ``tolerance`` when the run was on the CPU


_SCORE = Rule(True, {"sigma": 3.0, "abs": 0.03, "max": 0.3})
SCORES = ("score", "multishot_score", "schedule_score", "drift_score")
CHANCE_MARGIN = 0.05
RULES: dict[str, Rule] = {
    **{name: _SCORE for name in SCORES},
    # On a GPU speed may halve / latency double. On a shared 2-core CPU the same commit measured 40.6,
    # 87.3 and 96.6 FPS (dmd_t2v_2step) depending on what else the machine ran, so there only a 4x
    # slowdown fails: CPU timing catches a broken hot path (a stray O(n^2), a host sync per frame), not 10%.
    "fps": Rule(True, {"rel": 0.5}, hardware=True, cpu_tolerance={"rel": 0.75}),
    "first_chunk_latency_s": Rule(False, {"rel": 1.0}, hardware=True, cpu_tolerance={"rel": 3.0}),
    # CUDA's allocator peak is repeatable; the CPU's peak RSS increase is not (see longlive/eval/perf.py):
    # the same commit measured 44.9, 52.3 and 90.0 MiB for ar_t2v, the first variant evaluated, which also
    # pays one-time allocations. So there only a 4x growth fails. kv_cache_mb and weights_mb are exact.
    "peak_memory_mb": Rule(False, {"rel": 0.25}, hardware=True, cpu_tolerance={"rel": 3.0}),
    "kv_cache_mb": Rule(False, {"rel": 0.01}, hardware=True),
    "weights_mb": Rule(False, {"rel": 0.01}, hardware=True),
}
PREFIX_RULES: dict[str, Rule] = {"vbench_": Rule(True, {"abs": 0.02})}
NOT_GATED = ("vbench_not_computed",)


def rule_for(metric: str) -> Rule | None:
    if metric in NOT_GATED:
        return None
    if metric in RULES:
        return RULES[metric]
    for prefix, rule in PREFIX_RULES.items():
        if metric.startswith(prefix):
            return rule
    return None


def _check_tolerance(tol: dict, where: str) -> dict:
    if not isinstance(tol, dict) or not tol or set(tol) - {"rel", "abs", "sigma", "max"}:
        raise RegressError(f"{where}: a tolerance is a mapping with keys rel, abs, sigma and/or max, got {tol!r}")
    if "rel" in tol and "sigma" in tol:
        raise RegressError(f"{where}: give rel or sigma (with an abs floor), not both: {tol!r}")
    if "max" in tol and "sigma" not in tol:
        raise RegressError(f"{where}: max caps a sigma tolerance; without sigma use abs: {tol!r}")
    for k, v in tol.items():
        if not isinstance(v, (int, float)) or v < 0:
            raise RegressError(f"{where}: tolerance {k} must be a number >= 0, got {v!r}")
    return tol


# ----------------------------------------------------------------------------- loading


def load_metrics(metrics_dir: str | os.PathLike = METRICS_DIR) -> dict[str, dict]:
    """``{variant: metrics}`` from ``<metrics_dir>/<variant>.json`` (the evaluate stage's output)."""
    d = Path(metrics_dir)
    files = sorted(d.glob("*.json")) if d.is_dir() else []
    if not files:
        raise RegressError(f"no metrics in {d}/*.json; run `dvc repro evaluate` first (or pass --metrics DIR)")
    out = {}
    for f in files:
        try:
            out[f.stem] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise RegressError(f"{f} is not valid JSON ({e}); rerun `dvc repro evaluate`") from e
    return out


def default_baseline(preset: str) -> Path:
    return BASELINE_DIR / f"{preset}.json"


def load_baseline(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RegressError(f"baseline {path} not found; create it from a good run with "
                           f"`python -m longlive.eval.regress --update --baseline {path}` and commit it")
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegressError(f"baseline {path} is not valid JSON: {e}") from e
    if not isinstance(base, dict) or not isinstance(base.get("variants"), dict) or not base["variants"]:
        raise RegressError(f"baseline {path} needs a non-empty 'variants' mapping (variant -> metrics)")
    for key, tol in (base.get("tolerances") or {}).items():
        _check_tolerance(tol, f"{path}: tolerances.{key}")
    return base


# ----------------------------------------------------------------------------- comparing


@dataclass
class Check:
    variant: str
    metric: str
    baseline: float | None
    current: float | None
    allowed: float | None  # how much worse the current value may be
    higher_is_better: bool | None
    status: str  # ok | better | REGRESSED | MISSING | new | not compared
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("REGRESSED", "MISSING")


@dataclass
class Comparison:
    preset: str | None
    baseline_path: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        if self.passed:
            gated = sum(c.status in ("ok", "better") for c in self.checks)
            return f"PASS: {gated} gated metrics within tolerance of {self.baseline_path}"
        return "REGRESSION: " + "; ".join(_describe(c) for c in self.failed)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "baseline": self.baseline_path, "passed": self.passed,
                "regressed": [f"{c.variant}.{c.metric}" for c in self.failed], "summary": self.summary(),
                "checks": [asdict(c) for c in self.checks]}

    def rows(self) -> list[dict]:
        """Table rows as strings (for rich, markdown and Prefect artifacts)."""
        return [{"variant": c.variant, "metric": c.metric, "baseline": _fmt(c.baseline), "current": _fmt(c.current),
                 "change": _change(c), "allowed": _allowed(c), "status": c.status + (f" ({c.note})" if c.note else "")}
                for c in self.checks]

    def markdown(self) -> str:
        head = "PASS" if self.passed else "FAIL"
        lines = [MARKER, f"### LongLive regression check: **{head}** (preset {self.preset}, baseline `{self.baseline_path}`)",
                 "", self.summary(), "", "| variant | metric | baseline | current | change | allowed | status |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows():
            status = f"**{r['status']}**" if r["status"].startswith(("REGRESSED", "MISSING")) else r["status"]
            lines.append(f"| {r['variant']} | {r['metric']} | {r['baseline']} | {r['current']} | {r['change']} | "
                         f"{r['allowed']} | {status} |")
        return "\n".join(lines) + "\n"

    def print_table(self, file=None) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"regression check, preset {self.preset} vs {self.baseline_path}")
        for col, justify in (("variant", "left"), ("metric", "left"), ("baseline", "right"), ("current", "right"),
                             ("change", "right"), ("allowed", "right"), ("status", "left")):
            table.add_column(col, justify=justify)
        for c, r in zip(self.checks, self.rows()):
            style = "bold red" if c.failed else "green" if c.status == "better" else "dim" if c.status == "not compared" else ""
            table.add_row(*r.values(), style=style)
        console = Console(file=file, width=max(120, Console(file=file).width))
        console.print(table)
        # one line, never wrapped: CI logs and scripts read the verdict from the last line
        console.print(self.summary(), style="bold red" if self.failed else "bold green", soft_wrap=True)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def _change(c: Check) -> str:
    if c.baseline is None or c.current is None:
        return "-"
    d = c.current - c.baseline
    rel = f" ({d / abs(c.baseline):+.0%})" if c.baseline else ""
    return f"{d:+.4g}{rel}"


def _allowed(c: Check) -> str:
    if c.allowed is None or c.higher_is_better is None:
        return "-"
    return f"{'-' if c.higher_is_better else '+'}{c.allowed:.4g}"


def _describe(c: Check) -> str:
    if c.status == "MISSING":
        return f"{c.variant}.{c.metric} missing ({c.note})"
    word = "dropped" if c.higher_is_better else "rose"
    why = c.note or f"allowed {_allowed(c)}"
    return f"{c.variant}.{c.metric} {word} {_fmt(c.baseline)} -> {_fmt(c.current)} ({why})"


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return float(x)


def allowed_worsening(tol: dict, metric: str, base: dict, cur: dict) -> float:
    b = _number(base.get(metric))
    if "rel" in tol:
        return tol["rel"] * abs(b or 0.0) + tol.get("abs", 0.0)
    floor = tol.get("abs", 0.0)
    if "sigma" not in tol:
        return floor
    sems = [s for s in (_number(base.get(f"{metric}_sem")), _number(cur.get(f"{metric}_sem"))) if s is not None]
    if not sems:
        return floor
    if len(sems) == 1:
        sems = sems * 2  # the other side's error is taken to be the same size
    allowed = max(floor, tol["sigma"] * math.sqrt(sum(s * s for s in sems)))
    return min(allowed, tol["max"]) if "max" in tol else allowed


def _comparable(base: dict, cur: dict, metric: str) -> str | None:
    """None when hardware metrics of the two runs can be compared, else why not."""
    bi, ci = base.get("info") or {}, cur.get("info") or {}
    if bi.get("device_class") != ci.get("device_class"):
        return f"baseline on {bi.get('device_class')}, now {ci.get('device_class')}"
    if metric == "peak_memory_mb" and bi.get("memory_kind") != ci.get("memory_kind"):
        return f"memory measured as {bi.get('memory_kind')}, now {ci.get('memory_kind')}"
    return None


def compare(baseline: dict, current: dict[str, dict], *, hardware: str = "auto", baseline_path: str = "baseline",
            preset: str | None = None) -> Comparison:
    """Check every gated metric of every baseline variant against ``current`` (see the module doc)."""
    if hardware not in ("auto", "always", "never"):
        raise RegressError(f"hardware must be auto, always or never, got {hardware!r}")
    overrides = baseline.get("tolerances") or {}
    result = Comparison(preset or baseline.get("preset"), baseline_path)
    for variant, base in baseline["variants"].items():
        cur = current.get(variant)
        if cur is None:
            result.checks.append(Check(variant, "*", None, None, None, None, "MISSING",
                                       "variant not in the current metrics; rerun evaluate or --update the baseline"))
            continue
        for metric in base:
            rule = rule_for(metric)
            b = _number(base.get(metric))
            if rule is None or b is None:
                continue
            c = _number(cur.get(metric))
            on_cpu = (cur.get("info") or {}).get("device_class") == "cpu"
            default = rule.cpu_tolerance if on_cpu and rule.cpu_tolerance else rule.tolerance
            tol = _check_tolerance(overrides.get(f"{variant}.{metric}") or overrides.get(metric) or default,
                                   f"tolerance of {variant}.{metric}")
            if c is None:
                result.checks.append(Check(variant, metric, b, None, None, rule.higher_is_better, "MISSING",
                                           "not in the current metrics"))
                continue
            allowed = allowed_worsening(tol, metric, base, cur)
            why_not = None
            if rule.hardware and hardware != "always":
                why_not = "--hardware never" if hardware == "never" else _comparable(base, cur, metric)
            if why_not:
                result.checks.append(Check(variant, metric, b, c, allowed, rule.higher_is_better, "not compared", why_not))
                continue
            worse = (b - c) if rule.higher_is_better else (c - b)
            eps = 1e-9 * max(1.0, abs(b))
            status = "REGRESSED" if worse > allowed + eps else "better" if -worse > allowed + eps else "ok"
            note = ""
            chance = _number(cur.get("chance_score"))
            if metric in SCORES and chance is not None and c < chance + CHANCE_MARGIN <= b:
                status, note = "REGRESSED", f"at chance: below {chance:.3g} + {CHANCE_MARGIN}"
            result.checks.append(Check(variant, metric, b, c, allowed, rule.higher_is_better, status, note))
    for variant in current:
        if variant not in baseline["variants"]:
            result.checks.append(Check(variant, "*", None, None, None, None, "new",
                                       "no baseline; `longlive regress --update` adds it"))
    return result


# ----------------------------------------------------------------------------- the baseline file


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _run_record(current: dict[str, dict]) -> dict:
    first = next(iter(current.values()), {}).get("info") or {}
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "device": first.get("device")}  # on a CPU the device names its vector ISA


def write_baseline(path: str | os.PathLike, current: dict[str, dict], preset: str | None) -> dict:
    """Write ``current`` as the baseline at ``path`` (atomically), keeping an existing file's tolerances."""
    path = Path(path)
    old = json.loads(path.read_text()) if path.is_file() else {}
    run = _run_record(current)
    base = {"preset": preset or old.get("preset"), "created": run["created"], "commit": run["commit"],
            "device": run["device"],
            "note": old.get("note", "written by `python -m longlive.eval.regress --update` from reports/evaluate/metrics; "
                                    "tolerances override longlive.eval.regress.RULES by metric or variant.metric"),
            "tolerances": old.get("tolerances", {}), "runs": [run], "variants": current}
    _write(str(path), json.dumps(base, indent=2, sort_keys=False) + "\n")
    return base


def widen_baseline(path: str | os.PathLike, current: dict[str, dict], preset: str | None) -> dict:
    """Fold ``current`` into the baseline at ``path``: per gated metric the worse value (see the module doc).

    Both runs must cover the same variants: an envelope over different variant sets would gate nothing for
    the variants one of them lacks, so a mismatch is an error naming ``--update`` instead."""
    path = Path(path)
    old = load_baseline(path)
    if set(old["variants"]) != set(current):
        raise RegressError(f"--widen needs the same variants as {path} (baseline: {sorted(old['variants'])}, "
                           f"now: {sorted(current)}); rerun evaluate, or start a new baseline with --update")
    variants = {}
    for name, base in old["variants"].items():
        merged = dict(base)
        for metric, value in current[name].items():
            rule, b, c = rule_for(metric), _number(base.get(metric)), _number(value)
            if rule is None or c is None:
                continue
            if b is None or ((c < b) if rule.higher_is_better else (c > b)):
                merged[metric] = value
                if f"{metric}_sem" in current[name]:
                    merged[f"{metric}_sem"] = current[name][f"{metric}_sem"]
        variants[name] = merged
    runs = old.get("runs") or [{k: old.get(k) for k in ("created", "commit", "device")}]
    widened = {**old, "preset": preset or old.get("preset"), "runs": [*runs, _run_record(current)], "variants": variants}
    _write(str(path), json.dumps(widened, indent=2, sort_keys=False) + "\n")
    return widened


# ----------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", default=str(METRICS_DIR), help="directory of <variant>.json (default: %(default)s)")
    p.add_argument("--baseline", help="baseline JSON (default: benchmarks/baselines/<preset>.json)")
    p.add_argument("--preset", help="preset name (default: the one params.yaml records)")
    p.add_argument("--params", help="path to params.yaml")
    p.add_argument("--hardware", choices=("auto", "always", "never"), default="auto",
                   help="compare speed/memory: auto = only on the same device class")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as markdown (CI job summary, PR comment)")
    p.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true", help="write the current metrics as the baseline instead of checking")
    mode.add_argument("--widen", action="store_true",
                      help="fold the current metrics into the baseline, keeping the worse value of each gated metric "
                           "(another CI machine class's retraining of the same commit)")


def _preset_name(args) -> str:
    if args.preset:
        return args.preset
    from longlive.config import recorded_preset

    return recorded_preset(args.params)  # a LONGLIVE_PRESET that disagrees is refused, naming the route


def run(args: argparse.Namespace) -> int:
    try:
        preset = _preset_name(args)
        baseline_path = Path(args.baseline) if args.baseline else default_baseline(preset)
        current = load_metrics(args.metrics)
        if args.update:
            write_baseline(baseline_path, current, preset)
            print(f"wrote baseline {baseline_path} ({', '.join(current)}); commit it with the change that moved it")
            return 0
        if args.widen:
            runs = widen_baseline(baseline_path, current, preset)["runs"]
            print(f"widened baseline {baseline_path}: now the envelope of {len(runs)} runs; commit it")
            return 0
        result = compare(load_baseline(baseline_path), current, hardware=args.hardware,
                         baseline_path=str(baseline_path), preset=preset)
    except (RegressError, ValueError) as e:
        print(f"longlive regress: {e}", file=sys.stderr)
        return 2
    result.print_table()
    if args.markdown:
        _write(args.markdown, result.markdown())
    if args.json:
        _write(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="longlive regress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
