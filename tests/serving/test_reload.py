"""Hot reload: atomic swaps under load, refusal of bad artifacts, SIGHUP through the real CLI,
and loading from an MLflow run."""
from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.serving import Client, Server, ServerConfig

from .conftest import DIM, NAMES, TOKEN, expected_lookup, trained_collection
from .conftest import IDS_OOV as IDS


def manifest_sha(directory: Path) -> str:
    return hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()


def serves_from_mlflow(source: str, uri: str, coll, run_dir: Path, ids: list[int], connect) -> dict:
    """Start a server on an MLflow source, check that it reports that source and the artifact
    exported to ``run_dir/embeddings`` and answers ``coll``'s vectors for ``ids``; its model info."""
    server = Server(source, ServerConfig(port=0), tracking_uri=uri).start()
    try:
        client = connect(server)
        info = client.model_info()
        assert info["source"] == source and info["checksum"] == manifest_sha(run_dir / "embeddings")
        np.testing.assert_array_equal(client.lookup("b", ids), expected_lookup(coll, "b", ids).numpy())
    finally:
        server.stop(grace=0)
    return info


def test_reload_under_load_never_fails_or_mixes_models(model_a, model_b, serve, connect):
    """Four client threads query in a loop while the model is swapped back and forth: no request
    fails, and every answer is entirely model A's or entirely model B's."""
    (coll_a, dir_a), (coll_b, dir_b) = model_a, model_b
    server = serve(dir_a, token=TOKEN)
    expected = {
        "lookup": [expected_lookup(c, "a", IDS).numpy() for c in (coll_a, coll_b)],
        "bags": [],
    }
    # LookupBags of features c and a (request order), 3 bags each; the same batch in model order.
    lengths, ids = torch.tensor([2, 0, 1, 3, 1, 1]), torch.tensor([7, 8, 9, 10, 11, 12, 5, 6])
    kjt = KeyedJaggedTensor(keys=NAMES, values=torch.tensor([10, 11, 12, 5, 6, 7, 8, 9]),
                            lengths=torch.tensor([3, 1, 1, 0, 0, 0, 2, 0, 1]))  # fmt: skip
    for coll in (coll_a, coll_b):
        with torch.no_grad():
            expected["bags"].append(coll(kjt).values().view(3, 3, DIM)[:, [2, 0]].numpy())
    stop = threading.Event()
    seen = {"A": 0, "B": 0}
    problems: list[str] = []
    lock = threading.Lock()

    def query(worker: int) -> None:
        client = Client(server.address, token=TOKEN)
        try:
            while not stop.is_set():
                try:
                    if worker % 2:
                        got, options = client.lookup("a", IDS), expected["lookup"]
                    else:
                        got = client.lookup_bags(["c", "a"], lengths, ids)
                        options = expected["bags"]
                except grpc.RpcError as err:
                    with lock:
                        problems.append(f"{err.code()}: {err.details()}")
                    continue
                match = [name for name, e in zip("AB", options) if np.array_equal(got, e)]
                with lock:
                    if len(match) != 1:
                        problems.append("an answer equal to neither model")
                    else:
                        seen[match[0]] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=query, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    admin = connect(server, token=TOKEN)
    checksums = []
    try:
        for directory in (dir_b, dir_a, dir_b, dir_a, dir_b):
            time.sleep(0.15)
            checksums.append(admin.reload(str(directory))["checksum"])
        time.sleep(0.15)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == []
    assert seen["A"] > 0 and seen["B"] > 0, seen
    assert checksums == [manifest_sha(d) for d in (dir_b, dir_a, dir_b, dir_a, dir_b)]
    assert admin.model_info()["generation"] == 6 and admin.stats()["reloads"] == 5


