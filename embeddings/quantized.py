"""Quantized inference tables: fp16, int8 or int4 rows served by fbgemm's inference TBE.

Why row-wise: an embedding row is read whole and alone, so one scale and bias per row adapt
the grid to that row's own range (rows of one table differ by orders of magnitude: hot rows
train far from their init, cold rows barely move), and dequantization costs one multiply-add
per element inside the lookup kernel. fbgemm stores each int8/int4 row as
``[fp16 scale | fp16 bias | packed codes]`` (4 bytes of qparams per row), which is exactly what
artifacts hold, so loading is a copy and ``memory_bytes()`` is the real row storage.

Quantization is fbgemm's own (``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``, what torchrec
uses): bias = fp16(row min), scale = fp16((max - bias) / L) with L = 2**bits - 1 levels, and each
element rounds to the nearest point of the grid ``bias + k * scale, k = 0..L`` (clamped). Hence
the error bound of ``quantization_error_bound``: at most scale / 2 inside the grid's span, and
outside it the distance to the span, which only the fp16 rounding of bias and scale opens
(<= 2**-11 |min| below, <= L * 2**-11 * scale above: under scale / 2 for int8 and int4). The CPU
kernels dequantize in fp32; fbgemm's CUDA kernels in fp16, which adds half an fp16 ulp.

Pruned remaps stay in the method layouts (``transform``), not in fbgemm's
``index_remappings``: fbgemm remaps per TBE slot with no notion of tablezip's OOV contract (ids
outside [0, n) read the OOV entry; fbgemm's array lookup does no bounds check), needs int32 ids
for an int32 remap, and measured no faster than the layout's one gather (see compress/pruned.py).
Keeping the transform also keeps one code path for every method in training and serving.
"""
from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn

from .collection import EmbeddingBagLookup
from .features import FeatureSpec
from .registry import MethodConfig, TableSpec, build_layout

if TYPE_CHECKING:
    from .collection import CompressedEmbeddingBagCollection

QPARAM_BYTES = 4  # fp16 scale + fp16 bias, stored inline at the start of every int8/int4 row
FP16_MAX = 65504.0
MAX_CUDA_SCALE = FP16_MAX / 512  # CUDA's fp16 dequantization multiplies the scale by 2**9


class QuantDtype(str, enum.Enum):
    """A serving precision of the physical tables. The value is the manifest's ``dtype``."""

    FLOAT16 = "float16"
    INT8 = "int8"
    INT4 = "int4"

    @classmethod
    def parse(cls, value: "str | QuantDtype") -> "QuantDtype":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"dtype must be one of {[d.value for d in cls]} (or 'float32' for the unquantized "
                f"artifact), got {value!r}"
            ) from None

    @property
    def bits(self) -> int:
        return {QuantDtype.FLOAT16: 16, QuantDtype.INT8: 8, QuantDtype.INT4: 4}[self]

    @property
    def levels(self) -> int:
        """L = 2**bits - 1: the number of scale steps between a row's min and max."""
        return (1 << self.bits) - 1

    @property
    def is_integer(self) -> bool:
        return self is not QuantDtype.FLOAT16

    @property
    def sparse_type(self) -> SparseType:
        return {QuantDtype.FLOAT16: SparseType.FP16, QuantDtype.INT8: SparseType.INT8, QuantDtype.INT4: SparseType.INT4}[self]

    @property
    def dim_multiple(self) -> int:
        """Row widths this precision can store, measured on fbgemm-gpu 1.8.

        fp16: any width. int8/int4: the codes must fill whole bytes (int4: an even width, the
        inference TBE's own assert) and fbgemm's row-wise quantizer needs a whole number of
        2-byte words of codes so the fp16 qparams it appends stay aligned ("ncols needs to be
        multiple of 2 Bytes"): int8 widths are even, int4 widths multiples of 4. The training
        TBE already requires multiples of 4, so tables that trained always fit.
        """
        return {QuantDtype.FLOAT16: 1, QuantDtype.INT8: 2, QuantDtype.INT4: 4}[self]

    def row_bytes(self, dim: int) -> int:
        """Stored bytes of one row of ``dim`` elements (qparams included, no device padding)."""
        if self is QuantDtype.FLOAT16:
            return 2 * dim
        return dim * self.bits // 8 + QPARAM_BYTES


