"""The C backward of CPU TBEs (embeddings/tbe_backward.py) against fbgemm's CPU backward, the
reference: the same outputs (the forward is fbgemm's either way), tables and optimizer state
allclose after several steps, for every optimizer, shared and unshared tables, bags of 0-4 ids,
sum and mean pooling, per-sample weights; and when each path runs."""
from __future__ import annotations

import copy

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import QR, Full, Hash, MixedDim, Unified, fused_cpu
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer, native, tbe_backward
from tests.embeddings.test_batched_transform import random_kjt

pytestmark = pytest.mark.skipif(native.library() is None, reason="the compiled CPU kernels are unavailable (no C compiler)")

DIM = 8
FEATURES = [
    FeatureSpec("full", 30), FeatureSpec("u1", 500), FeatureSpec("hashed", 900), FeatureSpec("u2", 400, pooling="mean"),
    FeatureSpec("qr", 300), FeatureSpec("u3", 2000), FeatureSpec("md", 600),
]  # fmt: skip
METHODS = {
    "full": Full(), "u1": Unified(rows=40, chunks=2, seed=1), "hashed": Hash(rows=50, seed=2),
    "u2": Unified(rows=40, chunks=2, seed=1), "qr": QR(collisions=7), "u3": Unified(rows=40, chunks=2, seed=1),
    "md": MixedDim(dims=(8, 4), sizes=(100, 500)),
}  # fmt: skip
NAMES = [f.name for f in FEATURES]


def count_c_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = tbe_backward._TBEWithCBackward.backward

    def spy(ctx, grad):
        calls.append(1)
        return real(ctx, grad)

    monkeypatch.setattr(tbe_backward._TBEWithCBackward, "backward", staticmethod(spy))
    return calls


def train_twins(c_side, reference, kjts, weight_dense: bool = True) -> None:
    """One step per KJT on each twin (the C backward on ``c_side``, fbgemm's on ``reference``)
    with a loss whose gradient differs per bag and column; outputs equal, tables and optimizer
    state allclose after every step."""
    weight = torch.linspace(-1, 1, len(c_side.features) * DIM)
    for kjt in kjts:
        out = c_side(kjt).values()
        (out.pow(2) * weight).sum().backward()
        with_mode("off")
        expected = reference(kjt).values()
        (expected.pow(2) * weight).sum().backward()
        with_mode("auto")
        assert torch.equal(out, expected)  # fbgemm's forward on both sides, on equal tables so far
        for a, b in zip(c_side.table_weights(), reference.table_weights()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if c_side.tbe.optimizer.value != "exact_sgd":
            for a, b in zip(c_side.tbe.split_optimizer_states(), reference.tbe.split_optimizer_states()):
                torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
        assert int(c_side.tbe.iter) == int(reference.tbe.iter)
        # Re-sync the twins so each step compares one update, not drift accumulated over steps.
        reference.load_state_dict(c_side.state_dict())
        for a, b in zip(c_side.tbe.split_optimizer_states(), reference.tbe.split_optimizer_states()):
            b[0].copy_(a[0])


def with_mode(value: str) -> None:
    tbe_backward.set_mode(value)


@pytest.fixture(autouse=True)
def restore_mode():
    """Also keeps the fused C lookup off: these tests are the TBE path's backward, which it would
    replace for the Hash, Unified, QR and MixedDim collections here (its own tests:
    tests/compress/test_fused_cpu.py)."""
    with fused_cpu.mode("off"):
        yield
    tbe_backward.set_mode("auto")


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "sgd"])
def test_shared_and_unshared_tables_train_like_fbgemm(optimizer, monkeypatch):
    """The C side is built as it is by default on a CPU (the shared table's slots in feature order,
    apart in TBE); the reference as for fbgemm's backward (grouped): same tables, same outputs.
    Each step starts both from the C side's state, loaded across the two layouts."""
    calls = count_c_steps(monkeypatch)
    config = dict(optimizer=TableOptimizer(kind=optimizer, lr=0.1), seed=5)
    c_side = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS, **config)
    with tbe_backward.mode_as("off"):
        reference = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS, **config)
    assert c_side._shared_apart and not reference._shared_apart
    for a, b in zip(c_side.table_weights(), reference.table_weights()):
        assert torch.equal(a, b)
    kjts = [random_kjt(NAMES, 24, 3000, seed, max_len=4) for seed in range(3)]  # bags of 0-4 ids, ids out of range
    ones = KeyedJaggedTensor(keys=NAMES, values=torch.arange(7 * 24) * 37 - 5, lengths=torch.ones(7 * 24, dtype=torch.long))
    train_twins(c_side, reference, kjts + [ones])
    assert len(calls) == 4  # every step's backward was the C pass


