"""Export and engines: ONNX export, TensorRT FP16 plans, parity and latency checks against `reference/`.

Planned in issue 4.
"""
