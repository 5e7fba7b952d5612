"""Exported artifacts: ``tables.safetensors`` + ``manifest.json`` with a sha256 per tensor.

No pickle anywhere: an artifact may come from another team or a model registry, so loading it
must not run code, and every tensor is checked against the manifest before it is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .features import FeatureSpec
from .registry import config_from_dict
from .tbe import TableOptimizer

if TYPE_CHECKING:
    from .collection import CompressedEmbeddingBagCollection, EmbeddingBagLookup
    from .quantized import QuantizedEmbeddingBagCollection

FORMAT = "tablezip-artifact"
FORMAT_VERSION = 1
TABLES_FILE = "tables.safetensors"
MANIFEST_FILE = "manifest.json"


class ArtifactError(ValueError):
    """An artifact that is missing, changed, truncated or does not match its manifest."""


def tablezip_version() -> str:
    try:
        return metadata.version("tablezip")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collection_tensors(collection: "CompressedEmbeddingBagCollection") -> dict[str, torch.Tensor]:
    """Every tensor an artifact stores, by its name in the file."""
    tensors = {f"table.{i}": w.detach().cpu().contiguous() for i, w in enumerate(collection.table_weights())}
    tensors.update(_feature_tensors(collection))
    return tensors


def _feature_tensors(collection: "EmbeddingBagLookup") -> dict[str, torch.Tensor]:
    return {
        f"feature.{name}.{key}": value.detach().cpu().contiguous()
        for name, layout in collection.layouts.items()
        for key, value in layout.state_dict().items()
    }


def _base_manifest(collection: "EmbeddingBagLookup", dtype: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What every artifact's manifest says, whatever the precision of its tables."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tablezip_version": tablezip_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dim": collection.dim,
        "dtype": dtype,
        "memory_bytes": collection.memory_bytes(),
        "full_bytes": collection.full_bytes(),
        "features": [
            {**f.to_dict(), "method": collection.layouts[f.name].config.to_dict(), "tables": collection.feature_tables(f.name)}
            for f in collection.features
        ],
        "tables": [{"rows": t.rows, "dim": t.dim, "shared": t.shared} for t in collection.table_specs()],
        "tensors": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sha256": tensor_sha256(t)}
            for name, t in tensors.items()
        },
    }


def export_collection(collection: "CompressedEmbeddingBagCollection", directory: str | Path) -> Path:
    """Write the fp32 (trainable) artifact."""
    tensors = collection_tensors(collection)
    manifest = _base_manifest(collection, "float32", tensors)
    manifest["seed"] = collection.seed
    manifest["optimizer"] = {
        "kind": collection.optimizer_config.kind.value,
        "lr": collection.optimizer_config.lr,
        "eps": collection.optimizer_config.eps,
        "weight_decay": collection.optimizer_config.weight_decay,
    }
    return _write_artifact(directory, tensors, manifest)


def quantized_tensors(collection: "QuantizedEmbeddingBagCollection") -> dict[str, torch.Tensor]:
    """Every tensor a quantized artifact stores: each table's rows in fbgemm's stored format
    (float16 [R, D], or uint8 [R, row bytes] with the fp16 scale and bias inline), then the
    layouts' state as in the fp32 artifact."""
    tensors = {f"table.{i}": rows for i, rows in enumerate(collection.quantized_tables())}
    tensors.update(_feature_tensors(collection))
    return tensors


def export_quantized(collection: "QuantizedEmbeddingBagCollection", directory: str | Path) -> Path:
    """Write a quantized (serving-only) artifact; ``load_inference`` reads it back."""
    tensors = quantized_tensors(collection)
    return _write_artifact(directory, tensors, _base_manifest(collection, collection.dtype, tensors))


