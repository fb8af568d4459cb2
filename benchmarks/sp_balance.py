"""Attention work per sequence-parallel rank: a contiguous split against LongLive 2.0's zigzag pairing
and our spatial split, for the masks training and streaming use (counted FLOPs, no GPU needed).

For each preset's shapes (tokens per frame, heads, head_dim, clip length, block size) and SP degree P it
counts, per rank, the mask-aware attention FLOPs of one layer's forward (QK^T and PV; what a
block-sparse kernel spends) under query-sharded attention (``allgather``: each rank attends its own
queries to all keys), where the partition decides the balance; under Ulysses every rank computes
heads / P over the whole sequence, so every partition is balanced (listed once as a check).
Imbalance = max / mean: the slowest rank sets the step time.

    python benchmarks/sp_balance.py      # seconds; writes benchmarks/results/sp_balance.{json,md}
"""

from __future__ import annotations

from pathlib import Path

from longlive.bench.harness import write_results
from longlive.config import load_preset
from longlive.models.attention import block_causal_mask
from longlive.parallel.partition import (
    attention_flops, contiguous_partition, imbalance, spatial_partition, zigzag_partition,
)
from longlive.train.ar import attention_mask

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def masks(F: int, block: int) -> dict:
    """Frame-level masks (frame_tokens = 1) and whether they are [clean | noisy] (halves = 2)."""
    return {
        "teacher_forcing_t2v": (attention_mask(F, 1, block, False), 2),
        "teacher_forcing_i2v": (attention_mask(F, 1, block, True), 2),
        "block_causal": (block_causal_mask(F, 1, block), 1),
    }


def partitions(mask, halves: int, tokens: int, ranks: int) -> dict:
    F = mask.shape[0]
    out = {"contiguous": contiguous_partition(F, tokens, ranks), "zigzag": zigzag_partition(mask, tokens, ranks, halves=halves)}
    if tokens % ranks == 0:
        out["spatial"] = spatial_partition(F, tokens, ranks)
    return out


def study(preset_name: str, degrees: tuple[int, ...]) -> list[dict]:
    p = load_preset(preset_name)
    _, F, h, w = p.latent_shape
    tokens = (h // p.dit.patch_size[1]) * (w // p.dit.patch_size[2])
    heads, head_dim = p.dit.num_heads, p.dit.head_dim
    rows = []
    for name, (mask, halves) in masks(F, p.ar.block_frames).items():
        for ranks in degrees:
            if ranks > mask.shape[0]:
                continue
            for part_name, part in partitions(mask, halves, tokens, ranks).items():
                flops = attention_flops(mask, part, heads, head_dim, mode="allgather")
                rows.append({
                    "preset": preset_name, "mask": name, "sp": ranks, "partition": part_name,
                    "attention": "allgather", "flops_per_rank": flops,
                    "imbalance": round(imbalance(flops), 4),
                    "tokens_per_rank": [part.num_tokens(r) for r in range(ranks)],
                })
            if heads % ranks == 0:
                flops = attention_flops(mask, contiguous_partition(mask.shape[0], tokens, ranks), heads, head_dim, mode="ulysses")
                rows.append({"preset": preset_name, "mask": name, "sp": ranks, "partition": "any",
                             "attention": "ulysses", "flops_per_rank": flops,
                             "imbalance": round(imbalance(flops), 4), "tokens_per_rank": None})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Attention FLOPs per sequence-parallel rank (one layer, one forward)",
        "",
        "`python benchmarks/sp_balance.py`. Mask-aware counts (QK^T + PV). `allgather`: query-sharded",
        "attention, the partition decides the balance; `ulysses`: head-sharded, balanced for any partition.",
        "Imbalance = max / mean rank work. Partitions: `contiguous` (whole frames, P runs), `zigzag`",
        "(LongLive 2.0: clean block + its noisy block per unit, early/late blocks dealt in a snake; or paired",
        "single frames, or the plain split, whichever leaves the busiest rank least), `spatial` (1/P of every",
        "frame: the default, exact for any frame-level mask). Shapes: wan22-5b 32 latent frames of 880",
        "tokens, blocks of 8, 24 heads x 128; tiny 9 frames of 16 tokens, blocks of 2, 4 heads x 32.",
        "",
        "| preset | mask | SP | attention | partition | GFLOP per rank | imbalance |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['mask']} | {r['sp']} | {r['attention']} | {r['partition']} | "
                     f"{', '.join(f'{x / 1e9:.4g}' for x in r['flops_per_rank'])} | {r['imbalance']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = study("wan22-5b", (2, 4, 8)) + study("tiny", (2,))
    write_results(RESULTS / "sp_balance.json", rows, markdown(rows), indent=1)
    for r in rows:
        if r["preset"] == "wan22-5b" and r["mask"] == "teacher_forcing_t2v":
            print(f"{r['mask']:22s} sp={r['sp']} {r['attention']:9s} {r['partition']:10s} imbalance {r['imbalance']:.3f}  "
                  f"TFLOP/rank {[round(f / 1e12, 3) for f in r['flops_per_rank']]}")


if __name__ == "__main__":
    main()
