"""ONNX: export a pipeline's networks with a parity check, and run what was exported."""
