"""calibclust.serve: label image folders with an exported model. Never imports torch.

Reads only the model contract (ARCHITECTURE.md): an ONNX file whose metadata_props carry a
:class:`calibclust.metadata.ModelMetadata` document.
"""
