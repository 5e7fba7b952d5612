"""Compositional embeddings from complementary partitions (Shi et al., KDD 2020,
"Compositional Embeddings Using Complementary Partitions for Memory-Efficient Recommendation
Systems", arXiv:1909.02107).

Hashing gives colliding ids the very same vector. Instead, cut the id set by ``k`` partitions
that are *complementary*: no two distinct ids fall in the same block of every partition. Each
partition gets a table with one row per block, and an id's vector combines the rows of its
``k`` blocks. Distinct ids then read distinct row tuples, so they get distinct vectors, while
memory is the *sum* of the partition sizes instead of their product.

Quotient-remainder (``QR``): with ``c`` = ``collisions``, the quotient partition ``id // c``
(``ceil(N / c)`` rows) and the remainder partition ``id mod c`` (``c`` rows). ``c`` is the
number of ids sharing one quotient row, the parameterisation of the paper's experiments, so
the memory is ``ceil(N / c) + c`` rows: about ``c`` times less than Full for small ``c``, down
to the minimum ``~2 sqrt(N)`` at ``c ~ sqrt(N)``; a larger ``c`` only adds rows again.

``KWay`` generalises this to ``k`` partitions through a mixed-radix number system (the paper's
generalised QR): with sizes ``(m_1, ..., m_k)``, digit ``j`` of an id is
``(id // (m_{j+1} * ... * m_k)) mod m_j``, most significant first, so ``QR(c)`` is
``KWay((ceil(N / c), c))`` and table 0 is always the quotient. Digits are unique for ids in
``[0, prod(m))``, which is why the product must cover every id.

``op`` combines the ``k`` rows: ``mult`` (elementwise product), ``add`` (sum) or ``concat``
(``k`` tables of width ``D / k`` side by side). Sum and concatenation are linear, so TBE pools
each table's rows per bag; a product of sums is not a sum of products, so ``mult`` reads one row
per id and the collection pools the products.

Here ``N = num_embeddings + 1``: like Full, every id outside ``[0, num_embeddings)`` is first
mapped to one OOV id ``num_embeddings``, which is then decomposed like any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence, cast

import numpy as np
import torch

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import CombineForm, FeatureLayout, IdBatch, MethodConfig, TableSpec, register

from . import fused_ids
from .search import largest_fitting
from .full import Full, batch_oov_rows, oov_rows

OPS = ("mult", "add", "concat")
MAX_PARTITIONS = 16
TBE_ALIGN = 4  # fbgemm TBE rows must be a multiple of 4 floats wide
FLOAT_BYTES = 4


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_op(cls: str, op: object) -> None:
    if op not in OPS:
        raise ValueError(f"{cls}.op must be one of {OPS}, got {op!r}")


@dataclass(frozen=True)
class QR(MethodConfig):
    """Quotient-remainder trick: ``collisions`` ids share each quotient row and are told apart by
    the ``collisions``-row remainder table. Tables, in ``tables()`` order: quotient
    (``ceil((num_embeddings + 1) / collisions)`` rows), remainder (``collisions`` rows).

    Ids outside ``[0, num_embeddings)`` all map to the OOV id ``num_embeddings`` first (as in
    Full), so they share one vector and every table row stays in range.
    """

    kind = "qr"
    collisions: int = 4
    op: str = "mult"

    def __post_init__(self) -> None:
        if _is_int(self.collisions):
            object.__setattr__(self, "collisions", int(self.collisions))  # numpy ints are not JSON
        if not _is_int(self.collisions) or self.collisions < 1:
            raise ValueError(f"QR.collisions must be an integer >= 1, got {self.collisions!r}")
        _check_op("QR", self.op)

    def partitions_for(self, feature: FeatureSpec) -> tuple[int, ...]:
        return qr_partitions(feature.num_embeddings + 1, self.collisions)


@dataclass(frozen=True)
class KWay(MethodConfig):
    """``k`` complementary partitions of sizes ``partitions`` (mixed radix, most significant
    first); table ``j`` has ``partitions[j]`` rows. Their product must be at least
    ``num_embeddings + 1`` (checked when the layout is built), so every id in range, and the OOV
    id, gets its own row tuple.

    Ids outside ``[0, num_embeddings)`` all map to the OOV id ``num_embeddings`` first (as in
    Full), so they share one vector and every table row stays in range.
    """

    kind = "kway"
    partitions: tuple[int, ...]
    op: str = "mult"

    def __post_init__(self) -> None:
        sizes = self.partitions
        if isinstance(sizes, (tuple, list, np.ndarray)):  # hashable, and plain ints for JSON
            sizes = tuple(int(s) if _is_int(s) else s for s in sizes)
            object.__setattr__(self, "partitions", sizes)
        if (
            not isinstance(sizes, tuple)
            or not 2 <= len(sizes) <= MAX_PARTITIONS
            or not all(_is_int(s) and s >= 1 for s in sizes)
        ):
            raise ValueError(
                f"KWay.partitions must be a tuple of 2 to {MAX_PARTITIONS} integers >= 1, got {sizes!r}"
            )
        if math.prod(sizes) >= 2**63:
            raise ValueError(f"KWay.partitions must have a product < 2**63, got {math.prod(sizes)}")
        _check_op("KWay", self.op)

    def partitions_for(self, feature: FeatureSpec) -> tuple[int, ...]:
        ids = feature.num_embeddings + 1
        if math.prod(self.partitions) < ids:
            raise ValueError(
                f"KWay.partitions={self.partitions} of feature {feature.name!r} must have a product "
                f">= num_embeddings + 1 = {ids} (every id and the OOV id need their own row tuple), "
                f"got {math.prod(self.partitions)}"
            )
        return self.partitions


# -- index maths ---------------------------------------------------------------------------
def qr_partitions(num_ids: int, collisions: int) -> tuple[int, int]:
    """(quotient rows, remainder rows) covering ids ``[0, num_ids)``."""
    return -(-num_ids // collisions), collisions


def qr_split(ids: torch.Tensor, collisions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(quotient, remainder) of non-negative ids: ``id == quotient * collisions + remainder``."""
    return ids // collisions, ids % collisions


