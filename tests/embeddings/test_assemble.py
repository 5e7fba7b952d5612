"""The CPU step's fast paths (issue 3) against the reference paths they replace.

* The fused assemble (embeddings/assemble.py) against ``combine`` per feature
  (``fused_assemble = False``): forward, gradients, tables and optimizer state after training
  steps. Every test runs twice: with the compiled CPU assemble (embeddings/native.c)
  and with its torch path (``TABLEZIP_NATIVE=0``). Bitwise for identity, products, sums and concatenation (the same float ops in the same
  order); MixedDim's projections with a tolerance (matrix products into column views).
* Bags of one id (no cumsums for drops and offsets) and TBE's output returned as it is (a
  collection that only its drops kept off the fast path) against the per-feature reference
  (``batch_transforms = False``), exactly.
* The offsets check that replaces fbgemm's ``bounds_check_indices`` pass on a CPU, and the fbgemm
  behaviour that makes skipping that pass safe: its CPU forward kernel rejects out-of-range rows.
"""
from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import QR, Full, Hash, Hybrid, KWay, LearnedThreshold, MixedDim, Pruned, Unified, fused_cpu
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec
from tablezip.embeddings import assemble, native, tbe_backward
from tablezip.embeddings.assemble import plan_for
from tests.conftest import random_kjt
from tests.embeddings.test_conformance import FEATURES, KINDS, NAMES, build

_rng = np.random.default_rng(3)
MIXED_FEATURES = [
    FeatureSpec("full", 40),
    FeatureSpec("qr", 900, counts=_rng.zipf(1.3, 900)),
    FeatureSpec("kway3", 300, pooling="mean"),
    FeatureSpec("add", 700),
    FeatureSpec("concat", 500),
    FeatureSpec("md", 2000, counts=np.sort(_rng.zipf(1.2, 2000))[::-1].copy()),
    FeatureSpec("md_keep", 1500, pooling="mean", counts=_rng.zipf(1.2, 1500)),
    FeatureSpec("pruned", 800),
    FeatureSpec("hash", 5000),
]
DIM = 8
MIXED_METHODS = {
    "full": Full(),
    "qr": QR(collisions=7),
    "kway3": KWay(partitions=(3, 11, 10)),
    "add": QR(collisions=5, op="add"),
    "concat": KWay(partitions=(30, 30), op="concat"),
    "md": MixedDim(dims=(8, 4, 4), sizes=(100, 400, 1500)),  # a D-wide block and two projected ones
    "md_keep": MixedDim(dims=(4,), keep=1000),
    "pruned": Pruned(keep=200, missing="zero", remap=False),
    "hash": Hash(rows=300),
}
MIXED_NAMES = [f.name for f in MIXED_FEATURES]


@pytest.fixture(autouse=True, params=["native", "torch"])
def assemble_path(request, monkeypatch) -> Iterator[str]:
    """Each test on both paths of the fused assemble: the compiled one (skipped where it cannot be
    built) and the torch one. The TBE path is what this module tests: the fused C kernels
    (compress/fused_cpu.py), which take QR/KWay/MixedDim/Pruned collections off it, are off here
    (tests/compress/test_fused_train.py and test_fused_lookup.py compare them with this path)."""
    if request.param == "native":
        monkeypatch.setenv(native.ENV_SWITCH, "1")
        if native.library() is None:
            pytest.skip("no C compiler: the compiled assemble is not built here")
    else:
        monkeypatch.setenv(native.ENV_SWITCH, "0")
    with fused_cpu.mode("off"):
        yield request.param