def check_table_dim(dim: int, dtype: QuantDtype, where: str) -> None:
    """ValueError naming the table (``where``) when ``dtype`` cannot store rows of width ``dim``."""
    if dim < 1 or dim % dtype.dim_multiple:
        allowed = "any width" if dtype.dim_multiple == 1 else f"a multiple of {dtype.dim_multiple}"
        raise ValueError(
            f"{where} has rows of dim {dim}, which {dtype.value} cannot store: fbgemm's {dtype.value} rows need "
            f"{allowed} (int8: even widths, int4: multiples of 4, float16: any); keep this feature's "
            f"tables in a wider precision or choose method parameters with aligned widths"
        )


# -- row formats ---------------------------------------------------------------------------
def quantize_rows(weights: torch.Tensor, dtype: QuantDtype | str, where: str = "table") -> torch.Tensor:
    """fp32 rows [R, D] -> stored rows: float16 [R, D], or uint8 [R, row_bytes] in fbgemm's
    inference layout ``[scale fp16 | bias fp16 | codes]`` (int4: two codes a byte, low nibble
    first). Runs on CPU (an offline step). Values beyond fp16's range raise (scale and bias are
    fp16 too), as do int rows too wide for the CUDA kernels (scale > 127.9: a row range over
    32,600 in int8, over 1,900 in int4), so every artifact serves on CPU and CUDA alike."""
    dtype = QuantDtype.parse(dtype)
    rows = weights.detach().to("cpu", torch.float32).contiguous()
    if rows.dim() != 2:
        raise ValueError(f"{where}: expected rows [R, D], got shape {list(rows.shape)}")
    check_table_dim(rows.shape[1], dtype, where)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"{where} holds non-finite values; refusing to quantize")
    peak = float(rows.abs().max()) if rows.numel() else 0.0
    if peak > FP16_MAX:
        raise ValueError(f"{where} holds |value| {peak:.4g} > {FP16_MAX:g}, beyond fp16 (the {dtype.value} format's scale/bias)")
    if dtype is QuantDtype.FLOAT16:
        return rows.to(torch.float16)
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, dtype.bits)  # [codes | scale | bias]
    stored = torch.cat([fused[:, -QPARAM_BYTES:], fused[:, :-QPARAM_BYTES]], dim=1).contiguous()
    scale, _ = row_qparams(stored)
    if rows.shape[0] and float(scale.max()) > MAX_CUDA_SCALE:
        # fbgemm's CUDA kernels dequantize in fp16 with the scale times 2**9: beyond this they
        # produce inf. The CPU kernels would cope, but an artifact must serve on either.
        row = int(scale.argmax())
        raise ValueError(
            f"{where}: row {row} spans {float(rows[row].max() - rows[row].min()):.4g}, so its {dtype.value} scale "
            f"{float(scale[row]):.4g} exceeds {MAX_CUDA_SCALE:.4g}, which fbgemm's CUDA kernels cannot dequantize "
            f"(fp16 overflow); use {'int8 or ' if dtype is QuantDtype.INT4 else ''}float16 for this table"
        )
    return stored


