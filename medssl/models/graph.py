"""Does an ONNX graph, loaded in onnxruntime, match its model card? (torch-free)"""

from __future__ import annotations

from typing import Any

from medssl.models.card import ModelCard, TensorSpec

__all__ = ["graph_problems"]

#: ONNX element types as Triton data types (the card's vocabulary).
_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


def graph_problems(session: Any, card: ModelCard) -> list[str]:
    """Every difference between an onnxruntime session's inputs/outputs and the card's tensors.

    Names, data types, ranks, a dynamic batch axis (unless ``max_batch_size`` is 1) and the
    fixed dims after it. Returns messages naming the tensor; empty when they agree.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    problems = []
    if set(inputs) != {card.input.name}:
        problems.append(f"graph inputs {sorted(inputs)}, card input {card.input.name!r}")
    wanted = set(card.output_names)
    if set(outputs) != wanted:
        problems.append(f"graph outputs {sorted(outputs)}, card outputs {sorted(wanted)}")
    for spec in (card.input, *card.outputs):
        node = inputs.get(spec.name) or outputs.get(spec.name)
        if node is not None:
            problems.extend(_tensor_problems(node, spec, card.max_batch_size))
    return problems


def _tensor_problems(node: Any, spec: TensorSpec, max_batch_size: int) -> list[str]:
    """Data type, rank, batch axis and fixed dims of one graph tensor against its spec."""
    problems = []
    datatype = _ORT_TYPES.get(node.type, node.type)
    if datatype != spec.datatype:
        problems.append(f"{spec.name!r} is {datatype} in the graph, {spec.datatype} in the card")
    shape = list(node.shape)
    if len(shape) != len(spec.shape) + 1:
        problems.append(
            f"{spec.name!r} has shape {shape} in the graph, card (batch, *{list(spec.shape)})"
        )
        return problems
    batch = shape[0]
    if isinstance(batch, int) and not batch == max_batch_size == 1:
        problems.append(
            f"{spec.name!r} has a fixed batch axis of {batch} in the graph; the card's "
            f"max_batch_size {max_batch_size} needs a dynamic one"
        )
    fixed = [
        (i + 1, g, c)
        for i, (g, c) in enumerate(zip(shape[1:], spec.shape))
        if isinstance(g, int) and g != c
    ]
    for axis, graph_dim, card_dim in fixed:
        problems.append(
            f"{spec.name!r} axis {axis} is {graph_dim} in the graph, {card_dim} in the card"
        )
    return problems
