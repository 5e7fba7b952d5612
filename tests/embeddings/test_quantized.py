"""Quantized serving tables (fp16 / int8 / int4 through fbgemm's inference TBE).

Three separate claims, tested separately:
1. rows: every dequantized element lies within ``quantization_error_bound`` of the fp32 row
   (derived from the row's stored scale and bias), and that bound is tight;
2. plumbing: the served module (fbgemm's int-n-bit kernels) gives the vectors of the fp32
   collection holding the rows dequantized in plain torch, for every method, pooled bags,
   mean pooling, dropped and out-of-space ids;
3. combiners: a lookup's error is bounded by the row bounds pushed through the method's
   combiner (sum, concat, projection, product, threshold mask), derived per method below.
Plus exact bytes, the artifact round trip and its refusals, and the alignment rules.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import unpadded_row_size_in_bytes

from tablezip.compress import KWay, QR
from tablezip.embeddings import (
    ArtifactError,
    CompressedEmbeddingBagCollection,
    QuantDtype,
    QuantizedEmbeddingBagCollection,
    load_inference,
    quantize,
)
from tablezip.embeddings.quantized import (
    check_table_dim,
    dequantize_rows,
    quantization_error_bound,
    quantize_rows,
    row_qparams,
)
from tests.conftest import random_kjt
from tests.embeddings.test_conformance import DIM, EXAMPLES, FEATURES, KINDS, NAMES

DTYPES = [d.value for d in QuantDtype]
# Combiner variants the conformance examples do not cover: QR's product of rows, k-way concat
# of dim / 2 wide (4-element) tables, k-way product.
VARIANTS = {
    "qr_concat": lambda f: QR(collisions=4, op="concat"),
    "kway_mult": lambda f: KWay(partitions=EXAMPLES["kway"][0](f).partitions, op="mult"),
}
CASES = KINDS + sorted(VARIANTS)


def trained(case: str, seed: int = 3) -> CompressedEmbeddingBagCollection:
    """A conformance collection moved one step away from its init (rows of unequal ranges)."""
    factory = VARIANTS.get(case) or EXAMPLES[case][0]
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, {f.name: factory(f) for f in FEATURES}, seed=seed)
    coll(random_kjt(NAMES, 32, 3000, max_len=4, seed=seed)).values().pow(2).sum().backward()
    return coll


# -- 1. rows -------------------------------------------------------------------------------
def hard_rows(dim: int) -> torch.Tensor:
    """Rows that stress the format: typical init/trained scales, rows far from zero with a tiny
    spread (the fp16 bias rounding dominates), constant rows, tiny rows (subnormal fp16 scale),
    one outlier per row, and large values near fp16's top."""
    g = torch.Generator().manual_seed(dim)
    parts = [
        torch.randn(200, dim, generator=g) * 0.01,
        torch.randn(200, dim, generator=g),
        torch.rand(50, dim, generator=g) * 1e-3 + 3.0,
        torch.rand(50, dim, generator=g) * 1e-4 - 100.0,
        torch.full((5, dim), 0.7),
        torch.zeros(5, dim),
        torch.randn(50, dim, generator=g) * 1e-6,
        torch.randn(50, dim, generator=g) * 100 + 3e4,
    ]
    outlier = torch.randn(50, dim, generator=g) * 0.01
    outlier[:, 0] = 5.0
    parts.append(outlier)
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [4, 8, 12, 16, 64])
def test_rows_stay_within_the_derived_bound(dtype, dim):
    w = hard_rows(dim)
    stored = quantize_rows(w, dtype)
    err = (dequantize_rows(stored, dtype) - w).abs()
    bound = quantization_error_bound(w, stored, dtype)
    assert bool((err <= bound).all()), float((err / bound).max())
    if dtype == "float16":
        return
    # fbgemm's CUDA kernels dequantize int rows in fp16 (hfma2): the served value is rounded once more.
    on_cuda = (dequantize_rows(stored, dtype).half().float() - w).abs()
    assert bool((on_cuda <= quantization_error_bound(w, stored, dtype, device="cuda")).all())
    # The bound's parts, a priori: s / 2 on the grid, and only fp16 rounding opens a gap between
    # the row's range and the grid's span [b, b + L s]: |b - min| <= 2**-11 |min| (bias), and the
    # top is short by at most L * 2**-11 * s (scale); a subnormal fp16 (< 2**-14) errs by up to
    # 2**-25 instead, and the fp32 range max - b is itself rounded (2**-23 of |max|).
    levels = QuantDtype(dtype).levels
    s, b = row_qparams(stored)
    lo, hi = w.min(1).values, w.max(1).values
    below = (b - lo).clamp(min=0)
    above = (hi - (b + levels * s)).clamp(min=0)
    assert bool((below <= torch.clamp(lo.abs() * 2.0**-11, min=2.0**-25)).all())
    assert bool((above <= levels * torch.clamp(s * 2.0**-11 * (1 + 2.0**-10), min=2.0**-25) + hi.abs() * 2.0**-22).all())
    typical = slice(0, 400)  # on ordinary rows the top gap stays under s / 2: int8 0.125 s, int4 0.007 s
    assert bool((above[typical] <= s[typical] / 2).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_bound_is_tight(dtype):
    """On many random rows some element sits almost at the bound: it is not a loose guess."""
    w = torch.randn(2000, 16, generator=torch.Generator().manual_seed(1)) * 0.05
    stored = quantize_rows(w, dtype)
    ratio = (dequantize_rows(stored, dtype) - w).abs() / quantization_error_bound(w, stored, dtype)
    assert float(ratio.max()) > 0.95


def test_int_formats_match_fbgemm_layout_and_rounding():
    """Stored int rows are ``[scale | bias | codes]``; the codes are the nearest grid points."""
    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    for dtype in ("int8", "int4"):
        stored = quantize_rows(w, dtype)
        assert stored.dtype == torch.uint8 and stored.shape == (64, QuantDtype(dtype).row_bytes(8))
        s, b = row_qparams(stored)
        torch.testing.assert_close(b, w.min(1).values.half().float(), rtol=0, atol=0)
        fused = torch.cat([stored[:, 4:], stored[:, :4]], 1)  # fbgemm's own dequantizer wants qparams last
        reference = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, QuantDtype(dtype).bits)
        torch.testing.assert_close(dequantize_rows(stored, dtype), reference, rtol=0, atol=1e-6)


