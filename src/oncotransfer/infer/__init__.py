"""Inference: ONNX export and runtime, prediction, serving."""
