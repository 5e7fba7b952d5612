"""What the C backend of the fused lookup and step (compress/fused_cpu.py) adds to the kernel tests
of tests/compress/test_fused_train.py and test_fused_lookup.py (which run every op, optimizer and
bag shape through it against the TBE path): its switch, malformed input refused before any read,
a corrupted remap refused, threads splitting the bags, gradients of any strides, and its buffers.
"""
from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import QR, Full, Hash, Hybrid, MixedDim, MultiHash, Pruned, Unified, fused_cpu, fused_train
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer, native
from tests.compress.test_fused_lookup import count_calls
from tests.compress.test_fused_train import DIM as MD_DIM
from tests.compress.test_fused_train import MD_FEATURES, MD_METHODS, MD_NAMES, batches, train_both, twins

pytestmark = pytest.mark.skipif(native.library() is None, reason="the compiled CPU kernels could not be built")

DIM = 16
FEATURES = [
    FeatureSpec("qr", 500), FeatureSpec("md", 400, pooling="mean", counts=list(range(400, 0, -1))),
    FeatureSpec("pruned", 300), FeatureSpec("full", 30),
]  # fmt: skip
METHODS = {"qr": QR(collisions=9), "md": MixedDim(dims=(DIM, 4), sizes=(50, 350), remap=True), "pruned": Pruned(keep=120), "full": Full()}
NAMES = [f.name for f in FEATURES]


def build(seed: int = 3) -> CompressedEmbeddingBagCollection:
    return CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS, optimizer=TableOptimizer(lr=0.1), seed=seed)


def kjt_of(lengths: list[int], offsets: list[int] | None = None) -> KeyedJaggedTensor:
    values = torch.arange(sum(max(0, x) for x in lengths)) % 300
    return KeyedJaggedTensor(
        keys=NAMES, values=values, lengths=torch.tensor(lengths),
        offsets=None if offsets is None else torch.tensor(offsets),
    )  # fmt: skip


def train_then_look_up_like_the_tbe_path(fused, reference, names: list[str], seed: int, calls: list) -> None:
    """Three steps on the C path (``batches(names, seed)``) against the reference on the TBE path
    (``train_both``), each through ``backward_step``; then bags of one id (``batches(names,
    seed + 1)``) looked up in inference give the TBE path's output bit for bit."""
    with fused_cpu.mode("on"):
        train_both(fused, reference, batches(names, seed))
        kjt = batches(names, seed + 1)[0]
        with torch.no_grad():
            out = fused(kjt).values()
    assert len(calls) == 3
    with torch.no_grad(), fused_cpu.mode("off"):
        assert torch.equal(out, fused(kjt).values())


def test_auto_takes_the_measured_ops_and_on_takes_every_plan():
    """"auto" runs the plans with an op of ``AUTO_OPS``; "on" every plan the kernels cover; a
    collection the plans do not cover (Hash) never."""
    plan = fused_train.plan_for(build())
    assert fused_cpu.plan_ops(plan) == {"mult", "mixed"}
    assert fused_cpu.takes(plan) == bool({"mult", "mixed"} & fused_cpu.AUTO_OPS)
    with fused_cpu.mode("on"):
        assert fused_cpu.takes(plan)
        hashed = CompressedEmbeddingBagCollection([FeatureSpec("h", 100)], DIM, {"h": Hash(rows=10)})
        assert not fused_cpu.takes(fused_train.plan_for(hashed))
    with fused_cpu.mode("off"):
        assert not fused_cpu.wanted(torch.zeros(1, dtype=torch.long), "auto")
    assert not fused_cpu.wanted(torch.zeros(1, dtype=torch.long), "on")  # fused_train "on": Triton's