def mixed_radix_digits(ids: torch.Tensor, partitions: Sequence[int]) -> list[torch.Tensor]:
    """Digits of ids in ``[0, prod(partitions))``, most significant first; digit ``j`` lies in
    ``[0, partitions[j])``. A loop over the ``k`` digits, each a whole-tensor op."""
    digits: list[torch.Tensor] = []
    stride = 1
    for size in reversed(partitions[1:]):
        shifted = ids if stride == 1 else ids // stride
        digits.append(shifted % size)
        stride *= size
    digits.append(ids // stride)  # < partitions[0] for ids below the product
    return digits[::-1]


def compositional_rows(ids: torch.Tensor, num_embeddings: int, partitions: Sequence[int]) -> list[torch.Tensor]:
    """Row of every int64 id in each partition's table (out-of-space ids -> the OOV id first)."""
    return mixed_radix_digits(oov_rows(ids, num_embeddings), partitions)


def table_dim(dim: int, parts: int, op: str, cls: str = "QR") -> int:
    """Row width of each table: ``dim``, or ``dim / parts`` for concat (a TBE-legal width)."""
    if op != "concat":
        return dim
    if dim % parts or (dim // parts) % TBE_ALIGN:
        raise ValueError(
            f"{cls}.op='concat' splits dim={dim} into {parts} tables of dim / {parts}, which must be a "
            f"whole multiple of {TBE_ALIGN} (fbgemm's row width): use a dim divisible by "
            f"{parts * TBE_ALIGN}, fewer partitions, or op='mult'/'add'"
        )
    return dim // parts


def init_bound(op: str, parts: int, num_ids: int) -> float:
    """Half-width ``a`` of the U(-a, a) init of every table, chosen so that each coordinate of a
    combined vector has the variance of Full's U(-sqrt(1/N), sqrt(1/N)) init, ``1 / (3N)``.

    concat: one table per coordinate, ``a = sqrt(1/N)``. add: ``parts`` independent terms,
    ``a = sqrt(1/(parts N))``. mult: a product of ``parts`` independent zero-mean factors has the
    product of their variances, so ``(a^2/3)^parts = 1/(3N)``. The default per-table init would
    make a product of ``parts`` rows vanish for large tables and blow up for tiny ones.
    """
    if op == "concat":
        return math.sqrt(1.0 / num_ids)
    if op == "add":
        return math.sqrt(1.0 / (parts * num_ids))
    return math.sqrt(3.0) * (3.0 * num_ids) ** (-1.0 / (2 * parts))


class CompositionalLayout(FeatureLayout):
    # True: ``transform_batch`` chains the digits through their quotients (one division per digit
    # boundary); False: a division and a remainder per digit (the "before" of that change in
    # benchmarks/NOTES.md). The same integers either way.
    chained_digits: bool = True

    def __init__(self, feature: FeatureSpec, dim: int, config: QR | KWay) -> None:
        super().__init__(feature, dim, config)
        self.partitions = config.partitions_for(feature)
        self.op = config.op
        self.table_dim = table_dim(dim, len(self.partitions), config.op, type(config).__name__)

    @property
    def pooled_in_tbe(self) -> bool:  # type: ignore[override]
        return self.op != "mult"  # a product of pooled rows is not the pooled product

    def tables(self) -> list[TableSpec]:
        return [TableSpec(rows, self.table_dim) for rows in self.partitions]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return compositional_rows(ids, self.feature.num_embeddings, self.partitions)

    @property
    def batch_group(self) -> Hashable:
        return (type(self), len(self.partitions))

    @classmethod
    def transform_batch(cls, layouts: Sequence[FeatureLayout], batch: IdBatch) -> list[list[torch.Tensor]]:
        """``mixed_radix_digits`` of every id of every feature with ``k`` partitions at once,
        each id with its own feature's radices (plain ints where all features agree)."""
        comp = cast(Sequence[CompositionalLayout], layouts)
        # On a CPU: the OOV map and every digit in one C pass (fused_ids.native_digits), the same
        # integers as the torch ops below (k - 1 divisions, multiplies and subtractions, a cat).
        native = fused_ids.native_digits(batch, [l.feature.num_embeddings for l in comp], [l.partitions for l in comp])
        if native is not None:
            return batch.split_slots(list(native.unbind(0)))
        ids = batch_oov_rows(layouts, batch)
        digits: list[torch.Tensor] = []
        if cls.chained_digits:
            # Each quotient feeds the next digit: ``(id // a) // b == id // (a * b)`` for ids >= 0
            # (OOV-mapped ids are), and ``q - (q // m) * m == q % m``, so the digits are the very
            # integers of the loop below with k - 1 int64 divisions instead of 2k - 1 (a division
            # costs ~3x a multiply and a subtraction together: ~0.15 ms of a QR forward at 53k ids).
            quotient = ids
            for j in range(len(comp[0].partitions) - 1, 0, -1):
                size = batch.constant([l.partitions[j] for l in comp])
                higher = quotient // size
                digits.append(quotient - higher * size)
                quotient = higher
            digits.append(quotient)
            return batch.split_slots(digits[::-1])
        strides = [1] * len(comp)
        for j in range(len(comp[0].partitions) - 1, 0, -1):
            stride = batch.constant(strides)
            shifted = ids if isinstance(stride, int) and stride == 1 else ids // stride
            digits.append(shifted % batch.constant([l.partitions[j] for l in comp]))
            strides = [s * l.partitions[j] for s, l in zip(strides, comp)]
        digits.append(ids // batch.constant(strides))
        return batch.split_slots(digits[::-1])

    def combine_form(self) -> CombineForm:
        """``combine`` is the op over the slots, so the collection may compute it in place."""
        return CombineForm(self.op)

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.op == "concat":
            return torch.cat(parts, dim=1)
        out = parts[0]
        for part in parts[1:]:
            out = out * part if self.op == "mult" else out + part
        return out

    def init_tables(self, tables: list[torch.Tensor], generator: torch.Generator) -> None:
        bound = init_bound(self.op, len(self.partitions), self.feature.num_embeddings + 1)
        with torch.no_grad():
            for table in tables:
                values = torch.empty(table.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
                table.copy_(values.to(table.device))


register(QR, CompositionalLayout)
register(KWay, CompositionalLayout)


# -- budget fitting ------------------------------------------------------------------------
def nested_partitions(num_ids: int, parts: int, collisions: int) -> tuple[int, ...]:
    """``parts - 1`` radix-``collisions`` digits under one quotient digit: QR applied
    recursively. With ``parts = 2`` this is ``QR(collisions)``."""
    return (-(-num_ids // collisions ** (parts - 1)),) + (collisions,) * (parts - 1)


def _candidates(num_ids: int, dim: int, op: str, max_partitions: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Every structure the fitters consider for one feature, in order of preference (fewer
    partitions, then fewer collisions: both mean fewer ids sharing rows), with their bytes.

    ``collisions`` stops where the quotient would drop below it: past that point rows only grow.
    """
    costs: list[int] = []
    shapes: list[tuple[int, ...]] = []
    for parts in range(2, max_partitions + 1):
        if op == "concat" and (dim % parts or (dim // parts) % TBE_ALIGN):
            continue
        width = dim // parts if op == "concat" else dim
        collisions = 2
        while collisions ** (parts - 1) < num_ids:
            shape = nested_partitions(num_ids, parts, collisions)
            if shape[0] < 2:  # a one-row quotient: the structure has one partition too many
                break
            costs.append(sum(shape) * width * FLOAT_BYTES)
            shapes.append(shape)
            if shape[0] <= collisions:
                break
            collisions += 1
    return np.asarray(costs, dtype=np.int64), shapes


def _choose(full: int, costs: np.ndarray, cap: int) -> int:
    """Index of the preferred structure within ``cap`` bytes; -1 for Full. When nothing fits,
    the cheapest (Full on a tie)."""
    if full <= cap:
        return -1
    fits = np.flatnonzero(costs <= cap)
    if fits.size:
        return int(fits[0])
    if costs.size == 0 or full <= costs.min():
        return -1
    return int(np.argmin(costs))


def fit_partitions(
    features: Sequence[FeatureSpec], dim: int, budget_bytes: int, op: str = "mult", max_partitions: int = 2
) -> dict[str, tuple[int, ...] | None]:
    """Partition sizes per feature (None = stays Full) whose bytes total at most ``budget_bytes``.

    Water-filling, as for hashing: one per-feature byte cap, the largest whose total fits; each
    feature takes its most preferred structure under the cap, and features whose Full table fits
    under it stay Full.
    """
    _check_fit_args(op, max_partitions)
    full, options, total = _water_filling(features, dim, op, max_partitions)
    smallest = total(0)
    if budget_bytes < smallest:
        raise ValueError(
            f"budget_bytes={budget_bytes} is below the smallest compositional structure of these "
            f"features with op={op!r} and at most {max_partitions} partitions ({smallest} bytes)"
        )
    lo = largest_fitting(0, max(full.values()), lambda cap: total(cap) <= budget_bytes)
    chosen = {}
    for name, (costs, shapes) in options.items():
        i = _choose(full[name], costs, lo)
        chosen[name] = None if i < 0 else shapes[i]
    return chosen


def _check_fit_args(op: object, max_partitions: object) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if not _is_int(max_partitions) or not 2 <= max_partitions <= MAX_PARTITIONS:  # type: ignore[operator]
        raise ValueError(f"max_partitions must be an integer in [2, {MAX_PARTITIONS}], got {max_partitions!r}")


def _water_filling(
    features: Sequence[FeatureSpec], dim: int, op: str, max_partitions: int
) -> tuple[dict[str, int], dict[str, tuple[np.ndarray, list[tuple[int, ...]]]], Callable[[int], int]]:
    """Full bytes and candidate structures per feature, and the collection's bytes under a cap."""
    full = {f.name: (f.num_embeddings + 1) * dim * FLOAT_BYTES for f in features}
    options = {f.name: _candidates(f.num_embeddings + 1, dim, op, max_partitions) for f in features}

    def total(cap: int) -> int:
        out = 0
        for name, (costs, _) in options.items():
            i = _choose(full[name], costs, cap)
            out += full[name] if i < 0 else int(costs[i])
        return out

    return full, options, total


def smallest_bytes(features: Sequence[FeatureSpec], dim: int, op: str, max_partitions: int) -> int:
    """Fewest bytes any fit with ``op`` and at most ``max_partitions`` partitions can reach: every
    feature at its cheapest structure, or Full where that is smaller."""
    return _water_filling(features, dim, op, max_partitions)[2](0)


def concat_partitions(dim: int) -> int:
    """Most partitions ``op='concat'`` can split ``dim`` into (each table ``dim / k`` wide, a
    multiple of ``TBE_ALIGN``); 0 when not even two fit."""
    legal = [k for k in range(2, MAX_PARTITIONS + 1) if dim % k == 0 and (dim // k) % TBE_ALIGN == 0]
    return max(legal, default=0)


def fit_with_fallbacks(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    ladder: Sequence[tuple[str, int]],
    method: str,
    hint: str = "",
) -> tuple[str, dict[str, tuple[int, ...] | None]]:
    """``(op, fit_partitions(...))`` for the first ``(op, max_partitions)`` step of ``ladder``
    whose structures fit ``budget_bytes``. ValueError naming ``budget_bytes`` and the least any
    step can reach (bytes, and as a ratio of Full) when none fits."""
    for op, parts in ladder:
        _check_fit_args(op, parts)
    for op, parts in ladder:
        if smallest_bytes(features, dim, op, parts) <= budget_bytes:
            return op, fit_partitions(features, dim, budget_bytes, op, parts)
    least = min(smallest_bytes(features, dim, op, parts) for op, parts in ladder)
    full = sum((f.num_embeddings + 1) * dim * FLOAT_BYTES for f in features)
    tried = ", ".join(f"op={op!r} with <= {parts} partitions" for op, parts in ladder)
    raise ValueError(
        f"budget_bytes={budget_bytes} is below the smallest {method} structure of these features "
        f"({least} bytes, {full / least:.0f}x smaller than Full; tried {tried}){hint}"
    )


def qr_methods_for_budget(
    features: Sequence[FeatureSpec], dim: int, budget_bytes: int, op: str = "mult", fallback: bool = False
) -> Mapping[str, Full | QR]:
    """Per feature the fewest ``collisions`` that keep the total within ``budget_bytes`` (one
    water-filled byte cap); small features stay Full.

    Two partitions bottom out at ``~2 sqrt(N)`` rows per feature; use
    ``kway_methods_for_budget`` for budgets below that.

    ``fallback``: when no ``op`` structure fits, try ``op='concat'`` (the quotient and remainder
    tables each ``D / 2`` wide, so the same rows cost half the bytes) before raising. QR stays
    QR: two complementary partitions, so distinct ids keep distinct vectors. Below the concat
    minimum the ValueError names it; that is where ``kway_methods_for_budget`` is needed.
    Off by default; budgets that fit with ``op`` give the same configs either way.
    """
    ladder = [(op, 2)]
    if fallback and op != "concat" and concat_partitions(dim) >= 2:
        ladder.append(("concat", 2))
    hint = "; below that use kway (k-way partitions, kway_methods_for_budget)"
    chosen, fitted = fit_with_fallbacks(features, dim, budget_bytes, ladder, "QR", hint)
    return {name: Full() if p is None else QR(collisions=p[1], op=chosen) for name, p in fitted.items()}


def kway_methods_for_budget(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    op: str = "mult",
    max_partitions: int = 4,
    fallback: bool = False,
) -> Mapping[str, Full | KWay]:
    """Like ``qr_methods_for_budget``, but a feature whose two-way minimum exceeds the cap gets
    more partitions (nested QR, ``~k N^(1/k)`` rows), down to ``max_partitions``: the fewest
    partitions that fit are preferred, since each extra one makes more ids share rows.

    ``fallback``: when nothing fits, first allow up to ``MAX_PARTITIONS`` partitions: ``k N^(1/k)``
    rows are least near ``k = ln N`` (about ``e ln N`` rows, e.g. 29 for N = 37884), and the
    water-filling still gives each feature the fewest partitions under its cap. With ``D``-wide
    tables (``mult``/``add``) that floor is about ``e ln N`` full rows per feature, so
    ``op='concat'`` with as many partitions as ``D`` allows (tables ``D / k`` wide) is the last
    resort: the same digits, ``k`` times fewer bytes per row, but each slice of the vector then
    comes from one partition alone, so ids sharing a digit share that slice exactly, which is
    why it is not tried first. Every step keeps complementary partitions (their product covers
    every id), so distinct ids keep distinct row tuples and vectors. Off by default; budgets
    that fit without it give the same configs.
    """
    ladder = [(op, max_partitions)]
    if fallback:
        if max_partitions < MAX_PARTITIONS:
            ladder.append((op, MAX_PARTITIONS))
        if op != "concat" and concat_partitions(dim) >= 2:
            ladder.append(("concat", MAX_PARTITIONS))
    chosen, fitted = fit_with_fallbacks(features, dim, budget_bytes, ladder, "k-way")
    return {name: Full() if p is None else KWay(partitions=p, op=chosen) for name, p in fitted.items()}
