"""The served model: loading an artifact (a directory or an MLflow URI), checking it, and the
holder that swaps models atomically on reload.

Each request reads ``holder.current`` once and uses that ``LoadedModel`` to the end, so a
reload (one reference assignment, atomic under the GIL) never mixes two models in one answer,
and requests in flight finish on the model they started with.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from tablezip.embeddings import ArtifactError, load_inference, read_manifest
from tablezip.embeddings.artifact import MANIFEST_FILE, tablezip_version

from .reader import NumpyBagPooler, Reader, build_bag_pooler, build_readers
from .validation import LayoutCache

log = logging.getLogger(__name__)

# "runs:/...", "models:/...", "s3://...": anything with a URI scheme goes through MLflow.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


@dataclass(frozen=True)
class LoadedModel:
    """An eval-mode collection and what the server reports about it; immutable once built."""

    module: torch.nn.Module
    readers: dict[str, Reader]
    feature_names: tuple[str, ...]
    dim: int
    manifest: dict[str, Any]
    checksum: str
    source: str
    load_seconds: float
    loaded_at: str
    generation: int = 1
    # LookupBags without the model's forward, for the features it covers (see NumpyBagPooler).
    bag_pooler: NumpyBagPooler | None = None
    # Validated LookupBags request shapes and the pooler's per-shape plans; per model, so a reload
    # starts empty and no plan meets a pooler it was not made by.
    bag_layouts: LayoutCache = field(default_factory=LayoutCache)

    @property
    def dtype(self) -> str:
        return str(self.manifest.get("dtype", "float32"))


def is_mlflow_uri(source: str) -> bool:
    return bool(_URI.match(source)) and not source.startswith("file:")


@contextmanager
def local_artifact(source: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local directory holding the artifact: ``source`` itself, or an MLflow URI downloaded
    to a temp dir that is removed afterwards (the loaded model lives in memory).

    Training logs its run directory under artifact path ``model`` with the collection in
    ``model/embeddings``; given the parent (``runs:/<id>/model``, a registered model version
    whose source is it, ``models:/<name>/<version>``, or a run directory), the ``embeddings``
    folder inside it is used."""
    if is_mlflow_uri(source):
        import mlflow.artifacts

        with tempfile.TemporaryDirectory(prefix="tablezip-serve-") as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=_registry_resolved(source, tracking_uri), dst_path=tmp, tracking_uri=tracking_uri
                )
            except Exception as err:  # MlflowException, OSError, ...: all mean "cannot get it"
                raise ArtifactError(f"{source}: cannot download from MLflow ({type(err).__name__}: {err})") from None
            yield _artifact_dir(Path(path))
        return
    path = Path(source.removeprefix("file://"))
    if not path.is_dir():
        raise ArtifactError(f"{source}: not a directory")
    yield _artifact_dir(path)


def _registry_resolved(source: str, tracking_uri: str | None) -> str:
    """``models:/NAME/VERSION[/PATH]`` (or ``NAME/STAGE``, ``NAME/latest``, ``NAME@ALIAS``) as the
    storage URI of that model version's artifacts; any other URI unchanged.

    Why not hand ``models:/`` to ``download_artifacts``: MLflow (3.x) resolves it against the
    process-wide registry URI, ignoring the tracking URI given, so ``--tracking-uri`` would not
    reach the registry ("Registered Model ... not found"). Here the registry is the tracking
    store, as in MLflow's own default, unless MLFLOW_REGISTRY_URI names another."""
    if not source.startswith("models:/"):
        return source
    from mlflow import MlflowClient
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    model_uri, path = ModelsArtifactRepository.split_models_uri(source)
    if ModelsArtifactRepository._is_logged_model_uri(model_uri):  # models:/<model_id>: a tracking-store URI
        return source
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)
    name, version = get_model_name_and_version(client, model_uri)
    location = client.get_model_version_download_uri(name, version)
    return f"{location.rstrip('/')}/{path}" if path else location


def _artifact_dir(path: Path) -> Path:
    if not (path / MANIFEST_FILE).is_file() and (path / "embeddings" / MANIFEST_FILE).is_file():
        return path / "embeddings"
    return path


def _manifest_bytes(directory: Path) -> bytes:
    try:
        return (directory / MANIFEST_FILE).read_bytes()
    except OSError as err:
        raise ArtifactError(f"{directory}: cannot read {MANIFEST_FILE} ({err})") from None


def load_model(source: str, tracking_uri: str | None = None, generation: int = 1) -> LoadedModel:
    """Load and check an artifact; raises ``ArtifactError`` for anything that cannot be served.

    ``load_inference`` verifies every tensor's sha256 against the manifest; the manifest's bytes
    are read before and after, so a directory replaced mid-load is refused rather than served
    under the wrong checksum (the checksum is the sha256 of those bytes). Every feature is then
    probed once: finite vectors of width D for ids 0 and 1."""
    start = time.perf_counter()
    with local_artifact(source, tracking_uri) as directory:
        manifest = read_manifest(directory)  # first: its errors say what is wrong with the directory
        raw = _manifest_bytes(directory)
        module = load_inference(directory)
        if _manifest_bytes(directory) != raw or json.loads(raw) != manifest:
            raise ArtifactError(f"{source}: the artifact changed while it was being loaded; try again")
        checksum = hashlib.sha256(raw).hexdigest()
    names = tuple(module.feature_names)
    readers = build_readers(module, str(manifest.get("dtype", "float32")))
    for name in names:
        probe = readers[name](torch.tensor([0, 1], dtype=torch.int64))
        if probe.shape != (2, module.dim) or not torch.isfinite(probe).all():
            raise ArtifactError(f"{source}: feature {name!r} gives {tuple(probe.shape)} vectors or non-finite values")
    bag_pooler = build_bag_pooler(module, readers)
    return LoadedModel(
        module=module,
        readers=readers,
        feature_names=names,
        dim=int(module.dim),
        manifest=manifest,
        checksum=checksum,
        source=source,
        load_seconds=time.perf_counter() - start,
        loaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        generation=generation,
        bag_pooler=bag_pooler,
    )


class ModelHolder:
    """The current model and the reload protocol: load and check the new model beside the old
    one, then swap the reference; a failed load leaves the old model serving."""

    def __init__(self, model: LoadedModel, tracking_uri: str | None = None) -> None:
        self._current = model
        self._tracking_uri = tracking_uri
        self._reload_lock = threading.Lock()  # one load at a time: two would hold 3 models in memory
        self.reloads = 0
        self.failed_reloads = 0

    @property
    def current(self) -> LoadedModel:
        return self._current

    def reload(self, source: str | None = None) -> LoadedModel:
        """Load ``source`` (default: the current model's source again) and swap it in.
        Raises ``ArtifactError`` (the current model is kept) when it cannot be served."""
        with self._reload_lock:
            old = self._current
            try:
                new = load_model(source or old.source, self._tracking_uri, generation=old.generation + 1)
            except ArtifactError:
                self.failed_reloads += 1
                raise
            except Exception as err:  # anything else must not take the server down either
                self.failed_reloads += 1
                raise ArtifactError(f"{source or old.source}: cannot be loaded ({type(err).__name__}: {err})") from err
            self._current = new  # the swap: one reference assignment
            self.reloads += 1
            log.info("reloaded %s (generation %d, checksum %s, %.2fs)", new.source, new.generation, new.checksum[:12], new.load_seconds)
            return new


def server_version() -> str:
    return tablezip_version()


__all__ = ["LoadedModel", "ModelHolder", "is_mlflow_uri", "load_model", "local_artifact", "server_version"]
