"""HTTP server for a layerprune ONNX bundle (FastAPI + onnxruntime, torch-free).

Imports only `layerprune.runtime`, `layerprune.bundle`, `layerprune.artifacts` and `layerprune.errors`
from the project, never training, analysis or export code, so a serving image needs no torch.
"""