def row_qparams(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) per stored int8/int4 row, as fp32 [R]."""
    scale = rows[:, 0:2].contiguous().view(torch.float16).float().reshape(-1)
    bias = rows[:, 2:4].contiguous().view(torch.float16).float().reshape(-1)
    return scale, bias


def row_codes(rows: torch.Tensor, dtype: QuantDtype | str) -> torch.Tensor:
    """Integer codes [R, D] (int64) of stored int8/int4 rows."""
    dtype = QuantDtype.parse(dtype)
    packed = rows[:, QPARAM_BYTES:].to(torch.int64)
    if dtype is QuantDtype.INT8:
        return packed
    return torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(rows.shape[0], -1)


def dequantize_rows(rows: torch.Tensor, dtype: QuantDtype | str) -> torch.Tensor:
    """Stored rows -> fp32 [R, D] in plain torch: scale * code + bias. Independent of fbgemm's
    kernels on purpose, so tests can hold the served lookups against it."""
    dtype = QuantDtype.parse(dtype)
    if dtype is QuantDtype.FLOAT16:
        return rows.float()
    scale, bias = row_qparams(rows)
    return row_codes(rows, dtype).float() * scale.unsqueeze(1) + bias.unsqueeze(1)


def _fp16_rounding(x: torch.Tensor) -> torch.Tensor:
    """Half an fp16 ulp of |x|: 2**-11 |x|, and 2**-25 for subnormals (|x| < 2**-14)."""
    return torch.clamp(x.abs() * 2.0**-11, min=2.0**-25)


def quantization_error_bound(
    weights: torch.Tensor, rows: torch.Tensor, dtype: QuantDtype | str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-element bound [R, D] on |served row - weights| for rows made by ``quantize_rows``.

    float16: round to nearest, half an ulp: 2**-11 |w| (2**-25 for subnormals, |w| < 2**-14).
    int8/int4, with the row's stored scale s and bias b and L levels: each element rounds to the
    nearest grid point ``b + k s`` (k in 0..L), so the error is at most s / 2 inside
    [b, b + L s] and the distance to that span outside it (the clamped elements: those the fp16
    rounding of b pushed below it, or of s above it). Plus fp32 arithmetic, ~2**-21 of L s and
    of |b|: fbgemm computes the code as rint((w - b) * (1 / s)) and the value as s * k + b.

    ``device`` "cuda": fbgemm's CUDA kernels dequantize int rows in fp16 (``hfma2``), so each
    served element is the dequantized value rounded to fp16: half an fp16 ulp more (measured on
    an H100: CUDA and CPU lookups differ by up to 3.7e-4 at values near 1.46; 2**-11 * 1.46 = 7.1e-4).
    """
    dtype = QuantDtype.parse(dtype)
    w = weights.detach().to("cpu", torch.float32)
    if dtype is QuantDtype.FLOAT16:
        return _fp16_rounding(w)
    scale, bias = row_qparams(rows.cpu())
    s, b = scale.unsqueeze(1), bias.unsqueeze(1)
    span = s * dtype.levels
    outside = torch.clamp(b - w, min=0) + torch.clamp(w - (b + span), min=0)
    arithmetic = (span + s) * 2.0**-21 + b.abs() * 2.0**-22
    bound = torch.maximum(s / 2, outside) + arithmetic
    if torch.device(device).type == "cuda":
        bound = bound + _fp16_rounding(w.abs() + bound)
    return bound


