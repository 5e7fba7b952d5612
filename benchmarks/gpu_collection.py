"""The collection on CUDA: parity with the CPU path, then TBE speed at GPU sizes.

Runs on the lent GPU machine (see ../shared/device/README.md): it checks that a collection built
on ``cuda`` gives the same vectors and the same fused-optimizer step as the CPU build with the
same weights, then times forward and forward+backward of Full and Hash (10x) against torchrec's
EmbeddingBagCollection and one nn.EmbeddingBag per table, plus the device-to-device copy
bandwidth measured in the same run (the hardware ceiling a lookup-bound kernel is judged by).
Hybrid and Pruned (10x) are timed in tablezip only, and so are the OTHER_METHODS (MultiHash, QR,
KWay, MixedDim, Unified at 10x; ``tablezip_only``: each against the path its GPU change replaced,
see NOTES "GPU: other methods"). Every compressed variant is also timed with
``batch_transforms = False`` ("per-feature transforms": each feature's own id transform, the code
before issue 6), so one run gives the before and after of batching the transforms.

The default path on CUDA runs the fused Triton id transforms (compress/fused_ids.py) and drops
Pruned's -1 rows by zero weights (``drop_by_weight``, no host sync). Each compressed variant is
also timed "unfused" (torch transforms and compaction: the batched path before them); Pruned also
with one of the two changes at a time, and with its dropped ids spread over rows instead of row 0
(training only: how much the hot row 0 costs fbgemm's backward). The run checks on the GPU that
the fused rows equal the torch rows, that the forwards are bit-identical, and compares the tables
after two training steps of the default path against a twin on the unfused path.

    python benchmarks/gpu_collection.py --out DIR [--rows 1000000] [--dim 64] [--batch 65536]
Fused training (compress/fused_train.py): QR, KWay, MultiHash, MixedDim (md-10x: its projections'
gradients come back from the same backward, checked against the TBE path's) and Pruned
(pruned-10x) train through the fused lookup's kernels and a Triton backward that applies the
TBE's optimizer itself. Their default row
("tablezip TBE") is that path (``--fused-train-mode``, "auto"), timed beside the TBE path
("fused training off": fbgemm's backward and fused optimizer), both paired with Full; each
record says whether the fused step ran (``train_path``) and the tables' and optimizer state's
max |diff| after one step against a twin trained on the TBE path (``fused_train_*``).

    python benchmarks/gpu_collection.py --out DIR [--rows 1000000] [--dim 64] [--batch 65536]
    python benchmarks/gpu_collection.py --out DIR --device cpu --rows 1000 --batch 64   # smoke test
    TRITON_INTERPRET=1 python benchmarks/gpu_collection.py --out DIR --device cpu --rows 300 --batch 16 --tables 2 \
        --dim 16 --variants full,qr-10x,kway-10x,multihash-10x,md-10x,pruned-10x --bag-lens '' --fused-train-mode on   # interpreter smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_gpu_workload_args, env_info, time_cuda_fn, time_fn  # noqa: E402

from tablezip.compress import fused_ids, fused_lookup, fused_train  # noqa: E402
from tablezip.compress.multihash import MultiHashLayout  # noqa: E402
from tablezip.compress import (  # noqa: E402
    Hash,
    full_bytes,
    hash_methods_for_budget,
    hybrid_methods_for_budget,
    pruned_methods_for_budget,
)
from tablezip.compress.budget import methods_for_budget  # noqa: E402
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer  # noqa: E402

warnings.filterwarnings("ignore")


def parity(device: torch.device) -> dict[str, Any]:
    """CPU and CUDA builds with identical weights: same pooled vectors, same updated rows."""
    features = [FeatureSpec(f"f{i}", n) for i, n in enumerate([100, 5000, 7, 20000])]
    out: dict[str, Any] = {}
    for variant, methods in {"full": None, "hash": {"f1": Hash(rows=300), "f3": Hash(rows=999, seed=2)}}.items():
        cpu = CompressedEmbeddingBagCollection(features, 16, methods, optimizer=TableOptimizer(lr=0.1), seed=1)
        gpu = CompressedEmbeddingBagCollection(features, 16, methods, optimizer=TableOptimizer(lr=0.1), seed=1, device=device)
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(0, 4, (4 * 256,), generator=g)
        values = torch.randint(-2, 20000, (int(lengths.sum()),), generator=g)
        kjt = KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths)
        a = cpu(kjt).values()
        b = gpu(kjt.to(device)).values()
        fwd_err = (a - b.cpu()).abs().max().item()
        a.pow(2).sum().backward()
        b.pow(2).sum().backward()
        step_err = max((x - y.cpu()).abs().max().item() for x, y in zip(cpu.table_weights(), gpu.table_weights()))
        out[variant] = {"forward_max_abs_err": fwd_err, "after_step_max_abs_err": step_err}
    return out


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """GB/s of a device-to-device copy (read + write counted), the lookup kernel's ceiling."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_cuda_fn(lambda: dst.copy_(src), warmup=3, repeats=10, iterations=5)
    return 2 * src.numel() * 4 / (t["median_ms"] / 1e3) / 1e9