def single_id_kjt(names: list[str], batch: int, high: int, seed: int) -> KeyedJaggedTensor:
    """One id per bag (Criteo's shape), some of them past every id space or negative."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-5, high + 50, (len(names) * batch,), generator=g)
    return KeyedJaggedTensor(keys=names, values=values, lengths=torch.ones(len(names) * batch, dtype=torch.int64))


def twins(coll: CompressedEmbeddingBagCollection) -> tuple[CompressedEmbeddingBagCollection, CompressedEmbeddingBagCollection]:
    reference = copy.deepcopy(coll)
    reference.fused_assemble = False
    return coll, reference


@pytest.fixture
def assembles(monkeypatch) -> list[int]:
    """Counts the fused assembles that run, so a test knows which path it compared."""
    calls: list[int] = []
    real = assemble.AssemblePlan.__call__

    def counting(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(assemble.AssemblePlan, "__call__", counting)
    return calls


def train(coll: CompressedEmbeddingBagCollection, kjts: list[KeyedJaggedTensor]) -> list[torch.Tensor]:
    """Fused-optimizer steps: a weighted loss (a dense gradient) and a plain sum (the expanded
    gradient the benchmarks produce); returns the outputs and each dense parameter's gradient."""
    seen = []
    for step, kjt in enumerate(kjts):
        for p in coll.dense_parameters():
            p.grad = None
        out = coll(kjt).values()
        g = torch.Generator().manual_seed(step)
        loss = (out * torch.randn(out.shape, generator=g)).sum() if step % 2 == 0 else out.sum()
        loss.backward()
        seen.append(out.detach().clone())
        seen.extend(p.grad.clone() for p in coll.dense_parameters() if p.grad is not None)
    return seen


def state(coll: CompressedEmbeddingBagCollection) -> list[torch.Tensor]:
    states = [t for per_table in coll.tbe.split_optimizer_states() for t in per_table]
    return [w.detach().clone() for w in coll.table_weights()] + [s.clone() for s in states]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def uses_projection(coll: CompressedEmbeddingBagCollection) -> bool:
    return any(isinstance(l.config, MixedDim) for l in coll.layouts.values())


# -- fused assemble ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bags", ["single", "random"])
def test_fused_assemble_equals_per_feature_combine(kind, bags, assembles):
    fused, reference = twins(build(kind))
    kjts = [
        single_id_kjt(NAMES, 16, 3000, seed) if bags == "single" else random_kjt(NAMES, 16, 3000, max_len=3, seed=seed)
        for seed in range(3)
    ]
    exact = not uses_projection(fused)
    assert_same(train(fused, kjts), train(reference, kjts), exact)
    assert_same(state(fused), state(reference), exact)
    with torch.no_grad():
        assert_same([fused(kjts[0]).values()], [reference(kjts[0]).values()], exact)
    if kind in ("qr", "kway", "mixed_dim") and bags == "single":
        assert assembles, "the fused assemble should have run"


def mixed_kjts(bags: str) -> list[KeyedJaggedTensor]:
    """Four batches of the mixed collection's features: bags of one id ("single") or up to 3."""
    return [
        single_id_kjt(MIXED_NAMES, 32, 5000, seed)
        if bags == "single"
        else random_kjt(MIXED_NAMES, 32, 5000, max_len=3, seed=seed)
        for seed in range(4)
    ]


@pytest.mark.parametrize("bags", ["single", "random"])
def test_fused_assemble_on_every_combine_at_once(bags, assembles):
    """Products of 2 and 3 slots, sums, concatenation, projections with a D-wide block, drops
    (MixedDim keep, Pruned zero) and MEAN pooling in one collection."""
    coll = CompressedEmbeddingBagCollection(MIXED_FEATURES, DIM, MIXED_METHODS, seed=4)
    fused, reference = twins(coll)
    kjts = mixed_kjts(bags)
    assert_same(train(fused, kjts), train(reference, kjts), exact=False)
    assert_same(state(fused), state(reference), exact=False)
    assert bool(assembles) == (bags == "single")  # QR's products need bags of one id to fuse
    plan = plan_for(fused)
    assert plan is not None and {op.kind for op in plan.ops} == {"identity", "mult", "add", "concat", "project"}


@pytest.mark.parametrize("bags", ["single", "random"])
def test_hoisted_views_are_bitwise_the_sliced_ones(bags, assembles):
    """``AssemblePlan.lean_views`` (one split per tensor, no gradient copy for projection-free
    "project" ops, one scratch buffer for unreadable gradients) against a slice per use and a
    fresh copy per op: the same float ops on the same values, so equal bit for bit, with dense
    and expanded gradients, MEAN pooling and every combine kind."""
    lean = CompressedEmbeddingBagCollection(MIXED_FEATURES, DIM, MIXED_METHODS, seed=10)
    sliced = copy.deepcopy(lean)
    for coll, on in ((lean, True), (sliced, False)):
        plan = plan_for(coll)
        assert plan is not None and plan.lean_views
        plan.lean_views = on
    kjts = mixed_kjts(bags)
    assert_same(train(lean, kjts), train(sliced, kjts), exact=True)
    assert_same(state(lean), state(sliced), exact=True)
    assert bool(assembles) == (bags == "single")