# -- the module ----------------------------------------------------------------------------
class QuantizedEmbeddingBagCollection(EmbeddingBagLookup):
    """Inference-only twin of ``CompressedEmbeddingBagCollection`` with fp16/int8/int4 tables.

    Same features, methods, transforms, combiners and pooling (the forward is the shared
    ``EmbeddingBagLookup`` code); only the single TBE differs: fbgemm's
    ``IntNBitTableBatchedEmbeddingBagsCodegen``, which dequantizes inside the lookup and returns
    fp32, so method combiners (QR products, MixedDim projections) run in fp32 on dequantized rows.
    Method extras (projections, remaps, thresholds) stay in their fp32/int32 form.

    ``tables[i]`` holds table i's stored rows (``quantize_rows``); ``layout_state`` each feature's
    layout ``state_dict()`` (projections, remaps, thresholds). The device is fixed at
    construction (CPU: host memory; CUDA: device memory): fbgemm's inference TBE is laid out for
    one device, so ``.to()`` does not move it; build or load another instance instead.
    Build it with ``quantize(collection, dtype)`` or ``load_inference(dir)``.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        methods: Mapping[str, MethodConfig],
        tables: Sequence[torch.Tensor],
        dtype: QuantDtype | str,
        layout_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        from tablezip.compress import Full

        self.quant_dtype = QuantDtype.parse(dtype)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        layouts = nn.ModuleDict({f.name: build_layout(f, dim, methods.get(f.name, Full())) for f in features})
        self._plan(features, dim, layouts)
        for i, spec in enumerate(self._tables):
            check_table_dim(spec.dim, self.quant_dtype, self._describe_table(i))
        if len(tables) != len(self._tables):
            raise ValueError(f"got {len(tables)} stored tables, the methods define {len(self._tables)}")
        for i, (rows, spec) in enumerate(zip(tables, self._tables)):
            expected_dtype = torch.float16 if self.quant_dtype is QuantDtype.FLOAT16 else torch.uint8
            width = spec.dim if self.quant_dtype is QuantDtype.FLOAT16 else self.quant_dtype.row_bytes(spec.dim)
            if rows.dtype != expected_dtype or tuple(rows.shape) != (spec.rows, width):
                raise ValueError(
                    f"{self._describe_table(i)}: stored rows are {rows.dtype} {list(rows.shape)}, "
                    f"{self.quant_dtype.value} needs {expected_dtype} {[spec.rows, width]}"
                )
        self.tbe = _build_inference_tbe(self._tables, self.tbe_feature_table_map(), self.quant_dtype, self.device)
        for dest, rows in zip(self._tbe_rows(), tables):
            dest.copy_(rows.contiguous().view(torch.uint8).to(self.device))
        stateful = [name for name, layout in self.layouts.items() if layout.state_dict()]
        if layout_state is None and stateful:
            # Their projections, remaps or thresholds would silently stay at a fresh init.
            raise ValueError(f"layout_state must give the trained state of feature(s) {stateful}")
        for name, layout in self.layouts.items():
            layout.load_state_dict(dict((layout_state or {}).get(name, {})))
        self.layouts.to(self.device)
        self.layouts.requires_grad_(False)
        self.eval()

    @property
    def dtype(self) -> str:
        """The tables' precision as the manifest names it: "float16", "int8" or "int4"."""
        return self.quant_dtype.value

    def _describe_table(self, index: int) -> str:
        spec = self._tables[index]
        readers = sorted({self.feature_names[f] for f, slots in enumerate(self._feature_slots) for s in slots if self._slot_table[s] == index})
        return f"table {index} ({spec.rows}x{spec.dim}, read by feature(s) {', '.join(map(repr, readers))})"

    def _tbe_rows(self) -> list[torch.Tensor]:
        """Writable views of each table's stored bytes inside the TBE, without device padding."""
        out = []
        for (rows, _), spec in zip(self.tbe.split_embedding_weights(split_scale_shifts=False), self._tables):
            width = self.quant_dtype.row_bytes(spec.dim)
            out.append(rows[:, :width])
        return out

    def quantized_tables(self) -> list[torch.Tensor]:
        """Each table's stored rows as exported (CPU copies): float16 [R, D] or uint8 [R, bytes]."""
        rows = [r.detach().cpu().contiguous() for r in self._tbe_rows()]
        if self.quant_dtype is QuantDtype.FLOAT16:
            return [r.view(torch.float16) for r in rows]
        return rows

    def dequantized_weights(self) -> list[torch.Tensor]:
        """fp32 [R, D] per table, dequantized in plain torch: what the CPU kernels read (CUDA's
        round int rows to fp16 once more, see ``quantization_error_bound``)."""
        return [dequantize_rows(r, self.quant_dtype) for r in self.quantized_tables()]

    def memory_bytes(self) -> int:
        """Bytes stored for inference: every quantized row with its inline qparams, plus what
        each method keeps outside the TBE (projections, remaps). Same rule as the fp32
        collection, so ratios stay comparable; CUDA pads rows further (``device_bytes``)."""
        rows = sum(t.rows * self.quant_dtype.row_bytes(t.dim) for t in self._tables)
        return rows + sum(l.extra_bytes() for l in self.layouts.values())

    def device_bytes(self) -> int:
        """Bytes fbgemm actually allocated for the tables (plus method extras). On CPU rows are
        packed and equal ``memory_bytes()``; on CUDA each row is padded to 16 bytes and each
        table to a 128-byte cache line, for aligned vector loads."""
        tbe = self.tbe
        allocated = sum(t.numel() * t.element_size() for t in (tbe.weights_dev, tbe.weights_host, tbe.weights_uvm))
        return allocated + sum(l.extra_bytes() for l in self.layouts.values())

    def dequantize(self) -> "CompressedEmbeddingBagCollection":
        """An fp32 collection holding the dequantized rows: the served model in trainable form
        (e.g. to fine-tune after quantization, or as a reference for the served lookups)."""
        from .collection import CompressedEmbeddingBagCollection

        out = CompressedEmbeddingBagCollection(self.features, self.dim, self.methods, device=self.device)
        with torch.no_grad():
            for dest, rows in zip(out.table_weights(), self.dequantized_weights()):
                dest.copy_(rows.to(dest.device))
            for name, layout in out.layouts.items():
                layout.load_state_dict(self.layouts[name].state_dict())
        return out

    # -- artifacts -----------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write a quantized artifact (``dtype`` in the manifest, sha256 per tensor)."""
        from .artifact import export_quantized

        return export_quantized(self, directory)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str | None = None) -> "QuantizedEmbeddingBagCollection":
        """Rebuild from a quantized artifact, verifying every checksum."""
        from .artifact import load_quantized

        return load_quantized(directory, device=device)


