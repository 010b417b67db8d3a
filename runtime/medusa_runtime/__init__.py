"""medusa_runtime: the embeddable Medusa decoding runtime (numpy + ONNX Runtime / TensorRT, no torch)."""

__version__ = "0.1.0"
