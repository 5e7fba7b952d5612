"""Where one training step's GPU time goes: CUDA time per kernel, per step, for Full and each variant.

``gpu_collection.py`` says how long a step takes; this says which kernels take it, so the next
change to a fused kernel aims at the right one (the fused MixedDim step was predicted at
0.6-0.8x of Full's and measured 1.24x: without a split per kernel, that gap has no address).
Each variant is built as in ``gpu_collection.py`` (10x of Full's bytes, the same workload),
warmed up, then ``--steps`` training steps (forward, ``sum().backward()``, the fused optimizer)
run under ``torch.profiler``; kernel times are summed over the steps and divided by their number.

    python benchmarks/gpu_train_profile.py --out DIR [--variants full,qr-10x,md-10x] [--fused-train-mode auto]
    python benchmarks/gpu_train_profile.py --out DIR --device cpu --rows 1000 --batch 64   # smoke test (CPU op times)

Writes DIR/gpu_train_profile.json and DIR/gpu_train_profile.md (the ``--top`` kernels of each
variant with their share of its step).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_collection  # noqa: E402
from harness import add_gpu_workload_args, env_info  # noqa: E402

from tablezip.compress import fused_train, full_bytes  # noqa: E402
from tablezip.compress.budget import methods_for_budget  # noqa: E402
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec  # noqa: E402


def build(variant: str, features: list[FeatureSpec], dim: int, device: torch.device) -> CompressedEmbeddingBagCollection:
    """``full`` or ``<method>-<ratio>x`` (e.g. ``qr-10x``): the method fitted to Full's bytes / ratio."""
    if variant == "full":
        return CompressedEmbeddingBagCollection(features, dim, None, device=device)
    method, _, ratio = variant.partition("-")
    if not ratio.endswith("x") or not ratio[:-1].isdigit() or int(ratio[:-1]) < 1:
        raise ValueError(f"variant must be 'full' or '<method>-<N>x' with N >= 1, got {variant!r}")
    methods = methods_for_budget(method, features, dim, full_bytes(features, dim) // int(ratio[:-1]))
    return CompressedEmbeddingBagCollection(features, dim, methods, device=device)


def kernel_times(coll: CompressedEmbeddingBagCollection, kjt: KeyedJaggedTensor, steps: int, mode: str) -> dict[str, Any]:
    """Per-step device time of every kernel (CPU op time on a CPU device) over ``steps`` steps."""
    on_cuda = kjt.values().is_cuda

    def step() -> None:
        with fused_train.mode(mode):
            out = coll(kjt).values()
        out.sum().backward()

    for _ in range(3):  # compile the kernels, size the buffers
        step()
    if on_cuda:
        torch.cuda.synchronize()
    before = len(gpu_collection.FUSED_STEPS)  # which path the profiled steps took (main counts them)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_cuda:
            torch.cuda.synchronize()
    used = len(gpu_collection.FUSED_STEPS) - before == steps
    kernels: dict[str, dict[str, float]] = {}
    for event in prof.key_averages():
        us = (event.self_device_time_total if on_cuda else event.self_cpu_time_total) / steps
        if us <= 0 or (on_cuda and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        kernels[event.key] = {"us_per_step": us, "calls_per_step": event.count / steps}
    total = sum(k["us_per_step"] for k in kernels.values())
    return {"fused_step_ran": used, "total_us_per_step": total,
            "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_step"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gpu_workload_args(parser, "cuda, or cpu for a smoke test of this script (CPU op times)")
    parser.add_argument("--variants", default="full,qr-10x,kway-10x,multihash-10x,md-10x,pruned-10x")
    parser.add_argument("--fused-train-mode", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per variant (>= 1)")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per variant in the markdown (>= 1)")
    args = parser.parse_args()
    for name in ("steps", "top", "tables", "rows", "dim", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    device = torch.device(args.device)
    gpu_collection.count_fused_steps()
    features = [FeatureSpec(f"f{i}", args.rows) for i in range(args.tables)]
    g = torch.Generator(device=device).manual_seed(0)
    values = torch.randint(0, args.rows, (args.tables * args.batch,), device=device, generator=g)
    kjt = KeyedJaggedTensor(keys=[f.name for f in features], values=values,
                            lengths=torch.ones(args.tables * args.batch, dtype=torch.long, device=device))
    result: dict[str, Any] = {"env": {**env_info(), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none (cpu smoke test)"},
                              "workload": {"tables": args.tables, "rows": args.rows, "dim": args.dim, "batch": args.batch,
                                           "steps": args.steps, "fused_train_mode": args.fused_train_mode},
                              "variants": {}}
    for variant in (v for v in args.variants.split(",") if v):
        coll = build(variant, features, args.dim, device)
        result["variants"][variant] = kernel_times(coll, kjt, args.steps, args.fused_train_mode)
        print(f"{variant}: {result['variants'][variant]['total_us_per_step']:.0f} us per step", flush=True)
        del coll
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_train_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    unit = "CUDA" if device.type == "cuda" else "CPU (self)"
    lines = [f"# One training step's kernels on {result['env']['gpu']}: {args.tables} tables x {args.rows:,} rows, D={args.dim}, B={args.batch:,}", "",
             f"`{result['env']['command']}` at commit {result['env']['git_commit'][:10]}; fused_train mode {args.fused_train_mode!r}; "
             f"{unit} time per step, summed over {args.steps} profiled steps / {args.steps}.", ""]
    for variant, r in result["variants"].items():
        lines += [f"## {variant}: {r['total_us_per_step']:.0f} us per step (fused training step ran: {r['fused_step_ran']})", "",
                  "| kernel | us / step | share | calls / step |", "|---|---:|---:|---:|"]
        for name, k in list(r["kernels"].items())[: args.top]:
            short = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| `{short}` | {k['us_per_step']:.1f} | {100 * k['us_per_step'] / r['total_us_per_step']:.0f}% | {k['calls_per_step']:g} |")
        lines.append("")
    (args.out / "gpu_train_profile.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