_RUN_RNG = np.random.default_rng(11)
RUN_FEATURES = [
    FeatureSpec("m1", 300),
    FeatureSpec("m2", 400, counts=_RUN_RNG.zipf(1.2, 400)),  # with a remap
    FeatureSpec("m3", 500, counts=_RUN_RNG.zipf(1.2, 500)),
    FeatureSpec("full", 40),
    FeatureSpec("m4", 200),
    FeatureSpec("m5_mean", 250, pooling="mean"),  # MEAN: never in a run
    FeatureSpec("m6", 350),
    FeatureSpec("m7", 300),
    FeatureSpec("wide", 100),  # a D-wide block: no projection, ends the run
    FeatureSpec("m8", 300),
]
RUN_METHODS = {
    "m1": MixedDim(dims=(4,)),
    "m2": MixedDim(dims=(4,), keep=300),
    "m3": MixedDim(dims=(4,)),
    "full": Full(),
    "m4": MixedDim(dims=(4,)),
    "m5_mean": MixedDim(dims=(4,)),
    "m6": MixedDim(dims=(4,)),
    "m7": MixedDim(dims=(4,), keep=250),
    "wide": MixedDim(dims=(8,)),
    "m8": MixedDim(dims=(4,)),
}


@pytest.mark.parametrize("bags", ["single", "random"])
def test_projection_runs_are_bitwise_one_product_per_feature(bags, assembles):
    """``AssemblePlan.batch_runs`` (one ``bmm`` per run of neighbouring single-block MixedDim
    features of one width, forward and backward) against one ``mm`` per feature: CPU ``bmm`` runs
    the same GEMM per matrix, so outputs, projection gradients and the tables and optimizer state
    after fused steps are equal bit for bit, with dense and expanded gradients."""
    names = [f.name for f in RUN_FEATURES]
    batched = CompressedEmbeddingBagCollection(RUN_FEATURES, DIM, RUN_METHODS, seed=12)
    per_op = copy.deepcopy(batched)
    plan = plan_for(batched)
    assert plan is not None and plan.batch_runs
    # m1-m3 (the Full feature ends it), m6-m7 (m4 stands alone before the MEAN feature; "wide"
    # has no projection): runs of features, in op order.
    assert [run.ops for run in plan.op_runs] == [(0, 1, 2), (6, 7)]
    plan_for(per_op).batch_runs = False
    kjts = [
        single_id_kjt(names, 64, 600, seed) if bags == "single" else random_kjt(names, 64, 600, max_len=3, seed=seed)
        for seed in range(4)
    ]
    assert_same(train(batched, kjts), train(per_op, kjts), exact=True)
    assert_same(state(batched), state(per_op), exact=True)
    with torch.no_grad():
        assert_same([batched(kjts[0]).values()], [per_op(kjts[0]).values()], exact=True)
    assert assembles  # every layout pools in TBE: the fused assemble runs for any bags


def test_projection_runs_reach_every_projection(assembles):
    """Each projection of a run gets its own gradient (the run's stacked weights are a copy)."""
    names = [f.name for f in RUN_FEATURES]
    coll = CompressedEmbeddingBagCollection(RUN_FEATURES, DIM, RUN_METHODS, seed=13)
    coll(single_id_kjt(names, 64, 600, 0)).values().sum().backward()
    assert assembles
    for name, p in coll.layouts.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_fused_assemble_is_bitwise_without_projections(assembles):
    methods = {n: m for n, m in MIXED_METHODS.items() if not isinstance(m, MixedDim)}
    features = [f for f in MIXED_FEATURES if f.name in methods]
    names = [f.name for f in features]
    fused, reference = twins(CompressedEmbeddingBagCollection(features, DIM, methods, seed=5))
    kjts = [single_id_kjt(names, 64, 5000, seed) for seed in range(3)]
    assert_same(train(fused, kjts), train(reference, kjts), exact=True)
    assert_same(state(fused), state(reference), exact=True)
    assert len(assembles) == 3


