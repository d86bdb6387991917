"""The embedded demo checkpoint: an official-layout ffhq_encode pSp checkpoint with RANDOM weights.

Source: `reference.make_checkpoint("ffhq_encode", seed=0)` (the weight rule v1 of
`shared/golden/spec/WEIGHT_RULE.md`): the architecture, file layout and opts of the official
`psp_ffhq_encode.pt`, with deterministic random weights. It lets the CLI run end to end without a
download; its outputs are not faces.

The file (about 1.2 GB) is made on first use and cached under `$PSP_ENGINE_CACHE`, else
`~/.cache/psp-engine/`. It is written to a temp file in that folder and renamed into place, so a
reader never sees a partial file; two processes building it at once both write complete,
identical files and the last rename wins. Its size and sha256 are recorded at the build in its
sidecar (`demo_*.pt.json`, the one sidecar schema, kind "checkpoint"); every process checks them
before first use (`reference.description.verify_artifact`: a stat once the digest of this file
version is remembered) and rebuilds a damaged file (truncated, changed bytes, no sidecar) with a
one-line note instead of loading it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from reference import make_checkpoint, save_checkpoint
from reference.plumbing.child import call_in_child
from reference.description import verify_artifact, write_sidecar
from reference.plumbing.files import cache_dir

DEMO_CONFIG = "ffhq_encode"
DEMO_SEED = 0
WEIGHT_RULE_VERSION = "v1"  # in the file name: a new rule must not reuse an old cached file
REAL_CHECKPOINT_HINT = "--checkpoint psp_ffhq_encode.pt"
# Measured on 2 cores: 11.1 s in all on a fresh clone (2026-12-07, AMD EPYC); earlier 13.5 s to generate the weights, 6.2 s to write
# 1.20 GB; peak RSS of the build 2.4 GB (one copy of the weights plus torch), in a child process.
DEMO_BUILD_ESTIMATE_S = 10

DEMO_NOTICE = (
    "NOTE: no --checkpoint given, so this run uses the built-in DEMO checkpoint: the ffhq_encode pSp "
    "architecture (1024x1024 output) with RANDOM weights. Its outputs are NOT faces; they only show that "
    f"the pipeline runs. For real results pass a trained pSp checkpoint, e.g. {REAL_CHECKPOINT_HINT}"
)


def demo_path() -> Path:
    """Where the demo checkpoint is cached (`cache_dir()/demo_ffhq_encode_seed0_rule-v1.pt`); it may not exist yet."""
    return cache_dir() / f"demo_{DEMO_CONFIG}_seed{DEMO_SEED}_rule-{WEIGHT_RULE_VERSION}.pt"


def demo_checkpoint_path(announce: Callable[[str], None] | None = None) -> Path:
    """Path of the cached demo checkpoint, building it on first use.

    Args:
        announce: called with one-line messages about a build (what, where, how big, how long it
            took); a build with `announce` also shows a progress bar with an estimate on stderr
            (tqdm; bytes of weights generated). None to stay silent.

    Returns:
        `demo_path()`, built if it was missing or damaged (its size or sha256 differ from those its
        sidecar recorded at the build: announced in one line, never loaded).

    Raises:
        OSError: the cache folder cannot be created or written.
    """
    path = demo_path()
    if path.is_file():
        problems = verify_artifact(path)
        if not problems:
            return path
        if announce is not None:
            announce(f"the cached demo checkpoint {path} is damaged ({', '.join(problems)}): not used, building it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    if announce is None:
        call_in_child(_build_demo, (path, DEMO_CONFIG, DEMO_SEED), what="demo checkpoint build")
        return path
    from tqdm import tqdm

    announce(f"first run: building the demo checkpoint (random weights, about 1.2 GB on disk, about "
             f"{DEMO_BUILD_ESTIMATE_S} s on 2 cores) at {path}; it is built once and reused (set PSP_ENGINE_CACHE "
             "to put it elsewhere; python -m engine.cache lists and removes cached files)")
    t0 = time.perf_counter()
    with tqdm(desc="demo weights", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              dynamic_ncols=True) as bar:
        def progress(message: tuple[str, int, int]) -> None:
            stage, done, total = message
            if stage == "weights":
                bar.total = total
                bar.update(done - bar.n)
            else:  # "writing": the weights are complete
                bar.close()
                announce(f"writing the demo checkpoint ({total / 2**30:.2f} GiB) to {path} ...")

        call_in_child(_build_demo, (path, DEMO_CONFIG, DEMO_SEED), progress, what="demo checkpoint build")
    announce(f"demo checkpoint built in {time.perf_counter() - t0:.1f} s: {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return path


def _build_demo(path: Path, config: str, seed: int, notify: Callable[[tuple[str, int, int]], None]) -> None:
    """Generate the weights of `make_checkpoint(config, seed)` and write them to `path` (atomically), in the child process of
    `demo_checkpoint_path` (`reference.plumbing.child.call_in_child`): the 2.4 GB peak of the build ends with
    the child instead of staying in the process that next loads the model. Sends
    `("weights", bytes_done, bytes_total)` as the weights grow (at most every 1 %), then
    `("writing", total, total)`."""
    sent = [-1, 0]  # bytes last sent, total

    def progress(done: int, total: int) -> None:
        sent[1] = total
        if done == total or done - sent[0] >= total // 100:
            sent[0] = done
            notify(("weights", done, total))

    ckpt = make_checkpoint(config, seed=seed, progress=progress)
    notify(("writing", sent[1], sent[1]))
    save_checkpoint(ckpt, path)  # temp file + os.replace
    # its size and sha256 (1.5 s for 1.2 GB, pages still cached), checked before every later use
    write_sidecar(path, None, "checkpoint", config=config, seed=seed, weight_rule=WEIGHT_RULE_VERSION)
