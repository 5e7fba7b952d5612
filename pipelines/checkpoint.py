"""Training checkpoints: ``state.safetensors`` + ``meta.json`` per checkpoint, never pickle.

A checkpoint holds everything a resumed run needs to continue bit for bit: the TBE tables AND
the TBE's fused-optimizer state (rowwise Adagrad's per-row sums, read table by table through
``split_optimizer_states`` so the format does not depend on where fbgemm placed them), every
other model tensor, the dense Adam moments, the torch RNG state, and in JSON the position in
the data (epoch, batches done in it), the running loss, Adam's step counts and the config the
run was started with (a resume with another config is refused, naming the field).

Layout: ``<run dir>/checkpoints/ckpt-<global step, 9 digits>/``, written to a temp dir in the
same folder and renamed into place, so a kill at any moment leaves only complete checkpoints;
the newest ``keep`` are kept.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tablezip.embeddings.artifact import file_sha256

FORMAT = "tablezip-checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
PREFIX = "ckpt-"
DIRNAME = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, corrupt, or belongs to a different run."""


@dataclass
class Progress:
    """Where training stands; saved in meta.json, restored on resume."""

    epoch: int = 0  # the epoch being trained (== epochs once training is done)
    step: int = 0  # global batches of ``epoch`` already trained
    global_step: int = 0
    running_loss: float = 0.0
    seen: int = 0  # training examples processed, all workers together
    train_seconds: float = 0.0
    valid: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / DIRNAME


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp dirs of a killed write ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META_FILE).is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _tbe_of(model: nn.Module, collection: nn.Module) -> tuple[nn.Module, str]:
    """The collection's TBE and its state_dict prefix inside ``model``."""
    tbe = collection.tbe
    for name, module in model.named_modules():
        if module is tbe:
            return tbe, f"{name}."
    raise ValueError("the collection's TBE is not part of the model")


def _tensors(model: nn.Module, collection: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, scalars for JSON)."""
    tbe, prefix = _tbe_of(model, collection)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            tensors[f"model.{key}"] = value
    for t, weight in enumerate(tbe.split_embedding_weights()):
        tensors[f"tbe.table.{t}"] = weight
    for k, per_table in enumerate(tbe.split_optimizer_states()):
        for t, state in enumerate(per_table):
            tensors[f"tbe.state.{k}.{t}"] = state
    tensors["tbe.iter"] = tbe.iter
    scalars: dict[str, Any] = {"tbe_step": int(tbe.step), "adam": {}}
    for index, state in optimizer.state_dict()["state"].items():
        entry = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"optimizer.{index}.{key}"] = value
            elif isinstance(value, torch.Tensor):  # Adam's step: a 0-d tensor whose dtype matters
                entry[key] = {"value": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
            else:
                entry[key] = value
        scalars["adam"][str(index)] = entry
    tensors["rng.torch"] = torch.get_rng_state()
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, scalars


def save_checkpoint(
    root: str | Path,
    model: nn.Module,
    collection: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    run: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``ckpt-<global_step>`` atomically under ``root`` and prune to the newest ``keep``.

    ``run`` is what a resume must agree with (config, data fingerprint) plus informational
    fields (workers). Returns the checkpoint directory."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors, scalars = _tensors(model, collection, optimizer)
    target = root / f"{PREFIX}{progress.global_step:09d}"
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(tensors, str(staging / STATE_FILE), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "progress": asdict(progress),
            "run": run,
            **scalars,
            "state_sha256": file_sha256(staging / STATE_FILE),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name in (STATE_FILE, META_FILE):
            _fsync(staging / name)
        if target.exists():  # the same step written again (a resumed run re-saving): replace it
            shutil.rmtree(target)
        os.replace(staging, target)
        _fsync(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def _fsync(path: Path) -> None:
    """Flush to disk, so a machine crash (not just a killed process) keeps the checkpoint."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: cannot read checkpoint metadata ({err})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} v{FORMAT_VERSION} checkpoint")
    return meta


def check_compatible(meta: dict[str, Any], run: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume a checkpoint written for another config or other data, naming the field."""
    saved = meta["run"]
    for key in ("config", "data"):
        old, new = saved.get(key), run.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            for name in sorted(set(old) | set(new)):
                if _normal(old.get(name)) != _normal(new.get(name)):
                    raise CheckpointError(
                        f"cannot resume from {path}: {key} field {name!r} differs "
                        f"(checkpoint {old.get(name)!r}, requested {new.get(name)!r}); "
                        "start without --resume or use the checkpoint's settings"
                    )
        elif old != new:
            raise CheckpointError(f"cannot resume from {path}: {key} differs (checkpoint {old!r}, requested {new!r})")


def _normal(value: Any) -> Any:
    """JSON turns tuples into lists; compare through the same lens."""
    return json.loads(json.dumps(value))


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    collection: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> Progress:
    """Restore model, TBE tables + optimizer state, Adam and RNG from ``path``; verify the file
    against the sha256 in meta.json first. Returns the saved progress."""
    path = Path(path)
    meta = read_meta(path)
    state_path = path / STATE_FILE
    if not state_path.is_file() or file_sha256(state_path) != meta["state_sha256"]:
        raise CheckpointError(f"{state_path}: missing or does not match the sha256 in {META_FILE} (corrupt)")
    try:
        tensors = load_file(str(state_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{state_path}: cannot be read ({err})") from None
    tbe, prefix = _tbe_of(model, collection)
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    result = model.load_state_dict(model_state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefix)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: checkpoint does not fit the model (missing {missing}, unexpected {result.unexpected_keys})")
    with torch.no_grad():
        for t, weight in enumerate(tbe.split_embedding_weights()):
            _copy(weight, tensors, f"tbe.table.{t}", path)
        for k, per_table in enumerate(tbe.split_optimizer_states()):
            for t, state in enumerate(per_table):
                _copy(state, tensors, f"tbe.state.{k}.{t}", path)
        _copy(tbe.iter, tensors, "tbe.iter", path)
    tbe.step = int(meta["tbe_step"])
    optimizer.load_state_dict({"state": _adam_state(meta, tensors), "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return Progress(**meta["progress"])


def _copy(dst: torch.Tensor, tensors: dict[str, torch.Tensor], name: str, path: Path) -> None:
    src = tensors.get(name)
    if src is None or src.shape != dst.shape or src.dtype != dst.dtype:
        found = None if src is None else (tuple(src.shape), src.dtype)
        raise CheckpointError(f"{path}: tensor {name!r} is {found}, the model needs {(tuple(dst.shape), dst.dtype)}")
    dst.copy_(src.to(dst.device))


def _adam_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, Any]]:
    state: dict[int, dict[str, Any]] = {}
    for index, entry in meta["adam"].items():
        restored: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, dict) and "dtype" in value:
                restored[key] = torch.tensor(value["value"], dtype=getattr(torch, value["dtype"]))
            else:
                restored[key] = value
        state[int(index)] = restored
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    return state
