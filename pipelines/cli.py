"""The ``tablezip`` command line: prepare data, train and compare compressed models."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Sequence


MODEL_NAMES = ["dlrm", "dcn", "din"]  # the keys of pipelines.train.MODELS (a test keeps them equal)


def _csv(text: str, cast, what: str) -> list:
    """Comma-separated values for a list option; a bad item is a usage error, not a traceback."""
    try:
        values = [cast(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one of the {what}, got {text!r}")
    return values


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _fractions(text: str) -> tuple[float, float, float]:
    parts = _csv(text, float, "numbers")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--fractions needs three comma-separated numbers (train,valid,test), got {text!r}")
    return parts[0], parts[1], parts[2]


def _methods(text: str) -> list[str]:
    from tablezip.compress.budget import FITTERS

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in FITTERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--methods: unknown {unknown or text!r}; allowed: {','.join(sorted(FITTERS))}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tablezip", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="Criteo TSV(.gz) files -> id-encoded parquet shards + vocabularies")
    prep.add_argument("inputs", nargs="+", type=Path, help="Criteo files in train.txt layout (plain or .gz)")
    prep.add_argument("--out", type=Path, required=True, help="output directory (must be empty, or use --overwrite)")
    prep.add_argument("--split", choices=["random", "ordered"], default="random")
    prep.add_argument("--fractions", type=_fractions, default=(0.8, 0.1, 0.1), help="train,valid,test (default 0.8,0.1,0.1)")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--min-count", type=int, default=1, help="train occurrences a value needs for its own id")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    prep.add_argument("--no-progress", action="store_true")
    prep.add_argument("--workers", type=int, default=None,
                      help="parallel Ray tasks (default: all CPUs, but inputs under 256 MiB run serially); 0 or 1: serial, no Ray")
    prep.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray); inputs and --out on shared storage")

    tr = sub.add_parser("train", help="train DLRM with one or more methods and compare them")
    tr.add_argument("--data", type=Path, required=True, help="a directory written by `tablezip prepare`")
    tr.add_argument("--methods", type=_methods, default=["full"], help="comma-separated, e.g. full,hash")
    tr.add_argument("--model", choices=MODEL_NAMES, default="dlrm",
                    help="CTR model (default dlrm); din = DIN-style target attention over the Criteo fields")
    tr.add_argument("--plan", type=Path, default=None,
                    help="train the per-feature methods of a `tablezip plan` JSON (instead of --methods/--ratio)")
    tr.add_argument("--query-fields", type=lambda t: _csv(t, str, "feature names"), default=None,
                    help="--model din: the ad-side query fields, e.g. C3,C4 (default: the 4 largest)")
    tr.add_argument("--ratio", type=float, default=10.0, help="compressed methods get Full's bytes / RATIO (default 10)")
    tr.add_argument("--dim", type=int, default=16)
    tr.add_argument("--epochs", type=int, default=1)
    tr.add_argument("--batch-size", type=int, default=256)
    tr.add_argument("--dense-lr", type=float, default=1e-3)
    tr.add_argument("--table-lr", type=float, default=0.05)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--max-train-rows", type=int, default=None)
    tr.add_argument("--out", type=Path, default=Path("runs"), help="exported artifacts go here (default runs/)")
    tr.add_argument("--tracking-uri", default="sqlite:///mlruns.db", help="MLflow store (default sqlite:///mlruns.db)")
    tr.add_argument("--experiment", default="tablezip")
    tr.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--torch-threads", type=_nonnegative_int, default=1,
                    help="torch intra-op threads of an in-process run (default 1: the model is small, and on a "
                         "shared 2-core machine two threads stalled each other up to 100x whenever another "
                         "process held a core; 0: torch's default)")
    tr.add_argument("--workers", type=int, default=0,
                    help="0 (default): train in this process, no Ray; N: data-parallel on N Ray Train workers "
                         "sharing each global batch of --batch-size")
    tr.add_argument("--address", default=None, help="Ray cluster for --workers (default: a local Ray); --data and --out on shared storage")
    tr.add_argument("--gpu", action="store_true", help="one GPU per Ray worker (nccl) instead of CPU (gloo)")
    tr.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                    help="checkpoint every K steps as well as after each epoch (default 0: after each epoch only)")
    tr.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints")
    tr.add_argument("--resume", action="store_true",
                    help="continue each method's run from its newest checkpoint in OUT/<run>/checkpoints")

    pl = sub.add_parser("plan", help="choose a method per feature for a byte budget; writes a plan JSON for train/sweep")
    pl.add_argument("--data", type=Path, required=True, help="a directory written by `tablezip prepare` (train + valid)")
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", type=_bytes, help="embedding bytes allowed, e.g. 20MB, 1.5MiB, 1338982")
    budget.add_argument("--ratio", type=float, help="or Full's bytes / RATIO")
    pl.add_argument("--model", choices=MODEL_NAMES, default="dlrm",
                    help="the model the plan is for (recorded; the proxy itself is model-free)")
    pl.add_argument("--dim", type=int, default=16)
    pl.add_argument("--dtypes", type=lambda t: _csv(t, str, "dtypes"), default=["float32", "int8"],
                    help="row dtypes the planner may pick (one per plan): float32,float16,int8,int4 (default float32,int8)")
    pl.add_argument("--keep-full-below", type=int, default=100, help="features with fewer ids stay Full (default 100)")
    pl.add_argument("--out", type=Path, required=True, help="the plan JSON to write")
    pl.add_argument("--no-progress", action="store_true")

    sw = sub.add_parser("sweep", help="a grid of methods x budgets x models x seeds on Ray, tracked in MLflow")
    sw.add_argument("--data", type=Path, required=True, help="a directory written by `tablezip prepare`")
    sw.add_argument("--methods", type=_methods, default=["full", "hash"], help="comma-separated, e.g. full,hash,qr")
    sw.add_argument("--budgets", type=_floats, default=[2.0, 10.0, 100.0, 1000.0],
                    help="compression ratios (Full's bytes / budget), e.g. 2,10,100,1000; full runs at 1 only")
    sw.add_argument("--models", type=_models, default=["dlrm"], help="comma-separated: " + ",".join(MODEL_NAMES))
    sw.add_argument("--plan", type=Path, action="append", default=[],
                    help="add a `tablezip plan` JSON as a method (repeatable), at its own budget")
    sw.add_argument("--seeds", type=_ints, default=[0], help="comma-separated, e.g. 0,1,2")
    sw.add_argument("--out", type=Path, default=Path("sweep"), help="sweep.json/md, pareto.png and trial artifacts (default sweep/)")
    sw.add_argument("--tracking-uri", default="sqlite:///mlruns.db", help="MLflow store (default sqlite:///mlruns.db)")
    sw.add_argument("--experiment", default="tablezip-sweep")
    sw.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray on all cores)")
    sw.add_argument("--max-train-rows", type=int, default=None)
    sw.add_argument("--no-progress", action="store_true")

    sv = sub.add_parser("serve", help="serve an exported artifact over gRPC (Lookup, LookupBags, GetModelInfo, Stats, Reload)")
    sv.add_argument("source", help="artifact directory or MLflow URI (runs:/<run_id>/model/embeddings, models:/<name>/<version>)")
    sv.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed at startup)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    sv.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain; with --tls-key serves TLS")
    sv.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    sv.add_argument("--token", default=None, help="bearer token every call must send (default: $TABLEZIP_TOKEN); enables Reload")
    sv.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ sources")
    sv.add_argument("--max-ids", type=int, default=1_000_000, help="ids (and bags) per request (default 1,000,000)")
    sv.add_argument("--max-message-bytes", type=int, default=64 << 20, help="largest request accepted (default 64 MiB)")
    sv.add_argument("--workers", type=int, default=4, help="request threads (default 4)")
    sv.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1)")
    sv.add_argument("--max-concurrent-rpcs", type=int, default=256,
                    help="requests in flight or queued before RESOURCE_EXHAUSTED (default 256)")
    sv.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus text on http://HOST:PORT/metrics (same host as --host; 0 picks a free port; default off)")
    sv.add_argument("--reuse-port", action="store_true",
                    help="share --port with other `tablezip serve --reuse-port` processes (SO_REUSEPORT): each loads the model, "
                         "the kernel spreads connections over them; give each its own --metrics-port")

    q = sub.add_parser("query", help="query a running `tablezip serve`: vectors, --info, --stats, --health, --reload")
    q.add_argument("target", help="HOST:PORT of the server")
    q.add_argument("--feature", help="feature name for a lookup")
    q.add_argument("--ids", type=_ints, help="comma-separated ids, e.g. 1,2,3")
    q.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    q.add_argument("--info", action="store_true", help="the model: features, methods, bytes, checksum")
    q.add_argument("--stats", action="store_true", help="requests, errors and latency per RPC")
    q.add_argument("--health", action="store_true", help="the standard gRPC health check")
    q.add_argument("--reload", nargs="?", const="", default=None, metavar="SOURCE",
                   help="make the server load SOURCE (default: its current source again); needs --token")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--token", default=None, help="bearer token (default: $TABLEZIP_TOKEN)")
    q.add_argument("--tls-root-cert", type=Path, default=None, help="PEM root certificate: connect with TLS")
    q.add_argument("--tls-server-name", default=None, help="expected name in the server certificate, if not the target host")
    q.add_argument("--timeout", type=float, default=30.0, help="deadline per call in seconds (default 30)")
    return parser


def _floats(text: str) -> list[float]:
    values = _csv(text, float, "numbers")
    if any(not v >= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be ratios >= 1, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    return _csv(text, int, "integers")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _bytes(text: str) -> int:
    """'20MB' / '1.5MiB' / '1338982' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 20MB, 1.5MiB or 1338982, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"the budget must be at least 1 byte, got {text!r}")
    return value


