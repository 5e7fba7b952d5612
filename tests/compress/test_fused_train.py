"""The fused training step (compress/fused_train.py) against the TBE path: after each of three
steps of each optimizer, the forward output, the TBE's weights and its optimizer state are
allclose (rtol 1e-5, atol 1e-6) to a twin collection trained on the TBE path with the same ids;
for MixedDim also the projections' gradients and, after a torch optimizer's step on them, the
projections themselves.

CI has no GPU and no Triton: the kernel tests skip there. With Triton installed they run the
kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before the kernels are built)
under ``fused_train.mode("on")``; ``benchmarks/gpu_collection.py`` repeats the check on a GPU at
full size. The switch and the fallbacks are tested everywhere.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import KWay, QR, Full, Hybrid, MixedDim, MultiHash, Pruned, fused_cpu, fused_lookup, fused_train
from tablezip.compress.pruned import remap_for
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer, native
from tests.compress.test_fused_lookup import count_calls

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (CI: the TBE path only)")

DIM = 24  # not a power of two: the kernels mask the columns past D (concat: two 12-wide tables)
FEATURES = [
    FeatureSpec("full", 40), FeatureSpec("qr", 300), FeatureSpec("kway3", 200, pooling="mean"),
    FeatureSpec("add", 250, pooling="mean"), FeatureSpec("concat", 790), FeatureSpec("multihash", 400),
    FeatureSpec("multihash_mean", 300, pooling="mean"),
]  # fmt: skip
METHODS = {
    "full": Full(), "qr": QR(collisions=7), "kway3": KWay(partitions=(3, 5, 14)), "add": QR(collisions=5, op="add"),
    "concat": KWay(partitions=(40, 20), op="concat"), "multihash": MultiHash(rows=60, probes=2),
    "multihash_mean": MultiHash(rows=20, probes=3, seed=5),
}  # fmt: skip
# Tables of at most fused_train.SMALL_ROWS (32) rows take the kernel's per-program sums (kway3's,
# the remainders, concat's 20, multihash_mean's), the others per-id atomics (full, the quotients
# of qr and add, concat's 40, multihash's 60): both paths in every test.
NAMES = [f.name for f in FEATURES]
OPTIMIZERS = ["rowwise_adagrad", "adagrad", "sgd"]
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def interpreted(monkeypatch):
    """The Triton kernels under Triton's interpreter, built fresh for the test and dropped after it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for cached in (fused_lookup._kernel, fused_lookup._mixed_kernel, fused_train._kernels):
        cached.cache_clear()
    with fused_train.mode("on"):
        yield
    for cached in (fused_lookup._kernel, fused_lookup._mixed_kernel, fused_train._kernels):
        cached.cache_clear()


