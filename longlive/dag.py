"""The DVC stage items a preset builds: what its ``evaluate`` and ``publish`` read, and what those need.

dvc.yaml's ``foreach`` lists and the variant-overlay plots iterate ``dag`` in params.yaml. DVC templating
cannot look up ``presets.${preset}.x`` nor compute a list, so ``dvc exp run`` writes ``dag`` when it composes
params.yaml from conf/ (DVC's Hydra composition calls :func:`dag_section` through the ``longlive_dag``
resolver, conf/hydra_plugins/longlive_dag.py), and ``longlive.config`` refuses a params.yaml whose ``dag``
is not what its preset implies. Works on plain dicts (the YAML), before validation, so the resolver needs
nothing but this module.

A checkpoint path names its producer: ``models/ar/V`` (train_ar V), ``models/dmd/V-S`` (train_dmd),
``models/dmd/V-S-qat`` (train_qat V-S, after train_dmd V-S), ``models/nvfp4/NAME`` (quantize NAME, after
the export ``models/dmd/NAME``); so do the reports ``publish.metrics`` names (``reports/quantize/NAME/...``).
A path elsewhere (a checkpoint made outside this DAG) builds nothing.
"""

from __future__ import annotations


class DagError(ValueError):
    """A checkpoint or report the preset names cannot be built by this DAG; the message names the key."""


def _dmd_name(name: str, dmd: dict, key: str) -> tuple[str, str]:
    """``V-S`` -> (V, S) with V in dmd.variants and S in dmd.students (either may contain '-')."""
    for v in dmd.get("variants") or []:
        for s in dmd.get("students") or {}:
            if name == f"{v}-{s}":
                return v, s
    raise DagError(f"{key}: {name!r} is not VARIANT-STUDENT with VARIANT in dmd.variants "
                   f"{list(dmd.get('variants') or [])} and STUDENT in dmd.students {list(dmd.get('students') or {})}")


class _Needs:
    def __init__(self, preset: dict):
        self.preset = preset
        self.dmd = preset.get("dmd") or {}
        self.train_dmd: set[tuple[str, str]] = set()
        self.train_qat: set[tuple[str, str]] = set()
        self.quantize: set[tuple[str, str, bool]] = set()

    def export(self, name: str, key: str) -> tuple[str, str, bool]:
        """A models/dmd export NAME (V-S or V-S-qat) and the items that make it."""
        if not self.dmd:
            raise DagError(f"{key}: {name!r} is a DMD export, but preset has no dmd section")
        qat = name.endswith("-qat")
        v, s = _dmd_name(name[: -len("-qat")] if qat else name, self.dmd, key)
        self.train_dmd.add((v, s))
        if qat:
            if s not in (self.dmd.get("qat_students") or []):
                raise DagError(f"{key}: {name!r} is the QAT fine-tune of {s}, which is not in dmd.qat_students "
                               f"{list(self.dmd.get('qat_students') or [])}: add it there")
            self.train_qat.add((v, s))
        return v, s, qat

    def path(self, path: str, key: str) -> None:
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[0] == "models" and parts[1] in ("ar", "dmd", "nvfp4"):
            group, name = parts[1], parts[2]
        elif len(parts) >= 3 and parts[0] == "reports" and parts[1] in ("train_ar", "train_dmd", "quantize"):
            group, name = {"train_ar": "ar", "train_dmd": "dmd", "quantize": "nvfp4"}[parts[1]], parts[2]
        else:
            return  # made outside this DAG (or by a stage every preset runs): nothing to build
        if group == "ar":
            variants = list(self.preset.get("ar", {}).get("variants") or {})
            if name not in variants:
                raise DagError(f"{key}: {path!r} needs train_ar {name!r}, which is not in ar.variants {variants}")
        elif group == "dmd":
            self.export(name, key)
        else:
            self.quantize.add(self.export(name, key))


def dag_section(preset: dict, name: str) -> dict:
    """The ``dag`` section of params.yaml for preset ``name`` (its values as in params.yaml)."""
    prefix = f"presets.{name}"
    needs = _Needs(preset)
    evaluate = preset.get("evaluate") or {}
    for variant, spec in (evaluate.get("variants") or {}).items():
        needs.path((spec or {}).get("checkpoint", ""), f"{prefix}.evaluate.variants.{variant}.checkpoint")
    publish = preset.get("publish") or {}
    for ckpt, spec in (publish.get("checkpoints") or {}).items():
        path = spec if isinstance(spec, str) else (spec or {}).get("path", "")
        needs.path(path, f"{prefix}.publish.checkpoints.{ckpt}")
    for metric, path in (publish.get("metrics") or {}).items():
        needs.path(str(path), f"{prefix}.publish.metrics.{metric}")

    # dmd.variants x dmd.students order, so item order (dvc dag, the flow) does not depend on what named them
    dmd = needs.dmd
    order = [(v, s) for v in dmd.get("variants") or [] for s in dmd.get("students") or {}]

    # VARIANT-STUDENT -> [VARIANT, STUDENT] (dvc.yaml: ${item[0]} ${item[1]}): a list is one params leaf, so one
    # `dvc exp show` column per item where a {variant, student} mapping would be two
    def items(pairs: set) -> dict:
        return {f"{v}-{s}": [v, s] for v, s in order if (v, s) in pairs}

    quantize = ([f"{v}-{s}" for v, s in order if (v, s, False) in needs.quantize]
                + [f"{v}-{s}-qat" for v, s in order if (v, s, True) in needs.quantize])
    return {
        "train_ar": list((preset.get("ar") or {}).get("variants") or {}),
        "train_dmd": items(needs.train_dmd),
        "train_qat": items(needs.train_qat),
        "quantize": quantize,
        # the evaluate variants: the drift plots' lines (a field each of reports/evaluate/plots/drift/*.json)
        "evaluate": list(evaluate.get("variants") or {}),
    }
