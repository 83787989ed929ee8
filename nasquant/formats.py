"""Exported model files by suffix (a light module: the CLI dispatches on it without importing torch)."""

#: an exported ONNX graph, run by ONNX Runtime
ONNX_SUFFIX = ".onnx"
#: a serialized TensorRT engine, run by TensorRT
ENGINE_SUFFIXES = (".engine", ".plan")
#: every exported file a backend (not a checkpoint loader) opens
EXPORTED_SUFFIXES = (ONNX_SUFFIX, *ENGINE_SUFFIXES)