# Hash and Unified, which only the C kernels take (as hashed partitions): one- and two-chunk
# unified features sharing tables (u1/u1_mean: "a", u2/u2b: "b"), sum and mean, beside Full and QR.
HASHED_FEATURES = [
    FeatureSpec("full", 40), FeatureSpec("h", 300), FeatureSpec("h_mean", 200, pooling="mean"), FeatureSpec("u1", 400),
    FeatureSpec("u1_mean", 500, pooling="mean"), FeatureSpec("u2", 250), FeatureSpec("u2b", 90), FeatureSpec("qr", 300),
]  # fmt: skip
HASHED_METHODS = {
    "full": Full(), "h": Hash(rows=40), "h_mean": Hash(rows=7, seed=3), "u1": Unified(rows=30, table="a"),
    "u1_mean": Unified(rows=30, table="a"), "u2": Unified(rows=11, chunks=2, table="b", seed=2),
    "u2b": Unified(rows=11, chunks=2, table="b", seed=2), "qr": QR(collisions=7),
}  # fmt: skip
HASHED_NAMES = [f.name for f in HASHED_FEATURES]


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "sgd"])
def test_hash_and_unified_train_like_the_tbe_path(monkeypatch, optimizer):
    """Three steps (one-id, short and long bags, repeated ids: shared rows hit by several features
    and chunks) match the TBE path's outputs, tables and optimizer state; one-id bags bit for bit
    in inference."""
    calls = count_calls(monkeypatch, fused_cpu, "backward_step")
    fused, reference = twins(HASHED_FEATURES, HASHED_METHODS, TableOptimizer(kind=optimizer, lr=0.05))
    plan = fused_cpu.plan_for(fused)
    assert plan.weights is not None
    assert sorted(f.op for f in plan.features) == ["add", "hashcat", "hashcat", "mult", "multihash", "multihash", "multihash", "multihash"]
    train_then_look_up_like_the_tbe_path(fused, reference, HASHED_NAMES, 11, calls)


def test_bags_longer_than_a_chunk_train_like_the_tbe_path(monkeypatch):
    """The forward finds the rows of a chunk of bags (up to 32 ids) before it sums them: bags of
    31, 33 and 700 ids (a chunk of their own; 700 ids x 2 QR partitions outgrow the row buffer)
    beside empty and one-id bags give the TBE path's outputs, tables and state over two steps (a
    small step: a row hit by hundreds of ids sums its gradients in another order than fbgemm, and
    a 700-id bag adds up that rounding)."""
    calls = count_calls(monkeypatch, fused_cpu, "backward_step")
    fused, reference = twins(HASHED_FEATURES, HASHED_METHODS, TableOptimizer(lr=0.002))
    g = torch.Generator().manual_seed(11)
    kjts = []
    for pattern in ([0, 1, 31, 33, 700, 2], [700, 0, 33, 1, 31, 5]):
        lengths = torch.tensor(pattern * len(HASHED_NAMES))
        values = torch.randint(-3, 600, (int(lengths.sum()),), generator=g)
        kjts.append(KeyedJaggedTensor(keys=HASHED_NAMES, values=values, lengths=lengths))
    with fused_cpu.mode("on"):
        train_both(fused, reference, kjts)
    assert len(calls) == 2