def test_backward_reaches_every_projection_and_table(assembles):
    coll = CompressedEmbeddingBagCollection(MIXED_FEATURES, DIM, MIXED_METHODS, seed=6)
    coll(single_id_kjt(MIXED_NAMES, 64, 5000, 0)).values().sum().backward()
    assert assembles
    for name, p in coll.layouts.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_collections_without_a_combine_form_keep_the_per_feature_path(assembles):
    features = [FeatureSpec("a", 100), FeatureSpec("b", 100)]
    coll = CompressedEmbeddingBagCollection(features, DIM, {"a": LearnedThreshold(), "b": QR(collisions=3)})
    assert plan_for(coll) is None
    coll(single_id_kjt(["a", "b"], 8, 100, 0)).values().sum().backward()
    assert not assembles


def test_padded_bags_get_no_gradient():
    """TBE pads every slot to the longest one's bag count; the rows past the batch must get a zero
    gradient (the collection only fuses batches without padding, so call the plan directly)."""
    coll = CompressedEmbeddingBagCollection(MIXED_FEATURES, DIM, MIXED_METHODS, seed=7)
    plan = plan_for(coll)
    assert plan is not None
    batch = 5
    lengths = torch.randint(1, 3, (len(MIXED_FEATURES), batch))
    pooled = torch.randn(batch + 3, plan.width, requires_grad=True)
    out = plan(pooled, batch, lengths)
    reference = plan(pooled[:batch].detach().clone().requires_grad_(), batch, lengths)
    torch.testing.assert_close(out, reference)
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    assert pooled.grad is not None and torch.equal(pooled.grad[batch:], torch.zeros(3, plan.width))


def test_a_second_backward_is_refused_not_wrong():
    """The backward reuses TBE's output as the gradient (products): running it twice would read
    overwritten rows, so autograd's version check on the saved output refuses it; the per-feature
    path (``fused_assemble = False``) still allows it."""
    features = [FeatureSpec("qr", 500), FeatureSpec("full", 20)]
    methods = {"qr": QR(collisions=4), "full": Full()}
    kjt = single_id_kjt(["qr", "full"], 16, 500, 0)
    coll = CompressedEmbeddingBagCollection(features, DIM, methods)
    out = coll(kjt).values().sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    coll.fused_assemble = False
    out = coll(kjt).values().sum()
    out.backward(retain_graph=True)
    out.backward()


def test_no_grad_uses_the_fused_assemble(assembles):
    fused, reference = twins(CompressedEmbeddingBagCollection(MIXED_FEATURES, DIM, MIXED_METHODS, seed=8))
    kjt = single_id_kjt(MIXED_NAMES, 16, 5000, 1)
    with torch.no_grad():  # (fbgemm's CPU training TBE has no inference_mode kernel)
        a, b = fused(kjt).values(), reference(kjt).values()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert assembles