def timer(device: torch.device):
    """CUDA events on a GPU; the CPU harness timer for the smoke test."""
    if device.type == "cuda":
        return time_cuda_fn
    return lambda fn: time_fn(fn, warmup=2, repeats=5, min_seconds=0.05)


def paired_ratio(device: torch.device, reference, fn, repeats: int = 15) -> float:
    """Median over repeats of fn's time / reference's time, the two timed back to back in each
    repeat. Why: Full's own time moved 0.80-1.07 ms between runs on the same H100, so a ratio to
    a Full timed minutes earlier could swing by 20%; a pair shares the GPU's state of the moment."""
    if device.type == "cuda":
        one = lambda f: time_cuda_fn(f, warmup=2, repeats=1, iterations=10)["median_ms"]  # noqa: E731
    else:
        one = lambda f: time_fn(f, warmup=1, repeats=1, min_seconds=0.02)["median_ms"]  # noqa: E731
    ratios = []
    for r in range(repeats):  # alternate which runs first, so neither always follows the other
        if r % 2 == 0:
            a = one(reference)
            b = one(fn)
        else:
            b = one(fn)
            a = one(reference)
        ratios.append(b / a)
    return float(statistics.median(ratios))


def transforms_forward(coll: CompressedEmbeddingBagCollection, kjt: KeyedJaggedTensor, batched: bool):
    """The collection's forward with batched id transforms on or off (off: each feature's own
    transform, the path before issue 6), restored afterwards."""
    def run() -> torch.Tensor:
        coll.batch_transforms = batched
        try:
            return coll(kjt).values()
        finally:
            coll.batch_transforms = True
    return run


class FullReference:
    """Full's collection on the same ids, kept for the whole run: every default path is timed in
    pairs against it (``paired_ratio``), forward and training step."""

    def __init__(self, features: list[FeatureSpec], dim: int, kjt: KeyedJaggedTensor, device: torch.device) -> None:
        self.coll = CompressedEmbeddingBagCollection(features, dim, None, device=device)
        self.kjt, self.device = kjt, device

    def forward(self) -> torch.Tensor:
        return self.coll(self.kjt).values()

    def step(self) -> None:
        self.coll(self.kjt).values().sum().backward()

    def ratios(self, fwd, step) -> dict[str, float | None]:
        with torch.no_grad():
            f = paired_ratio(self.device, self.forward, fwd)
        return {"fwd_vs_full_paired": f, "train_vs_full_paired": paired_ratio(self.device, self.step, step) if step is not None else None}


VARIANTS = ("full", "hash-10x", "hybrid-10x", "pruned-10x")
FITTERS = {"hash-10x": hash_methods_for_budget, "hybrid-10x": hybrid_methods_for_budget, "pruned-10x": pruned_methods_for_budget}