def _write_artifact(directory: str | Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    """Write the artifact atomically: files go to a temp dir that is renamed into place, so a
    crash never leaves a directory that looks like a complete artifact."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(staging / TABLES_FILE), metadata={"format": FORMAT})
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            _replace_dir(staging, directory)
        else:
            os.replace(staging, directory)
    except BaseException:
        _remove_tree(staging)
        raise
    return directory


def _replace_dir(staging: Path, directory: Path) -> None:
    old = directory.with_name(f".{directory.name}.old")
    _remove_tree(old)
    os.replace(directory, old)
    os.replace(staging, directory)
    _remove_tree(old)


def _remove_tree(path: Path) -> None:
    if path.exists():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; not a tablezip artifact directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this tablezip reads {FORMAT_VERSION})"
        )
    return manifest


def load_verified_tensors(directory: str | Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load the tensor file and check each tensor's presence, shape, dtype and sha256."""
    path = Path(directory) / TABLES_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: tensor file is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: cannot be read, truncated or corrupt ({err})") from None
    expected = manifest["tensors"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ArtifactError(f"{path}: tensor {missing[0]!r} listed in the manifest is missing from the file")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ArtifactError(f"{path}: tensor {extra[0]!r} is in the file but not in the manifest")
    for name, meta in expected.items():
        t = tensors[name]
        if list(t.shape) != meta["shape"]:
            raise ArtifactError(f"{path}: tensor {name!r} has shape {list(t.shape)}, manifest says {meta['shape']}")
        if str(t.dtype).removeprefix("torch.") != meta["dtype"]:
            raise ArtifactError(f"{path}: tensor {name!r} has dtype {t.dtype}, manifest says {meta['dtype']}")
        if tensor_sha256(t) != meta["sha256"]:
            raise ArtifactError(f"{path}: tensor {name!r} does not match its sha256 in the manifest (changed or corrupt)")
    return tensors



def _features_and_methods(manifest: dict[str, Any]) -> tuple[list[FeatureSpec], dict[str, Any]]:
    """The manifest's features and their method configs (KeyError/ValueError when malformed)."""
    features = [FeatureSpec.from_dict(f) for f in manifest["features"]]
    return features, {f["name"]: config_from_dict(f["method"]) for f in manifest["features"]}


def _feature_state(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """One feature's layout state: the ``feature.<name>.`` tensors without their prefix."""
    prefix = f"feature.{name}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_matches_manifest(
    directory: str | Path, manifest: dict[str, Any], collection: Any, expected_names: set[str], tensors: dict[str, torch.Tensor]
) -> None:
    """The rebuilt collection must have exactly the manifest's tables and the file's tensors:
    a manifest edited to name other methods is refused, not half-loaded."""
    specs = [{"rows": t.rows, "dim": t.dim, "shared": t.shared} for t in collection.table_specs()]
    if specs != manifest["tables"]:
        raise ArtifactError(f"{directory}: manifest tables {manifest['tables']} do not match the methods it names {specs}")
    if expected_names != set(tensors):
        diff = sorted(expected_names ^ set(tensors))
        raise ArtifactError(f"{directory}: tensor {diff[0]!r} does not belong to the collection the manifest describes")

def load_collection(
    directory: str | Path,
    device: torch.device | str | None = None,
    optimizer: TableOptimizer | None = None,
) -> "CompressedEmbeddingBagCollection":
    from .collection import CompressedEmbeddingBagCollection

    manifest = read_manifest(directory)
    dtype = manifest.get("dtype", "float32")
    if dtype != "float32":
        raise ArtifactError(
            f"{directory}: holds {dtype!r} tables, which serve but do not train; load it with load_inference"
        )
    tensors = load_verified_tensors(directory, manifest)
    try:
        features, methods = _features_and_methods(manifest)
        opt = optimizer or TableOptimizer(**manifest["optimizer"])
        collection = CompressedEmbeddingBagCollection(
            features, manifest["dim"], methods, optimizer=opt, device=device, seed=manifest["seed"]
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{directory}: manifest does not describe a valid collection ({err})") from None
    _check_matches_manifest(directory, manifest, collection, set(collection_tensors(collection)), tensors)
    with torch.no_grad():
        for i, weight in enumerate(collection.table_weights()):
            weight.copy_(tensors[f"table.{i}"].to(weight.device))
        for name, layout in collection.layouts.items():
            layout.load_state_dict(_feature_state(tensors, name))
    return collection


def load_quantized(directory: str | Path, device: torch.device | str | None = None) -> "QuantizedEmbeddingBagCollection":
    """Rebuild a ``QuantizedEmbeddingBagCollection`` from a quantized artifact, every tensor
    checked against its sha256 first."""
    from .quantized import QuantDtype, QuantizedEmbeddingBagCollection

    manifest = read_manifest(directory)
    try:
        dtype = QuantDtype.parse(manifest.get("dtype"))
    except ValueError as err:
        raise ArtifactError(f"{directory}: not a quantized artifact ({err})") from None
    tensors = load_verified_tensors(directory, manifest)
    try:
        features, methods = _features_and_methods(manifest)
        tables = [tensors[f"table.{i}"] for i in range(len(manifest["tables"]))]
        state = {f.name: _feature_state(tensors, f.name) for f in features}
        collection = QuantizedEmbeddingBagCollection(features, manifest["dim"], methods, tables, dtype, state, device=device)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{directory}: manifest does not describe a valid {dtype.value} collection ({err})") from None
    _check_matches_manifest(directory, manifest, collection, set(quantized_tensors(collection)), tensors)
    return collection


def load_inference(directory: str | Path, device: torch.device | str | None = None) -> "EmbeddingBagLookup":
    """The one loader for serving and evaluation: an eval-mode module with
    ``forward(kjt) -> KeyedTensor``, ``lookup(name, ids) -> [N, D]`` fp32, ``feature_names``,
    ``dim``, ``features``, ``methods``, ``dtype``, ``memory_bytes()`` and ``full_bytes()``,
    whatever the artifact holds: the manifest's ``dtype`` picks an fp32
    ``CompressedEmbeddingBagCollection`` ("float32") or a ``QuantizedEmbeddingBagCollection``
    ("float16", "int8", "int4")."""
    from .quantized import QuantDtype

    manifest = read_manifest(directory)
    dtype = manifest.get("dtype", "float32")
    if dtype == "float32":
        return load_collection(directory, device=device).eval()
    if dtype in {d.value for d in QuantDtype}:
        return load_quantized(directory, device=device)
    raise ArtifactError(
        f"{directory}: dtype {dtype!r} is not supported by this tablezip "
        f"(float32, {', '.join(d.value for d in QuantDtype)})"
    )