class Backend:
    """What a test asks of a backend of the fused step: its training state and whether the state's
    buffers are clean between steps (every touched row's mark undone)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def state_for(self, collection):
        return fused_cpu.state_for(collection) if self.name == "c" else fused_train.state_for(collection)

    def clean(self, state) -> bool:
        if self.name == "c":  # an int32 slot per row, -1 between steps
            return bool((state.flags == -1).all())
        return int(state.count) == 0 and not state.flags.any() and not state.grad.any()


@pytest.fixture(params=["triton", "c"])
def kernel(request, monkeypatch):
    """Each backend of the fused step on a CPU: "triton" (the kernels under Triton's interpreter,
    fused_train mode "on"; skipped without Triton) and "c" (compress/fused_cpu.py, fused_train
    mode "auto"; skipped without a compiler)."""
    if request.param == "c":
        if native.library() is None:
            pytest.skip("the compiled CPU kernels could not be built")
        with fused_cpu.mode("on"):
            yield Backend("c")
        return
    if not HAS_TRITON:
        pytest.skip("triton is not installed (CI: the C step and the TBE path)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for cached in (fused_lookup._kernel, fused_lookup._mixed_kernel, fused_train._kernels):
        cached.cache_clear()
    with fused_train.mode("on"):
        yield Backend("triton")
    for cached in (fused_lookup._kernel, fused_lookup._mixed_kernel, fused_train._kernels):
        cached.cache_clear()


def spy(monkeypatch) -> list[int]:
    """Count the fused backward steps (Triton's launches or the C pass)."""
    return count_calls(monkeypatch, fused_cpu, "backward_step", count_calls(monkeypatch, fused_train, "backward_step"))


def batches(names: list[str], seed: int) -> list[KeyedJaggedTensor]:
    """Three steps' ids: bags of one id (Criteo), then bags of 0-3 ids with repeats (ids drawn
    from a few values, so rows repeat within and across bags), then bags of up to 9 ids; ids out
    of range (negative, past the end: the OOV row) among them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths, high in (
        (torch.ones(len(names) * 9, dtype=torch.long), 500),
        (torch.randint(0, 4, (len(names) * 11,), generator=g), 12),
        (torch.randint(0, 10, (len(names) * 5,), generator=g), 500),
    ):
        values = torch.randint(-3, high, (int(lengths.sum()),), generator=g)
        out.append(KeyedJaggedTensor(keys=names, values=values, lengths=lengths))
    return out


def twins(features, methods, optimizer: TableOptimizer) -> tuple[CompressedEmbeddingBagCollection, CompressedEmbeddingBagCollection]:
    """(fused, reference): built alike from one seed, so their tables start equal."""
    return tuple(CompressedEmbeddingBagCollection(features, DIM, methods, optimizer=optimizer, seed=3) for _ in range(2))


def train_both(fused, reference, kjts, check_state: bool = True, dense: str | None = None) -> None:
    """One step per KJT on each twin (fused under the current mode, the reference with the fused
    training path off), with a loss whose gradient differs per bag and column; after each step
    the outputs, tables and optimizer state must be allclose. ``dense`` ("sgd" or "adagrad"): a
    torch optimizer steps each twin's dense parameters (MixedDim's projections) after every
    backward; their gradients and, after the step, their values must be allclose too."""
    weight = torch.linspace(-1, 1, len(fused.features) * DIM)
    optimizers = []
    if dense is not None:
        make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.3), "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1)}[dense]
        optimizers = [make(coll.dense_parameters()) for coll in (fused, reference)]
        assert fused.dense_parameters(), "no dense parameters to check"
    for step, kjt in enumerate(kjts):
        out = fused(kjt).values()
        with fused_train.mode("off"):
            expected = reference(kjt).values()
        torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"forward, step {step}: {m}")
        (out.pow(2) * weight).sum().backward()
        (expected.pow(2) * weight).sum().backward()
        if optimizers:
            pairs = list(zip(fused.layouts.named_parameters(), reference.layouts.named_parameters()))
            for (name, a), (_, b) in pairs:
                assert b.grad is not None and a.grad is not None, f"{name}: no gradient, step {step}"
                torch.testing.assert_close(a.grad, b.grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}.grad, step {step}: {m}")
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            for (name, a), (_, b) in pairs:
                torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} after the step, step {step}: {m}")
        for t, (a, b) in enumerate(zip(fused.table_weights(), reference.table_weights())):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"table {t}, step {step}: {m}")
        if check_state and fused.tbe.optimizer.name != "EXACT_SGD":
            for t, (a, b) in enumerate(zip(fused.tbe.split_optimizer_states(), reference.tbe.split_optimizer_states())):
                torch.testing.assert_close(a[0], b[0], rtol=RTOL, atol=ATOL, msg=lambda m: f"state {t}, step {step}: {m}")
        assert torch.equal(fused.tbe.iter, reference.tbe.iter)


# -- without Triton too ------------------------------------------------------------------
def test_cpu_modes_pick_the_path(monkeypatch):
    """On a CPU, fused_train "auto" takes the C step (fused_cpu "auto" or "on") and the TBE path
    with fused_cpu "off"; fused_train "off" is the TBE path whatever fused_cpu says."""
    triton_calls = count_calls(monkeypatch, fused_train, "backward_step")
    c_calls = count_calls(monkeypatch, fused_cpu, "backward_step")
    fused, reference = twins(FEATURES, METHODS, TableOptimizer())
    kjts = batches(NAMES, 0)
    assert fused_train.current_mode() == "auto" and fused_cpu.current_mode() == "auto"  # the defaults
    assert not fused_train.enabled_for(kjts[0].values())  # Triton: CUDA ids only under "auto"
    with fused_cpu.mode("off"):
        train_both(fused, reference, kjts[:1])
    assert c_calls == []
    with fused_train.mode("off"), fused_cpu.mode("on"):
        train_both(fused, reference, kjts[1:2])
    assert c_calls == []
    if native.library() is not None:
        train_both(fused, reference, kjts[2:])  # the defaults: the C step
        assert len(c_calls) == 1
    assert triton_calls == []
    with pytest.raises(ValueError, match="mode must be"):
        with fused_train.mode("gpu"):
            pass
    with pytest.raises(ValueError, match="mode must be"):
        with fused_cpu.mode("fast"):
            pass


def test_auto_skips_multihash_collections():
    """Mode "auto" leaves collections with a MultiHash feature on the TBE path (slower fused on an
    H100), and takes the others; "on" forces the fused step for both (the tests above)."""
    with_multihash = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS)
    names = [n for n in NAMES if not n.startswith("multihash")]
    without = CompressedEmbeddingBagCollection([f for f in FEATURES if f.name in names], DIM, {n: METHODS[n] for n in names})
    assert not fused_train.auto_wants(fused_train.plan_for(with_multihash))
    assert fused_train.auto_wants(fused_train.plan_for(without))


def test_inference_is_not_the_training_path():
    with fused_train.mode("on"), torch.no_grad():
        assert not fused_train.enabled_for(torch.zeros(1, dtype=torch.long))


# -- the kernels (Triton's interpreter on a CPU) -----------------------------------------
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_three_steps_match_the_tbe_path(kernel, monkeypatch, optimizer):
    """mult (2 and 3 partitions), add, concat, MultiHash (2 and 3 probes) and Full, sum and mean
    pooling, one-id / empty / repeated-id / longer bags: outputs, tables, optimizer state."""
    calls = spy(monkeypatch)
    fused, reference = twins(FEATURES, METHODS, TableOptimizer(kind=optimizer, lr=0.05))
    train_both(fused, reference, batches(NAMES, 1))
    assert len(calls) == 3  # the fused path ran every step, not a silent fallback
    state = kernel.state_for(fused)
    assert state is not None and state.optimizer == fused_train.OPTIMIZERS[fused.tbe.optimizer.name]
    # Between steps the buffers are clean: the update cleared every row it applied.
    assert kernel.clean(state)


def test_learning_rate_is_read_each_step(kernel, monkeypatch):
    calls = spy(monkeypatch)
    fused, reference = twins(FEATURES, METHODS, TableOptimizer(lr=0.05))
    kjts = batches(NAMES, 2)
    train_both(fused, reference, kjts[:1])
    for coll in (fused, reference):
        coll.tbe.set_learning_rate(0.3)
    train_both(fused, reference, kjts[1:])
    assert len(calls) == 3


@pytest.mark.parametrize(
    "replace", [{"weight_decay": 0.01}, {"gradient_clipping": True, "max_gradient": 0.1}, {"max_norm": 0.5}],
    ids=["weight_decay", "gradient_clipping", "max_norm"],
)
def test_unsupported_optimizer_settings_fall_back(kernel, monkeypatch, replace):
    """fbgemm features the kernel does not apply keep the TBE path (set on the TBE directly: a
    CPU collection refuses weight decay, and fbgemm's CPU kernels ignore these settings, so the
    twins must still match)."""
    calls = spy(monkeypatch)
    fused, reference = twins(FEATURES, METHODS, TableOptimizer())
    for coll in (fused, reference):
        coll.tbe.optimizer_args = coll.tbe.optimizer_args._replace(**replace)
    train_both(fused, reference, batches(NAMES, 3)[:2])
    assert calls == [] and kernel.state_for(fused) is None


def test_other_collections_fall_back(kernel, monkeypatch):
    """Hybrid (Triton: no plan covers it; the C plan does), Pruned's default row without a remap (no block test expresses it),
    Full alone (TBE's own pooled lookup) and a TBE whose placeholder does not require grad keep
    the TBE path, and still train like it."""
    calls = spy(monkeypatch)
    features = [FeatureSpec("full", 40), FeatureSpec("other", 600)]
    others = [Pruned(keep=50, missing="default", remap=False)] + ([Hybrid(hot=10, cold_rows=60)] if kernel.name == "triton" else [])
    for other in others:
        pair = twins(features, {"full": Full(), "other": other}, TableOptimizer())
        train_both(*pair, batches(["full", "other"], 4)[:2])
        assert kernel.state_for(pair[0]) is None
    full = twins(features, None, TableOptimizer())
    train_both(*full, batches(["full", "other"], 5)[:2])
    frozen = twins(FEATURES, METHODS, TableOptimizer())
    frozen[0].tbe.placeholder_autograd_tensor.requires_grad_(False)
    frozen[0](batches(NAMES, 6)[0]).values().sum().backward()  # TBE's autograd (its weights)
    assert calls == []


def test_multihash_probes_sharing_a_row(kernel, monkeypatch):
    """A tiny MultiHash table: probes of one id and ids of one bag often land on the same row, so
    its gradient gathers several terms from one id (each probe's) and the row is listed once."""
    calls = spy(monkeypatch)
    features = [FeatureSpec("a", 100), FeatureSpec("b", 100, pooling="mean")]
    methods = {"a": MultiHash(rows=3, probes=4), "b": QR(collisions=50)}  # QR: 2 remainder rows, hot
    fused, reference = twins(features, methods, TableOptimizer(kind="adagrad"))
    train_both(fused, reference, batches(["a", "b"], 7))
    assert len(calls) == 3


# -- MixedDim: projected and D-wide blocks, remap, keep; the projections trained by torch ----------
# md: four blocks (D-wide, 8, 4 and 12 wide), ranks by unsorted counts (an int32 remap), and the
# rarest 130 ids dropped (keep). md_mean: a projected block then a D-wide one holding the OOV row,
# ids in rank order (no remap), mean pooling. md_one: one 8-wide block (the benchmark's shape).
MD_COUNTS = torch.randperm(600, generator=torch.Generator().manual_seed(11)).tolist()
MD_FEATURES = [
    FeatureSpec("full", 40), FeatureSpec("md", 600, counts=MD_COUNTS), FeatureSpec("md_mean", 300, pooling="mean"),
    FeatureSpec("md_one", 200),
]  # fmt: skip
MD_METHODS = {
    "full": Full(), "md": MixedDim(dims=(DIM, 8, 4, 12), sizes=(20, 80, 200, 300), keep=470),
    "md_mean": MixedDim(dims=(12, DIM), sizes=(100, 200)), "md_one": MixedDim(dims=(8,), sizes=(200,)),
}  # fmt: skip
MD_NAMES = [f.name for f in MD_FEATURES]


@pytest.mark.parametrize("optimizer,dense", [("rowwise_adagrad", "sgd"), ("adagrad", "adagrad"), ("sgd", "sgd")])
def test_mixed_dim_three_steps_match_the_tbe_path(kernel, monkeypatch, optimizer, dense):
    """Outputs, projection gradients, projections after the dense step, tables and optimizer
    state, over one-id / empty / repeated-id / longer bags (ids up to 500: the rarest ranks of
    md, past keep, read and train nothing)."""
    calls = spy(monkeypatch)
    fused, reference = twins(MD_FEATURES, MD_METHODS, TableOptimizer(kind=optimizer, lr=0.05))
    assert fused.layouts["md"].remap is not None and fused.layouts["md"].keep == 470
    train_both(fused, reference, batches(MD_NAMES, 8), dense=dense)
    assert len(calls) == 3
    state = kernel.state_for(fused)
    assert state is not None and len(state.projections) == 5  # md's three, md_mean's and md_one's
    assert kernel.clean(state)


@needs_triton
def test_mixed_dim_programs_loop_over_bag_blocks(interpreted, monkeypatch):
    """Blocks of 16 bags, two per program, 70 bags: programs that loop over several bag blocks
    (their projection sums carried across them) and a last, partial block."""
    monkeypatch.setattr(fused_train, "MIXED_BLOCK_BAGS", 16)
    monkeypatch.setattr(fused_train, "MIXED_BAG_BLOCKS", 2)
    calls = spy(monkeypatch)
    fused, reference = twins(MD_FEATURES, MD_METHODS, TableOptimizer(lr=0.05))
    g = torch.Generator().manual_seed(13)
    kjts = []
    for _ in range(2):
        lengths = torch.randint(0, 4, (len(MD_NAMES) * 70,), generator=g)
        kjts.append(KeyedJaggedTensor(keys=MD_NAMES, values=torch.randint(-3, 650, (int(lengths.sum()),), generator=g), lengths=lengths))
    train_both(fused, reference, kjts, dense="sgd")
    assert len(calls) == 2


def test_mixed_dim_projection_gradient_without_grad_is_none(kernel, monkeypatch):
    """A frozen projection (requires_grad False) gets no gradient; the tables still train."""
    calls = spy(monkeypatch)
    fused, reference = twins(MD_FEATURES, MD_METHODS, TableOptimizer(lr=0.05))
    for coll in (fused, reference):
        coll.layouts["md"].projections["1"].requires_grad_(False)
    train_both(fused, reference, batches(MD_NAMES, 9)[:2])
    assert len(calls) == 2 and fused.layouts["md"].projections["1"].grad is None
    assert fused.layouts["md"].projections["2"].grad is not None


# -- Pruned: remap (a scattered one), prefix, default row ---------------------------------
PRUNED_FEATURES = [
    FeatureSpec("full", 40), FeatureSpec("zero", 300), FeatureSpec("default", 300, pooling="mean"),
    FeatureSpec("prefix", 400), FeatureSpec("prefix_mean", 300, pooling="mean"), FeatureSpec("qr", 300),
]  # fmt: skip
PRUNED_METHODS = {
    "full": Full(), "zero": Pruned(keep=90), "default": Pruned(keep=70, missing="default"),
    "prefix": Pruned(keep=150, remap=False), "prefix_mean": Pruned(keep=301, remap=False), "qr": QR(collisions=7),
}  # fmt: skip
PRUNED_NAMES = [f.name for f in PRUNED_FEATURES]


def pruned_twins(optimizer: TableOptimizer):
    """Twins whose remaps keep scattered ids (as prune_collection leaves them), not a prefix."""
    pair = twins(PRUNED_FEATURES, PRUNED_METHODS, optimizer)
    g = torch.Generator().manual_seed(12)
    for name in ("zero", "default"):
        kept = torch.randperm(301, generator=g)[: pair[0].layouts[name].keep].sort().values  # 300: the OOV id
        for coll in pair:
            coll.layouts[name].remap.copy_(remap_for(kept, 300))
    return pair


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_pruned_three_steps_match_the_tbe_path(kernel, monkeypatch, optimizer):
    """Pruned ids read nothing and train nothing (zero), or read and train the shared default
    row; prefix layouts keep ids below keep (prefix_mean: every id and the OOV id); mean pooling
    counts pruned ids; beside Full and QR."""
    calls = spy(monkeypatch)
    fused, reference = pruned_twins(TableOptimizer(kind=optimizer, lr=0.05))
    # A fourth step of the ids at every keep boundary (keep - 1, keep, keep + 1), at n and past
    # it (the OOV id), and negative ones, one per bag, then two bags of seven.
    edges = torch.tensor([-2, -1, 0, 69, 70, 71, 89, 90, 91, 149, 150, 151, 299, 300, 301, 399, 400, 401])
    per_feature = torch.cat([edges, edges[:7], edges[-7:]])
    lengths = torch.cat([torch.ones(len(edges), dtype=torch.long), torch.tensor([7, 7])]).repeat(len(PRUNED_NAMES))
    edge_kjt = KeyedJaggedTensor(keys=PRUNED_NAMES, values=per_feature.repeat(len(PRUNED_NAMES)), lengths=lengths)
    train_both(fused, reference, batches(PRUNED_NAMES, 10) + [edge_kjt])
    assert len(calls) == 4
    state = kernel.state_for(fused)
    assert state is not None and len(state.plan.mixed) == 4 and not state.projections
    assert kernel.clean(state)
    default = fused.table_weights()[fused.feature_tables("default")[0]]
    twin = reference.table_weights()[reference.feature_tables("default")[0]]
    assert not torch.equal(default[-1], twins(PRUNED_FEATURES, PRUNED_METHODS, TableOptimizer())[0].table_weights()[
        fused.feature_tables("default")[0]][-1])  # the default row trained
    torch.testing.assert_close(default[-1], twin[-1], rtol=RTOL, atol=ATOL)


def test_pruned_inference_keeps_the_tbe_path(kernel):
    """The training plan covers Pruned; the inference plan (fused_lookup) still does not."""
    fused, _ = pruned_twins(TableOptimizer())
    assert fused_lookup.plan_for(fused).weights is None
    assert fused_train.plan_for(fused).weights is not None


def test_vector_atomics_only_where_every_row_is_aligned(monkeypatch):
    """``add_quads`` adds four floats at one 16-byte aligned address: a group takes it only when
    switched on, compiled (the interpreter cannot run inline PTX), and every table offset, width,
    the dimension and the buffer are multiples of 4 floats; anything else keeps scalar atomics."""
    aligned = torch.zeros(64)
    assert aligned.data_ptr() % 16 == 0
    monkeypatch.setattr(fused_train, "_COMPILED", True)
    monkeypatch.setattr(fused_train, "VECTOR_ATOMICS", True)
    assert fused_train._quads_ok([0, 64, 128], [64], 64, aligned)
    assert fused_train._quads_ok([0, 12], [12, 4], 24, aligned)
    assert not fused_train._quads_ok([0, 66], [64], 64, aligned)  # a table at an odd offset
    assert not fused_train._quads_ok([0, 64], [6], 64, aligned)  # a 6-wide block
    assert not fused_train._quads_ok([0], [12], 12 + 2, aligned)  # D=14
    assert not fused_train._quads_ok([0], [64], 64, aligned[1:])  # a buffer 4 bytes off
    assert not fused_train._quads_ok([0], [64], 64, aligned, capability=(8, 0))  # an A100: no red.v4
    assert fused_train._quads_ok([0], [64], 64, aligned, capability=(10, 0))
    monkeypatch.setattr(fused_train, "VECTOR_ATOMICS", False)
    assert not fused_train._quads_ok([0], [64], 64, aligned)
    monkeypatch.setattr(fused_train, "VECTOR_ATOMICS", True)
    monkeypatch.setattr(fused_train, "_COMPILED", False)
    assert not fused_train._quads_ok([0], [64], 64, aligned)


@needs_triton
def test_interpreted_kernels_launch_with_scalar_atomics(interpreted, monkeypatch):
    """Under the interpreter every gradient launch gets VEC=0 even with the switch on (inline PTX
    cannot run there), so the CPU tests keep checking the scalar path against the TBE path."""
    assert fused_train.VECTOR_ATOMICS
    seen = []
    grad_kernel, mixed_grad_kernel, update_kernel = fused_train._kernels()
    assert fused_train._COMPILED is False

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs.get("VEC"))
                return self.kernel[grid](*args, **kwargs)
            return launch

    with monkeypatch.context() as patch:  # undone before the fixture clears the kernels' cache
        patch.setattr(fused_train, "_kernels", lambda: (Spy(grad_kernel), Spy(mixed_grad_kernel), update_kernel))
        for features, methods in ((FEATURES, METHODS), (MD_FEATURES, MD_METHODS)):
            fused, reference = twins(features, methods, TableOptimizer(lr=0.05))
            train_both(fused, reference, batches([f.name for f in features], 8)[:1])
    # DIM=24 and the tables' widths are multiples of 4: aligned, so only the interpreter says no.
    assert len(seen) >= 4 and all(v is False for v in seen)
