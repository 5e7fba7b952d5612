"""Quantized artifacts come through the same loader: the server reports their dtype from the
manifest and answers what the quantized module computes (no fp32 fast path for them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tablezip.embeddings import load_inference
from tablezip.serving.reader import TableRowReader
from tests.conftest import random_kjt

from .conftest import DIM, IDS_OOV, NAMES


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_quantized_artifacts_are_served_as_their_module_computes(model_a, dtype, tmp_path, serve, connect):
    directory = model_a[0].export(tmp_path / dtype, dtype=dtype)
    module = load_inference(directory)
    server = serve(directory)
    client = connect(server)
    info = client.model_info()
    assert info["dtype"] == dtype and info["memory_bytes"] == module.memory_bytes() < model_a[0].memory_bytes()
    assert not any(isinstance(r, TableRowReader) for r in server.holder.current.readers.values())
    for name in NAMES:
        expected = module.lookup(name, torch.tensor(IDS_OOV))
        np.testing.assert_array_equal(client.lookup(name, IDS_OOV), expected.numpy())
    kjt = random_kjt(NAMES, 12, 1000, seed=9)
    with torch.no_grad():
        expected_bags = module(kjt).values().view(12, len(NAMES), DIM)
    assert torch.equal(client.lookup_kjt(kjt, as_torch=True), expected_bags)