def speed(device: torch.device, tables: int, rows: int, dim: int, batch: int, variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:
    features = [FeatureSpec(f"f{i}", rows) for i in range(tables)]
    names = [f.name for f in features]
    g = torch.Generator(device=device).manual_seed(0)
    values = torch.randint(0, rows, (tables * batch,), device=device, generator=g)
    kjt = KeyedJaggedTensor(keys=names, values=values, lengths=torch.ones(tables * batch, dtype=torch.long, device=device))
    per_feature = values.view(tables, batch)
    offsets = torch.arange(batch, device=device)
    records = []
    timed = timer(device)
    reference = FullReference(features, dim, kjt, device)
    for variant in variants:
        if variant in OTHER_METHODS:
            records.extend(tablezip_only(variant, features, kjt, dim, timed, reference))
            continue
        methods = FITTERS[variant](features, dim, full_bytes(features, dim) // 10) if variant in FITTERS else None
        coll = CompressedEmbeddingBagCollection(features, dim, methods, device=device)
        specs = coll.table_specs()
        transforms = [coll.layouts[n].transform for n in names]
        ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=s.rows, feature_names=[n]) for i, (s, n) in enumerate(zip(specs, names))],
            device=device,
        )
        bags = nn.ModuleList(nn.EmbeddingBag(s.rows, dim, mode="sum", sparse=True, device=device) for s in specs)
        opt_ebc = torch.optim.SGD(ebc.parameters(), lr=0.01)
        opt_bags = torch.optim.SGD(bags.parameters(), lr=0.01)

        def remapped() -> KeyedJaggedTensor:
            rows_ = torch.cat([t(per_feature[i])[0] for i, t in enumerate(transforms)])
            return KeyedJaggedTensor(keys=names, values=rows_, lengths=kjt.lengths())

        def loop_forward() -> torch.Tensor:
            return torch.cat([bag(t(per_feature[i])[0], offsets) for i, (bag, t) in enumerate(zip(bags, transforms))], dim=1)

        def train(fwd, opt=None, train_mode: str = "off"):
            def step():
                with fused_train.mode(train_mode):
                    out = fwd()
                out.sum().backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            return step

        per_feature_forward = transforms_forward(coll, kjt, batched=False)

        def configured(fused: bool, by_weight: bool):
            """The batched forward with the fused kernels on or off and drops by weight or not."""
            def forward() -> torch.Tensor:
                before = coll.drop_by_weight
                coll.drop_by_weight = by_weight
                try:
                    with fused_ids.mode("auto" if fused else "off"):
                        return coll(kjt).values()
                finally:
                    coll.drop_by_weight = before
            return forward

        unfused_forward = configured(False, False)
        checks: dict[str, Any] = {}
        with torch.no_grad():  # the transform paths are bit-identical (tests); check it here too
            same = bool(torch.equal(coll(kjt).values(), per_feature_forward()))
            if variant != "full":
                checks = fused_checks(coll, kjt, names, unfused_forward)
        if variant != "full":
            with fused_train.mode("off"):  # the transforms' check: both twins on the TBE path
                checks.update(train_twin_check(features, dim, FITTERS[variant], kjt, device, coll.drop_by_weight))
        if variant == "pruned-10x":  # the fused training step (compress/fused_train.py) against the TBE path
            checks.update(fused_train_check(features, dim, methods, kjt))
        # impl -> (forward, dense optimizer, fused_train mode of its training step): the default
        # row trains as the collection does by default (Pruned: the fused step; the others keep
        # the TBE path either way); the rows that compare TBE-path variants train on it.
        cases = {"tablezip TBE": (lambda: coll(kjt).values(), None, FUSED_TRAIN_MODE)}
        if variant != "full":
            if variant == "pruned-10x":
                cases["tablezip TBE, fused training off (fbgemm backward + fused optimizer)"] = (lambda: coll(kjt).values(), None, "off")
            cases["tablezip TBE, unfused (torch transforms, compaction)"] = (unfused_forward, None, "off")
            if variant == "pruned-10x":
                cases["tablezip TBE, fused transforms + compaction"] = (configured(True, False), None, "off")
                cases["tablezip TBE, torch transforms + zero-weight drops"] = (configured(False, True), None, "off")
                cases["tablezip TBE, zero-weight drops spread over rows"] = (spread_drops_forward(coll, kjt), None, "off")
            cases["tablezip TBE, per-feature transforms"] = (per_feature_forward, None, "off")
        if variant in ("full", "hash-10x"):  # -1 rows of pruned ids are not valid EBC input
            cases["torchrec EBC"] = (lambda: ebc(remapped()).values(), opt_ebc, "off")
            cases["nn.EmbeddingBag loop"] = (loop_forward, opt_bags, "off")
        for impl, (fwd, opt, train_mode) in cases.items():
            with torch.no_grad():
                f = timed(fwd)
            fused_before = len(FUSED_STEPS)
            t = timed(train(fwd, opt, train_mode))
            train_path = "fused" if len(FUSED_STEPS) > fused_before else "TBE"
            pair = impl == "tablezip TBE" or impl.startswith("tablezip TBE, fused training off")
            paired = reference.ratios(fwd, train(fwd, opt, train_mode)) if pair else {}
            looked_up = tables * batch
            records.append({**paired,
                "variant": variant, "impl": impl, "tables": tables, "rows": rows, "dim": dim, "batch": batch, "train_path": train_path,
                "batch_groups": len(coll._groups), "batched_equals_per_feature": same,
                "drop_by_weight": coll.drop_by_weight, **checks,
                "bytes": coll.memory_bytes(), "fwd_ms": f["median_ms"], "fwd_p90_ms": f["p90_ms"],
                "train_ms": t["median_ms"], "train_p90_ms": t["p90_ms"],
                "fwd_rows_per_s": looked_up / (f["median_ms"] / 1e3),
                # a pooled lookup reads each row once (dim * 4 bytes) and writes the output once
                "fwd_GBps": looked_up * dim * 4 * 2 / (f["median_ms"] / 1e3) / 1e9,
            })
        del coll, ebc, bags
        torch.cuda.empty_cache()
    return records


