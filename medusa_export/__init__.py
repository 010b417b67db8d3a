"""medusa-export: export a causal LM + Medusa heads to ONNX / TensorRT and validate it token for token."""

__version__ = "0.1.0"
