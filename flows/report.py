"""The markdown report of one flow run: what ran, the evaluation's metrics table, links to the sample videos,
the plots and the release. Pure functions of the repository's files, so a test can check the text.

Paths follow what the stages write (longlive/eval/suite.py, stages/publish.py): ``reports/evaluate/metrics/
<variant>.json``, ``reports/evaluate/samples/<variant>/*.mp4``, ``reports/evaluate/plots/``,
``reports/publish/release.json`` (``url``: a local folder, relative to the repository, or a remote URL).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

EVALUATE = Path("reports/evaluate")
METRICS_DIR, SAMPLES_DIR, PLOTS_DIR = EVALUATE / "metrics", EVALUATE / "samples", EVALUATE / "plots"
RELEASE = Path("reports/publish/release.json")
# the headline columns of the table (each variant's JSON has all of them and more; it is linked per row)
COLUMNS = ("score", "multishot_score", "drift_score", "schedule_score", "fps", "first_chunk_latency_s",
           "peak_memory_mb", "weights_mb")
SAMPLES_PER_VARIANT = 4


@dataclass
class ItemRow:
    item: str
    resource: str
    state: str          # COMPLETED, FAILED, NOT RUN
    attempts: int = 0
    seconds: float | None = None
    ran: bool | None = None  # False: DVC found it up to date (or restored it from its run cache)
    error: str | None = None


def link(path: Path | str, root: Path) -> str:
    """A markdown link target: remote URLs as they are, local paths as file:// URIs of the worker's disk."""
    text = str(path)
    if "://" in text:
        return text
    p = Path(text)
    p = p if p.is_absolute() else root / p
    return p.resolve().as_uri()


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def metrics_table(root: Path) -> list[str]:
    files = sorted((root / METRICS_DIR).glob("*.json"))
    if not files:
        return [f"No `{METRICS_DIR}/*.json`: this run did not reach `evaluate` and none is recorded."]
    rows = {f.stem: json.loads(f.read_text()) for f in files}
    cols = [c for c in COLUMNS if any(c in m for m in rows.values())]
    out = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        out.append(f"| [{name}]({link(root / METRICS_DIR / (name + '.json'), root)}) | "
                   + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return out


def sample_links(root: Path) -> list[str]:
    out = []
    for d in sorted(p for p in (root / SAMPLES_DIR).glob("*") if p.is_dir()):
        videos = sorted(d.glob("*.mp4"))
        if videos:
            shown = ", ".join(f"[{v.name}]({link(v, root)})" for v in videos[:SAMPLES_PER_VARIANT])
            more = f" (+{len(videos) - SAMPLES_PER_VARIANT} more in [{d.name}/]({link(d, root)}))" \
                if len(videos) > SAMPLES_PER_VARIANT else ""
            out.append(f"- **{d.name}**: {shown}{more}")
    return out or [f"No sample videos under `{SAMPLES_DIR}/`."]


def plot_links(root: Path, html: Path | None) -> list[str]:
    out = [f"- [all plots (`dvc plots show`)]({link(html, root)})"] if html is not None else []
    for f in sorted((root / PLOTS_DIR).rglob("*.json")):
        out.append(f"- [{f.relative_to(root / PLOTS_DIR).as_posix()}]({link(f, root)})")
    return out or ["No plots."]


def release_lines(root: Path, published_now: bool) -> tuple[str | None, list[str]]:
    f = root / RELEASE
    if not f.is_file():
        return None, [f"No release: `{RELEASE}` does not exist (the `publish` stage has not run)."]
    rel = json.loads(f.read_text())
    url = rel.get("url")
    if not url:
        return None, [f"`{RELEASE}` names no url."]
    target = link(url, root)
    when = "published by this run" if published_now else "the last release recorded (`publish` did not run now)"
    line = f"- **{rel.get('version', '?')}**: [{url}]({target}), {when}"
    if rel.get("uploaded") is False:
        line += "; identical to what the store already held"
    return target, [line]


def render(root: Path, title: str, rows: list[ItemRow], failure: str | None, plots_html: Path | None = None,
           preset: str | None = None) -> str:
    root = Path(root).resolve()
    published = any(r.item == "publish" and r.state == "COMPLETED" for r in rows)
    lines = [f"# {title}: {'FAILED' if failure else 'COMPLETED'}", "",
             f"Repository `{root}`" + (f", preset `{preset}`" if preset else "") + ".", ""]
    if failure:
        first, _, rest = failure.partition("\n")
        lines += ["## Failure", "", f"**{first}**", ""] + ([f"```\n{rest}\n```", ""] if rest else [])
    lines += ["## Stages", "", "| item | pool | state | attempts | seconds | |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = "" if r.ran is None else ("ran" if r.ran else "up to date")
        lines.append(f"| `{r.item}` | {r.resource} | {r.state} | {r.attempts or ''} | "
                     f"{'' if r.seconds is None else f'{r.seconds:.1f}'} | {note} |")
    lines += ["", f"## Metrics (`{METRICS_DIR}`)", ""] + metrics_table(root)
    lines += ["", "## Sample videos", ""] + sample_links(root)
    lines += ["", "## Plots", ""] + plot_links(root, plots_html)
    _, rel = release_lines(root, published)
    lines += ["", "## Release", ""] + rel
    return "\n".join(lines) + "\n"


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    key = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, key.split("-")))


def flatten(d: dict, prefix: str = "") -> list[dict]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += flatten(v, key + ".")
        elif not isinstance(v, list):
            rows.append({"metric": key, "value": v})
    return rows


def metric_rows(root: Path, paths: tuple[str, ...] | list[str], item: str) -> list[dict]:
    """Rows of an item's metrics files (a directory: one JSON per entry, e.g. one per evaluated variant)."""
    rows = []
    for rel in paths:
        p = Path(root) / rel
        files = sorted(p.glob("*.json")) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            try:
                data = json.loads(f.read_text())
            except ValueError:
                continue
            if isinstance(data, dict):
                name = f.stem if p.is_dir() else item
                rows += [{"item": name, **row} for row in flatten(data)]
    return rows
