"""psp-engine: inference for pixel2style2pixel (pSp) encoders and their StyleGAN2 generators.

    import engine
    eng = engine.load("psp_ffhq_encode.pt")          # or engine.load() for the random-weight demo
    img, w_plus = eng.invert(x)                      # x [B, input_nc, 256, 256] float32

CLI: `python -m engine.run --input photos/ --output out/` (see `engine/run.py`).
"""

from reference.plumbing.errors import CheckpointError, InputImageError, PSPError

from .api import BACKENDS, Engine, UsageError, load

__all__ = ["BACKENDS", "CheckpointError", "Engine", "InputImageError", "PSPError", "UsageError", "load"]