def test_a_tampered_artifact_is_refused_and_the_old_model_keeps_serving(model_a, model_b, tmp_path, serve, connect):
    (coll_a, dir_a), (_, dir_b) = model_a, model_b
    tampered = tmp_path / "tampered"
    shutil.copytree(dir_b, tampered)
    tables = tampered / "tables.safetensors"
    data = bytearray(tables.read_bytes())
    data[-5] ^= 0x01  # one bit of one table value
    tables.write_bytes(bytes(data))
    client = connect(serve(dir_a, token=TOKEN), token=TOKEN)
    before = client.model_info()
    for source, message in ((tampered, "does not match its sha256"), (tmp_path / "missing", "not a directory")):
        with pytest.raises(grpc.RpcError) as info:
            client.reload(str(source))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert message in info.value.details() and "still serving generation 1" in info.value.details()
    after = client.model_info()
    assert (after["checksum"], after["generation"]) == (before["checksum"], 1)
    np.testing.assert_array_equal(client.lookup("a", IDS), expected_lookup(coll_a, "a", IDS).numpy())
    stats = client.stats()
    assert stats["failed_reloads"] == 2 and stats["reloads"] == 0
    assert stats["rpcs"]["Reload"]["errors"] == {"FAILED_PRECONDITION": 2}


class Lines:
    """Lines of a subprocess stream, read by a thread so a test can wait with a timeout."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in stream], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if text in line:
                return line
        raise AssertionError(f"no line containing {text!r} within {timeout} s")


def test_sighup_reloads_the_cli_server_in_place(tmp_path):
    """`tablezip serve --port 0` in a subprocess: it prints its address; the artifact directory is
    re-exported with another model and SIGHUP swaps it in; a corrupt re-export is refused on the
    next SIGHUP and the server keeps the last good model; SIGTERM stops it cleanly."""
    coll_a, coll_b = trained_collection(seed=0), trained_collection(seed=1)
    artifact = coll_a.export(tmp_path / "served")
    env = {**os.environ, "TABLEZIP_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tablezip.pipelines.cli", "serve", str(artifact), "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        address = out.wait_for("tablezip serving").rsplit(" on ", 1)[1].split()[0]
        metrics_url = out.wait_for("Prometheus metrics on").rsplit(" on ", 1)[1].strip()
        assert metrics_url.startswith("http://127.0.0.1:") and metrics_url.endswith("/metrics")
        client = Client(address, token=TOKEN)
        np.testing.assert_array_equal(client.lookup("c", IDS), expected_lookup(coll_a, "c", IDS).numpy())

        coll_b.export(artifact)  # atomic replace of the directory
        proc.send_signal(signal.SIGHUP)
        assert "generation 2" in out.wait_for("reloaded")
        info = client.model_info()
        assert info["generation"] == 2 and info["checksum"] == manifest_sha(artifact)
        np.testing.assert_array_equal(client.lookup("c", IDS), expected_lookup(coll_b, "c", IDS).numpy())
        with urllib.request.urlopen(metrics_url, timeout=5) as response:  # --metrics-port, end to end
            scraped = response.read().decode().splitlines()
        assert "tablezip_model_generation 2" in scraped and "tablezip_reloads_total 1" in scraped
        assert 'tablezip_requests_total{method="Lookup",code="OK"} 2' in scraped

        (artifact / "tables.safetensors").write_bytes(b"not a tensor file")
        proc.send_signal(signal.SIGHUP)
        assert "cannot be read" in err.wait_for("reload refused")
        assert client.model_info()["generation"] == 2
        np.testing.assert_array_equal(client.lookup("c", IDS), expected_lookup(coll_b, "c", IDS).numpy())
        client.close()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serves_an_artifact_logged_to_mlflow(tmp_path, serve, connect, mlflow_store):
    """The layout training logs: the run directory under artifact path "model", the collection
    in "model/embeddings"; both runs:/ URIs serve the same model."""
    coll = trained_collection(seed=2)
    run_dir = tmp_path / "run"
    coll.export(run_dir / "embeddings")
    uri, client_mlflow = mlflow_store
    experiment = client_mlflow.create_experiment("serving", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client_mlflow.create_run(experiment)
    client_mlflow.log_artifacts(run.info.run_id, str(run_dir), artifact_path="model")
    client_mlflow.set_terminated(run.info.run_id)

    for source in (f"runs:/{run.info.run_id}/model/embeddings", f"runs:/{run.info.run_id}/model"):
        serves_from_mlflow(source, uri, coll, run_dir, IDS, connect)
    with pytest.raises(ValueError, match="cannot download from MLflow"):
        Server("runs:/0123456789abcdef/model", ServerConfig(port=0), tracking_uri=uri)