def _models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODEL_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--models: unknown {unknown or text!r}; allowed: {','.join(MODEL_NAMES)}")
    return names


def cmd_prepare(args: argparse.Namespace) -> int:
    from .criteo import NotPreparedError, PrepareConfig, prepare_criteo, read_manifest

    config = PrepareConfig(seed=args.seed, split=args.split, fractions=args.fractions, min_count=args.min_count)
    if args.overwrite and args.out.exists():
        try:
            read_manifest(args.out)
        except NotPreparedError:
            print(f"error: --overwrite refuses to delete {args.out}: it is not a prepared directory", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    report = prepare_criteo(args.inputs, args.out, config, progress=not args.no_progress,
                            workers=args.workers, address=args.address)
    print(report.summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .report import format_table, human_bytes
    from .train import TrainConfig, ray_session, train

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    results = []
    plan_ratio = None
    if args.plan is not None:
        from .plan import checked_plan_ratio

        plan_ratio = checked_plan_ratio(args.data, args.plan)
    methods = ["plan"] if args.plan is not None else args.methods
    with ray_session(args.address, args.workers):  # one Ray for all methods (none when --workers 0)
        for method in methods:
            config = TrainConfig(
                method=method,
                plan=str(args.plan.resolve()) if args.plan is not None else None,
                query_fields=tuple(args.query_fields or ()),
                model=args.model,
                ratio=plan_ratio if plan_ratio else 1.0 if method == "full" else args.ratio,
                dim=args.dim,
                epochs=args.epochs,
                batch_size=args.batch_size,
                dense_lr=args.dense_lr,
                table_lr=args.table_lr,
                seed=args.seed,
                max_train_rows=args.max_train_rows,
            )
            result = train(
                args.data,
                config,
                args.out,
                tracking_uri=None if args.no_mlflow else args.tracking_uri,
                experiment=args.experiment,
                progress=not args.no_progress,
                workers=args.workers,
                address=args.address,
                use_gpu=args.gpu,
                checkpoint_every=None if args.no_checkpoint else args.checkpoint_every,
                resume=args.resume,
            )
            if result.resumed_from:
                print(f"{method}: resumed from {result.resumed_from}")
            print(f"{method}: test AUC {result.test_auc:.4f}, logloss {result.test_logloss:.4f}, exported {result.artifact_dir}")
            results.append(result)
    rows = [
        [r.method, human_bytes(r.embedding_bytes), f"{r.embedding_bytes:,}", f"{r.ratio:.1f}x", f"{r.test_auc:.4f}",
         f"{r.test_logloss:.4f}", f"{r.examples_per_second:,.0f}", f"{r.wall_seconds:.1f}"]
        for r in results
    ]
    headers = ["method", "embeddings", "bytes", "ratio", "test AUC", "test logloss", "train ex/s", "wall s"]
    print()
    print(format_table(headers, rows, right=[False] + [True] * (len(headers) - 1)))
    if not args.no_mlflow:
        print(f"\nMLflow runs in {args.tracking_uri} (experiment {args.experiment!r}); artifacts in {args.out}/")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    records = run_sweep(
        args.data,
        args.methods,
        args.budgets,
        args.models,
        args.seeds,
        args.out,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        address=args.address,
        max_train_rows=args.max_train_rows,
        progress=not args.no_progress,
        plans=args.plan,
    )
    print((args.out / "sweep.md").read_text())
    failed = sum("error" in r for r in records)
    print(f"\n{len(records)} trials ({failed} failed); plot: {args.out / 'pareto.png'}; records: {args.out / 'sweep.json'}")
    print(f"MLflow runs in {args.tracking_uri} (experiment {args.experiment!r})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tablezip.compress import full_bytes

    from .plan import make_plan
    from .report import format_table, human_bytes
    from .train import feature_specs

    features = feature_specs(args.data)
    full = full_bytes(features, args.dim)
    if args.ratio is not None and not args.ratio >= 1:
        raise ValueError(f"--ratio must be >= 1, got {args.ratio}")
    budget = args.budget if args.budget is not None else int(full / args.ratio)
    plan = make_plan(args.data, budget, dim=args.dim, dtypes=args.dtypes, keep_full_below=args.keep_full_below,
                     progress=not args.no_progress)
    plan = dataclasses.replace(plan, notes={**plan.notes, "model": args.model, "data": str(args.data.resolve())})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(plan.to_json())
    rows = [[f.name, f"{f.num_embeddings:,}", plan.methods[f.name].kind,
             ", ".join(f"{k}={v}" for k, v in plan.methods[f.name].params().items() if v is not None)]
            for f in features]
    print(format_table(["feature", "ids", "method", "parameters"], rows, right=[False, True, False, False]))
    print(f"\nplan: {human_bytes(plan.bytes)} ({plan.bytes:,} bytes, {plan.dtype} rows) of a {human_bytes(budget)} budget; "
          f"Full is {human_bytes(full)} ({full / plan.bytes:.1f}x smaller); written to {args.out}")
    print(f"train it: tablezip train --data {args.data} --plan {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tablezip.serving.auth import token_from_env
    from tablezip.serving.server import ServerConfig, serve_forever

    config = ServerConfig(
        host=args.host, port=args.port, max_workers=args.workers, max_ids=args.max_ids,
        max_message_bytes=args.max_message_bytes, token=token_from_env(args.token), tls_cert=args.tls_cert,
        tls_key=args.tls_key, torch_threads=args.torch_threads, max_concurrent_rpcs=args.max_concurrent_rpcs,
        metrics_port=args.metrics_port, reuse_port=args.reuse_port,
    )
    logging.getLogger("tablezip.serving").setLevel(logging.INFO)
    try:
        return serve_forever(args.source, config, tracking_uri=args.tracking_uri)
    except OSError as err:  # the port is taken, the host cannot be bound, TLS files unreadable
        print(f"error: {err}", file=sys.stderr)
        return 2


def cmd_query(args: argparse.Namespace) -> int:
    from tablezip.serving.auth import token_from_env
    from tablezip.serving.query import run_query

    args.token = token_from_env(args.token)
    return run_query(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # noise from torchrec imports
    handlers = {"prepare": cmd_prepare, "train": cmd_train, "plan": cmd_plan, "sweep": cmd_sweep, "serve": cmd_serve, "query": cmd_query}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
