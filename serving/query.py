"""``tablezip query``: one call to a running server, printed as a table or as JSON.

Kept out of pipelines/cli.py so the CLI stays a thin argument layer and this formatting can be
tested without a shell.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
import numpy as np

from tablezip.pipelines.report import format_table, human_bytes

from .client import Client


def run_query(args: argparse.Namespace) -> int:
    """0 on success; 1 when the server answers with an error status (printed to stderr)."""
    client = Client(args.target, token=args.token, tls_root_cert=args.tls_root_cert,
                    tls_server_name=args.tls_server_name, timeout=args.timeout)  # fmt: skip
    try:
        if args.health:
            status = client.health()
            print(json.dumps({"status": status}) if args.json else status)
        elif args.info:
            _print_info(client.model_info(), args.json)
        elif args.stats:
            _print_stats(client.stats(), args.json)
        elif args.reload is not None:
            info = client.reload(args.reload)
            print(json.dumps(info, indent=2) if args.json else
                  f"reloaded {info['source']}: generation {info['generation']}, checksum {info['checksum'][:12]}")  # fmt: skip
        else:
            if not args.feature or args.ids is None:
                print("error: query needs --feature and --ids (or --info, --stats, --health, --reload)", file=sys.stderr)
                return 2
            vectors = client.lookup(args.feature, args.ids, dtype=args.dtype)
            _print_vectors(args.feature, args.ids, vectors, args.json)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def _print_vectors(feature: str, ids: list[int], vectors: np.ndarray, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"feature": feature, "ids": ids, "vectors": vectors.astype(np.float64).tolist()}))
        return
    rows = [[str(i), " ".join(f"{v:+.5f}" for v in row)] for i, row in zip(ids, vectors)]
    print(format_table(["id", f"{feature}: vector [{vectors.shape[1]}]"], rows, right=[True, False]))


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"source     {info['source']}\nchecksum   {info['checksum']} (generation {info['generation']})")
    print(f"dim        {info['dim']}, dtype {info['dtype']}, {human_bytes(info['memory_bytes'])} "
          f"({info['memory_bytes']:,} bytes; Full would be {info['full_bytes']:,})")  # fmt: skip
    print(f"versions   artifact {info['tablezip_version']}, server {info['server_version']}; "
          f"loaded {info['loaded_at']} in {info['load_seconds']:.2f} s\n")  # fmt: skip
    rows = [[f["name"], f"{f['num_embeddings']:,}", f["pooling"], f["method"],
             ", ".join(f"{k}={v}" for k, v in sorted(f["params"].items()))] for f in info["features"]]  # fmt: skip
    print(format_table(["feature", "ids", "pooling", "method", "params"], rows, right=[False, True, False, False, False]))


def _print_stats(stats: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    print(f"uptime {stats['uptime_seconds']:.0f} s, generation {stats['generation']}, "
          f"reloads {stats['reloads']} ({stats['failed_reloads']} refused)\n")  # fmt: skip
    rows = [[method, f"{s['requests']:,}", f"{s['ids']:,}", f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}", f"{s['max_ms']:.3f}",
             ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "-"]
            for method, s in stats["rpcs"].items()]  # fmt: skip
    print(format_table(["rpc", "requests", "ids", "p50 ms", "p99 ms", "max ms", "errors"], rows,
                       right=[False, True, True, True, True, True, False]))  # fmt: skip
