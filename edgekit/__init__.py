"""edgekit: sensor models from a GPU server to small devices, with a human in the loop.

Importing this package imports nothing heavy (no onnxruntime, no torch, no paho): each stage is its own module.
"""

__version__ = "0.1.0"
