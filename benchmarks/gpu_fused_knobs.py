"""The fused training step's knobs, A/B on one GPU in one process: each setting's step time paired
with Full's, its kernels' times, and its tables after a step against the TBE path's.

Why: each GPU session has a few minutes of device time, and a knob of ``compress/fused_train.py``
(vectorised atomics, bags per gradient program, rows per update program, warps) judged in a later
run against an earlier run's Full says little (Full's own step moves 10-20% between runs). Here
every setting of every variant is timed back to back with the same Full, and a setting that
trains different tables than the TBE path is marked, so no speed is quoted for a wrong kernel.

    python benchmarks/gpu_fused_knobs.py --out DIR [--variants qr-10x,md-10x] [--settings "vec=1;vec=0;vec=1,bags=128"]
    python benchmarks/gpu_fused_knobs.py --out DIR --device cpu --rows 1000 --batch 64 --tables 4   # smoke test

A setting is ``knob=value`` pairs separated by commas, or ``defaults``; settings are separated by ``;``. Knobs:
``vec`` (fused_train.VECTOR_ATOMICS, 0/1), ``bags`` (GRAD_BLOCK_BAGS), ``rows`` (BLOCK_ROWS),
``warps`` (fused_lookup.NUM_WARPS: the lookup and gradient kernels' warps), ``mbags``
(MIXED_BLOCK_BAGS), ``uwarps`` (UPDATE_WARPS), ``programs`` (MAX_UPDATE_PROGRAMS). Writes DIR/gpu_fused_knobs.json and
DIR/gpu_fused_knobs.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_collection  # noqa: E402
import gpu_train_profile  # noqa: E402
from harness import add_gpu_workload_args, env_info, time_cuda_fn, time_fn  # noqa: E402

from tablezip.compress import fused_lookup, fused_train  # noqa: E402
from tablezip.compress.budget import methods_for_budget  # noqa: E402
from tablezip.compress import full_bytes  # noqa: E402
from tablezip.embeddings import FeatureSpec  # noqa: E402

# knob -> (module, attribute, smallest value): what a setting may change.
KNOBS: dict[str, tuple[Any, str, int]] = {
    "vec": (fused_train, "VECTOR_ATOMICS", 0),
    "bags": (fused_train, "GRAD_BLOCK_BAGS", 16),
    "rows": (fused_train, "BLOCK_ROWS", 1),
    "warps": (fused_lookup, "NUM_WARPS", 1),
    "mbags": (fused_train, "MIXED_BLOCK_BAGS", 16),
    "uwarps": (fused_train, "UPDATE_WARPS", 1),
    "programs": (fused_train, "MAX_UPDATE_PROGRAMS", 1),
}


def parse_settings(text: str) -> list[dict[str, int]]:
    """``"vec=1;vec=0,bags=128"`` -> [{"vec": 1}, {"vec": 0, "bags": 128}], with errors that name
    the bad piece and the allowed knobs and values."""
    settings = []
    for piece in (p.strip() for p in text.split(";")):
        if not piece:
            continue
        setting: dict[str, int] = {}
        if piece == "defaults":  # the module's own values
            settings.append(setting)
            continue
        for pair in piece.split(","):
            name, _, value = pair.strip().partition("=")
            if name not in KNOBS:
                raise ValueError(f"--settings: unknown knob {name!r} in {piece!r}; knobs: {', '.join(KNOBS)}")
            if not value.strip().isdigit():
                raise ValueError(f"--settings: {name} needs a non-negative integer, got {value!r} in {piece!r}")
            number = int(value)
            low = KNOBS[name][2]
            if number < low or (name == "vec" and number > 1) or (name != "vec" and number & (number - 1)):
                allowed = "0 or 1" if name == "vec" else f"a power of two >= {low}"
                raise ValueError(f"--settings: {name} must be {allowed}, got {number} in {piece!r}")
            setting[name] = number
        settings.append(setting)
    if not settings:
        raise ValueError("--settings: no setting given")
    return settings


class applied:
    """Set a setting's knobs for a ``with`` block, restoring the defaults after (the kernels are
    specialised on them at launch, so one process times them all)."""

    def __init__(self, setting: dict[str, int]) -> None:
        self.setting = setting
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        for name, value in self.setting.items():
            module, attr, _ = KNOBS[name]
            self.saved[name] = getattr(module, attr)
            setattr(module, attr, bool(value) if name == "vec" else value)

    def __exit__(self, *exc: Any) -> None:
        for name, value in self.saved.items():
            module, attr, _ = KNOBS[name]
            setattr(module, attr, value)


def label(setting: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items()) or "defaults"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gpu_workload_args(parser, "cuda, or cpu for a smoke test of this script (the interpreter; vec is 0 there)")
    parser.add_argument("--variants", default="qr-10x,kway-10x,multihash-10x,md-10x,pruned-10x")
    parser.add_argument("--settings", default="vec=0;vec=1", help="';'-separated settings of 'knob=value,...' (see above)")
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats per setting (>= 1)")
    parser.add_argument("--profile-steps", type=int, default=5, help="profiled steps per setting (0: no kernel times)")
    args = parser.parse_args()
    for name in ("repeats", "tables", "rows", "dim", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.profile_steps < 0:
        parser.error(f"--profile-steps must be >= 0, got {args.profile_steps}")
    try:
        settings = parse_settings(args.settings)
    except ValueError as e:
        parser.error(str(e))
    device = torch.device(args.device)
    gpu_collection.count_fused_steps()
    gpu_collection.FUSED_TRAIN_MODE = "on"  # fused_train_check's fused twin: the step under test
    features = [FeatureSpec(f"f{i}", args.rows) for i in range(args.tables)]
    g = torch.Generator(device=device).manual_seed(0)
    values = torch.randint(0, args.rows, (args.tables * args.batch,), device=device, generator=g)
    kjt = KeyedJaggedTensor(keys=[f.name for f in features], values=values,
                            lengths=torch.ones(args.tables * args.batch, dtype=torch.long, device=device))
    full = gpu_train_profile.build("full", features, args.dim, device)

    def step_of(coll, mode: str):
        def step() -> None:
            with fused_train.mode(mode):
                out = coll(kjt).values()
            out.sum().backward()
        return step

    one_time = (lambda f: time_cuda_fn(f, warmup=3, repeats=7, iterations=10)["median_ms"]) if device.type == "cuda" else (
        lambda f: time_fn(f, warmup=1, repeats=3, min_seconds=0.02)["median_ms"])
    full_step = step_of(full, "off")
    records: list[dict[str, Any]] = []
    for variant in (v for v in args.variants.split(",") if v):
        method, _, ratio = variant.partition("-")
        methods = methods_for_budget(method, features, args.dim, full_bytes(features, args.dim) // int(ratio.rstrip("x")))
        coll = gpu_train_profile.build(variant, features, args.dim, device)
        tbe_ms = one_time(step_of(coll, "off"))
        for setting in settings:
            with applied(setting):
                check = gpu_collection.fused_train_check(features, args.dim, methods, kjt)
                before = len(gpu_collection.FUSED_STEPS)
                step = step_of(coll, "on")
                ms = one_time(step)
                used = len(gpu_collection.FUSED_STEPS) > before
                ratio_full = gpu_collection.paired_ratio(device, full_step, step, repeats=args.repeats)
                kernels = gpu_train_profile.kernel_times(coll, kjt, args.profile_steps, "on") if args.profile_steps else None
            record = {
                "variant": variant, "setting": label(setting), "step_ms": ms, "tbe_path_step_ms": tbe_ms,
                "vs_full_paired": ratio_full, "fused_step_ran": used, **check,
                "kernels_us": {k: v["us_per_step"] for k, v in list(kernels["kernels"].items())[:6]} if kernels else None,
            }  # fmt: skip
            records.append(record)
            print(f"{variant} [{record['setting']}]: {ms:.3f} ms, {ratio_full:.2f}x Full (paired), TBE path {tbe_ms:.3f} ms, "
                  f"tables allclose {check['fused_train_tables_allclose']} ({check['fused_train_tables_max_abs_diff']:.2g})", flush=True)
        del coll
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env = {**env_info(), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none (cpu smoke test)"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_fused_knobs.json").write_text(json.dumps({"env": env, "records": records}, indent=2) + "\n")
    lines = [f"# Fused training step knobs on {env['gpu']}: {args.tables} tables x {args.rows:,} rows, D={args.dim}, B={args.batch:,}", "",
             f"`{env['command']}` at commit {env['git_commit'][:10]}. step: median ms of the fused step (forward, `sum().backward()`, "
             "the fused optimizer); vs Full: median over paired repeats of step / Full's step; tables: max |diff| after one step "
             "against a twin on the TBE path (allclose: rtol 1e-5, atol 1e-6; a setting that fails it has no valid speed).", "",
             "| variant | setting | step ms | vs Full | TBE path ms | fused ran | tables max diff | allclose | top kernels (us) |",
             "|---|---|---:|---:|---:|---|---:|---|---|"]
    for r in records:
        top = ", ".join(f"{k[:28]} {v:.0f}" for k, v in list((r["kernels_us"] or {}).items())[:3])
        lines.append(f"| {r['variant']} | {r['setting']} | {r['step_ms']:.3f} | {r['vs_full_paired']:.2f}x | {r['tbe_path_step_ms']:.3f} | "
                     f"{r['fused_step_ran']} | {r['fused_train_tables_max_abs_diff']:.2g} | {r['fused_train_tables_allclose']} | {top} |")
    (args.out / "gpu_fused_knobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
