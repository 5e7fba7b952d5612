"""The compiled CPU assemble (embeddings/native.py, native.c) against the torch path of the
same plan, op by op, and its build: cache, switch, fallback.

Identity, products, sums, concatenation and mean pooling must be bitwise the torch path's (the same
IEEE ops in the same order); MixedDim's projections equal up to rounding (another summation order).
"""
from __future__ import annotations

import collections
import copy
import ctypes
import os
from typing import Iterator

import numpy as np
import pytest
import torch

from tablezip.compress import QR, Full, KWay, MixedDim, Unified, fused_cpu
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, native
from tablezip.embeddings.assemble import AssemblePlan, plan_for
from tests.embeddings.test_assemble import MIXED_FEATURES, MIXED_METHODS, MIXED_NAMES, single_id_kjt

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler: the compiled assemble is not built")


@pytest.fixture(autouse=True)
def switched_on(monkeypatch) -> Iterator[None]:
    """The compiled kernels on; the fused C lookup off (these tests are the TBE path's pieces:
    assemble, compaction; tests/compress/test_fused_*.py test the fused kernels)."""
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    assert native.library() is not None, "the compiled assemble did not build"
    with fused_cpu.mode("off"):
        yield


def plan_of(features, methods, dim: int) -> AssemblePlan:
    coll = CompressedEmbeddingBagCollection(features, dim, methods)
    coll(single_id_kjt([f.name for f in features], 4, 50, 0))  # builds the plan
    plan = plan_for(coll)
    assert plan is not None
    return plan


def run(plan: AssemblePlan, pooled: torch.Tensor, batch: int, lengths: torch.Tensor, grad_of, use_native: bool):
    """Forward and backward of the plan on one path: output, TBE's gradient, projection gradients."""
    plan.native = use_native
    x = pooled.clone().requires_grad_()
    weights = plan.weights()
    for w in weights:
        w.grad = None
    out = plan(x, batch, lengths)
    out.backward(grad_of(out))
    return out.detach(), x.grad, [None if w.grad is None else w.grad.clone() for w in weights]


GRADS = {
    "contiguous": lambda out: torch.randn(out.shape, generator=torch.Generator().manual_seed(5)),
    "expanded": lambda out: torch.full((1, 1), 0.37).expand(out.shape),  # as from out.sum()
    "row-expanded": lambda out: torch.randn(out.shape[0], 1, generator=torch.Generator().manual_seed(6)).expand(out.shape),
    "transposed": lambda out: torch.randn(out.shape[1], out.shape[0], generator=torch.Generator().manual_seed(7)).t(),
}


