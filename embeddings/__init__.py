"""The shared interface: feature specs, method registry, the compressed collection, artifacts."""
from .artifact import ArtifactError, load_inference, read_manifest
from .collection import CompressedEmbeddingBagCollection, EmbeddingBagLookup
from .features import FeatureSpec, Pooling
from .quantized import QuantDtype, QuantizedEmbeddingBagCollection, quantize
from .registry import FeatureLayout, MethodConfig, TableSpec, build_layout, config_from_dict, register, registered
from .tbe import TableOptimizer, TableOptimizerKind

__all__ = [
    "ArtifactError",
    "CompressedEmbeddingBagCollection",
    "EmbeddingBagLookup",
    "FeatureLayout",
    "FeatureSpec",
    "MethodConfig",
    "Pooling",
    "QuantDtype",
    "QuantizedEmbeddingBagCollection",
    "TableOptimizer",
    "TableOptimizerKind",
    "TableSpec",
    "build_layout",
    "load_inference",
    "quantize",
    "config_from_dict",
    "read_manifest",
    "register",
    "registered",
]
