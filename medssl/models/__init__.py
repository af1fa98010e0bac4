"""Exported models: the model card (``medssl.json``), Triton configs and model repositories.

Torch-free: serving and scoring read models through this package. ``config.pbtxt`` handling
needs ``tritonclient`` (the ``serve`` extra) for Triton's ``ModelConfig`` protobuf.
"""

from medssl.models.card import (
    CARD_FILE,
    LUNG,
    NODULE,
    NODULE_LABEL,
    Code,
    Decoding,
    Label,
    ModelCard,
    Task,
    TensorSpec,
    load_card,
)

__all__ = [
    "CARD_FILE",
    "LUNG",
    "NODULE",
    "NODULE_LABEL",
    "Code",
    "Decoding",
    "Label",
    "ModelCard",
    "Task",
    "TensorSpec",
    "load_card",
]
