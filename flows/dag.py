"""The DVC DAG as the flow sees it: one node per stage item (``train_ar@t2v``), its upstream items, the
resource it needs and its metrics files.

It is read from DVC itself (``Repo.index.graph``, the graph ``dvc dag`` prints), never listed here: a stage
added to ``dvc.yaml`` becomes a task of the next flow run without a change to flows/.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

RESOURCES = ("cpu", "gpu")
# Where each stage group runs. A stage can say it in dvc.yaml instead (DVC ignores `meta`):
#   mystage: {cmd: ..., meta: {resource: cpu}}
GPU_STAGES = {"base", "encode", "distill_decoder", "quantize", "evaluate"}  # and every train_*
CPU_STAGES = {"synth", "ingest", "validate", "publish"}

log = logging.getLogger(__name__)


class DagError(ValueError):
    """The DAG cannot be read or a request names something it lacks."""


@dataclass(frozen=True)
class Item:
    name: str                     # what `dvc repro --single-item` takes: "train_ar@t2v", "synth"
    upstream: tuple[str, ...]     # items whose outputs this one reads
    resource: str                 # "cpu" or "gpu": the work pool that runs it
    metrics: tuple[str, ...] = () # its metrics files or directories, relative to the repo (see metrics_of)

    @property
    def stage(self) -> str:
        return stage_of(self.name)


@dataclass
class Dag:
    items: dict[str, Item] = field(default_factory=dict)  # in a topological order: upstream first

    def downstream_depth(self) -> dict[str, int]:
        """Length of the longest chain of items that wait on each item: the scheduler starts deep ones first
        (train_ar before distill_decoder, which nothing waits on), so the critical path is never held back."""
        depth: dict[str, int] = {}
        for name in reversed(list(self.items)):
            depth.setdefault(name, 0)
            for up in self.items[name].upstream:
                depth[up] = max(depth.get(up, 0), depth[name] + 1)
        return depth

    def upstream_closure(self, targets: list[str]) -> Dag:
        """The targets and everything they depend on (what `dvc repro TARGET` would consider)."""
        unknown = [t for t in targets if t not in self.items and not self._group(t)]
        if unknown:
            raise DagError(f"unknown stage(s) {unknown}: the DAG has {sorted(self.items)}")
        keep: set[str] = set()
        todo = [name for t in targets for name in (self._group(t) or [t])]
        while todo:
            name = todo.pop()
            if name not in keep:
                keep.add(name)
                todo.extend(self.items[name].upstream)
        return Dag({name: item for name, item in self.items.items() if name in keep})

    def _group(self, stage: str) -> list[str]:
        """Every item of a foreach/matrix stage named by its group ("quantize" -> its eight items)."""
        return [name for name, item in self.items.items() if "@" in name and item.stage == stage]


def stage_of(item: str) -> str:
    """The stage group of an item: "train_ar" for "train_ar@t2v" (and for "sub/dvc.yaml:train_ar@t2v")."""
    return item.split("@", 1)[0].rsplit(":", 1)[-1]


def resource_of(stage: str, meta: dict | None) -> str:
    """``meta.resource`` from dvc.yaml if set, else the table above; a stage in neither goes to the GPU pool
    (a GPU machine runs CPU work too, the reverse fails) with a warning naming the fix."""
    declared = (meta or {}).get("resource")
    if declared is not None:
        if declared not in RESOURCES:
            raise DagError(f"stage {stage}: meta.resource is {declared!r}; use one of {list(RESOURCES)}")
        return declared
    if stage in CPU_STAGES:
        return "cpu"
    if stage in GPU_STAGES or stage.startswith("train_"):
        return "gpu"
    log.warning("stage %s has no resource: it goes to the gpu pool; add `meta: {resource: cpu}` to it in "
                "dvc.yaml if it needs no GPU", stage)
    return "gpu"


def _address(stage, root: Path) -> str:
    """What `dvc repro` takes when run in ``root``: "train_ar@t2v", or "sub/dvc.yaml:train_ar@t2v" elsewhere."""
    path = Path(stage.path).resolve()
    if path == (root / "dvc.yaml").resolve():
        return stage.name
    rel = os.path.relpath(path, root.resolve())
    return f"{rel}:{stage.name}" if stage.name != rel else rel


def metrics_of(stage) -> tuple[str, ...]:
    """The files with every figure a stage measured: its outs named metrics.json or metrics/ (dvc.yaml declares
    only a few headline figures as DVC metrics, for `dvc exp show`), else the DVC metrics it declares."""
    full = tuple(o.def_path for o in stage.outs if Path(o.def_path).name in ("metrics.json", "metrics"))
    return full or tuple(o.def_path for o in stage.outs if o.metric)


def read_dag(repo_dir: str | Path) -> Dag:
    """The DAG of the DVC project at ``repo_dir``: the graph ``dvc dag`` draws (edges from an item to the
    items whose outputs it depends on), with each item's resource and metrics paths."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(repo_dir)
    if not (root / "dvc.yaml").is_file():
        raise DagError(f"{root} has no dvc.yaml: pass the DVC project's directory as repo_dir")
    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph  # nodes: Stage; edge a -> b: a depends on an output of b
            # `Stage.addressing` is relative to this process's working directory: name them from the repo
            names = {s: _address(s, root) for s in graph}
            stages = {names[s]: s for s in graph if s.cmd}  # cmd-less nodes are .dvc files (data), not stages
            # upstream first; among items free to go in either order, dvc.yaml's order (the graph's node order)
            index = {s: i for i, s in enumerate(graph)}
            order = [names[s] for s in nx.lexicographical_topological_sort(graph.reverse(copy=False), key=index.get)
                     if names[s] in stages]
            items = {}
            for name in order:
                st = stages[name]
                items[name] = Item(
                    name=name,
                    upstream=tuple(sorted(names[d] for d in graph.successors(st) if names[d] in stages)),
                    resource=resource_of(stage_of(name), st.meta if isinstance(st.meta, dict) else None),
                    metrics=metrics_of(st),
                )
    except DvcException as e:
        raise DagError(f"dvc cannot read the DAG of {root}: {e}") from e
    return Dag(items)
