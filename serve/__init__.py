"""calibclust.serve: label image folders with an exported model. Never imports torch.

Reads only the model contract (calibclust/contract.py): an ONNX file whose metadata_props carry a
:class:`calibclust.metadata.ModelMetadata` document.
"""
