"""What fp16 / int8 / int4 serving tables cost in quality and buy in bytes and speed.

For each method at 10x fewer bytes than Full (md: the largest ratio its fitter reaches at D=16,
trying 10, 4, 3, 2), train DLRM on the Criteo sample (the same one-epoch run as README's
results), then swap the trained collection for ``quantize(collection, dtype)`` and re-evaluate
test AUC and logloss with the same dense weights: the deltas are what quantization alone costs.
Speed: forward of the fp32 collection (no grad, as ``load_inference`` serves fp32) against the
quantized one on the first 4096 test rows (26 features, one real id per bag), interleaved
repeats, median; and the TBE call alone (same indices), which isolates the kernel from the
method transforms the two share. Timing runs on one thread (set below) so the other processes
of a 2-core machine disturb it less.

    .venv/bin/python benchmarks/quantization.py [--prepared build/demo/prepared] [--seeds 0]
        [--methods full,hash,...] [--repeats 7] [--out build/quantization]
    python benchmarks/quantization.py --gpu --results DIR    # on a CUDA machine: parity + speed
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO_ROOT, env_info, time_cuda_fn, time_fn, write_results  # noqa: E402

from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, quantize  # noqa: E402

warnings.filterwarnings("ignore")

METHODS = "full,hash,qr,md,unified,pruned,hybrid,multihash,kway"
DTYPES = ("float16", "int8", "int4")
MD_RATIOS = (10.0, 4.0, 3.0, 2.0)
SAMPLE = REPO_ROOT / "data" / "criteo_sample_110k.tsv.gz"


def prepared_dir(path: Path) -> Path:
    """The sample prepared with README's split (ordered, 72/8/20), made if it does not exist."""
    if (path / "manifest.json").is_file():
        return path
    cmd = [sys.executable, "-m", "tablezip.pipelines.cli", "prepare", str(SAMPLE), "--out", str(path),
           "--split", "ordered", "--fractions", "0.72,0.08,0.2"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return path


def train_method(prepared: Path, method: str, seed: int, out: Path):
    """Train at 10x; md falls back to the largest ratio its fitter can reach."""
    from tablezip.pipelines.train import TrainConfig, train
    ratios = MD_RATIOS if method == "md" else (10.0,)
    for ratio in ratios:
        try:
            return ratio, train(prepared, TrainConfig(method=method, ratio=ratio, seed=seed), out, tracking_uri=None, progress=False)
        except ValueError as err:
            if ratio == ratios[-1]:
                raise
            print(f"  {method} at {ratio:g}x: {err.__class__.__name__}: {str(err)[:120]}; trying a smaller ratio", flush=True)
    raise AssertionError("unreachable")


def capture_tbe_call(collection, kjt) -> tuple[torch.Tensor, torch.Tensor]:
    """The (indices, offsets) the collection's forward hands to its TBE for ``kjt``."""
    captured: dict[str, Any] = {}
    inner = collection.tbe.forward

    def spy(indices, offsets, *args, **kwargs):
        captured["call"] = (indices, offsets)
        return inner(indices, offsets, *args, **kwargs)

    collection.tbe.forward = spy
    try:
        with torch.no_grad():
            collection(kjt)
    finally:
        del collection.tbe.forward
    return captured["call"]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Per-call ms of each fn, one repeat of every fn in turn, so load drift hits all alike."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            out[key].append(time_fn(fn, warmup=2, repeats=1, min_seconds=0.15)["median_ms"])
    return out


def measure(method: str, seed: int, prepared: Path, out: Path, repeats: int, batch: int) -> dict[str, Any]:
    # Imported here: the --gpu mode runs where the data pipeline's dependencies are not installed.
    from tablezip.pipelines.dataset import CriteoSplit
    from tablezip.pipelines.train import evaluate

    start = time.perf_counter()
    ratio_target, result = train_method(prepared, method, seed, out / f"seed{seed}")
    train_s = time.perf_counter() - start
    model = result.model
    fp32 = model.embeddings
    test = CriteoSplit(prepared, "test")
    record: dict[str, Any] = {
        "method": method, "seed": seed, "ratio_target": ratio_target, "train_seconds": train_s,
        "full_bytes": fp32.full_bytes(), "dtypes": {},
    }  # fmt: skip
    auc, logloss = evaluate(model, test, 8192)
    record["dtypes"]["float32"] = {"bytes": fp32.memory_bytes(), "auc": auc, "logloss": logloss}
    served = {"float32": fp32}
    for dtype in DTYPES:
        t0 = time.perf_counter()
        q = quantize(fp32, dtype)
        quantize_s = time.perf_counter() - t0
        model.embeddings = q
        auc, logloss = evaluate(model, test, 8192)
        record["dtypes"][dtype] = {"bytes": q.memory_bytes(), "auc": auc, "logloss": logloss, "quantize_seconds": quantize_s}
        served[dtype] = q
    model.embeddings = fp32
    fp32.eval()
    kjt = next(iter(test.batches(batch))).sparse
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forward = {k: (lambda m=m: m(kjt)) for k, m in served.items()}
        tbe_calls = {k: (lambda m=m, call=capture_tbe_call(m, kjt): m.tbe(*call)) for k, m in served.items()}
        with torch.no_grad():
            ref = fp32(kjt).values()
            for k, m in served.items():  # the timed modules serve the same batch, within quantization error
                assert m(kjt).values().shape == ref.shape
            fwd = interleaved(forward, repeats)
            tbe = interleaved(tbe_calls, repeats)
    finally:
        torch.set_num_threads(threads)
    for k in served:
        record["dtypes"][k].update(forward_ms=statistics.median(fwd[k]), forward_per_repeat_ms=fwd[k],
                                   tbe_ms=statistics.median(tbe[k]), tbe_per_repeat_ms=tbe[k])  # fmt: skip
    return record


def markdown(records: Sequence[dict[str, Any]], args: argparse.Namespace, env: dict[str, Any], wall_s: float) -> str:
    seeds = sorted({r["seed"] for r in records})
    lines = [
        "# Quantized serving tables: test AUC, bytes and forward speed per method",
        "",
        f"`{env['command']}` at commit {env['git_commit'][:10]}, {env['cpu_count']} CPUs; DLRM, D=16, one epoch on the "
        f"Criteo sample (ordered split 72/8/20, test = last 22,000 rows), seed(s) {seeds}; {wall_s / 60:.1f} min in all.",
        "Each method is trained once in fp32; the same model is re-evaluated with its collection quantized row-wise "
        "(fbgemm IntNBit TBE, fp32 output). dAUC = quantized - fp32 test AUC, in units of 1e-4 (mean over seeds). "
        "Bytes = `memory_bytes()` (stored rows incl. 4 bytes of fp16 scale+bias per int row, plus method extras); "
        "ratio = Full fp32 bytes / bytes.",
        f"Speed: B={args.batch} real test ids (26 features, one id per bag), 1 thread, median of {args.repeats} interleaved "
        "repeats per seed (mean over seeds); fwd = collection forward (transforms + TBE + combine), tbe = the TBE call "
        "alone; x = fp32 time / time.",
        "",
        "| method | fp32 ratio | fp32 AUC | fp16 dAUC | int8 dAUC | int4 dAUC | int8 ratio | int4 ratio | fwd ms fp32 | fp16 | int8 | int4 | tbe ms fp32 | fp16 | int8 | int4 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        def mean(dtype: str, key: str) -> float:
            return float(np.mean([r["dtypes"][dtype][key] for r in rs]))

        full = rs[0]["full_bytes"]
        d = {dt: (mean(dt, "auc") - mean("float32", "auc")) * 1e4 for dt in DTYPES}
        fwd = {dt: mean(dt, "forward_ms") for dt in ("float32", *DTYPES)}
        tbe = {dt: mean(dt, "tbe_ms") for dt in ("float32", *DTYPES)}
        label = method if rs[0]["ratio_target"] == 10 else f"{method} (at {rs[0]['ratio_target']:g}x)"
        lines.append(
            f"| {label} | {full / mean('float32', 'bytes'):.1f}x | {mean('float32', 'auc'):.4f} | "
            + " | ".join(f"{d[dt]:+.1f}" for dt in DTYPES)
            + f" | {full / mean('int8', 'bytes'):.1f}x | {full / mean('int4', 'bytes'):.1f}x | {fwd['float32']:.2f} | "
            + " | ".join(f"{fwd[dt]:.2f} ({fwd['float32'] / fwd[dt]:.2f}x)" for dt in DTYPES)
            + f" | {tbe['float32']:.2f} | "
            + " | ".join(f"{tbe[dt]:.2f} ({tbe['float32'] / tbe[dt]:.2f}x)" for dt in DTYPES)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(records: Sequence[dict[str, Any]]):
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(methods))
    width = 0.27
    for i, dt in enumerate(DTYPES):
        deltas = [np.mean([(r["dtypes"][dt]["auc"] - r["dtypes"]["float32"]["auc"]) * 1e4 for r in records if r["method"] == m]) for m in methods]
        ax1.bar(x + (i - 1) * width, deltas, width, label=dt)
        ratios = [np.mean([r["full_bytes"] / r["dtypes"][dt]["bytes"] for r in records if r["method"] == m]) for m in methods]
        ax2.bar(x + (i - 1) * width, ratios, width, label=dt)
    ax1.axhline(0, color="black", linewidth=0.8)
    ax1.set_ylabel("test AUC - fp32 test AUC (x1e-4)")
    ax1.set_title("what quantizing the trained tables costs")
    ax2.set_yscale("log")
    ax2.set_ylabel("Full fp32 bytes / bytes")
    ax2.set_title("compression incl. quantization (fp32 methods at 10x)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, methods, rotation=30)
        ax.legend()
    fig.tight_layout()
    return fig


# -- --gpu: parity and speed on CUDA (run on the lent GPU machine; no training data needed) -------
CARDINALITIES = (  # the prepared sample's vocabularies (benchmarks/collection_speed.py)
    471, 510, 37883, 21352, 127, 12, 7527, 230, 3, 10776, 3770, 34831, 2803,
    26, 4939, 29166, 9, 2451, 1197, 4, 32519, 13, 14, 10464, 49, 8044,
)  # fmt: skip


def gpu_parity(device: torch.device) -> list[dict[str, Any]]:
    """Every method at 10x (md 2x), quantized for CPU and for CUDA from the same fp32 tables:
    the CUDA kernels must give the CPU kernels' vectors (both dequantize the same stored rows)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from tablezip.compress import full_bytes, methods_for_budget

    rng = np.random.default_rng(0)
    features = [FeatureSpec(f"C{i + 1}", n, counts=np.sort(rng.zipf(1.2, n))[::-1].copy()) for i, n in enumerate(CARDINALITIES)]
    names = [f.name for f in features]
    lengths = torch.from_numpy(rng.integers(0, 4, size=len(names) * 512))
    values = torch.from_numpy(rng.integers(-2, 40000, size=int(lengths.sum())))
    kjt = KeyedJaggedTensor(keys=names, values=values, lengths=lengths)
    out = []
    for method in METHODS.split(","):
        ratio = 2 if method == "md" else 10
        methods = methods_for_budget(method, features, 16, int(full_bytes(features, 16) / ratio))
        coll = CompressedEmbeddingBagCollection(features, 16, methods, seed=1)
        for dtype in DTYPES:
            cpu, cuda = quantize(coll, dtype, "cpu"), quantize(coll, dtype, device)
            with torch.no_grad():
                a = cpu(kjt).values()
                b = cuda(kjt.to(device)).values().cpu()
            rec = {"method": method, "dtype": dtype, "max_abs_diff": float((a - b).abs().max()),
                   "max_abs": float(a.abs().max()), "memory_bytes": cuda.memory_bytes(), "device_bytes": cuda.device_bytes()}  # fmt: skip
            out.append(rec)
            print(f"parity {method:>9} {dtype:>7}: max |cuda - cpu| {rec['max_abs_diff']:.2e} (values up to {rec['max_abs']:.2e}); "
                  f"bytes {rec['memory_bytes']:,}, on the GPU {rec['device_bytes']:,}", flush=True)  # fmt: skip
    return out


def gpu_speed(device: torch.device, rows: int, dim: int, batch: int) -> list[dict[str, Any]]:
    """Forward of 26 Full tables of ``rows`` x ``dim``, one uniform id per bag: fp32 TBE against
    the quantized inference TBE, CUDA-event timed."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    features = [FeatureSpec(f"f{i}", rows - 1) for i in range(26)]
    coll = CompressedEmbeddingBagCollection(features, dim, device=device, seed=0)
    g = torch.Generator().manual_seed(0)
    kjt = KeyedJaggedTensor(
        keys=[f.name for f in features], values=torch.randint(0, rows - 1, (26 * batch,), generator=g),
        lengths=torch.ones(26 * batch, dtype=torch.int64),
    ).to(device)  # fmt: skip
    served: dict[str, Any] = {"float32": coll.eval()}
    for dtype in DTYPES:
        served[dtype] = quantize(coll, dtype, device)
    out = []
    with torch.no_grad():
        for dtype, module in served.items():
            t = time_cuda_fn(lambda m=module: m(kjt))
            read = 26 * batch * (dim * 4 if dtype == "float32" else served[dtype].quant_dtype.row_bytes(dim))
            rec = {"dtype": dtype, "rows": rows, "dim": dim, "batch": batch, "forward_ms": t["median_ms"], "p90_ms": t["p90_ms"],
                   "bytes": module.memory_bytes(), "device_bytes": module.memory_bytes() if dtype == "float32" else module.device_bytes(),
                   "row_bytes_read_GBps": read / t["median_ms"] / 1e6}  # fmt: skip
            out.append(rec)
            print(f"speed {dtype:>7}: {t['median_ms']:.3f} ms (p90 {t['p90_ms']:.3f}), {rec['bytes'] / 2**20:,.0f} MiB "
                  f"({rec['device_bytes'] / 2**20:,.0f} MiB allocated)", flush=True)  # fmt: skip
    return out


def gpu_main(out_dir: Path, rows: int, dim: int, batch: int) -> None:
    device = torch.device("cuda")
    parity, speed = gpu_parity(device), gpu_speed(device, rows, dim, batch)
    env = {**env_info(), "gpu": torch.cuda.get_device_name(device)}
    lines = [
        f"# Quantized tables on CUDA ({env['gpu']}, fbgemm-gpu {env['fbgemm_gpu']})",
        "",
        "Parity: every method (10x; md 2x) on 26 features of the sample's cardinalities, D=16, 512 bags of 0-3 ids; "
        "the same stored rows served by fbgemm's CUDA and CPU kernels. Bytes: `memory_bytes()` (packed rows) and "
        "`device_bytes()` (what fbgemm allocated on the GPU: rows padded to 16 bytes, tables to 128).",
        "",
        "| method | dtype | max abs diff CUDA vs CPU | bytes | GPU bytes |",
        "|---|---|---:|---:|---:|",
        *[f"| {r['method']} | {r['dtype']} | {r['max_abs_diff']:.1e} | {r['memory_bytes']:,} | {r['device_bytes']:,} |" for r in parity],
        "",
        f"Speed: forward, 26 Full tables x {rows:,} rows, D={dim}, B={batch:,}, one uniform id per bag, median of 20 CUDA-event repeats.",
        "",
        "| dtype | forward ms | p90 ms | table MiB | allocated MiB | row GB/s |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {r['dtype']} | {r['forward_ms']:.3f} | {r['p90_ms']:.3f} | {r['bytes'] / 2**20:,.0f} | {r['device_bytes'] / 2**20:,.0f} | {r['row_bytes_read_GBps']:.0f} |" for r in speed],
    ]
    records = [{"kind": "parity", **r} for r in parity] + [{"kind": "speed", **r} for r in speed]
    for path in write_results("quantization_gpu", [{**r, "env": env} for r in records], "\n".join(lines), out_dir=out_dir):
        print(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=REPO_ROOT / "build" / "demo" / "prepared",
                        help="prepared Criteo sample (made with README's split if missing)")  # fmt: skip
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "quantization", help="training runs go here")
    parser.add_argument("--name", default="quantization")
    parser.add_argument("--gpu", action="store_true", help="CUDA parity + speed instead (the lent GPU machine)")
    parser.add_argument("--gpu-rows", type=int, default=1_000_000)
    parser.add_argument("--gpu-dim", type=int, default=64)
    parser.add_argument("--gpu-batch", type=int, default=65536)
    parser.add_argument("--results", type=Path, default=None, help="where results go (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.gpu:
        gpu_main(args.results or REPO_ROOT / "benchmarks" / "results", args.gpu_rows, args.gpu_dim, args.gpu_batch)
        return
    start = time.perf_counter()
    prepared = prepared_dir(args.prepared)
    records = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for method in [m for m in args.methods.split(",") if m]:
            rec = measure(method, seed, prepared, args.out, args.repeats, args.batch)
            d = rec["dtypes"]
            print(
                f"{method:>9} seed {seed}: fp32 AUC {d['float32']['auc']:.4f} ({rec['full_bytes'] / d['float32']['bytes']:.1f}x, "
                f"trained in {rec['train_seconds']:.0f} s); dAUC x1e-4 "
                + ", ".join(f"{dt} {(d[dt]['auc'] - d['float32']['auc']) * 1e4:+.1f}" for dt in DTYPES)
                + "; fwd ms " + ", ".join(f"{dt} {d[dt]['forward_ms']:.2f}" for dt in ("float32", *DTYPES)),
                flush=True,
            )
            records.append({**rec, "workload": {"batch": args.batch, "features": 26, "ids": "first test rows"}, "env": env_info()})
    env = env_info()
    wall = time.perf_counter() - start
    paths = write_results(args.name, records, markdown(records, args, env, wall), plot(records),
                          out_dir=args.results or REPO_ROOT / "benchmarks" / "results")  # fmt: skip
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
