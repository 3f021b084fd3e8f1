"""Training side: recipes -> torch/scikit-learn models -> ONNX -> INT8 -> parity -> signed bundle.

The only package that imports torch. Installed as `edgekit.exporters` (needs the `train` extra).
"""