@pytest.mark.parametrize("dim", [20, 136])
def test_mixed_dim_widths_off_the_vector_paths_train_like_the_tbe_path(monkeypatch, dim):
    """D not a multiple of the vector width (20) or wider than the register-held products (136)
    takes the plain loops of the projections and their gradients: two steps of one-id and longer
    bags give the TBE path's outputs, projection gradients and tables."""
    features = [FeatureSpec("md", 300, counts=list(range(300, 0, -1))), FeatureSpec("md_mean", 200, pooling="mean")]
    methods = {"md": MixedDim(dims=(dim, 8, 4), sizes=(20, 80, 200)), "md_mean": MixedDim(dims=(12,), sizes=(200,))}
    fused, reference = (
        CompressedEmbeddingBagCollection(features, dim, methods, optimizer=TableOptimizer(lr=0.1), seed=3) for _ in range(2)
    )
    calls = count_calls(monkeypatch, fused_cpu, "backward_step")
    weight = torch.linspace(-1, 1, 2 * dim)
    for kjt in batches(["md", "md_mean"], 6)[1:]:
        outs = []
        for coll, mode in ((fused, "on"), (reference, "off")):
            with fused_cpu.mode(mode):
                out = coll(kjt).values()
                (out.pow(2) * weight).sum().backward()
                outs.append(out.detach())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for a, b in zip(fused.dense_parameters(), reference.dense_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
            a.grad = b.grad = None
    assert len(calls) == 2
    for a, b in zip(fused.table_weights(), reference.table_weights()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# Hybrid: hot ids through a scattered remap or a prefix, the others hashed into the cold rows.
HYBRID_FEATURES = [FeatureSpec("full", 40), FeatureSpec("y_remap", 300, counts=list(range(300))), FeatureSpec("y_prefix", 200, pooling="mean"), FeatureSpec("qr", 300)]
HYBRID_METHODS = {"full": Full(), "y_remap": Hybrid(hot=30, cold_rows=20), "y_prefix": Hybrid(hot=25, cold_rows=9, seed=4), "qr": QR(collisions=7)}
HYBRID_NAMES = [f.name for f in HYBRID_FEATURES]


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
def test_hybrid_trains_like_the_tbe_path(monkeypatch, optimizer):
    calls = count_calls(monkeypatch, fused_cpu, "backward_step")
    fused, reference = twins(HYBRID_FEATURES, HYBRID_METHODS, TableOptimizer(kind=optimizer, lr=0.05))
    assert fused.layouts["y_remap"].uses_remap and not fused.layouts["y_prefix"].uses_remap
    plan = fused_cpu.plan_for(fused)
    assert [h.feature for h in plan.hybrid] == [1, 2] and plan.hybrid[0].remap_offset is not None
    train_then_look_up_like_the_tbe_path(fused, reference, HYBRID_NAMES, 13, calls)


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["training", "inference"])
def test_a_corrupted_hybrid_remap_is_refused(grad_enabled):
    refuses_corrupted_remap(CompressedEmbeddingBagCollection(HYBRID_FEATURES, DIM, HYBRID_METHODS), "y_remap", grad_enabled)


def test_pruned_default_rows_without_a_remap_keep_the_tbe_path():
    """The one layout no C plan covers (no block test expresses "every id past keep")."""
    coll = CompressedEmbeddingBagCollection([FeatureSpec("p", 100), FeatureSpec("h", 50)], DIM, {"p": Pruned(keep=10, missing="default", remap=False), "h": Hash(rows=9)})
    assert fused_cpu.plan_for(coll).weights is None


def test_without_the_compiled_kernels_the_tbe_path_runs(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    calls = count_calls(monkeypatch, fused_cpu, "forward")
    coll = build()
    with fused_cpu.mode("on"):
        coll(batches(NAMES, 0)[0]).values().sum().backward()
    assert calls == []


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["training", "inference"])
def test_malformed_bags_are_refused_before_any_read(grad_enabled):
    """Negative lengths (offsets that decrease and run past the ids) and offsets that disagree
    with the lengths raise ValueError, as the TBE path's check does, before the kernel reads
    through them; the tables are unchanged."""
    coll = build()
    before = [t.clone() for t in coll.table_weights()]
    cases = [
        kjt_of([3, -1, 2, 4, 1, -1, 2, 1]),
        kjt_of([2, 2, 0, 2, 1, 1, 1, 1], offsets=[0, 2, 4, 3, 6, 7, 8, 9, 10]),
    ]
    with fused_cpu.mode("on"), torch.set_grad_enabled(grad_enabled):
        for kjt in cases:
            with pytest.raises(ValueError, match="offsets"):
                coll(kjt)
    for a, b in zip(coll.table_weights(), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["pruned", "md"])
@pytest.mark.parametrize("grad_enabled", [True, False], ids=["training", "inference"])
def test_a_corrupted_remap_is_refused_not_read_as_dropped(method, grad_enabled):
    """A remap value no layout writes (ranks are in [-1, n]) raises, as fbgemm's bounds check does
    on the TBE path, instead of reading as a dropped id."""
    refuses_corrupted_remap(build(), method, grad_enabled)


def refuses_corrupted_remap(coll: CompressedEmbeddingBagCollection, name: str, grad_enabled: bool) -> None:
    """Feature ``name``'s remap gets a value past every table; a lookup of bags of one id (id 3
    among them) must raise RuntimeError ("out of bounds")."""
    with torch.no_grad():
        coll.layouts[name].remap[3] = 10_000
    ones = torch.ones(2 * len(coll.features), dtype=torch.long)
    kjt = KeyedJaggedTensor(keys=coll.feature_names, values=torch.tensor([1, 3, 2, 3, 5, 3, 1, 2]), lengths=ones)
    with fused_cpu.mode("on"), torch.set_grad_enabled(grad_enabled):
        with pytest.raises(RuntimeError, match="out of bounds"):
            coll(kjt)


def test_threads_split_the_bags_bitwise(monkeypatch):
    """Two threads (each a part of the bags, 301 of them: uneven) give the one-thread output bit
    for bit, in inference and in the training forward."""
    coll = build()
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 4, (len(NAMES) * 301,), generator=g)
    kjt = KeyedJaggedTensor(keys=NAMES, values=torch.randint(-3, 600, (int(lengths.sum()),), generator=g), lengths=lengths)
    threads = count_calls(monkeypatch, native, "threads")
    with fused_cpu.mode("on"), torch.no_grad():
        one = coll(kjt).values()
        monkeypatch.setattr(native, "PARALLEL_FLOATS", 0)
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert native.threads(301, len(NAMES) * DIM) == 2
            two = coll(kjt).values()
            with torch.enable_grad():
                trained = coll(kjt).values().detach()
        finally:
            torch.set_num_threads(before)
    assert len(threads) >= 3
    assert torch.equal(one, two) and torch.equal(one, trained)