@pytest.mark.parametrize("grad", list(GRADS))
@pytest.mark.parametrize("dim", [8, 16, 12, 20])  # the wide vectors (D % 8 == 0), then the 4-wide ones
@pytest.mark.parametrize("bags", ["equal", "padded"])
def test_every_op_matches_the_torch_path(grad, dim, bags):
    methods = dict(MIXED_METHODS)
    methods["md"] = MixedDim(dims=(dim, 4, 4), sizes=(100, 400, 1500))
    methods["md_keep"] = MixedDim(dims=(4,), keep=1000)
    if dim % 8:  # concat into 4-wide tables (fbgemm's narrowest row)
        methods["concat"] = KWay(partitions=(23,) * (dim // 4), op="concat")
    plan = plan_of(MIXED_FEATURES, methods, dim)
    kinds = {op.kind for op in plan.ops}
    assert kinds == {"identity", "mult", "add", "concat", "project"}, kinds
    assert any(op.mean for op in plan.ops)
    batch = 300
    rows = batch + (7 if bags == "padded" else 0)  # TBE's output may hold more bags than the batch
    g = torch.Generator().manual_seed(dim)
    pooled = torch.randn(rows, plan.width, generator=g)
    lengths = torch.randint(0, 4, (len(plan.ops), batch), generator=g)  # zeros: divisor clamped to 1
    c_out, c_gx, c_gw = run(plan, pooled, batch, lengths, GRADS[grad], True)
    t_out, t_gx, t_gw = run(plan, pooled, batch, lengths, GRADS[grad], False)
    projected = [op for op in plan.ops if op.kind == "project"]
    plain_cols = [c for op in plan.ops if op.kind != "project" for c in range(op.out, op.out + dim)]
    plain_slots = [c for op in plan.ops if op.kind != "project" for a, w in op.cols for c in range(a, a + w)]
    assert torch.equal(c_out[:, plain_cols], t_out[:, plain_cols])  # bitwise
    assert torch.equal(c_gx[:, plain_slots], t_gx[:, plain_slots])
    torch.testing.assert_close(c_out, t_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_gx, t_gx, rtol=1e-5, atol=1e-6)
    if bags == "padded":
        assert torch.count_nonzero(c_gx[batch:]) == 0
    assert projected and len(c_gw) == len(t_gw) > 0
    for a, b in zip(c_gw, t_gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_products_of_many_parts_follow_autograds_order():
    """KWay with 4 partitions: the gradient of ((p0 * p1) * p2) * p3 for each part, bitwise."""
    features = [FeatureSpec("k4", 5000), FeatureSpec("k3", 700)]
    plan = plan_of(features, {"k4": KWay(partitions=(5, 6, 7, 30)), "k3": KWay(partitions=(9, 9, 9))}, 16)
    assert [len(op.cols) for op in plan.ops] == [4, 3]
    pooled = torch.randn(64, plan.width, generator=torch.Generator().manual_seed(1))
    lengths = torch.ones(2, 64, dtype=torch.int64)
    c = run(plan, pooled, 64, lengths, GRADS["contiguous"], True)
    t = run(plan, pooled, 64, lengths, GRADS["contiguous"], False)
    assert torch.equal(c[0], t[0]) and torch.equal(c[1], t[1])


def test_threads_split_rows_and_sum_projection_gradients(monkeypatch):
    """Two threads (forced below the size where one is used): the same outputs and slot gradients,
    projection gradients summed over both threads' rows."""
    plan = plan_of(MIXED_FEATURES, MIXED_METHODS, 8)
    pooled = torch.randn(3000, plan.width, generator=torch.Generator().manual_seed(2))
    lengths = torch.ones(len(plan.ops), 3000, dtype=torch.int64)
    one = run(plan, pooled, 3000, lengths, GRADS["contiguous"], True)
    monkeypatch.setattr(native, "PARALLEL_FLOATS", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.threads(3000, 10) == 2
        two = run(plan, pooled, 3000, lengths, GRADS["contiguous"], True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    for a, b in zip(one[2], two[2]):  # sums of 3000 products in another grouping: fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert not torch.equal(a, torch.zeros_like(a))


def test_training_steps_take_the_compiled_path_and_match(monkeypatch):
    """Whole training steps (TBE update included) of a QR/KWay/MixedDim/Unified collection: the C
    path runs (counted) and tables end allclose to the torch path's."""
    rng = np.random.default_rng(0)
    features = [
        FeatureSpec("a", 3000, counts=rng.zipf(1.2, 3000)),
        FeatureSpec("b", 900),
        FeatureSpec("c", 2000),
        FeatureSpec("d", 50),
        FeatureSpec("e", 400),
    ]
    methods = {"a": MixedDim(dims=(16, 4), sizes=(200, 2800)), "b": QR(collisions=9), "c": KWay(partitions=(8, 16, 16)), "d": Full(), "e": Unified(rows=97)}
    coll = CompressedEmbeddingBagCollection(features, 16, methods)
    reference = copy.deepcopy(coll)
    calls: collections.Counter[str] = collections.Counter()
    lib = native.library()

    class Counting:
        def __getattr__(self, name):
            fn = getattr(lib, name)

            def counted(*args):
                calls[name] += 1
                return fn(*args)

            return counted

    monkeypatch.setattr(native, "library", lambda: Counting())
    names = [f.name for f in features]
    for step in range(3):
        kjt = single_id_kjt(names, 128, 3000, step)
        for model, on in ((coll, True), (reference, False)):
            plan_for(model).native = on
            model(kjt).values().pow(2).sum().backward()
    assert calls["tz_assemble_forward"] == 3 and calls["tz_assemble_backward"] == 3
    for a, b in zip(coll.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_switch_off_and_missing_compiler_fall_back(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.library() is None
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(UserWarning, match="compiled CPU kernels unavailable"):
        assert native.library() is None
    plan = plan_of([FeatureSpec("q", 100)], {"q": QR(collisions=4)}, 8)
    assert not plan.native_ok(torch.zeros(2, plan.width), ())  # and the plan keeps its torch path
    out = plan(torch.randn(4, plan.width), 4, torch.ones(1, 4, dtype=torch.int64))
    assert out.shape == (4, 8)


def test_build_is_cached_and_leaves_no_partial_files(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    cc = native.compiler()
    assert cc is not None
    first = native._build(cc)
    mtime = first.stat().st_mtime_ns
    assert native._build(cc) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert first.name.startswith("tz_native-") and os.access(first, os.R_OK)


def test_a_failing_compiler_reports_its_error(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    script = tmp_path / "badcc"
    script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo badcc 1.0; exit 0; }\necho 'boom: no such thing' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(RuntimeError, match="boom: no such thing"):
        native._build(str(script))
    assert not any(p.suffix == ".tmp" or p.name.endswith(".so") for p in tmp_path.iterdir() if p != script)


@pytest.mark.parametrize("runs", [[], [(0, 2)], [(1, 2), (3, 5)], [(4, 6)]])
def test_compaction_of_dropped_ids_equals_the_torch_ops(runs):
    """tz_compact_unit_bags against compare + masked_select + cumsum (what ``_lookup_unit_drops``
    runs without it): same kept ids, same offsets, negative ids kept inside the runs."""
    batch, slots = 50, 6
    flat = torch.randint(-3, 9, (slots * batch,), generator=torch.Generator().manual_seed(len(runs)))
    keep = flat >= 0
    for first, end in runs:
        keep[first * batch : end * batch] = True
    pairs = torch.tensor([p for first, end in runs for p in (first * batch, end * batch)] or [0, 0], dtype=torch.int64)
    indices = torch.empty_like(flat)
    offsets = torch.empty(flat.numel() + 1, dtype=torch.int64)
    kept = native.library().tz_compact_unit_bags(
        flat.data_ptr(), flat.numel(), pairs.data_ptr(), pairs.numel() // 2, indices.data_ptr(), offsets.data_ptr()
    )
    assert kept == int(keep.sum()) and 0 < kept < flat.numel()
    assert torch.equal(indices[:kept], torch.masked_select(flat, keep))
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(keep, 0)]))


def test_collection_with_drops_compacts_in_c_and_trains_bitwise(monkeypatch):
    """A collection whose MixedDim features drop ids (``keep``) next to ones that never drop: the C
    compaction runs and the outputs and tables after training steps are bitwise the torch ops'."""
    features = [FeatureSpec("a", 3000, counts=np.arange(3000, 0, -1)), FeatureSpec("b", 40), FeatureSpec("c", 900, counts=np.arange(900, 0, -1))]
    methods = {"a": MixedDim(dims=(16,), keep=500), "b": Full(), "c": MixedDim(dims=(16,), keep=100)}
    coll = CompressedEmbeddingBagCollection(features, 16, methods)
    reference = copy.deepcopy(coll)
    reference.native_compaction = False
    called = []
    real = coll._kept_runs_tensor
    monkeypatch.setattr(coll, "_kept_runs_tensor", lambda batch: called.append(batch) or real(batch))
    for step in range(3):
        kjt = single_id_kjt(["a", "b", "c"], 64, 3000, step)
        outs = []
        for model in (coll, reference):
            out = model(kjt).values()
            out.pow(2).sum().backward()
            outs.append(out.detach())
        assert torch.equal(outs[0], outs[1])
        assert torch.count_nonzero(outs[0][:, :16].abs().sum(1) == 0) > 0  # some ids of "a" were dropped
    assert called == [64, 64, 64]
    for a, b in zip(coll.table_weights(), reference.table_weights()):
        assert torch.equal(a, b)


def test_an_unwritable_home_builds_in_the_temp_dir(monkeypatch, tmp_path):
    """No cache variable and a home whose cache folder cannot be created: the build goes to a
    per-user folder in the temp dir instead of failing (CI runners, containers)."""
    monkeypatch.delenv(native.ENV_CACHE, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("a file where the folder would go")
    monkeypatch.setattr(native.Path, "home", classmethod(lambda cls: home))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    where = native._cache_dir()
    assert where.parent == tmp_path / "tmp" and where.name.startswith("tablezip-native-")
    built = native._build(native.compiler())
    assert built.parent == where and built.exists()


def test_a_compiler_without_march_native_gets_the_portable_build(monkeypatch, tmp_path):
    """A compiler that rejects -march=native: the build retries without it and loads."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    real = native.compiler()
    script = tmp_path / "picky-cc"
    script.write_text(
        "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -march=native ] && { echo 'unknown -march=native' >&2; exit 1; }; done\n"
        f"exec {real} \"$@\"\n"
    )
    script.chmod(0o755)
    built = native._build(str(script))
    lib = ctypes.CDLL(str(built))
    lib.tz_native_version.restype = ctypes.c_int64
    assert lib.tz_native_version() == native.VERSION
