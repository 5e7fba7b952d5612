"""`tablezip query` against a real server: tables for people, JSON for scripts, errors as messages."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tablezip.pipelines.cli import main

from .conftest import TOKEN, expected_lookup


@pytest.fixture
def server(model_a, serve):
    return serve(model_a[1], token=TOKEN)


def test_query_prints_vectors_info_and_stats(server, model_a, capsys, monkeypatch):
    monkeypatch.setenv("TABLEZIP_TOKEN", TOKEN)
    coll = model_a[0]
    assert main(["query", server.address, "--feature", "b", "--ids", "1,2,1000", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["ids"] == [1, 2, 1000]
    np.testing.assert_array_equal(np.array(answer["vectors"], dtype=np.float32), expected_lookup(coll, "b", [1, 2, 1000]).numpy())

    assert main(["query", server.address, "--feature", "b", "--ids", "7"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["id", "b:", "vector"] and table[2].split()[0] == "7"
    assert [float(v) for v in table[2].split()[1:]] == pytest.approx(expected_lookup(coll, "b", [7])[0].tolist(), abs=1e-5)

    assert main(["query", server.address, "--info"]) == 0
    info = capsys.readouterr().out
    assert "hash" in info and "rows=97" in info and "qr" in info and server.holder.current.checksum in info
    assert main(["query", server.address, "--info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["features"][0] == {
        "name": "a", "num_embeddings": 1000, "pooling": "sum", "method": "hash", "params": {"rows": 97, "seed": 0, "budget_bytes": None}
    }  # fmt: skip
    assert main(["query", server.address, "--stats"]) == 0
    stats = capsys.readouterr().out
    assert "Lookup" in stats and "GetModelInfo" in stats
    assert main(["query", server.address, "--health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["query", server.address, "--reload"]) == 0
    assert "generation 2" in capsys.readouterr().out


def test_query_errors_are_messages(server, capsys):
    assert main(["query", server.address, "--feature", "b", "--ids", "1"]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["query", server.address, "--token", TOKEN, "--feature", "zz", "--ids", "1"]) == 1
    assert "NOT_FOUND: unknown feature 'zz'" in capsys.readouterr().err
    assert main(["query", server.address, "--token", TOKEN, "--feature", "b"]) == 2
    assert "needs --feature and --ids" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["query", server.address, "--feature", "b", "--ids", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_serve_refuses_a_bad_artifact_with_a_message(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_serve_reuse_port_shares_the_port_of_a_running_server(model_a, serve, connect):
    """`tablezip serve --reuse-port` in its own process binds the port a reuse_port server already
    holds (without the flag it would exit with "cannot bind"), then answers from its own copy."""
    coll, path = model_a
    first = serve(path, reuse_port=True)
    proc = subprocess.Popen([sys.executable, "-m", "tablezip.pipelines.cli", "serve", str(path), "--port", str(first.port), "--reuse-port"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # the startup line, or the error
        assert f"on 127.0.0.1:{first.port}" in line, line
        first.stop(grace=0)  # from now on only the subprocess can answer on this port
        client = connect(first.address)
        np.testing.assert_array_equal(client.lookup("b", [3, 10**9]), expected_lookup(coll, "b", [3, 10**9]).numpy())
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