@pytest.mark.parametrize("loss", ["sum", "strided_columns"])
def test_gradients_of_any_strides_train_like_the_tbe_path(loss):
    """``out.sum()`` hands the backward an expanded gradient (strides 0, 0); a loss on every other
    column a gradient that autograd builds with zeros between. Tables and state after two steps
    match a twin on the TBE path."""
    fused, reference = build(), build()
    for kjt in batches(NAMES, 4)[:2]:
        for coll, mode in ((fused, "on"), (reference, "off")):
            with fused_cpu.mode(mode):
                out = coll(kjt).values()
                (out.sum() if loss == "sum" else out[:, ::2].pow(2).sum()).backward()
    for a, b in zip(fused.table_weights(), reference.table_weights()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused.tbe.split_optimizer_states(), reference.tbe.split_optimizer_states()):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


def test_buffers_grow_with_the_batch_and_stay_clean(monkeypatch):
    """The accumulators grow when a larger batch comes, every row's slot is back to -1 after each
    step, and the ranks of MixedDim's ids go from the forward to the backward (not gathered again)."""
    coll = CompressedEmbeddingBagCollection(MD_FEATURES, MD_DIM, MD_METHODS, optimizer=TableOptimizer(lr=0.1))
    seen = []
    real = fused_cpu.backward_step

    def spy(*args, **kwargs):
        seen.append(args[-1] if len(args) == 8 else kwargs.get("ranks"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_cpu, "backward_step", spy)
    sizes = []
    with fused_cpu.mode("on"):
        for batch in (4, 64):
            lengths = torch.randint(0, 3, (len(MD_NAMES) * batch,), generator=torch.Generator().manual_seed(batch))
            kjt = KeyedJaggedTensor(keys=MD_NAMES, values=torch.randint(0, 600, (int(lengths.sum()),)), lengths=lengths)
            coll(kjt).values().pow(2).sum().backward()
            state = fused_cpu.state_for(coll)
            sizes.append(state.params["c_buffers"][0].numel())
            assert bool((state.flags == -1).all())
    assert sizes[1] > sizes[0]
    assert len(seen) == 2 and all(r is not None and r.dtype == torch.int32 for r in seen)


def test_multihash_negative_mixed_seeds_reach_the_kernel_unchanged():
    """Probe seeds are the int64 bit patterns of uint64 mixes (negative for about half): the C rows
    are the torch rows for them (outputs bit for bit the TBE path's)."""
    features = [FeatureSpec("m", 1000)]
    for seed in range(64):  # the first seed with a negative mixed seed among its probes
        coll = CompressedEmbeddingBagCollection(features, DIM, {"m": MultiHash(rows=37, probes=3, seed=seed)})
        plan = fused_train.plan_for(coll)
        if any(s < 0 for s in plan.features[0].seeds):
            break
    assert any(s < 0 for s in plan.features[0].seeds)
    kjt = KeyedJaggedTensor(keys=["m"], values=torch.arange(-5, 995), lengths=torch.ones(1000, dtype=torch.long))
    with torch.no_grad():
        with fused_cpu.mode("off"):
            expected = coll(kjt).values()
        with fused_cpu.mode("on"):
            assert torch.equal(coll(kjt).values(), expected)


def test_streamed_outputs_are_the_stored_ones_bit_for_bit(monkeypatch):
    """Outputs past ``STREAM_BYTES`` are written with streaming stores, a tile of 256 bags at a
    time, from register sums (parts records, Hybrid, Pruned) or from a scratch row (MixedDim's
    projected blocks, parts narrower than a vector): the values of the ordinary stores bit for bit, for every record kind, sum and mean,
    bags of 0-5 ids, 601 bags (two full tiles and a partial one), one and two threads, in
    inference and in the training forward. Where the build has AVX the output was streamed."""
    # u4: 4-wide parts, a scratch row; p_mean: Pruned (no projection: register sums) averaged
    extra = [FeatureSpec("mh", 90), FeatureSpec("u4", 120, pooling="mean"), FeatureSpec("p_mean", 200, pooling="mean")]
    features = HASHED_FEATURES + [f for f in FEATURES if f.name in ("md", "pruned")] + [HYBRID_FEATURES[1]] + extra
    methods = {**HASHED_METHODS, "md": METHODS["md"], "pruned": METHODS["pruned"], "y_remap": HYBRID_METHODS["y_remap"],
               "mh": MultiHash(rows=13, probes=3), "u4": Unified(rows=17, chunks=4, table="c"), "p_mean": Pruned(keep=60)}  # fmt: skip
    names = [f.name for f in features]
    coll = CompressedEmbeddingBagCollection(features, DIM, methods, optimizer=TableOptimizer(lr=0.1), seed=4)
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(0, 6, (len(names) * 601,), generator=g)
    for name in ("pruned", "p_mean"):  # a bag of 5000 ids outgrows the row buffer (512 rows)
        lengths[names.index(name) * 601 + 300] = 5000
    kjt = KeyedJaggedTensor(keys=names, values=torch.randint(-3, 600, (int(lengths.sum()),), generator=g), lengths=lengths)
    plan = fused_cpu.plan_for(coll)
    assert {f.op for f in plan.features} >= {"add", "mult", "multihash", "hashcat"} and plan.mixed and plan.hybrid
    outputs, streamed = [], []
    with fused_cpu.mode("on"):
        for stream_bytes, threads in ((-1, 1), (0, 1), (0, 2)):
            monkeypatch.setattr(fused_cpu, "STREAM_BYTES", stream_bytes)
            monkeypatch.setattr(native, "PARALLEL_FLOATS", 0 if threads == 2 else native.PARALLEL_FLOATS)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    outputs.append(look_up_then_poison(coll, kjt))
                streamed.append(plan.params["c_streamed"])
                outputs.append(look_up_then_poison(coll, kjt))
            finally:
                torch.set_num_threads(before)
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    assert streamed[0] is False
    assert streamed[1:] == [cpu_has_avx()] * 2


def test_one_line_rows_stream_from_a_smaller_size(monkeypatch):
    """Rows of one whole 64-byte line (D = 16 fp32, the output 64-byte aligned) are streamed from
    ``LINE_STREAM_BYTES``, other rows from ``STREAM_BYTES``; -1 stays "never". End to end: at one
    output size between the two, a D=16 collection streams (where the build has AVX) and a D=32 one
    does not, and the streamed output is the stored one bit for bit."""
    assert fused_cpu.stream_bytes(16, torch.empty(8, 64)) == min(fused_cpu.STREAM_BYTES, fused_cpu.LINE_STREAM_BYTES)
    for dim, out in ((8, torch.empty(8, 64)), (32, torch.empty(8, 64)), (64, torch.empty(8, 128)),
                     (16, torch.empty(8 * 64 + 4)[4:].view(8, 64)), (16, torch.empty(8, 72)[:, :64])):  # fmt: skip
        assert fused_cpu.stream_bytes(dim, out) == fused_cpu.STREAM_BYTES, (dim, out.stride(), out.data_ptr() % 64)
    monkeypatch.setattr(fused_cpu, "STREAM_BYTES", -1)
    assert fused_cpu.stream_bytes(16, torch.empty(8, 64)) == -1

    monkeypatch.setattr(fused_cpu, "STREAM_BYTES", 1 << 30)
    monkeypatch.setattr(fused_cpu, "LINE_STREAM_BYTES", 64 << 10)
    features = [FeatureSpec("a", 700), FeatureSpec("b", 90)]
    bags = 1024  # 1024 x 2 x 16 floats = 128 KB at D=16, 256 KB at D=32: both past 64 KB
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.arange(2 * bags) % 800, lengths=torch.ones(2 * bags, dtype=torch.long))
    for dim, streams in ((16, cpu_has_avx()), (32, False)):
        coll = CompressedEmbeddingBagCollection(features, dim, {"a": Hash(rows=50), "b": QR(collisions=4)}, seed=2)
        plan = fused_cpu.plan_for(coll)
        with fused_cpu.mode("on"), torch.no_grad():
            streamed = look_up_then_poison(coll, kjt)
            assert plan.params["c_streamed"] is streams, dim
            monkeypatch.setattr(fused_cpu, "LINE_STREAM_BYTES", 1 << 30)
            stored = look_up_then_poison(coll, kjt)
            assert plan.params["c_streamed"] is False
            monkeypatch.setattr(fused_cpu, "LINE_STREAM_BYTES", 64 << 10)
        assert torch.equal(streamed, stored)


def look_up_then_poison(coll: CompressedEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """A copy of the lookup; the output itself is then filled with NaN, so a later lookup that
    reuses its memory (embeddings/spare.py) and skips a value is seen."""
    out = coll(kjt).values().detach()
    kept = out.clone()
    out.fill_(float("nan"))
    return kept


def cpu_has_avx() -> bool:
    """Whether this CPU has AVX (the kernels are built for it: -march=native), from Linux's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx " in f" {line.split(':', 1)[1].strip()} " for line in f)
    except OSError:
        return False
