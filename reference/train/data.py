"""Paired training data: source/target folders, the official train/test transforms, a resumable order.

Source: eladrich/pixel2style2pixel@5cfff38 `datasets/images_dataset.py` (a source and a target image
per sample; `from_im = to_im` when the task has no source transform), `configs/transforms_config.py`
(per-task transforms), `utils/data_utils.py::make_dataset` (recursive folder scan), `training/coach.py`
(`DataLoader(shuffle=True, drop_last=True)`).

The transforms reuse the engine's image IO (`reference.images.read_input`, `read_image`,
`to_input_tensor`), which reproduces the official test transforms (`Resize((256, 256))` bilinear,
`ToTensor`, `Normalize(0.5, 0.5)`, `ToOneHot`, the super-resolution degradation through
`reference.sr`) and names the file in every error. The train transforms add only
`RandomHorizontalFlip(0.5)` for the tasks that have it; flipping the transformed tensor equals the
official flip-before-`ToTensor`, which is per pixel.

Where this departs from the official loader:
- Pairs are matched by file name (relative path without extension), not by position in two sorted
  lists; files without a partner are reported and left out.
- One coin toss flips source and target together (official frontalization tosses twice).
- Randomness (flip, super-resolution factor) and the shuffle order come from `seed`, the epoch and
  the sample index, not from worker processes: a run is reproducible for any `--workers`, and the
  position in the data is a single batch counter, which `--resume` restores.
- A file that cannot be read is skipped with its error (the batch is smaller by one) instead of
  stopping the run; `check_pairs` finds every bad file up front.
- `image_size` < 256 (tests and smoke runs) area-averages the 256 px tensors down to that side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from ..plumbing.files import IMAGE_EXTENSIONS, scan_folder
from ..images import read_image, read_input, to_input_tensor

from ..plumbing.errors import InputImageError, PSPError
from .options import TASKS, TrainConfigError

STREAM_TRAIN, STREAM_TEST = 0, 1


class TrainDataError(PSPError):
    """The training data cannot be used: missing folder, no pairs, duplicate names, no readable sample."""


@dataclass(frozen=True)
class Pair:
    """One training sample: `name` (relative path without extension), its `source` and `target` files."""

    name: str
    source: Path
    target: Path


def scan_images(root: str | os.PathLike, what: str = "folder") -> dict[str, Path]:
    """Image files under `root` (recursive), keyed by relative path without extension.

    Source: official `utils/data_utils.py::make_dataset` (os.walk, image extensions); hidden files
    and folders are skipped.

    Args:
        root: folder to scan.
        what: the option that named it, for messages (e.g. "--source").

    Returns:
        `{name: path}` sorted by name.

    Raises:
        TrainDataError: `root` is not a folder, or two files share a name (e.g. `a.png` and `a.jpg`).
    """
    root = Path(root)
    if not root.is_dir():
        raise TrainDataError(f"{root}: {what} folder not found" if not root.exists()
                             else f"{root}: {what} must be a folder of images, this is a file")
    found: dict[str, Path] = {}
    for path in scan_folder(root):
        name = path.relative_to(root).with_suffix("").as_posix()
        if name in found:
            raise TrainDataError(
                f"{root}: two images share the name {name!r} ({found[name].name}, {path.name}); pairs are matched "
                "by name, so keep one")
        found[name] = path
    return dict(sorted(found.items()))


def pair_folders(source: str | os.PathLike, target: str | os.PathLike | None = None,
                 what: str = "--source/--target") -> tuple[list[Pair], list[str], list[str]]:
    """Match source and target images by name.

    Args:
        source: folder of encoder inputs.
        target: folder of targets; None or the same folder: each image is its own target.
        what: option names for messages.

    Returns:
        `(pairs, source names without a target, target names without a source)`.

    Raises:
        TrainDataError: a folder is missing, holds no image, or no name is in both.
    """
    src_opt, tgt_opt = what.split("/")
    src = scan_images(source, src_opt)
    if not src:
        raise TrainDataError(f"{source}: no images found ({src_opt}; extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if target is None or Path(target).resolve() == Path(source).resolve():
        return [Pair(n, p, p) for n, p in src.items()], [], []
    tgt = scan_images(target, tgt_opt)
    if not tgt:
        raise TrainDataError(f"{target}: no images found ({tgt_opt})")
    pairs = [Pair(n, src[n], tgt[n]) for n in src if n in tgt]
    if not pairs:
        raise TrainDataError(
            f"no pairs: no file name is in both {source} ({len(src)} images, e.g. {next(iter(src))!r}) and "
            f"{target} ({len(tgt)} images, e.g. {next(iter(tgt))!r}); pairs are matched by name without extension")
    return pairs, [n for n in src if n not in tgt], [n for n in tgt if n not in src]


def sample_rng(seed: int, stream: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one sample draw: a function of (seed, stream, epoch, index) only."""
    return np.random.default_rng([int(seed), int(stream), int(epoch), int(index)])