# The fused_train mode of the default training rows ("on": the CPU interpreter smoke test).
FUSED_TRAIN_MODE = "auto"
FUSED_STEPS: list[int] = []  # one entry per fused backward step (counted by main's wrapper)


def count_fused_steps() -> None:
    """Count the fused training steps, so each record says which path its step actually took."""
    real = fused_train.backward_step

    def counted(*args, **kwargs):
        FUSED_STEPS.append(1)
        return real(*args, **kwargs)

    fused_train.backward_step = counted


def fused_train_check(features, dim: int, methods, kjt: KeyedJaggedTensor) -> dict[str, Any]:
    """Two collections built alike (same seed); one training step of a loss whose gradient differs
    per bag and column, one twin on the fused training path (``FUSED_TRAIN_MODE``), the other on
    the TBE path: max |diff| of outputs, tables and optimizer state, and whether the fused step
    ran (False: the method keeps the TBE path, e.g. MixedDim, Unified)."""
    device = kjt.values().device
    twins = [CompressedEmbeddingBagCollection(features, dim, methods, device=device) for _ in range(2)]
    weight = torch.linspace(-1, 1, len(features) * dim, device=device)
    before = len(FUSED_STEPS)
    outs = []
    for coll, value in zip(twins, (FUSED_TRAIN_MODE, "off")):
        with fused_train.mode(value):
            out = coll(kjt).values()
        (out.pow(2) * weight).sum().backward()
        outs.append(out.detach())
    used = len(FUSED_STEPS) > before
    tables = max(float((a - b).abs().max()) for a, b in zip(twins[0].table_weights(), twins[1].table_weights()))
    scale = max(float(b.abs().max()) for b in twins[1].table_weights())
    states = [s[0] for s in twins[0].tbe.split_optimizer_states()], [s[0] for s in twins[1].tbe.split_optimizer_states()]
    state_diff = max((float((a - b).abs().max()) for a, b in zip(*states)), default=0.0)
    state = fused_train.state_for(twins[0]) if used else None
    buffers = sum(t.numel() * t.element_size() for t in (state.grad, state.flags, state.rows)) if state is not None else 0
    # MixedDim's projections: dense parameters, their gradient returned by the fused backward.
    dense = [(a.grad, b.grad) for a, b in zip(twins[0].dense_parameters(), twins[1].dense_parameters()) if b.grad is not None]
    dense_diff = max((float((a - b).abs().max()) if a is not None else float("inf") for a, b in dense), default=0.0)
    dense_close = all(a is not None and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6)) for a, b in dense)
    result = {
        "fused_train_used": used, "fused_train_forward_max_abs_diff": float((outs[0] - outs[1]).abs().max()),
        "fused_train_tables_max_abs_diff": tables, "fused_train_tables_allclose": tables <= 1e-5 * scale + 1e-6,
        "fused_train_state_max_abs_diff": state_diff, "fused_train_buffer_bytes": buffers,
        "fused_train_projection_grads": len(dense), "fused_train_projection_grad_max_abs_diff": dense_diff,
        "fused_train_projection_grad_allclose": dense_close,
    }  # fmt: skip
    del twins
    return result


# Methods with several tables per feature, projections or a shared table: timed in tablezip
# only (no torchrec/nn.EmbeddingBag twin here; methods_speed.py has their dlrm-style builds).
OTHER_METHODS = ("multihash-10x", "qr-10x", "kway-10x", "md-10x", "unified-10x")