def test_per_sample_weights_scale_each_ids_gradient():
    """TBE's per-sample weights (the zero-weight drops use them): the C backward gives each id
    weight * gradient, as fbgemm does; weight 0 adds nothing."""
    with tbe_backward.mode_as("off"):  # grouped slots: fbgemm's backward is the reference here
        coll = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS, seed=2)
    tbe = coll.tbe
    twin = copy.deepcopy(tbe)
    slots = len(tbe.feature_table_map)
    g = torch.Generator().manual_seed(3)
    rows = [t.shape[0] for t in tbe.split_embedding_weights()]
    table_of = tbe.feature_table_map
    batch = 10
    lengths = torch.randint(0, 4, (slots * batch,), generator=g)
    indices = torch.cat([torch.randint(0, rows[table_of[i // batch]], (int(n),), generator=g) for i, n in enumerate(lengths)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    weights = torch.rand(indices.numel(), generator=g)
    weights[::3] = 0.0
    grad = torch.randn(batch, int(tbe.total_D), generator=g)
    out = tbe_backward.lookup(tbe, indices, offsets, prefer=True, per_sample_weights=weights)
    assert out is not None
    out.backward(grad)
    expected = twin(indices, offsets, per_sample_weights=weights)
    expected.backward(grad)
    assert torch.equal(out.detach(), expected.detach())
    for a, b in zip(tbe.split_embedding_weights(), twin.split_embedding_weights()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_when_each_path_runs(monkeypatch):
    """"auto": the C pass for compressed collections and shared tables, fbgemm's for all-Full
    ones; "on": every CPU training TBE; "off": never; never without grad (inference)."""
    calls = count_c_steps(monkeypatch)
    kjt = random_kjt(NAMES, 8, 3000, 0)
    compressed = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS)
    full = CompressedEmbeddingBagCollection(FEATURES, DIM)
    shared_only = CompressedEmbeddingBagCollection(FEATURES[1:2] + FEATURES[3:4], DIM, {"u1": METHODS["u1"], "u2": METHODS["u2"]})
    assert compressed._compressed and not full._compressed

    def steps(coll) -> int:
        before = len(calls)
        coll(coll_kjt(coll)).values().sum().backward()
        return len(calls) - before

    def coll_kjt(coll):
        names = coll.feature_names
        return random_kjt(names, 8, 3000, 1)

    assert steps(compressed) == 1 and steps(full) == 0 and steps(shared_only) == 1
    # Wider than AUTO_MAX_DIM without a shared table: fbgemm's kernels measured faster there.
    wide = CompressedEmbeddingBagCollection([FeatureSpec("h", 900)], 64, {"h": Hash(rows=50)})
    assert wide._compressed and steps(wide) == 0
    with_mode("on")
    assert steps(full) == 1
    with_mode("off")
    with tbe_backward.mode_as("off"):
        grouped = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS)
    assert steps(grouped) == 0 and steps(full) == 0
    # Built for the C backward, its shared slots apart: fbgemm's backward would train each slot
    # as a table of its own, so training without the C pass is refused (inference is not).
    with pytest.raises(RuntimeError, match="not adjacent in its TBE"):
        steps(compressed)
    with torch.no_grad():
        compressed(kjt)
    with_mode("auto")
    with torch.no_grad():
        compressed(kjt)
    assert tbe_backward.lookup(compressed.tbe, torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long)) is not None
    with torch.no_grad():
        assert tbe_backward.lookup(compressed.tbe, torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long)) is None
    with pytest.raises(ValueError, match="tbe_backward.mode must be one of auto, on, off"):
        tbe_backward.set_mode("shared")


def test_unpooled_tbes_keep_fbgemms_backward():
    """The C pass pools by sum; an unpooled (sequence) TBE is fbgemm's."""
    from tablezip.embeddings.registry import TableSpec
    from tablezip.embeddings.tbe import build_tbe

    tbe = build_tbe([TableSpec(10, 4)], [0, 0], TableOptimizer(), torch.device("cpu"), pooled=False)
    assert tbe_backward.state_for(tbe) is None
    pooled = build_tbe([TableSpec(10, 4)], [0, 0], TableOptimizer(), torch.device("cpu"))
    assert tbe_backward.state_for(pooled) is not None


def test_an_id_outside_its_table_updates_nothing():
    """Defensive (fbgemm's forward rejects such ids first): the C pass returns the feature, restores
    its row slots and leaves weights and state as they were, so the next step is unaffected."""
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS)
    tbe = coll.tbe
    state = tbe_backward.state_for(tbe)
    slots = state.feat.shape[0]
    indices = torch.zeros(slots, dtype=torch.int64)
    indices[3] = 10**6  # slot 3: far past its table
    offsets = torch.arange(slots + 1, dtype=torch.int64)
    grad = torch.ones(1, int(tbe.total_D))
    state.touched = torch.empty(2 * slots, dtype=torch.int64)
    state.acc = torch.empty(slots * state.max_d)
    before = tbe.weights_host.clone(), tbe.momentum1_host.clone()
    done = native.library().tz_tbe_backward(
        grad.data_ptr(), grad.stride(0), grad.stride(1), indices.data_ptr(), offsets.data_ptr(), None, slots, 1, state.feat.data_ptr(),
        tbe.weights_host.data_ptr(), tbe.momentum1_host.data_ptr(), state.slot.data_ptr(), state.touched.data_ptr(),
        state.acc.data_ptr(), state.max_d, state.optimizer, 0.1, 1e-8,
    )  # fmt: skip
    assert done == -1 - 3
    assert bool((state.slot == -1).all())
    assert torch.equal(tbe.weights_host, before[0]) and torch.equal(tbe.momentum1_host, before[1])


def test_shared_table_slots_apart_train_as_one_table():
    """A TBE whose shared table is read by slots that are not adjacent (fbgemm's CPU backward would
    treat them as separate tables): the C pass still sums every slot's gradient per row and updates
    the row once, as fbgemm does for the same slots grouped."""
    from tablezip.embeddings.registry import TableSpec
    from tablezip.embeddings.tbe import build_tbe

    tables = [TableSpec(12, 4), TableSpec(7, 4)]
    apart = build_tbe(tables, [0, 1, 0], TableOptimizer(lr=0.2), torch.device("cpu"), bounds_check=False)
    grouped = build_tbe(tables, [0, 0, 1], TableOptimizer(lr=0.2), torch.device("cpu"), bounds_check=False)
    for a, b in zip(apart.split_embedding_weights(), grouped.split_embedding_weights()):
        b.copy_(torch.randn(a.shape, generator=torch.Generator().manual_seed(a.shape[0])))
        a.copy_(b)
    batch = 3
    g = torch.Generator().manual_seed(0)
    # Slot order of ``apart``: table 0, table 1, table 0; ``grouped`` reads the same bags as 0, 2, 1.
    bags = [[[1, 4], [4], []], [[2], [6, 6], [0]], [[4, 11], [1], [4, 4]]]
    def flat(order):
        lengths = [len(bag) for s in order for bag in bags[s]]
        values = [i for s in order for bag in bags[s] for i in bag]
        return torch.tensor(values), torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))

    grad = torch.randn(batch, 12, generator=g)
    indices, offsets = flat([0, 1, 2])
    out = tbe_backward.lookup(apart, indices, offsets, prefer=True)
    assert out is not None and tbe_backward._shared(apart)
    out.backward(grad)
    indices, offsets = flat([0, 2, 1])
    with tbe_backward.mode_as("off"):
        expected = grouped(indices, offsets)
    expected.backward(torch.cat([grad[:, 0:4], grad[:, 8:12], grad[:, 4:8]], dim=1))
    assert torch.equal(torch.cat([out[:, 0:4], out[:, 8:12], out[:, 4:8]], dim=1).detach(), expected.detach())
    for a, b in zip(apart.split_embedding_weights(), grouped.split_embedding_weights()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(apart.split_optimizer_states(), grouped.split_optimizer_states()):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert tbe_backward.mode == "auto"  # mode_as restored it


def test_feature_ordered_shared_slots_need_no_reordering_and_equal_the_grouped_outputs():
    """With the C backward a shared table's slots stay in feature order: a unified collection of
    one-chunk features is then a passthrough (TBE's output is the output, no gather) and gives
    the grouped build's vectors bit for bit."""
    features = [FeatureSpec(f"f{i}", n) for i, n in enumerate([50, 800, 20, 900, 700])]
    methods = {"f0": Full(), "f1": Unified(rows=60), "f2": Full(), "f3": Unified(rows=60), "f4": Unified(rows=60)}
    apart = CompressedEmbeddingBagCollection(features, DIM, methods, seed=4)
    with tbe_backward.mode_as("off"):
        grouped = CompressedEmbeddingBagCollection(features, DIM, methods, seed=4)
    assert apart._passthrough and not grouped._passthrough
    assert apart.tbe_feature_table_map() != grouped.tbe_feature_table_map()
    names = [f.name for f in features]
    for seed in range(3):
        kjt = random_kjt(names, 16, 3000, seed, max_len=3)
        with torch.no_grad():
            assert torch.equal(apart(kjt).values(), grouped(kjt).values())


def test_state_dicts_load_across_slot_layouts_and_keep_the_own_layout():
    """A checkpoint of the feature-ordered build loads into the grouped one and back (the tables,
    optimizer state included; each keeps the slot layout it reads them with), and the loaded
    collection computes the saved one's vectors. Other tables still refuse to load."""
    features = [FeatureSpec(f"f{i}", n) for i, n in enumerate([50, 800, 20, 900])]
    methods = {"f0": Full(), "f1": Unified(rows=60), "f2": Full(), "f3": Unified(rows=60)}
    apart = CompressedEmbeddingBagCollection(features, DIM, methods, seed=1)
    with tbe_backward.mode_as("off"):
        grouped = CompressedEmbeddingBagCollection(features, DIM, methods, seed=2)
    names = [f.name for f in features]
    apart(random_kjt(names, 8, 3000, 0)).values().sum().backward()  # moves tables and state
    layout = grouped.tbe.weights_offsets.clone()
    grouped.load_state_dict(apart.state_dict())
    assert torch.equal(grouped.tbe.weights_offsets, layout)
    for a, b in zip(apart.tbe.split_optimizer_states(), grouped.tbe.split_optimizer_states()):
        assert torch.equal(a[0], b[0])
    kjt = random_kjt(names, 8, 3000, 1)
    with torch.no_grad():
        assert torch.equal(apart(kjt).values(), grouped(kjt).values())
    apart.load_state_dict(grouped.state_dict())
    other = CompressedEmbeddingBagCollection(features, DIM, {**methods, "f1": Unified(rows=61), "f3": Unified(rows=61)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(apart.state_dict())


@pytest.mark.parametrize("loss", ["sum", "strided"])
def test_gradients_of_any_strides_train_like_fbgemm(loss):
    """The gradient reaching the C pass as it comes: the expanded gradient of a plain ``sum``
    (strides 0, 0: read a value per row, no [B, W] copy) or a column-strided one (copied first)."""
    features = [FeatureSpec(f"f{i}", n) for i, n in enumerate([50, 800, 20, 900, 700])]
    methods = {"f0": Full(), "f1": Unified(rows=60), "f2": Hash(rows=9), "f3": Unified(rows=60), "f4": Unified(rows=60)}
    apart = CompressedEmbeddingBagCollection(features, DIM, methods, seed=4)
    with tbe_backward.mode_as("off"):
        grouped = CompressedEmbeddingBagCollection(features, DIM, methods, seed=4)
    names = [f.name for f in features]
    for seed in range(3):
        kjt = random_kjt(names, 16, 3000, seed, max_len=3)
        for coll, mode in ((apart, "auto"), (grouped, "off")):
            with tbe_backward.mode_as(mode):
                out = coll(kjt).values()
                if loss == "sum":
                    out.sum().backward()
                else:  # the transpose of a [W, B] tensor's contiguous gradient: column stride B
                    (out.t().contiguous().t() * torch.linspace(-1, 1, out.numel()).view(out.t().shape).t()).sum().backward()
        for a, b in zip(apart.table_weights(), grouped.table_weights()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