class PairedDataset(Dataset):
    """Samples `(x, y)` of one task; indexed by `(epoch, index)` so that randomness is reproducible.

    Source: official `ImagesDataset.__getitem__` with the transforms of `transforms_config.py`.

    Args:
        pairs: from `pair_folders`.
        dataset_type: a `options.TASKS` key.
        label_nc: 0 RGB, 1 sketch, > 1 segmentation classes.
        image_size: side of x and y in px (256 official; 32..128 area-averaged for tests).
        resize_factors: super-resolution factors, one drawn per sample.
        seed: run seed.
        train: train transforms (flip) and stream; False: test transforms.
    """

    def __init__(self, pairs: Sequence[Pair], dataset_type: str, label_nc: int, image_size: int = 256,
                 resize_factors: Sequence[int] = (), seed: int = 0, train: bool = True):
        if dataset_type not in TASKS:
            raise TrainConfigError(f"unknown dataset_type {dataset_type!r}; known: {', '.join(TASKS)}")
        self.pairs = list(pairs)
        self.task = TASKS[dataset_type]
        self.label_nc = int(label_nc)
        self.image_size = int(image_size)
        self.factors = [int(f) for f in resize_factors]
        if self.task.source == "degraded" and not self.factors:
            raise TrainConfigError("super-resolution needs --resize-factors")
        self.seed = int(seed)
        self.train = train

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `index` as drawn in `epoch`.

        Returns:
            x `[input_nc, S, S]` float32 (RGB [-1, 1], sketch [0, 1], one-hot {0, 1}), y `[3, S, S]`
            float32 in [-1, 1]; S = image_size.

        Raises:
            InputImageError: an unreadable file, a colour segmentation map, a class id >= label_nc
                (the message starts with the file's path).
        """
        pair = self.pairs[index]
        rng = sample_rng(self.seed, STREAM_TRAIN if self.train else STREAM_TEST, epoch, index)
        flip = bool(self.train and self.task.flip and rng.random() < 0.5)
        factor = self.factors[int(rng.integers(len(self.factors)))] if self.task.source == "degraded" else None
        y = to_input_tensor([read_image(pair.target)], 0, names=[str(pair.target)])[0]
        kind = self.task.source
        if kind == "rgb" and pair.source == pair.target:
            x = y  # official: from_im = to_im
        elif kind in ("rgb", "degraded"):
            x = to_input_tensor([read_image(pair.source)], 0, names=[str(pair.source)], degrade_factor=factor)[0]
        else:  # sketch, seg
            x = to_input_tensor([read_input(pair.source, self.label_nc)], self.label_nc, names=[str(pair.source)])[0]
        same = x is y
        if self.image_size != 256:
            k = 256 // self.image_size
            y = F.avg_pool2d(y[None], k)[0]
            x = y if same else F.avg_pool2d(x[None], k)[0]
        if flip:
            y = y.flip(-1)
            x = y if same else x.flip(-1)
        return x, y

    def __getitem__(self, key: tuple[int, int]) -> dict:
        """`{"name", "x", "y"}`, or `{"name", "error"}` when the files cannot be used (never raises
        for a bad file, so one bad file does not stop a batch)."""
        epoch, index = key
        name = self.pairs[index].name
        try:
            x, y = self.load(index, epoch)
        except InputImageError as e:
            return {"name": name, "error": str(e)}
        return {"name": name, "x": x, "y": y}


@dataclass
class Batch:
    """A collated batch: `x` `[B, input_nc, S, S]`, `y` `[B, 3, S, S]` (None when every sample
    failed), the sample names and `errors` (one message per skipped sample)."""

    x: torch.Tensor | None
    y: torch.Tensor | None
    names: list[str]
    errors: list[str]


def collate(items: list[dict]) -> Batch:
    """Stack the good samples of a batch and keep the errors of the bad ones."""
    good = [it for it in items if "error" not in it]
    errors = [it["error"] for it in items if "error" in it]
    if not good:
        return Batch(None, None, [], errors)
    return Batch(torch.stack([it["x"] for it in good]), torch.stack([it["y"] for it in good]),
                 [it["name"] for it in good], errors)


class EpochBatches(Sampler):
    """Endless shuffled batches, `drop_last` per epoch, as official `DataLoader(shuffle=True, drop_last=True)`.

    Batch number `b` (counting from 0 over the whole run) is batch `b % n_batches` of epoch
    `b // n_batches`, whose order is `permutation(n)` drawn from `(seed, epoch)`. Starting at
    `start` therefore continues a run exactly where it stopped.

    Args:
        n: number of samples.
        batch_size: samples per batch.
        seed: run seed.
        start: index of the first batch to yield.

    Raises:
        TrainDataError: fewer samples than one batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start: int = 0):
        if n < batch_size:
            raise TrainDataError(
                f"{n} training pair(s) is fewer than --batch-size {batch_size}: batches drop the incomplete "
                "rest as official pSp does, so no batch could be formed; lower --batch-size or add images")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, int(seed), int(start)
        self.n_batches = n // batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch`."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b, epoch, perm = self.start, None, None
        while True:
            e, j = divmod(b, self.n_batches)
            if e != epoch:
                epoch, perm = e, self.order(e)
            yield [(e, int(i)) for i in perm[j * self.batch_size:(j + 1) * self.batch_size]]
            b += 1


def test_batches(n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The test set in order, in batches of `batch_size` (the last one may be smaller)."""
    return [[(0, i) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]


def check_pairs(dataset: PairedDataset) -> list[str]:
    """Read every pair once with the run's transforms (epoch 0) and return the errors.

    Returns:
        One message per unusable pair (each names its file); empty when every pair loads.
    """
    errors = []
    for i in range(len(dataset)):
        item = dataset[(0, i)]
        if "error" in item:
            errors.append(item["error"])
    return errors