def tablezip_only(variant: str, features: list[FeatureSpec], kjt: KeyedJaggedTensor, dim: int, timed, reference: FullReference) -> list[dict[str, Any]]:
    """Forward and fwd+bwd(+fused step) of one more method at 10x: the default path, the
    per-feature transforms, and the path each GPU change replaced, measured in the same run:
    MultiHash with its probes unfolded (one TBE slot per probe, summed after), QR/KWay with the
    fused inference lookup off (unpooled TBE rows, torch product), Unified with torch hashing.
    Rows whose training path equals the default's are timed forward only (train_ms None).
    The checks compare each default path with its replaced one on the GPU."""
    method = variant.split("-")[0]
    device = kjt.values().device
    methods = methods_for_budget(method, features, dim, full_bytes(features, dim) // 10)
    coll = CompressedEmbeddingBagCollection(features, dim, methods, device=device)

    def forward(batched: bool):
        return transforms_forward(coll, kjt, batched)

    def switched(switch, value: str):
        def run() -> torch.Tensor:
            with switch.mode(value):
                return coll(kjt).values()
        return run

    with torch.no_grad():
        same = bool(torch.allclose(forward(True)(), forward(False)(), rtol=1e-5, atol=1e-6))
    # impl -> (forward, timed training too, fused_train mode of the training step)
    cases: dict[str, tuple[Any, bool, str]] = {"tablezip TBE": (forward(True), True, FUSED_TRAIN_MODE)}
    cases["tablezip TBE, fused training off (fbgemm backward + fused optimizer)"] = (forward(True), True, "off")
    checks: dict[str, Any] = fused_train_check(features, dim, methods, kjt)
    twin = None
    if method == "multihash":
        twin = unfolded(features, dim, methods, device)
        cases["tablezip TBE, probes unfolded (one slot per probe)"] = (lambda: twin(kjt).values(), True, "off")
        with fused_train.mode("off"):  # the fold is TBE's: checked on the TBE path
            checks.update(fold_checks(features, dim, methods, kjt))
    if method in ("qr", "kway", "multihash", "md"):
        off = {"md": "fused lookup off (TBE pooled narrow rows, torch projections)",
               "multihash": "fused lookup off (folded TBE bag)"}.get(method, "fused lookup off (unpooled rows, torch product)")
        cases[f"tablezip TBE, {off}"] = (switched(fused_lookup, "off"), False, "off")
        with torch.no_grad():  # (enabled_for is False while grad is enabled: inference only)
            out, ref = coll(kjt).values(), switched(fused_lookup, "off")()
            used = fused_lookup.enabled_for(kjt.values()) and getattr(fused_lookup._PLANS.get(coll), "weights", None) is not None
        # MixedDim's kernel projects each id before pooling, TBE pools first: equal up to rounding.
        checks = {**checks, "fused_lookup_used": used, "fused_forward_equal_tbe": bool(torch.equal(out, ref)),
                  "fused_forward_allclose_tbe": bool(torch.allclose(out, ref, rtol=1e-5, atol=1e-6)),
                  "fused_forward_max_abs_diff": float((out - ref).abs().max())}
    elif method == "unified":
        cases["tablezip TBE, torch transforms (fused_ids off)"] = (switched(fused_ids, "off"), True, FUSED_TRAIN_MODE)
        with torch.no_grad():
            checks = {"forward_equal_torch_transforms": bool(torch.equal(coll(kjt).values(), switched(fused_ids, "off")()))}
    cases["tablezip TBE, per-feature transforms"] = (forward(False), True, "off")  # (the TBE path either way)
    records = []
    for impl, (fwd, train, train_mode) in cases.items():
        with torch.no_grad():
            f = timed(fwd)
        t = None
        fused_before = len(FUSED_STEPS)
        if train:
            def step(fwd=fwd, train_mode=train_mode) -> None:
                with fused_train.mode(train_mode):
                    out = fwd()
                out.sum().backward()
                for m in (coll, twin):
                    for p in (m.parameters() if m is not None else []):  # projections of md are dense parameters
                        p.grad = None

            t = timed(step)
        train_path = None if not train else ("fused" if len(FUSED_STEPS) > fused_before else "TBE")
        pair = impl == "tablezip TBE" or impl.startswith("tablezip TBE, fused training off")
        paired = reference.ratios(fwd, step if train else None) if pair else {}
        looked_up = kjt.values().numel()
        records.append({**paired,
            "variant": variant, "impl": impl, "tables": len(features), "rows": features[0].num_embeddings, "dim": dim,
            "batch": kjt.stride(), "batch_groups": len(coll._groups), "batched_equals_per_feature": same,
            "physical_tables": len(coll.table_specs()), "tbe_slots": len(coll.tbe_feature_table_map()), "bytes": coll.memory_bytes(),
            "methods": sorted({repr(m) for m in methods.values()})[:3], **checks, "train_path": train_path,
            "fwd_ms": f["median_ms"], "fwd_p90_ms": f["p90_ms"],
            "train_ms": t["median_ms"] if t else None, "train_p90_ms": t["p90_ms"] if t else None,
            "fwd_rows_per_s": looked_up / (f["median_ms"] / 1e3),
            "fwd_GBps": looked_up * dim * 4 * 2 / (f["median_ms"] / 1e3) / 1e9,
        })
    del coll, twin
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return records


def unfolded(features, dim: int, methods, device: torch.device):
    """The collection as it was before the fold: MultiHash's probes as separate TBE slots, each
    pooled, then summed by ``combine`` (same seed, so the same tables as the default build)."""
    MultiHashLayout.folds_slots = False
    try:
        return CompressedEmbeddingBagCollection(features, dim, methods, device=device)
    finally:
        MultiHashLayout.folds_slots = True


def fold_checks(features, dim: int, methods, kjt: KeyedJaggedTensor) -> dict[str, Any]:
    """Folded and unfolded twins: forward bit-identical (one id per bag), and after two
    fused-Adagrad steps of a loss whose gradient differs per bag the tables are allclose (the
    same gradient terms per row, summed in another order by the backward)."""
    device = kjt.values().device
    folded = CompressedEmbeddingBagCollection(features, dim, methods, device=device)
    twin = unfolded(features, dim, methods, device)
    weight = torch.linspace(-1, 1, len(features) * dim, device=device)
    first_equal, diffs = None, []
    for _ in range(2):
        outs = []
        for coll in (folded, twin):
            out = coll(kjt).values()
            (out.pow(2) * weight).sum().backward()
            outs.append(out.detach())
        first_equal = bool(torch.equal(outs[0], outs[1])) if first_equal is None else first_equal
        diffs.append(float((outs[0] - outs[1]).abs().max()))
    table_diff = max(float((a - b).abs().max()) for a, b in zip(folded.table_weights(), twin.table_weights()))
    scale = max(float(a.abs().max()) for a in twin.table_weights())
    result = {
        "fold_tbe_slots": len(folded.tbe_feature_table_map()), "unfolded_tbe_slots": len(twin.tbe_feature_table_map()),
        "fold_forward_equal_unfolded": first_equal, "fold_forward_max_abs_diff_after_step": diffs[-1],
        "fold_train_tables_max_abs_diff": table_diff, "fold_train_tables_allclose": table_diff <= 1e-5 * scale + 1e-6,
    }
    del folded, twin
    return result


def fused_checks(coll, kjt: KeyedJaggedTensor, names: list[str], unfused_forward) -> dict[str, Any]:
    """On the GPU: the fused kernels' rows equal the torch path's (every feature, int64), and the
    default forward (fused + drops by weight) equals the unfused one bit for bit."""
    per_feature = torch.split(kjt.values(), kjt.length_per_key())
    with fused_ids.mode("off"):
        reference = coll.transform_ids(per_feature)
    fused = coll.transform_ids(per_feature)
    rows_equal = all(a.dtype == b.dtype == torch.int64 and torch.equal(a, b) for x, y in zip(reference, fused) for a, b in zip(x, y))
    out, ref = coll(kjt).values(), unfused_forward()
    return {
        "fused_kernel_used": fused_ids.enabled_for(kjt.values()),
        "fused_rows_equal_torch": rows_equal,
        "forward_equal_unfused": bool(torch.equal(out, ref)),
        "forward_max_abs_diff_unfused": float((out - ref).abs().max()),
    }


def train_twin_check(features, dim: int, fitter, kjt: KeyedJaggedTensor, device: torch.device, by_weight: bool) -> dict[str, Any]:
    """Two collections built alike (same seed: same tables); two fused-Adagrad steps on the
    default path and on the unfused path (torch transforms, compaction): same outputs and tables?"""
    methods = fitter(features, dim, full_bytes(features, dim) // 10)
    twins = [CompressedEmbeddingBagCollection(features, dim, methods, device=device) for _ in range(2)]
    twins[0].drop_by_weight, twins[1].drop_by_weight = by_weight, False
    weight = torch.linspace(-1, 1, len(features) * dim, device=device)
    outputs_equal, diff = True, 0.0
    for _ in range(2):
        outs = []
        for coll, mode in zip(twins, ("auto", "off")):
            with fused_ids.mode(mode):
                out = coll(kjt).values()
            (out * weight).sum().backward()
            outs.append(out.detach())
        outputs_equal &= bool(torch.equal(outs[0], outs[1]))
    tables_equal = True
    for a, b in zip(twins[0].table_weights(), twins[1].table_weights()):
        tables_equal &= bool(torch.equal(a, b))
        diff = max(diff, float((a - b).abs().max()))
    del twins
    torch.cuda.empty_cache()
    return {"train_outputs_equal_unfused": outputs_equal, "train_tables_equal_unfused": tables_equal, "train_tables_max_abs_diff": diff}


def spread_drops_forward(coll, kjt: KeyedJaggedTensor):
    """The default forward, but each dropped id points at row (position mod the smallest table)
    instead of row 0: exact too; measures what the hot row 0 costs fbgemm's backward."""
    smallest = min(s.rows for s in coll.table_specs())

    def spread(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = rows >= 0
        spread_rows = torch.arange(rows.numel(), device=rows.device) % smallest
        return torch.where(kept, rows, spread_rows), kept.to(torch.float32)

    def forward() -> torch.Tensor:
        real = fused_ids.zero_weight_drops
        fused_ids.zero_weight_drops = spread
        try:
            return coll(kjt).values()
        finally:
            fused_ids.zero_weight_drops = real
    return forward


def bag_sweep(device: torch.device, tables: int, rows: int, dim: int, batch: int, bag_lens: list[int]) -> list[dict[str, Any]]:
    """Full's pooled forward with L uniform ids per bag: with one id per bag the kernel is bound
    by latency and output writes; longer bags show how close it gets to the copy bandwidth."""
    features = [FeatureSpec(f"f{i}", rows) for i in range(tables)]
    coll = CompressedEmbeddingBagCollection(features, dim, None, device=device)
    timed = timer(device)
    g = torch.Generator(device=device).manual_seed(1)
    out = []
    for length in bag_lens:
        values = torch.randint(0, rows, (tables * batch * length,), device=device, generator=g)
        lengths = torch.full((tables * batch,), length, dtype=torch.long, device=device)
        kjt = KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths)
        with torch.no_grad():
            f = timed(lambda: coll(kjt).values())
        moved = (tables * batch * length + tables * batch) * dim * 4  # rows read + pooled rows written
        out.append({"bag_len": length, "batch": batch, "fwd_ms": f["median_ms"], "fwd_GBps": moved / (f["median_ms"] / 1e3) / 1e9})
        del values, lengths, kjt
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_gpu_workload_args(parser, "cuda, or cpu for a smoke test of this script (no parity, no bandwidth)")
    parser.add_argument("--fused-train-mode", default="auto", choices=("auto", "on", "off"),
                        help="fused_train mode of the default training rows ('on' with --device cpu: the interpreter smoke test)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bag-lens", default="1,4,16,32", help="Full's bandwidth sweep over ids per bag ('' to skip)")
    parser.add_argument("--sweep-batch", type=int, default=16384, help="bags per table in the bandwidth sweep")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    global FUSED_TRAIN_MODE
    FUSED_TRAIN_MODE = args.fused_train_mode
    count_fused_steps()
    result = {
        "env": {**env_info(), "gpu": torch.cuda.get_device_name(0) if on_cuda else "none (cpu smoke test)"},
        "parity": parity(device) if on_cuda else {},
        "copy_GBps": copy_bandwidth(device) if on_cuda else float("nan"),
        "speed": speed(device, args.tables, args.rows, args.dim, args.batch, tuple(v for v in args.variants.split(",") if v)),
        "bag_sweep": bag_sweep(device, args.tables, args.rows, args.dim, args.sweep_batch, [int(x) for x in args.bag_lens.split(",") if x]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_collection.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Collection on {result['env']['gpu']}: {args.tables} tables x {args.rows:,} rows, D={args.dim}, B={args.batch:,}", "",
             f"`{result['env']['command']}` at commit {result['env']['git_commit'][:10]}; medians of CUDA-event timings.", "",
             f"GPU: {result['env']['gpu']}; copy bandwidth {result['copy_GBps']:.0f} GB/s", "",
             f"parity (max abs err CPU vs CUDA): {json.dumps(result['parity'])}", "",
             "*vs Full*: against Full's row of this table (timed once, earlier in the run); *paired*: the median ratio over "
             "15 repeats in which this path and Full's ran back to back (the ratio to trust; default paths only).", "",
             "| variant | impl | fwd ms | fwd vs Full | fwd vs Full, paired | fwd+bwd(+step) ms | fwd+bwd vs Full | fwd+bwd vs Full, paired | fwd G rows/s | fwd GB/s | % of copy BW | batched == per-feature |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    full = next((r for r in result["speed"] if r["variant"] == "full" and r["impl"] == "tablezip TBE"), None)
    for r in result["speed"]:
        vs = f"{r['fwd_ms'] / full['fwd_ms']:.2f}x" if full else "-"
        trained = r["train_ms"] is not None
        vs_train = f"{r['train_ms'] / full['train_ms']:.2f}x" if full and trained else "-"
        train_ms = f"{r['train_ms']:.3f}" if trained else "(= default)"
        pf = f"{r['fwd_vs_full_paired']:.2f}x" if r.get("fwd_vs_full_paired") is not None else "-"
        pt = f"{r['train_vs_full_paired']:.2f}x" if r.get("train_vs_full_paired") is not None else "-"
        lines.append(f"| {r['variant']} | {r['impl']} | {r['fwd_ms']:.3f} | {vs} | {pf} | {train_ms} | {vs_train} | {pt} | {r['fwd_rows_per_s'] / 1e9:.2f} | {r['fwd_GBps']:.0f} | "
                     f"{100 * r['fwd_GBps'] / result['copy_GBps']:.0f}% | {r['batched_equals_per_feature']} |")
    checked = {}
    for r in result["speed"]:
        if "fused_rows_equal_torch" in r:
            checked[r["variant"]] = {k: r[k] for k in ("drop_by_weight", "fused_kernel_used", "fused_rows_equal_torch", "forward_equal_unfused",
                                                      "forward_max_abs_diff_unfused", "train_outputs_equal_unfused", "train_tables_equal_unfused",
                                                      "train_tables_max_abs_diff")}
    lines += ["", "Fused kernels and drops by weight against the unfused path, on the GPU:", "",
              "| variant | drop by weight | kernel used | rows equal | forward equal | fwd max diff | 2-step outputs equal | tables equal | tables max diff |",
              "|---|---|---|---|---|---:|---|---|---:|"]
    for variant, c in checked.items():
        lines.append(f"| {variant} | {c['drop_by_weight']} | {c['fused_kernel_used']} | {c['fused_rows_equal_torch']} | {c['forward_equal_unfused']} | "
                     f"{c['forward_max_abs_diff_unfused']:.3g} | {c['train_outputs_equal_unfused']} | {c['train_tables_equal_unfused']} | {c['train_tables_max_abs_diff']:.3g} |")
    prefixes = ("tbe_slots", "methods", "fold_", "unfolded_", "fused_lookup_used", "fused_forward", "forward_equal_torch_transforms", "fused_train")
    other = {r["variant"]: {k: v for k, v in r.items() if k.startswith(prefixes)}
             for r in result["speed"] if r["variant"] in OTHER_METHODS and r["impl"] == "tablezip TBE"}
    if other:
        lines += ["", "Other methods, default path against the path it replaced (same run, on the GPU):", ""]
        lines += [f"- {variant}: `{json.dumps(c)}`" for variant, c in other.items()]
    trains = [r for r in result["speed"] if "fused_train_used" in r and r["impl"] == "tablezip TBE"]
    if trains:
        lines += ["", f"Fused training step (mode {args.fused_train_mode!r}) against the TBE path (fbgemm's backward + fused optimizer), "
                  "one step each on twins: tables / optimizer state max |diff|; steps paired with Full:", "",
                  "| variant | fused step ran | fused train ms | vs Full, paired | TBE path train ms | vs Full, paired | speed-up | tables max diff | allclose | state max diff | projection grads max diff (allclose) | buffers MB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
        for r in trains:
            off = next((o for o in result["speed"] if o["variant"] == r["variant"] and o["impl"].startswith("tablezip TBE, fused training off")), None)
            pt = f"{r['train_vs_full_paired']:.2f}x" if r.get("train_vs_full_paired") is not None else "-"
            po = f"{off['train_vs_full_paired']:.2f}x" if off and off.get("train_vs_full_paired") is not None else "-"
            lines.append(f"| {r['variant']} | {r['train_path'] == 'fused'} | {r['train_ms']:.3f} | {pt} | {off['train_ms'] if off else float('nan'):.3f} | {po} | "
                         f"{(off['train_ms'] / r['train_ms']) if off else float('nan'):.2f}x | {r['fused_train_tables_max_abs_diff']:.3g} | {r['fused_train_tables_allclose']} | "
                         f"{r['fused_train_state_max_abs_diff']:.3g} | "
                         + (f"{r['fused_train_projection_grad_max_abs_diff']:.3g} ({r['fused_train_projection_grad_allclose']})" if r["fused_train_projection_grads"] else "-")
                         + f" | {r['fused_train_buffer_bytes'] / 2**20:.1f} |")
    lines += ["", f"Full, uniform ids, {args.sweep_batch} bags per table, L ids per bag (bytes = rows read + pooled rows written):", "",
              "| L | fwd ms | GB/s | % of copy BW |", "|---:|---:|---:|---:|"]
    for r in result["bag_sweep"]:
        lines.append(f"| {r['bag_len']} | {r['fwd_ms']:.3f} | {r['fwd_GBps']:.0f} | {100 * r['fwd_GBps'] / result['copy_GBps']:.0f}% |")
    (args.out / "gpu_collection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
