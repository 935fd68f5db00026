"""Micro-batches per second through 2- and 4-stage pipelines: pipepack against per-tensor p2p.

Reproduce (CPU, gloo, local ranks forked by bench/pipeline.py; ~1 min on 2 cores):
    python bench/bench_pipeline.py --out bench/results/pipeline_cpu_gloo.json
One configuration by hand (same model, same flags):
    python bench/pipeline.py --stages 4 --transport per_tensor --hidden 256 --layers 4 \
        --tokens 16 --microbatches 64 --depth 2

Same model, same micro-batches (varying token counts), same StageDriver for every transport;
only the hop differs (see bench/pipeline.py). The transports run on the same ranks and take
turns within each repeat, so a noisy (shared) machine slows them alike. Every run is also
checked bit-exact against the one-process run; ``one_process`` is the same model run in one
process (no pipeline, one core), the compute-only reference. Medians over ``--repeats`` timed
runs of all micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline  # noqa: E402
from bench_p2p import meta_record  # noqa: E402

from pipepack.pp.refmodel import ModelConfig, build_stage, sample_tokens  # noqa: E402


def one_process(args: argparse.Namespace) -> dict:
    """The whole model in this process, one thread: what the pipeline's stages split."""
    torch.set_num_threads(1)
    config = ModelConfig(
        vocab=args.vocab,
        hidden=args.hidden,
        heads=args.heads,
        layers=args.layers,
        dtype=pipeline.DTYPES[args.dtype],
    )
    sizes = pipeline.microbatch_sizes(args.microbatches, args.tokens)
    tokens = sample_tokens(config, sizes, seed=args.seed)
    model = build_stage(config, 0, 1)
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            for ids in tokens:
                model({"input_ids": ids})
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "stages": 1,
        "tp": 1,
        "transport": "one_process",
        "dtype": args.dtype,
        "depth": 0,
        "microbatches": len(sizes),
        "tokens": sum(sizes),
        "hidden": args.hidden,
        "layers": args.layers,
        "backend": "none",
        "repeats": len(times),
        "median_s": med,
        "mb_per_s": len(sizes) / med,
        "tokens_per_s": sum(sizes) / med,
        "match": True,
    }


def table(records: list[dict]) -> str:
    base = {r["stages"]: r for r in records if r["transport"] == "per_tensor"}
    lines = [
        "| stages | transport | micro-batches/s | p20–p80 | tokens/s | vs per_tensor | bit-equal |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in records:
        b = base.get(r["stages"])
        ratio = f"{r['mb_per_s'] / b['mb_per_s']:.2f}×" if b and r is not b else "-"
        spread = f"{r['mb_per_s_p20']:.0f}–{r['mb_per_s_p80']:.0f}" if "mb_per_s_p20" in r else "-"
        lines.append(
            f"| {r['stages']} | {r['transport']} | {r['mb_per_s']:.1f} | {spread} | "
            f"{r['tokens_per_s']:.0f} | {ratio} | "
            f"{'MATCH' if r['match'] else 'MISMATCH'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = pipeline.parser()
    p.description = __doc__.split("\n")[0]
    p.set_defaults(layers=4, tokens=16, microbatches=64, repeats=9, depth=2)
    p.add_argument("--stage-counts", type=int, nargs="+", default=[2, 4])
    p.add_argument(
        "--transports",
        nargs="+",
        default=["per_tensor", "pipepack", "pipepack_static", "pipepack_shm"],
        choices=pipeline.TRANSPORTS,
    )
    p.add_argument("--out", help="write the JSON records here")
    args = p.parse_args(argv)
    if args.backend != "gloo" or args.tp != 1:
        p.error("this table is the CPU/gloo, tp 1 run; use bench/pipeline.py under torchrun")
    t0 = time.time()
    records = [one_process(args)]
    for stages in args.stage_counts:  # one set of ranks per pipeline, transports alternating
        run = argparse.Namespace(**vars(args))
        run.stages = stages
        records += pipeline.run_local(run, args.transports)
    meta = meta_record(args)
    meta["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    meta["model"] = {
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "max_tokens": args.tokens,
        "microbatches": args.microbatches,
        "depth": args.depth,
    }
    print(
        f"\n{meta['device']} / gloo / torch {meta['torch']} / triton {meta['triton']} / "
        f"{meta['cores']} cores / {meta['date']} ({time.time() - t0:.0f} s)\n"
    )
    print(table(records))
    if args.out:
        with open(args.out, "w") as f:
            json.dump([meta] + records, f, indent=1)
    return 0 if all(r["match"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
