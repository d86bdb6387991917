"""The runtime backends: every way this project runs pSp (`registry`: one row each), and the models
they load: the engine formulation in torch (`engine_model`), the cached ONNX graphs on ONNX Runtime
or OpenVINO (`graph`); TensorRT plans run through `export.tensorrt.runtime`. Packaging (ONNX,
AOTInductor, TensorRT builds, Triton repositories) and checks (`export.compare`, `export.parity`)
stay in `export/` itself."""

from .registry import (AUTO_ORDER, BACKENDS, BASELINE, PRECISIONS, Backend, BackendModel, Choice, LoadRequest,
                       auto_precision, check_calibration, help_text, load_model, markdown_table, resolve)

__all__ = ["AUTO_ORDER", "BACKENDS", "BASELINE", "PRECISIONS", "Backend", "BackendModel", "Choice", "LoadRequest",
           "auto_precision", "check_calibration", "help_text", "load_model", "markdown_table", "resolve"]
