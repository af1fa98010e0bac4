"""Export: checkpoints to ONNX / TensorRT in a Triton model repository.

Built by the export issue; until then this package holds nothing.
"""