# -- 2. plumbing ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_served_vectors_are_the_fp32_model_on_dequantized_rows(case, dtype):
    coll = trained(case)
    served = quantize(coll, dtype)
    reference = served.dequantize()
    kjt = random_kjt(NAMES, 48, 3000, max_len=4, seed=11, id_low=-2)
    one_id_each = random_kjt(NAMES, 40, 3100, max_len=1, seed=12, id_low=-2)
    with torch.no_grad():
        for batch in (kjt, one_id_each):
            torch.testing.assert_close(served(batch).values(), reference(batch).values(), rtol=1e-6, atol=1e-7)


# -- 3. combiners --------------------------------------------------------------------------
def _gather(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = table[rows.clamp(min=0)]
    out[rows < 0] = 0  # a dropped id (pruned, other mixed-dim block) adds nothing, error 0
    return out


def lookup_error_bound(coll: CompressedEmbeddingBagCollection, served, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Bound on |served.lookup - coll.lookup| per element, from the per-row bounds e_k of the
    rows x_k the feature reads (slot k), derived per combiner:

    identity / sum / concat (full, hash, hybrid, pruned, multihash, unified, qr and kway with add
    or concat): the combiner is linear with non-negative coefficients, so it maps the e_k to the
    bound; mixed_dim: sum_k e_k |P_k| (a projection P_k mixes signs); product (qr, kway mult):
    |prod(x_k + d_k) - prod(x_k)| <= prod(|x_k| + e_k) - prod(|x_k|) for |d_k| <= e_k;
    learned_threshold: the row bound where the norm mask agrees (asserted), 0 where both drop it.
    A method not listed here fails, so a new method must state its own.
    """
    layout = coll.layouts[name]
    tables = coll.feature_tables(name)
    weights, stored = coll.table_weights(), served.quantized_tables()
    rows = layout.transform(ids)
    x = [_gather(weights[t].detach(), r) for t, r in zip(tables, rows)]
    e = [_gather(quantization_error_bound(weights[t], stored[t], served.dtype), r) for t, r in zip(tables, rows)]
    kind = layout.config.kind
    if kind == "mixed_dim":
        return sum(ek if layout.projection_of(k) is None else ek @ layout.projection_of(k).detach().abs() for k, ek in enumerate(e))
    if kind in ("qr", "kway") and layout.op == "mult":
        return math.prod(xk.abs() + ek for xk, ek in zip(x, e)) - math.prod(xk.abs() for xk in x)
    if kind == "learned_threshold":
        (xk,), (ek,) = x, e
        keep = xk.norm(dim=1) > layout.threshold.detach()
        deq = _gather(served.dequantized_weights()[tables[0]], rows[0])
        assert torch.equal(keep, deq.norm(dim=1) > layout.threshold.detach()), "quantization flipped a mask"
        return ek * keep.unsqueeze(1)
    assert kind in {"full", "hash", "hybrid", "pruned", "multihash", "unified", "qr", "kway"}, kind
    return layout.combine(e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_lookups_stay_within_the_combined_bound(case, dtype):
    coll = trained(case)
    served = quantize(coll, dtype)
    ids = torch.cat([torch.tensor([-5, -1, 0, 1, 11, 12, 499, 500, 2999, 3000, 10**9]), torch.randint(0, 3000, (200,))])
    for name in NAMES:
        with torch.no_grad():
            err = (served.lookup(name, ids) - coll.lookup(name, ids)).abs()
            bound = lookup_error_bound(coll, served, name, ids)
            # fp32 rounding of the combiner itself (sums, projections) on top of exact maths
            slack = 1e-6 * coll.lookup(name, ids).abs() + 1e-7
        assert bool((err <= bound + slack).all()), (name, float(((err - slack) / bound).max()))


# -- bytes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_memory_bytes_are_the_stored_rows_plus_extras(case, dtype, tmp_path):
    coll = trained(case)
    served = quantize(coll, dtype)
    extras = sum(l.extra_bytes() for l in coll.layouts.values())
    sparse = QuantDtype(dtype).sparse_type
    fbgemm_rows = sum(t.rows * unpadded_row_size_in_bytes(t.dim, sparse) for t in coll.table_specs())
    assert served.memory_bytes() == fbgemm_rows + extras
    # the TBE's real allocation on CPU: packed rows, nothing else
    assert served.tbe.weights_host.numel() == fbgemm_rows
    assert served.device_bytes() == served.memory_bytes()
    # and exactly the bytes the artifact stores
    path = coll.export(tmp_path / "a", dtype=dtype)
    manifest = json.loads((path / "manifest.json").read_text())
    stored = sum(math.prod(m["shape"]) * torch.empty(0, dtype=getattr(torch, m["dtype"])).element_size() for m in manifest["tensors"].values())
    assert stored == served.memory_bytes() == manifest["memory_bytes"]
    assert manifest["full_bytes"] == coll.full_bytes()


def test_int8_and_int4_bytes_per_row():
    """Inline qparams are 4 bytes a row: at D = 16 int8 keeps 20/64 of fp32, int4 12/64; a 4-wide
    table (mixed-dim block, concat part) pays 6 bytes in int4 for 2 bytes of codes."""
    assert [QuantDtype(d).row_bytes(16) for d in DTYPES] == [32, 20, 12]
    assert [QuantDtype(d).row_bytes(4) for d in DTYPES] == [8, 8, 6]


# -- artifacts -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_export_load_inference_round_trip(case, dtype, tmp_path):
    coll = trained(case)
    served = quantize(coll, dtype)
    loaded = load_inference(coll.export(tmp_path / case, dtype=dtype))
    assert isinstance(loaded, QuantizedEmbeddingBagCollection)
    assert loaded.dtype == dtype and not loaded.training
    assert loaded.methods == coll.methods and loaded.feature_names == coll.feature_names and loaded.dim == DIM
    assert loaded.memory_bytes() == served.memory_bytes() and loaded.full_bytes() == coll.full_bytes()
    assert all(torch.equal(a, b) for a, b in zip(loaded.quantized_tables(), served.quantized_tables()))
    kjt = random_kjt(NAMES, 32, 3000, max_len=4, seed=5, id_low=-2)
    with torch.no_grad():
        assert torch.equal(loaded(kjt).values(), served(kjt).values())
    ids = torch.tensor([0, 5, 2999, 3000, -1])
    assert torch.equal(loaded.lookup(NAMES[1], ids), served.lookup(NAMES[1], ids))


@pytest.fixture
def int8_artifact(tmp_path: Path) -> Path:
    return trained("pruned").export(tmp_path / "art", dtype="int8")


def test_quantized_manifest_checksums_every_tensor(int8_artifact):
    manifest = json.loads((int8_artifact / "manifest.json").read_text())
    assert manifest["dtype"] == "int8"
    assert {m["dtype"] for n, m in manifest["tensors"].items() if n.startswith("table.")} == {"uint8"}
    assert any(n.endswith(".remap") for n in manifest["tensors"])  # the pruned remap travels too
    assert all(len(m["sha256"]) == 64 for m in manifest["tensors"].values())


def test_changed_quantized_bytes_are_refused(int8_artifact):
    f = int8_artifact / "tables.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_inference(int8_artifact)


def test_edited_checksum_or_dtype_is_refused(int8_artifact):
    path = int8_artifact / "manifest.json"
    original = json.loads(path.read_text())
    m = json.loads(json.dumps(original))
    m["tensors"]["table.0"]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"'table.0'.*sha256"):
        load_inference(int8_artifact)
    m = json.loads(json.dumps(original))
    m["dtype"] = "int4"  # int8 rows declared int4: their width cannot match
    path.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="int4"):
        load_inference(int8_artifact)
    m["dtype"] = "int2"
    path.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="'int2' is not supported"):
        load_inference(int8_artifact)


def test_training_loader_refuses_quantized_artifacts(int8_artifact):
    with pytest.raises(ArtifactError, match="load_inference"):
        CompressedEmbeddingBagCollection.load(int8_artifact)


def test_fp32_export_is_unchanged_by_default(tmp_path):
    coll = trained("hash")
    manifest = json.loads((coll.export(tmp_path / "fp32") / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and "optimizer" in manifest and "seed" in manifest
    served = load_inference(tmp_path / "fp32")
    assert isinstance(served, CompressedEmbeddingBagCollection) and served.dtype == "float32"


# -- alignment and input checks ----------------------------------------------------------------
def test_alignment_errors_name_the_table_and_dim():
    """fbgemm 1.8's rules: int8 rows need an even width, int4 a multiple of 4, fp16 any. Every
    method's tables are multiples of 4 wide (the training TBE's rule), so trained collections
    always fit; the check guards hand-made rows and artifacts with a clear error, not a crash."""
    where = "table 2 (300x6, read by feature(s) 'large')"
    with pytest.raises(ValueError, match=r"table 2 \(300x6, read by feature\(s\) 'large'\) has rows of dim 6.*int4.*multiple of 4"):
        check_table_dim(6, QuantDtype.INT4, where)
    with pytest.raises(ValueError, match="dim 7.*int8.*multiple of 2"):
        quantize_rows(torch.randn(5, 7), "int8", "table 0 (5x7, read by feature(s) 'x')")
    check_table_dim(6, QuantDtype.INT8, where)
    check_table_dim(7, QuantDtype.FLOAT16, where)
    # the narrowest tables methods build (4 wide: mixed-dim blocks, concat parts) fit every dtype
    for case in ("mixed_dim", "qr_concat"):
        coll = trained(case)
        assert min(t.dim for t in coll.table_specs()) == 4
        assert quantize(coll, "int4").memory_bytes() > 0


def test_rows_the_fp16_format_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="beyond fp16"):
        quantize_rows(torch.tensor([[1.0, 7e4, 0.0, 0.0]]), "int8", "table 0")
    wide = torch.tensor([[0.0, 2000.0, 1.0, 2.0]])  # int4 scale 133 > 127.9: CUDA's fp16 dequantization overflows
    with pytest.raises(ValueError, match=r"table 0: row 0 spans 2000.*int4 scale 133.*CUDA"):
        quantize_rows(wide, "int4", "table 0")
    assert quantize_rows(wide, "int8").shape == (1, 8)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), "float16", "table 0")
    with pytest.raises(ValueError, match="dtype must be one of"):
        quantize(trained("full"), "int2")


def test_stored_rows_of_the_wrong_shape_are_refused():
    coll = trained("hash")
    tables = [quantize_rows(w, "int8") for w in coll.table_weights()]
    tables[1] = tables[1][:-1]
    with pytest.raises(ValueError, match="table 1 .*needs torch.uint8"):
        QuantizedEmbeddingBagCollection(coll.features, DIM, coll.methods, tables, "int8")
    pruned = trained("pruned")
    tables = [quantize_rows(w, "int8") for w in pruned.table_weights()]
    with pytest.raises(ValueError, match="layout_state must give the trained state"):
        QuantizedEmbeddingBagCollection(pruned.features, DIM, pruned.methods, tables, "int8")


# -- the inference interface -----------------------------------------------------------------
def test_served_module_has_the_inference_interface_and_survives_train_calls():
    """``pipelines.train.evaluate`` calls ``model.train()`` after evaluating; a quantized
    collection swapped into a model must keep serving the same vectors through that."""
    coll = trained("qr")
    served = quantize(coll, "int8")
    assert served.features == coll.features and served.feature_names == NAMES
    assert served.dtype == "int8" and not served.training
    assert not any(p.requires_grad for p in served.parameters())
    kjt = random_kjt(NAMES, 16, 3000, seed=3)
    with torch.no_grad():
        before = served(kjt)
        served.train()
        after = served(kjt)
    assert before.keys() == NAMES and torch.equal(before.values(), after.values())
    with pytest.raises(KeyError, match="unknown feature"):
        served.lookup("nope", torch.tensor([1]))
    assert served.lookup("large", np.array([1, 2])).shape == (2, DIM)
