"""Plain-PyTorch pSp, computing what the official implementation computes: the ground truth.

Public API (benchmarks and tools rely on these names):
    load_psp(path_or_dict) -> PSP; PSP.encode / synthesize / mapping; style_mix;
    make_checkpoint(config, seed); load_stylegan2; read_checkpoint / save_checkpoint.
"""

from .checkpoint import read_checkpoint, save_checkpoint
from .configs import CONFIGS, n_styles_for
from .plumbing.errors import CheckpointError, InputImageError, PSPError
from .psp import PSP, load_psp, load_stylegan2, style_mix
from .stylegan2 import Generator
from .weights import make_checkpoint

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "Generator",
    "InputImageError",
    "PSP",
    "PSPError",
    "load_psp",
    "load_stylegan2",
    "make_checkpoint",
    "n_styles_for",
    "read_checkpoint",
    "save_checkpoint",
    "style_mix",
]
