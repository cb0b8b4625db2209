"""calibclust.export: turn a trained checkpoint into the deployable model contract (ONNX, TensorRT).

May import torch and the core; nothing here is imported by the core or by calibclust.serve.
"""
