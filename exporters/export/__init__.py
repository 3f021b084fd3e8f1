"""Export: a run directory -> ONNX fp32 -> INT8 static QDQ (quantize.py) -> parity (parity.py) -> the gate
calibrated on the outputs the bundle uses (calibrate.py) -> a signed bundle (export.py; signing itself is
edgekit.manifest's, which the agent verifies with)."""
