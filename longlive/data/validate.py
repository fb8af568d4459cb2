"""Validate encoded shards: shard-level checks plus a great-expectations suite over per-sample stats.

Two layers, one report:

* shard level (plain Python, because GX validates tables, not files): the manifest exists and is
  complete, its counts add up, every shard it lists is present and no shard file it does not list
  sits beside them, every shard's sha256 matches, every shard is a readable tar holding the keys the
  manifest lists;
* sample level (GX 1.x, ephemeral context, pandas dataframe): one row per readable sample with NaN/Inf
  counts, latent shape/dtype/mean/std, caption lengths and frame counts, checked by an
  ``ExpectationSuite`` whose failures name the offending sample keys.

Problems are failed checks in the report, never exceptions, so the stage can write the report and
then stop the DAG on ``not report.success``.

The report is also the gate in code: ``report.json`` records ``success`` and the sha256 of the manifest
it judged, and :func:`require_validated` (called wherever training opens shards) refuses a dataset
without a passing report for exactly that manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from longlive.config import Preset, ValidateConfig
from longlive.data.shards import (
    MANIFEST, ChecksumError, ShardError, iter_shard, open_fs, read_manifest_digest, shard_files,
)
from longlive.io import write_text_atomic
from longlive.secrets import redact_url

MAX_EXAMPLES = 10
COLUMNS = {  # column -> dtype of the per-sample table (also used to build an empty one)
    "key": "object", "shard": "object", "n_nan": "int64", "n_inf": "int64", "latent_shape": "object",
    "latent_dtype": "object", "latent_mean": "float64", "latent_std": "float64", "text_shape": "object",
    "num_text_embeddings": "int64", "num_shots": "int64", "min_caption_len": "int64",
    "num_latent_frames": "int64", "num_frames": "int64",
}


@dataclass
class Check:
    name: str  # what is expected, in words ("n_nan == 0")
    success: bool
    column: str | None = None
    kind: str = "sample"  # "shard" (files, manifest) or "sample" (a GX expectation)
    expectation: str | None = None  # the GX expectation type, for sample checks
    observed: str = ""  # a short summary: "3 of 96 samples", "observed 95"
    examples: list[str] = field(default_factory=list)  # failing sample keys / shard names, with values


@dataclass
class Report:
    url: str
    checks: list[Check]
    num_samples: int = 0
    num_shards: int = 0
    manifest_sha256: str | None = None  # the dataset judged; the training gate compares it
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def success(self) -> bool:
        return all(c.success for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.success]

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "url": self.url,
            "manifest_sha256": self.manifest_sha256,
            "created_at": self.created_at,
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "num_checks": len(self.checks),
            "num_failed": len(self.failures),
            "checks": [asdict(c) for c in self.checks],
        }

    def to_markdown(self) -> str:
        status = "PASSED" if self.success else "FAILED"
        lines = [
            f"# Data validation: {status}",
            "",
            f"`{self.url}`: {self.num_samples} samples in {self.num_shards} shards; "
            f"{len(self.checks) - len(self.failures)}/{len(self.checks)} checks passed ({self.created_at}).",
            "",
            "| check | column | result | observed | failing examples |",
            "|---|---|---|---|---|",
        ]
        for c in sorted(self.checks, key=lambda c: c.success):  # failures first
            cells = [c.name, c.column or "", "pass" if c.success else "**FAIL**", c.observed, "<br>".join(c.examples)]
            lines.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
        return "\n".join(lines) + "\n"

    def headline(self) -> str:
        """One line: the verdict and, when it failed, the first failed check with its first example."""
        if self.success:
            return f"{self.url}: {len(self.checks)} checks passed"
        first = self.failures[0]
        detail = first.examples[0] if first.examples else first.observed
        line = f"{self.url}: {len(self.failures)} of {len(self.checks)} checks failed; first: {first.name}: {detail}"
        return " ".join(line.split())  # examples may quote multi-line errors

    def summary(self) -> dict:
        """Flat numbers for DVC metrics."""
        return {
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "num_checks": len(self.checks),
            "num_failed": len(self.failures),
        }

    def write(self, out_dir: str | os.PathLike, stem: str = "report") -> tuple[Path, Path]:
        """Write ``{stem}.json`` and ``{stem}.md`` under ``out_dir``; return their paths."""
        out = Path(out_dir)
        paths = out / f"{stem}.json", out / f"{stem}.md"
        for path, text in zip(paths, (json.dumps(self.to_dict(), indent=2) + "\n", self.to_markdown())):
            write_text_atomic(path, text)
        return paths


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def expected_from_preset(preset: Preset, *, latent_dtypes: Iterable[str] = ("float16",),
                         num_samples: int | None = None) -> dict:
    """The ``expected`` dict of :func:`validate_shards` for data encoded with ``preset``."""
    return {
        "latent_shapes": [list(preset.latent_shape)],
        "latent_dtypes": list(latent_dtypes),
        "num_frames": preset.video.num_frames,
        "num_latent_frames": preset.latent_shape[1],
        "num_samples": num_samples,
    }


# ---------------------------------------------------------------------------------------------
# Per-sample statistics


def _shape_str(shape: Iterable[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def sample_row(sample: dict) -> dict:
    lat = np.asarray(sample.get("latents.npy", np.zeros((0,), np.float32)))
    text = np.asarray(sample.get("text.npy", np.zeros((0,), np.float16)))
    meta = sample.get("json") or {}
    lat64 = lat.astype(np.float64)
    finite = lat64[np.isfinite(lat64)]  # stats over finite values; NaN/Inf are counted separately
    captions = meta.get("captions") or [s.get("caption", "") for s in meta.get("shots", [])]
    return {
        "key": sample["__key__"],
        "shard": sample.get("__shard__", ""),
        "n_nan": int(np.isnan(lat64).sum() + np.isnan(text.astype(np.float32)).sum()),
        "n_inf": int(np.isinf(lat64).sum() + np.isinf(text.astype(np.float32)).sum()),
        "latent_shape": _shape_str(lat.shape),
        "latent_dtype": str(lat.dtype),
        "latent_mean": float(finite.mean()) if finite.size else float("nan"),
        "latent_std": float(finite.std()) if finite.size else float("nan"),
        "text_shape": _shape_str(text.shape),
        "num_text_embeddings": int(text.shape[0]) if text.ndim else 0,
        "num_shots": len(captions),
        "min_caption_len": min((len(str(c).strip()) for c in captions), default=0),
        "num_latent_frames": int(lat.shape[1]) if lat.ndim >= 2 else 0,
        "num_frames": int(meta.get("num_frames", -1)),
    }


# ---------------------------------------------------------------------------------------------
# Shard-level checks


def _check_shards(url: str, storage_options: dict | None) -> tuple[list[Check], list[dict], dict | None, str | None]:
    """Shard-level checks, the rows of every sample that could be read, the manifest and its sha256."""
    try:
        fs, root = open_fs(url, storage_options)
        manifest, digest = read_manifest_digest(url, fs=fs, root=root)
    except ShardError as e:
        return ([Check("manifest.json present and complete", False, kind="shard", observed=str(e),
                       examples=[redact_url(url)])], [], None, None)
    checks = [Check("manifest.json present and complete", True, kind="shard", observed=f"{manifest['num_shards']} shards")]

    shards = manifest["shards"]
    keys = [k for s in shards for k in s["keys"]]
    bad_counts = [s["name"] for s in shards if s["count"] != len(s["keys"])]
    total_ok = manifest.get("total_samples") == len(keys) and not bad_counts
    checks.append(Check(
        "manifest counts add up", total_ok, kind="shard",
        observed=f"total_samples {manifest.get('total_samples')}, keys listed {len(keys)}",
        examples=[f"{n}: count != len(keys)" for n in bad_counts][:MAX_EXAMPLES],
    ))

    listed = [s["name"] for s in shards]
    present = shard_files(url, fs=fs, root=root)
    missing = [n for n in listed if n not in present]
    extra = sorted(present - set(listed))
    checks.append(Check(
        "every shard the manifest lists is present", not missing, kind="shard",
        observed=f"{len(missing)} of {len(listed)} shards missing",
        examples=[f"{n} is listed in {MANIFEST} but missing; rerun `dvc repro encode` (it encodes their clips again)"
                  for n in missing][:MAX_EXAMPLES],
    ))
    checks.append(Check(
        "no shard files the manifest does not list", not extra, kind="shard",
        observed=f"{len(extra)} unlisted shard files",
        examples=[f"{n} is not in {MANIFEST}: encode did not write it and training would skip it; move it away "
                  "from the shard url" for n in extra][:MAX_EXAMPLES],
    ))

    rows: list[dict] = []
    sha_bad: list[str] = []
    unreadable: list[str] = []
    for entry in shards:
        if entry["name"] in missing:
            continue  # reported above, once
        try:
            samples = list(iter_shard(url, entry, verify=True, fs=fs, root=root))
        except ChecksumError as e:
            sha_bad.append(str(e))  # the message names the shard and the fix
            try:  # still read what it holds, so the sample checks can say more
                samples = list(iter_shard(url, entry, verify=False, fs=fs, root=root))
            except ShardError as e2:
                unreadable.append(str(e2))
                continue
        except ShardError as e:
            unreadable.append(str(e))
            continue
        rows.extend(sample_row(s) for s in samples)
    n = len(shards)
    checks.append(Check("shard sha256 matches manifest", not sha_bad, kind="shard",
                        observed=f"{len(sha_bad)} of {n} shards differ", examples=sha_bad[:MAX_EXAMPLES]))
    checks.append(Check("shard is a readable tar with the manifest's keys", not unreadable, kind="shard",
                        observed=f"{len(unreadable)} of {n} shards unreadable", examples=unreadable[:MAX_EXAMPLES]))
    return checks, rows, manifest, digest


# ---------------------------------------------------------------------------------------------
# The GX suite


def build_suite(expected: dict, cfg: ValidateConfig, num_rows: int) -> list:
    """The expectations, each tagged with ``meta["check"]`` (the words the report shows)."""
    import great_expectations as gx

    E = gx.expectations
    m = cfg.latent_mean_abs_max
    out = [
        E.ExpectColumnValuesToBeUnique(column="key", meta={"check": "sample keys are unique"}),
        E.ExpectColumnValuesToBeBetween(column="n_nan", min_value=0, max_value=0, meta={"check": "no NaN in latents/text"}),
        E.ExpectColumnValuesToBeBetween(column="n_inf", min_value=0, max_value=0, meta={"check": "no Inf in latents/text"}),
        E.ExpectColumnValuesToBeBetween(column="latent_mean", min_value=-m, max_value=m,
                                        meta={"check": f"|latent mean| <= {m}"}),
        E.ExpectColumnValuesToBeBetween(column="latent_std", min_value=cfg.latent_std_min, max_value=cfg.latent_std_max,
                                        meta={"check": f"latent std in [{cfg.latent_std_min}, {cfg.latent_std_max}]"}),
        E.ExpectColumnValuesToBeBetween(column="min_caption_len", min_value=1, meta={"check": "every caption non-empty"}),
        E.ExpectColumnValuesToBeBetween(column="num_shots", min_value=1, meta={"check": "at least one shot"}),
        E.ExpectColumnPairValuesToBeEqual(column_A="num_shots", column_B="num_text_embeddings",
                                          meta={"check": "one text embedding per shot"}),
        E.ExpectTableRowCountToEqual(value=num_rows, meta={"check": "every sample in the manifest is readable"}),
    ]
    if expected.get("latent_shapes"):
        shapes = sorted({_shape_str(s) for s in expected["latent_shapes"]})
        out.append(E.ExpectColumnValuesToBeInSet(column="latent_shape", value_set=shapes,
                                                 meta={"check": f"latent shape in {shapes}"}))
    dtypes = list(expected.get("latent_dtypes") or ["float16", "float32"])
    out.append(E.ExpectColumnValuesToBeInSet(column="latent_dtype", value_set=dtypes,
                                             meta={"check": f"latent dtype in {dtypes}"}))
    for col in ("num_frames", "num_latent_frames"):
        if expected.get(col) is not None:
            v = int(expected[col])
            out.append(E.ExpectColumnValuesToBeBetween(column=col, min_value=v, max_value=v,
                                                       meta={"check": f"{col} == {v}"}))
    if expected.get("num_samples") is not None:
        v = int(expected["num_samples"])
        out.append(E.ExpectTableRowCountToEqual(value=v, meta={"check": f"dataset has {v} samples"}))
    return out


def run_suite(df: pd.DataFrame, expectations: list) -> list[Check]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig,
    )

    # Ephemeral, in-memory, no analytics or progress bars: nothing written, nothing sent.
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(), analytics_enabled=False,
                               progress_bars=ProgressBarsConfig(globally=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    asset = context.data_sources.add_pandas(name="shards").add_dataframe_asset(name="samples")
    batch_def = asset.add_batch_definition_whole_dataframe("all_samples")
    suite = context.suites.add(gx.ExpectationSuite(name="longlive_shards"))
    for e in expectations:
        suite.add_expectation(e)
    batch = batch_def.get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["key"]})
    checks = []
    for r in result.results:
        cfg = r.expectation_config
        column = cfg.kwargs.get("column") or (
            f"{cfg.kwargs['column_A']}, {cfg.kwargs['column_B']}" if "column_A" in cfg.kwargs else None)
        res = r.result or {}
        if r.exception_info and r.exception_info.get("raised_exception"):
            observed = f"error: {r.exception_info.get('exception_message')}"
        elif "observed_value" in res:
            want = cfg.kwargs.get("value")
            observed = f"observed {res['observed_value']}" + (f", expected {want}" if want is not None else "")
        else:
            observed = f"{res.get('unexpected_count', 0)} of {res.get('element_count', len(df))} samples unexpected"
        examples = [_example(u) for u in (res.get("unexpected_index_list") or [])[:MAX_EXAMPLES]]
        checks.append(Check(cfg.meta.get("check", cfg.type), bool(r.success), column=column, kind="sample",
                            expectation=cfg.type, observed=observed, examples=examples))
    return checks


def _example(u: Any) -> str:
    if not isinstance(u, dict):
        return str(u)
    rest = ", ".join(f"{k}={v}" for k, v in u.items() if k != "key")
    return f"{u.get('key')} ({rest})" if rest else str(u.get("key"))


def validate_shards(url: str, expected: dict, cfg: ValidateConfig, *, storage_options: dict | None = None) -> Report:
    """Check the shards at ``url``; see :func:`expected_from_preset` for ``expected``.

    ``expected`` keys (all optional): ``latent_shapes`` (list of (C, F, h, w)), ``latent_dtypes``,
    ``num_frames`` (pixel frames per clip), ``num_latent_frames``, ``num_samples``.
    """
    shard_checks, rows, manifest, digest = _check_shards(url, storage_options)
    if manifest is None:  # nothing to look at: the report says why
        return Report(redact_url(url), shard_checks)
    df = pd.DataFrame(rows, columns=list(COLUMNS)).astype(COLUMNS)
    total = int(manifest["total_samples"])
    sample_checks = run_suite(df, build_suite(expected, cfg, total))
    return Report(redact_url(url), shard_checks + sample_checks, num_samples=len(df),
                  num_shards=int(manifest["num_shards"]), manifest_sha256=digest)


# ---------------------------------------------------------------------------------------------
# The gate


class NotValidatedError(ShardError):
    """The shards have no passing validation report for their current manifest."""


def require_validated(url: str, report: str | os.PathLike, storage_options: dict | None = None) -> tuple[Any, str, dict]:
    """``(fs, root, manifest)`` of the shards at ``url`` if ``report`` (the validate stage's ``report.json``)
    passed them; :class:`NotValidatedError` otherwise.

    The manifest returned is the one whose bytes the report's ``manifest_sha256`` names (one read), so a
    reader that takes its shard list from it reads exactly what was validated: each shard's sha256 is in
    it, and :func:`~longlive.data.shards.iter_shard` checks it.
    """
    fs, root = open_fs(url, storage_options)
    manifest, digest = read_manifest_digest(url, fs=fs, root=root)
    where, fix = redact_url(url), "run `dvc repro validate`"
    try:
        record = json.loads(Path(report).read_text())
    except FileNotFoundError:
        raise NotValidatedError(f"the shards at {where} have not been validated ({report} not found); {fix}") from None
    except (OSError, ValueError) as e:
        raise NotValidatedError(f"the shards at {where} have no readable validation report ({report}: {e}); {fix}") from None
    if not isinstance(record, dict) or record.get("manifest_sha256") != digest:
        judged = (record.get("manifest_sha256") or "none") if isinstance(record, dict) else "none"
        raise NotValidatedError(
            f"the shards at {where} changed since {report} judged them (manifest sha256 {digest[:12]}..., the report's "
            f"{judged[:12]}...); {fix}"
        )
    if record.get("success") is not True:
        raise NotValidatedError(
            f"the shards at {where} failed validation ({record.get('num_failed', '?')} failed checks, see "
            f"{Path(report).with_suffix('.md')}); fix the data (`dvc repro encode`), then {fix}"
        )
    return fs, root, manifest
