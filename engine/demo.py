"""The embedded demo checkpoint: an official-layout ffhq_encode pSp checkpoint with RANDOM weights.

Source: `reference.make_checkpoint("ffhq_encode", seed=0)` (the weight rule v1 of
`shared/golden/spec/WEIGHT_RULE.md`): the architecture, file layout and opts of the official
`psp_ffhq_encode.pt`, with deterministic random weights. It lets the CLI run end to end without a
download; its outputs are not faces.

The file (about 1.2 GB) is made on first use and cached under `$PSP_ENGINE_CACHE`, else
`~/.cache/psp-engine/`. It is written to a temp file in that folder and renamed into place, so a
reader never sees a partial file; two processes building it at once both write complete,
identical files and the last rename wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from reference import make_checkpoint, save_checkpoint
from reference.files import cache_dir

DEMO_CONFIG = "ffhq_encode"
DEMO_SEED = 0
WEIGHT_RULE_VERSION = "v1"  # in the file name: a new rule must not reuse an old cached file
REAL_CHECKPOINT_HINT = "--checkpoint psp_ffhq_encode.pt"

DEMO_NOTICE = (
    "NOTE: no --checkpoint given, so this run uses the built-in DEMO checkpoint: the ffhq_encode pSp "
    "architecture (1024x1024 output) with RANDOM weights. Its outputs are NOT faces; they only show that "
    f"the pipeline runs. For real results pass a trained pSp checkpoint, e.g. {REAL_CHECKPOINT_HINT}"
)


def demo_checkpoint_path(announce: Callable[[str], None] | None = None) -> Path:
    """Path of the cached demo checkpoint, building it on first use.

    Args:
        announce: called with a one-line message before a build (which takes seconds and
            writes about 1.2 GB); None to stay silent.

    Returns:
        Path of `demo_ffhq_encode_seed0_rule-v1.pt` in `cache_dir()`.

    Raises:
        OSError: the cache folder cannot be created or written.
    """
    path = cache_dir() / f"demo_{DEMO_CONFIG}_seed{DEMO_SEED}_rule-{WEIGHT_RULE_VERSION}.pt"
    if path.is_file():
        return path
    if announce is not None:
        announce(f"building the demo checkpoint once at {path} (about 1.2 GB; set PSP_ENGINE_CACHE to move it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(make_checkpoint(DEMO_CONFIG, seed=DEMO_SEED), path)  # temp file + os.replace
    return path