def _build_inference_tbe(
    tables: Sequence[TableSpec], feature_table_map: Sequence[int], dtype: QuantDtype, device: torch.device
) -> IntNBitTableBatchedEmbeddingBagsCodegen:
    """One inference TBE over all tables, returning fp32 pooled rows (SUM; MEAN is finished by
    the shared forward, as in training)."""
    on_cuda = device.type == "cuda"
    location = EmbeddingLocation.DEVICE if on_cuda else EmbeddingLocation.HOST
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [(f"t{i}", t.rows, t.dim, dtype.sparse_type, location) for i, t in enumerate(tables)],
        feature_table_map=list(feature_table_map),
        pooling_mode=PoolingMode.SUM,
        device=device,
        # Every method's transform yields in-range rows; a violation is a bug, so fail loudly.
        bounds_check_mode=BoundsCheckMode.FATAL,
        output_dtype=SparseType.FP32,
        # CPU kernels read unaligned rows: pack them so the storage is exactly the row bytes.
        # CUDA keeps fbgemm's defaults (16-byte rows, 128-byte aligned tables) for vector loads.
        cacheline_alignment=on_cuda,
    )
    tbe.initialize_weights()
    return tbe


def quantize(
    collection: "CompressedEmbeddingBagCollection", dtype: QuantDtype | str, device: torch.device | str | None = None
) -> QuantizedEmbeddingBagCollection:
    """The trained collection's tables quantized row-wise to ``dtype``, served on ``device``
    (default: the collection's). For evaluation in memory; ``collection.export(dir, dtype)``
    writes the same tables to an artifact."""
    qdtype = QuantDtype.parse(dtype)
    specs = collection.table_specs()
    tables = []
    for i, weights in enumerate(collection.table_weights()):
        readers = sorted({n for n in collection.feature_names if i in collection.feature_tables(n)})
        where = f"table {i} ({specs[i].rows}x{specs[i].dim}, read by feature(s) {', '.join(map(repr, readers))})"
        tables.append(quantize_rows(weights, qdtype, where))
    state = {name: layout.state_dict() for name, layout in collection.layouts.items()}
    return QuantizedEmbeddingBagCollection(
        collection.features, collection.dim, collection.methods, tables, qdtype, state,
        device=device if device is not None else collection.device,
    )  # fmt: skip


__all__ = [
    "QuantDtype",
    "QuantizedEmbeddingBagCollection",
    "check_table_dim",
    "dequantize_rows",
    "quantization_error_bound",
    "quantize",
    "quantize_rows",
]