def test_export_load_keeps_the_fused_path(tmp_path, assembles):
    coll = CompressedEmbeddingBagCollection(MIXED_FEATURES, DIM, MIXED_METHODS, seed=9)
    kjt = single_id_kjt(MIXED_NAMES, 16, 5000, 2)
    train(coll, [kjt])
    loaded = CompressedEmbeddingBagCollection.load(coll.export(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(coll(kjt).values(), loaded(kjt).values())
    assert len(assembles) == 3


# -- the forward's output: kept memory, one gather, merged copies ---------------------------------
UNIFIED_FEATURES = [FeatureSpec(f"u{i}", 300 + 100 * i) for i in range(4)] + [FeatureSpec(f"f{i}", 30 + i) for i in range(4)]
# Full features between the shared table's readers: TBE groups the shared slots, so the plan's
# slots are out of feature order (the gather permutes), with runs of adjacent Full features too.
UNIFIED_ORDER = ["f0", "u0", "f1", "f2", "u1", "u2", "f3", "u3"]
UNIFIED_METHODS = {f.name: Unified(rows=97) if f.name.startswith("u") else Full() for f in UNIFIED_FEATURES}


def unified_collection(seed: int) -> CompressedEmbeddingBagCollection:
    """Built as for fbgemm's CPU backward (tbe_backward mode "off"): the shared table's slots
    grouped in TBE, so its vectors come out of order and the assemble's gather puts them back (the
    path these tests check; with the C backward they stay in feature order and need none)."""
    by_name = {f.name: f for f in UNIFIED_FEATURES}
    features = [by_name[n] for n in UNIFIED_ORDER]
    with tbe_backward.mode_as("off"):
        return CompressedEmbeddingBagCollection(features, DIM, UNIFIED_METHODS, seed=seed)


def old_output_path(coll: CompressedEmbeddingBagCollection) -> CompressedEmbeddingBagCollection:
    """A deep-copied twin with the output switches off: a fresh output per call, a copy per op."""
    twin = copy.deepcopy(coll)
    plan = plan_for(twin)
    assert plan is not None
    plan.reuse_out = plan.merge_runs = plan.gather = False
    twin.lean_lengths = False
    return twin


@pytest.mark.parametrize("which", ["mixed", "unified"])
def test_output_switches_are_bitwise_the_old_path(which, assembles):
    """Kept output memory (``reuse_out``), the one-gather unified forward (``gather``), merged
    identity copies (``merge_runs``) and no unused slot lengths (``lean_lengths``) against all of
    them off: outputs, gradients, tables and optimizer state bit for bit, over steps that reuse
    the output's memory."""
    coll = CompressedEmbeddingBagCollection(MIXED_FEATURES, DIM, MIXED_METHODS, seed=11) if which == "mixed" else unified_collection(11)
    names = coll.feature_names
    old = old_output_path(coll)
    plan = plan_for(coll)
    assert plan is not None and plan.runs  # adjacent Full features merge in both collections
    assert (plan.order is not None) == (which == "unified")
    if which == "unified":
        assert list(plan.order) != list(range(len(names)))  # really a permutation
    kjts = [single_id_kjt(names, 32, 5000, seed) for seed in range(4)]
    assert_same(train(coll, kjts), train(old, kjts), exact=True)
    assert_same(state(coll), state(old), exact=True)
    with torch.no_grad():
        for kjt in kjts:
            assert torch.equal(coll(kjt).values(), old(kjt).values())
    assert assembles


def train_gradient_kinds(coll: CompressedEmbeddingBagCollection, kjts: list[KeyedJaggedTensor]) -> list[torch.Tensor]:
    """Steps whose output gradient is dense, a plain ``sum``'s (stride 0 everywhere), one row
    broadcast over the batch (stride 0 along it) and a transposed one (columns not unit-stride)."""
    seen = []
    for step, kjt in enumerate(kjts):
        out = coll(kjt).values()
        g = torch.Generator().manual_seed(step)
        kind = step % 4
        if kind == 0:
            loss = (out * torch.randn(out.shape, generator=g)).sum()
        elif kind == 1:
            loss = out.sum()
        elif kind == 2:
            loss = (out.sum(0) * torch.randn(out.shape[1], generator=g)).sum()  # sum(0): expanded rows
        else:
            loss = (out.t() * torch.randn(out.shape[1], 1, generator=g)).sum()
        loss.backward()
        seen.append(out.detach().clone())
    return seen


@pytest.mark.parametrize("bags", ["single", "pooled"])
def test_gather_plan_reusing_tbe_output_is_bitwise_a_fresh_gradient(bags, assembles):
    """Unified's backward writing TBE's gradient into TBE's own output (``reuse_output``, which a
    ``gather`` plan keeps for its backward only for that) against a fresh gradient buffer:
    outputs, tables and optimizer state bit for bit, for every kind of output gradient."""
    coll = unified_collection(5)
    names = coll.feature_names
    plan = plan_for(coll)
    assert plan is not None and plan.order is not None and plan.reuse_output
    old = copy.deepcopy(coll)
    plan_for(old).reuse_output = False
    if bags == "single":
        kjts = [single_id_kjt(names, 32, 5000, seed) for seed in range(8)]
    else:
        kjts = [random_kjt(names, 24, 5000, seed=seed) for seed in range(8)]
    assert_same(train_gradient_kinds(coll, kjts), train_gradient_kinds(old, kjts), exact=True)
    assert_same(state(coll), state(old), exact=True)
    assert assembles


def test_gather_plan_writes_into_tbe_output_and_refuses_a_second_backward():
    """With ``reuse_output`` the unified plan keeps TBE's output for its backward and writes the
    gradient there: a second backward through the same graph is refused, never silently applied
    from an overwritten buffer; with it off a second backward runs."""
    coll = unified_collection(2)
    kjt = single_id_kjt(coll.feature_names, 16, 5000, 0)
    out = coll(kjt).values().sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    plan_for(coll).reuse_output = False
    out = coll(kjt).values().sum()
    out.backward(retain_graph=True)
    out.backward()


def test_kept_output_memory_is_reused_only_once_nothing_holds_it():
    """The next forward writes into the last output's memory only when no tensor uses it: an
    output still held, or saved by autograd for a later layer's backward, keeps its values."""
    coll = unified_collection(12)
    names = coll.feature_names
    kjts = [single_id_kjt(names, 16, 5000, seed) for seed in range(3)]
    with torch.no_grad():
        expected = [coll(k).values().clone() for k in kjts]
    held = coll(kjts[0]).values()
    pointer = held.data_ptr()
    second = coll(kjts[1]).values()  # ``held`` still alive: new memory
    assert second.data_ptr() != pointer and torch.equal(held, expected[0]) and torch.equal(second, expected[1])
    del held
    second_pointer = second.data_ptr()
    del second
    third = coll(kjts[2]).values()  # nothing holds the second output's memory any more: reused
    assert third.data_ptr() == second_pointer and torch.equal(third, expected[2])
    # Saved for backward by a later op: the next forward must not overwrite it.
    weight = torch.randn(third.shape[1], requires_grad=True)
    loss = (third * weight).sum()  # saves ``third`` for weight's gradient
    del third
    assert not torch.equal(coll(kjts[0]).values(), expected[2])
    loss.backward()
    assert weight.grad is not None and torch.equal(weight.grad, expected[2].sum(0))


def test_kept_output_memory_survives_deepcopy_and_pickle():
    """The kept memory is a cache: copies of the collection start without it (and a lock, which
    cannot be pickled, is made afresh), then compute the same outputs."""
    coll = unified_collection(13)
    kjt = single_id_kjt(coll.feature_names, 8, 5000, 0)
    before = coll(kjt).values().detach().clone()
    twin = copy.deepcopy(coll)
    plan = plan_for(twin)
    assert plan is not None and plan._spare.storage is None
    assert torch.equal(twin(kjt).values(), before) and plan._spare.storage is not None


# -- bags of one id, drops, TBE's output as it is -----------------------------------------------
DROP_FEATURES = [FeatureSpec("full", 30), FeatureSpec("p1", 400), FeatureSpec("p2", 900, pooling="mean"), FeatureSpec("h", 700)]
DROP_METHODS = {
    "full": Full(),
    "p1": Pruned(keep=100, remap=False),
    "p2": Pruned(keep=300),  # a remap: its own transform group
    "h": Hybrid(hot=50, cold_rows=60),
}


@pytest.mark.parametrize("bags", ["single", "random"])
@pytest.mark.parametrize("by_weight", [False, True])
def test_drops_with_bags_of_one_id_equal_the_reference(bags, by_weight):
    coll = CompressedEmbeddingBagCollection(DROP_FEATURES, DIM, DROP_METHODS, seed=2)
    names = [f.name for f in DROP_FEATURES]
    fast = copy.deepcopy(coll)
    fast.drop_by_weight = by_weight
    coll.batch_transforms = False  # the per-feature reference: compaction, combine, concatenation
    kjts = [
        single_id_kjt(names, 32, 1000, seed) if bags == "single" else random_kjt(names, 32, 1000, max_len=3, seed=seed)
        for seed in range(3)
    ]
    assert_same(train(fast, kjts), train(coll, kjts), exact=True)
    assert_same(state(fast), state(coll), exact=True)


def test_unit_offsets_are_the_cumsum_offsets():
    coll = CompressedEmbeddingBagCollection(MIXED_FEATURES[:5], DIM, {f.name: MIXED_METHODS[f.name] for f in MIXED_FEATURES[:5]})
    offsets = coll._unit_offsets(12, torch.device("cpu"))
    assert torch.equal(offsets, torch.arange(13))
    assert coll._unit_offsets(12, torch.device("cpu")) is offsets  # kept
    assert coll._unit_offsets(7, torch.device("cpu")).numel() == 8
    assert "_unit_offsets_cache" not in coll.state_dict()


# -- offsets check instead of fbgemm's bounds pass -----------------------------------------------
def test_cpu_collections_skip_fbgemm_bounds_pass():
    coll = CompressedEmbeddingBagCollection(FEATURES, 8, {f.name: Hash(rows=50) for f in FEATURES})
    assert coll._checks_offsets
    assert coll.tbe.bounds_check_mode_int == BoundsCheckMode.NONE.value


@pytest.mark.parametrize("methods", ["passthrough", "general"])
def test_malformed_bags_are_rejected(methods):
    config = {"a": Hash(rows=50), "b": Full()} if methods == "passthrough" else {"a": QR(collisions=3), "b": Full()}
    coll = CompressedEmbeddingBagCollection([FeatureSpec("a", 100), FeatureSpec("b", 100)], 8, config)
    values = torch.arange(8)
    negative = KeyedJaggedTensor(keys=["a", "b"], values=values, lengths=torch.tensor([3, -1, 2, 4, 1, -1]))
    with pytest.raises((ValueError, RuntimeError)):
        coll(negative)
    # Offsets that disagree with the lengths (both given): a bag reading backwards. The fast path
    # hands the KJT's offsets to TBE, so they are checked; the general path builds its own from
    # the lengths, which are consistent here.
    bad = KeyedJaggedTensor(
        keys=["a", "b"], values=values, lengths=torch.tensor([2, 2, 0, 2, 1, 1]), offsets=torch.tensor([0, 2, 4, 3, 6, 7, 8])
    )
    if methods == "passthrough":
        with pytest.raises(ValueError, match="must not decrease"):
            coll(bad)
    else:
        good = KeyedJaggedTensor(keys=["a", "b"], values=values, lengths=torch.tensor([2, 2, 0, 2, 1, 1]))
        assert torch.equal(coll(bad).values(), coll(good).values())


@pytest.mark.parametrize("method", ["pruned", "hybrid"])
def test_fbgemm_cpu_kernel_rejects_rows_outside_their_table(method):
    """What makes skipping fbgemm's bounds pass safe on a CPU: its forward kernel checks every row
    itself, before anything is written (pinned here, so an fbgemm upgrade that drops the check
    fails this test). A corrupted remap is the one way a transform can yield such a row."""
    config = Pruned(keep=10) if method == "pruned" else Hybrid(hot=10, cold_rows=5, remap=True)
    coll = CompressedEmbeddingBagCollection([FeatureSpec("f", 100)], 8, {"f": config})
    assert coll.tbe.bounds_check_mode_int == BoundsCheckMode.NONE.value
    with torch.no_grad():
        coll.layouts["f"].remap[3] = 10_000  # far past the table
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 3, 2]), lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(RuntimeError, match="out of bounds"):
        coll(kjt)


@pytest.mark.parametrize("kind", ["hash", "hybrid", "pruned", "qr", "mixed_dim"])
@pytest.mark.parametrize("bags", ["single", "random"])
def test_own_offsets_check_changes_nothing(kind, bags):
    """Against fbgemm's FATAL bounds pass on the KJT's offsets (the collection before issue 3):
    same outputs, tables and optimizer state, with bags of one id (the cached offsets 0..n) or not."""
    ours = build(kind)
    theirs = copy.deepcopy(ours)
    theirs._checks_offsets = False
    theirs.tbe.bounds_check_mode_int = BoundsCheckMode.FATAL.value
    kjts = [
        single_id_kjt(NAMES, 16, 3000, seed) if bags == "single" else random_kjt(NAMES, 16, 3000, max_len=3, seed=seed)
        for seed in range(3)
    ]
    assert_same(train(ours, kjts), train(theirs, kjts), exact=True)
    assert_same(state(ours), state(theirs), exact=True)
