"""CTR models that receive a built embedding collection."""
from .blocks import AttentionUnit, Dice, mlp
from .dcn import CrossLayer, CrossNetwork, DCNv2
from .din import DIN, DINInputs
from .dlrm import DLRM
from .field_attention import FieldAttention, default_query_fields
from .sequence import PaddedSequence, SequenceEmbedding, mini_batch_l2, pad_jagged

__all__ = [
    "AttentionUnit",
    "CrossLayer",
    "CrossNetwork",
    "DCNv2",
    "DIN",
    "DINInputs",
    "DLRM",
    "Dice",
    "FieldAttention",
    "PaddedSequence",
    "SequenceEmbedding",
    "mini_batch_l2",
    "mlp",
    "pad_jagged",
    "default_query_fields",
]
