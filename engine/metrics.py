"""`python -m engine.metrics`: compare a folder of outputs with a folder of targets.

Source: official pSp `scripts/calc_losses_on_images.py` (pairs outputs with ground truth by file
name, `Resize((256, 256))`, `ToTensor()`, `Normalize([0.5]*3, [0.5]*3)`, LPIPS(alex) and L2, mean and
std printed) and `scripts/calc_id_loss_parallel.py` (identity similarity), extended:

- Pairing: by relative path without extension (pred `a/b.png` <-> target `a/b.jpg`), in sub-folders
  too. A pred named with its target's whole name (`x.jpg.png`, how `engine.run` names outputs whose
  stems collide) pairs with that exact file. Unmatched files are listed, not fatal; a stem shared by
  several files on one side is reported as ambiguous.
- `engine.run`'s extra outputs are recognised and skipped (counted, not listed as unmatched):
  `<base>_mix<k>.png`, `<base>_grid.jpg`, `<base>_coupled.jpg` and `<base>_aligned.png` beside the
  inversion `<base>.png` (`EXTRA_SUFFIXES`; the sibling must exist, so an input that was itself
  named `x_mix0.jpg` keeps its output `x_mix0.png` a prediction). `--include-extras` scores each
  against its base's target (named `<base>_mix0` ... in the report). `.npy` latents are not images.
- Reading: `reference.images.read_image` (EXIF orientation applied, alpha over white, 16-bit scaled;
  the official script reads `convert('RGB')`), then RGB. Both images are resized to `size` x `size`
  with PIL bilinear, as torchvision's `Resize` does on PIL images; `size=0` compares at native size
  (the two sizes must then match, else the pair fails with the reason).
- Metrics, per pair, then mean / std (numpy, ddof=0 as the official script) over the finite values:
    psnr_db      10*log10(1/MSE) on [0, 1] RGB (data range 1), MSE over pixels and channels.
                 Identical images give +inf: they are counted (`n_inf`) and left out of the mean and
                 std, which are over the finite values (+inf only when every pair is identical).
    ssim         pytorch-msssim, Gaussian window 11, sigma 1.5, K=(0.01, 0.03), on [0, 1] RGB,
                 averaged over channels. Needs both sides >= 11 px.
    ms_ssim      pytorch-msssim, same window, the 5 standard weights (0.0448, 0.2856, 0.3001,
                 0.2363, 0.1333). Needs both sides > 160 px (4 halvings of an 11-px window).
    id_cosine, id_distance
                 dlib's 128-d face embedding (ResNet `dlib_face_recognition_resnet_model_v1.dat`,
                 landmarks `shape_predictor_5_face_landmarks.dat`, from the face-recognition-models
                 package; HOG detector, 1 upsampling; the largest face of each image). Cosine
                 similarity, and Euclidean distance: dlib calls < 0.6 the same person. A side with
                 no face gives NaN and the reason. (Official pSp uses an ArcFace IR-SE50 for this,
                 whose weights cannot be fetched here; the numbers are not comparable to its.)
    lpips        LPIPS v0.1 (`reference.perceptual.load_lpips`, alex by default, as the official
                 script) on [-1, 1] images. Left out of the report, with a one-line message naming
                 the file, when the backbone weights are not on disk.
  A metric a pair cannot have (too small, no face) is NaN with the reason in the pair's `notes`;
  NaNs are counted (`n_nan`) and left out of means.
- Runtime: when the pred folder holds an `engine.run` manifest (`manifest.jsonl`), mean / p50 / p90
  ms per stage over its "ok" records (the latest run configuration, the latest record per input;
  encode and synthesize are per image, i.e. the batch time divided by its size) and img/s =
  images / summed per-image ms.

Output: a table on stdout; with `--json FILE` a JSON report (written atomically): `settings`,
`pairs` (per-pair values and notes), `summary` (mean, std, count, n_nan, n_inf per metric),
`counts`, `failures` (with reasons), `unmatched`, `runtime`, `messages`. In JSON a NaN is `null`
and an infinity the string "inf".

Exit codes: 0 every matched pair was compared, 1 some pairs failed (unreadable file, size
mismatch, ambiguous name), 2 usage error (a folder missing, no image, no pair), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from reference.plumbing.errors import InputImageError, PSPError
from reference.perceptual import MissingWeightsError, load_lpips, lpips_backbone_path

from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli, say
from reference.plumbing.errors import UsageError
from reference.plumbing.files import atomic_write, scan_folder
from reference.images import read_image
from .manifest import MANIFEST_NAME, read_records

SSIM_WINDOW = 11  # px, Gaussian window of SSIM and MS-SSIM
SSIM_SIGMA = 1.5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, 5 scales
SSIM_MIN_SIZE = SSIM_WINDOW  # px, smaller side
MS_SSIM_MIN_SIZE = (SSIM_WINDOW - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1  # 161 px: pytorch-msssim asserts > 160
DLIB_SAME_PERSON = 0.6  # Euclidean distance below which dlib calls two faces one person
FACE_MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
}
METRICS = ("psnr_db", "ssim", "ms_ssim", "id_cosine", "id_distance", "lpips")
STAGES = ("read", "encode", "synthesize", "write")


# ------------------------------------------------------------------------------------------------
# Pixel metrics


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"need two [B, C, H, W] tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio, 10*log10(data_range^2 / MSE) with data range 1.

    Args:
        pred: [B, C, H, W] float, in [0, 1].
        target: [B, C, H, W] float, in [0, 1].

    Returns:
        [B] float64 PSNR in dB; +inf where the images are equal.

    Raises:
        ValueError: the shapes differ or are not 4-d.
    """
    _check_pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)  # [B]
    return 10 * torch.log10(1 / mse)  # 1/0 = inf -> +inf dB


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) via pytorch-msssim: Gaussian window 11, sigma 1.5, data range 1.

    Args:
        pred: [B, C, H, W] float, in [0, 1], both sides >= SSIM_MIN_SIZE (11 px).
        target: [B, C, H, W] float, in [0, 1].

    Returns:
        [B] float64 SSIM (mean over channels); 1 for equal images.

    Raises:
        ValueError: the shapes differ, or a side is under 11 px.
    """
    from pytorch_msssim import ssim as _ssim

    _check_pair(pred, target)
    if min(pred.shape[-2:]) < SSIM_MIN_SIZE:
        raise ValueError(
            f"SSIM needs both sides >= {SSIM_MIN_SIZE} px (its window), got {pred.shape[-1]}x{pred.shape[-2]}"
        )
    return _ssim(pred.double(), target.double(), data_range=1.0, size_average=False, win_size=SSIM_WINDOW,
                 win_sigma=SSIM_SIGMA)


def ms_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MS-SSIM (Wang et al. 2003) via pytorch-msssim: window 11, sigma 1.5, the 5 standard weights.

    Args:
        pred: [B, C, H, W] float, in [0, 1], both sides >= MS_SSIM_MIN_SIZE (161 px).
        target: [B, C, H, W] float, in [0, 1].

    Returns:
        [B] float64 MS-SSIM (mean over channels); 1 for equal images.

    Raises:
        ValueError: the shapes differ, or a side is under 161 px.
    """
    from pytorch_msssim import ms_ssim as _ms_ssim

    _check_pair(pred, target)
    if min(pred.shape[-2:]) < MS_SSIM_MIN_SIZE:
        raise ValueError(
            f"MS-SSIM needs both sides >= {MS_SSIM_MIN_SIZE} px (an {SSIM_WINDOW}-px window after 4 halvings), "
            f"got {pred.shape[-1]}x{pred.shape[-2]}"
        )
    return _ms_ssim(pred.double(), target.double(), data_range=1.0, size_average=False, win_size=SSIM_WINDOW,
                    win_sigma=SSIM_SIGMA, weights=list(MS_SSIM_WEIGHTS))


# ------------------------------------------------------------------------------------------------
# Identity (dlib)


def face_model_paths() -> dict[str, Path]:
    """The dlib model files of the face-recognition-models package, found without importing it.

    Its `__init__` imports pkg_resources (deprecated, absent from new setuptools), so the package
    folder is located with `importlib.util.find_spec(...).submodule_search_locations`.

    Returns:
        {"recognition": dlib_face_recognition_resnet_model_v1.dat, "landmarks":
        shape_predictor_5_face_landmarks.dat} as paths.

    Raises:
        MissingWeightsError: the package is not installed or a file is missing (names it and the fix).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"dlib face models ({', '.join(FACE_MODEL_FILES.values())}) not found: the face-recognition-models "
            "package that ships them is not installed; run `pip install face-recognition-models==0.3.0 dlib-bin`"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    paths = {k: folder / name for k, name in FACE_MODEL_FILES.items()}
    for p in paths.values():
        if not p.is_file():
            raise MissingWeightsError(
                f"dlib face model {p.name} not found in {folder}; reinstall it with "
                "`pip install --force-reinstall face-recognition-models==0.3.0`"
            )
    return paths


class FaceIdentity:
    """dlib face embeddings (the models the face_recognition package uses), to compare identities.

    Source: dlib `dnn_face_recognition_ex` / face_recognition `face_encodings`: HOG frontal face
    detector, 5-point landmarks, 128-d ResNet descriptor; distance < 0.6 means the same person.

    Args:
        upsample: times the detector upsamples the image (1 finds faces down to ~40 px).

    Raises:
        MissingWeightsError: the model files are missing (see `face_model_paths`).
        ImportError: dlib is not installed (`pip install dlib-bin`).
    """

    def __init__(self, upsample: int = 1):
        import dlib

        paths = face_model_paths()
        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(paths["landmarks"]))
        self._encoder = dlib.face_recognition_model_v1(str(paths["recognition"]))

    def embed(self, rgb: np.ndarray) -> tuple[np.ndarray | None, int]:
        """128-d descriptor of the largest face in an image.

        Args:
            rgb: [H, W, 3] uint8 RGB.

        Returns:
            (descriptor [128] float64, or None when no face is found; number of faces found).
        """
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        faces = self._detector(rgb, self.upsample)
        if len(faces) == 0:
            return None, 0
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self._landmarks(rgb, face)
        return np.asarray(self._encoder.compute_face_descriptor(rgb, shape), dtype=np.float64), len(faces)

    def compare(self, pred: np.ndarray, target: np.ndarray) -> tuple[float, float, str | None]:
        """Identity similarity of the largest face of each image.

        Args:
            pred: [H, W, 3] uint8 RGB.
            target: [H, W, 3] uint8 RGB.

        Returns:
            (cosine similarity in [-1, 1], Euclidean distance (< 0.6: same person), reason or None);
            both values NaN, with the reason, when either image has no face.
        """
        (a, na), (b, nb) = self.embed(pred), self.embed(target)
        missing = [side for side, d in (("pred", a), ("target", b)) if d is None]
        if missing:
            return math.nan, math.nan, f"no face found in {' and '.join(missing)} (dlib HOG detector)"
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        reason = None
        if na > 1 or nb > 1:
            reason = f"{na} face(s) in pred, {nb} in target: the largest of each was compared"
        return cosine, float(np.linalg.norm(a - b)), reason


# ------------------------------------------------------------------------------------------------
# Pairing


@dataclass
class Pairing:
    """Files of two folders paired by name (see the module docstring).

    Attributes:
        pairs: (name, pred file, target file), sorted by name; name is the pred's relative path
            without extension (POSIX).
        unmatched_pred, unmatched_target: relative paths with no partner.
        ambiguous: (relative path, reason) of files that could pair with more than one file.
        extras: relative paths of `engine.run`'s extra outputs left out (see `extra_base`).
    """

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)
    unmatched_pred: list[str] = field(default_factory=list)
    unmatched_target: list[str] = field(default_factory=list)
    ambiguous: list[tuple[str, str]] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)


def list_images(folder: str | os.PathLike, ignore: Sequence[str] = ()) -> dict[str, Path]:
    """Image files under a folder (recursive; hidden files and folders skipped).

    Args:
        folder: the folder.
        ignore: relative POSIX paths to leave out.

    Returns:
        {relative POSIX path: file}, sorted, for extensions in `reference.images.IMAGE_EXTENSIONS`.
    """
    root = Path(folder)
    skip = set(ignore)
    found = {p.relative_to(root).as_posix(): p for p in scan_folder(root)}
    found = {rel: p for rel, p in found.items() if rel not in skip}
    return dict(sorted(found.items()))


# engine.run's outputs besides the inversion `<base>.png` (engine.inputs.Job.outputs): the style mixes,
# the mixing grid, the side-by-side and the aligned crop. Checked on the file name's end.
EXTRA_SUFFIXES = (re.compile(r"_mix\d+\.png$"), re.compile(r"_grid\.jpg$"), re.compile(r"_coupled\.jpg$"),
                  re.compile(r"_aligned\.png$"))


def extra_base(rel: str, images: Sequence[str] | set[str]) -> str | None:
    """The base of an `engine.run` extra output (`a/x_mix0.png` -> `a/x`) when `rel` is one: its name ends
    with an `EXTRA_SUFFIXES` pattern and the inversion `<base>.png` is among `images`; else None."""
    for pattern in EXTRA_SUFFIXES:
        m = pattern.search(rel)
        if m and rel[:m.start()] + ".png" in images:
            return rel[:m.start()]
    return None


def _stem(rel: str) -> str:
    p = PurePosixPath(rel)
    return str(p.with_suffix("")) if p.suffix else rel


def pair_folders(pred_dir: str | os.PathLike, target_dir: str | os.PathLike,
                 ignore_pred: Sequence[str] = (), include_extras: bool = False) -> Pairing:
    """Pair the images of two folders by relative path without extension.

    A pred `a/b.png` pairs with the target whose relative path is `a/b` plus any extension; a pred
    `a/x.jpg.png` pairs with target `a/x.jpg` itself (checked first). A stem held by several
    files on one side (`x.jpg` and `x.png`) pairs with nothing and is reported as ambiguous.
    `engine.run`'s extra outputs (`extra_base`) are left out into `Pairing.extras`, or with
    `include_extras` paired with their base's target.

    Args:
        pred_dir: outputs to evaluate.
        target_dir: ground truth.
        ignore_pred: relative paths under pred_dir that are not candidates.
        include_extras: pair the extra outputs too (name `<base>_mix0` etc., the target of `<base>`).

    Returns:
        A `Pairing`.
    """
    preds = list_images(pred_dir, ignore_pred)
    extras = {rel: base for rel in preds if (base := extra_base(rel, preds)) is not None}
    preds = {rel: p for rel, p in preds.items() if rel not in extras}
    targets = list_images(target_dir)
    by_stem: dict[str, list[str]] = {}
    for rel in targets:
        by_stem.setdefault(_stem(rel), []).append(rel)
    pred_by_stem: dict[str, list[str]] = {}
    for rel in preds:
        pred_by_stem.setdefault(_stem(rel), []).append(rel)

    out = Pairing()
    used: set[str] = set()
    for name, rels in sorted(pred_by_stem.items()):
        if len(rels) > 1:
            for rel in rels:
                out.ambiguous.append((f"pred/{rel}", f"pred files {', '.join(rels)} share the name {name!r}"))
            continue
        rel = rels[0]
        if name in targets:  # x.jpg.png -> x.jpg
            match = name
        elif len(by_stem.get(name, [])) == 1:
            match = by_stem[name][0]
        elif name in by_stem:
            out.ambiguous.append((f"pred/{rel}", f"target files {', '.join(by_stem[name])} share the name {name!r}; "
                                  f"name the pred after one of them in full (e.g. {by_stem[name][0]}.png)"))
            continue
        else:
            out.unmatched_pred.append(rel)
            continue
        out.pairs.append((name, preds[rel], targets[match]))
        used.add(match)
    out.unmatched_target = [t for t in targets if t not in used]
    if include_extras:
        target_of = {name: target for name, _, target in out.pairs}
        for rel, base in extras.items():
            if base in target_of:
                out.pairs.append((_stem(rel), Path(pred_dir) / rel, target_of[base]))
            else:
                out.unmatched_pred.append(rel)
        out.pairs.sort(key=lambda t: t[0])
    else:
        out.extras = sorted(extras)
    return out


# ------------------------------------------------------------------------------------------------
# Runtime from an engine.run manifest


def runtime_stats(pred_dir: str | os.PathLike) -> dict | None:
    """Per-stage timing of the `engine.run` that wrote a folder, from its manifest.

    Uses the "ok" records of the latest run configuration (fingerprint of the last "ok" record),
    the latest one per input.

    Args:
        pred_dir: an `engine.run --output` folder.

    Returns:
        None when there is no manifest or no "ok" record; else {"manifest": path, "images": n,
        "backend": str | None, "stages_ms": {stage: {"mean", "p50", "p90"}} for read, encode,
        synthesize, write and total (ms per image; encode and synthesize are batch time / batch
        size), "images_per_s": images / summed per-image ms, "records_ignored": records of other
        configurations or earlier duplicates}.
    """
    path = Path(pred_dir) / MANIFEST_NAME
    records = [r for r in read_records(pred_dir) if isinstance(r, dict) and r.get("status") == "ok"
               and isinstance(r.get("timings_ms"), dict)]
    if not records:
        return None
    fp = records[-1].get("fingerprint")
    latest: dict[str, dict] = {}
    for r in records:
        if r.get("fingerprint") == fp:
            latest[str(r.get("input"))] = r
    rows = list(latest.values())
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    totals = []
    for r in rows:
        t = r["timings_ms"]
        for s in STAGES:
            if isinstance(t.get(s), (int, float)):
                per_stage[s].append(float(t[s]))
        totals.append(sum(float(v) for k, v in t.items() if k in STAGES and isinstance(v, (int, float))))

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": math.nan, "p50": math.nan, "p90": math.nan}
        a = np.asarray(values)
        return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90))}

    stages = {s: stats(v) for s, v in per_stage.items()}
    stages["total"] = stats(totals)
    config = rows[-1].get("config") if isinstance(rows[-1].get("config"), dict) else {}
    total_s = sum(totals) / 1e3
    return {
        "manifest": str(path),
        "images": len(rows),
        "backend": config.get("backend"),
        "stages_ms": stages,
        "images_per_s": len(rows) / total_s if total_s > 0 else math.nan,
        "records_ignored": len(records) - len(rows),
    }


# ------------------------------------------------------------------------------------------------
# Evaluation


def _load_rgb(path: Path, size: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB, resized to size x size (bilinear) unless size == 0."""
    im = read_image(path, min_size=1).convert("RGB")
    if size:
        im = im.resize((size, size), Image.BILINEAR)  # torchvision Resize((size, size)) on a PIL image
    return np.array(im)  # a writable copy (torch.from_numpy warns on read-only arrays)


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    finite = a[np.isfinite(a)]
    n_inf = int(np.isinf(a).sum())
    if finite.size:
        mean, std = float(finite.mean()), float(finite.std())
    elif n_inf:
        mean, std = float(a[np.isinf(a)][0]), math.nan  # every pair identical (+inf PSNR)
    else:
        mean = std = math.nan
    return {"mean": mean, "std": std, "count": int(finite.size), "n_nan": int(np.isnan(a).sum()), "n_inf": n_inf}


def evaluate(pred_dir: str | os.PathLike, target_dir: str | os.PathLike, size: int = 256, lpips_net: str = "alex",
             identity: bool = True, lpips: bool = True, lpips_backbone: str | os.PathLike | None = None,
             say: Callable[[str], Any] = print, progress: Callable[[Sequence], Any] | None = None,
             include_extras: bool = False) -> dict:
    """Compare every paired image of two folders (the report `python -m engine.metrics` prints).

    Source: official pSp `scripts/calc_losses_on_images.py` (see the module docstring for what is added).

    Args:
        pred_dir: folder of outputs (may hold an `engine.run` manifest).
        target_dir: folder of ground truth.
        size: px, both images are resized to size x size (bilinear); 0 compares native sizes.
        lpips_net: LPIPS backbone, "alex" (official), "vgg" or "squeeze".
        identity: compute dlib identity similarity.
        lpips: compute LPIPS (left out, with a message, when its weights are missing).
        lpips_backbone: the torchvision weight file of the LPIPS backbone; default
            `reference.perceptual.lpips_backbone_path(lpips_net)` (the torch hub cache).
        say: receives one-line notices (metrics left out and why).
        progress: wraps the pair list for a progress bar (e.g. tqdm), or None.
        include_extras: also score `engine.run`'s extra outputs (mixes, grids, side-by-sides, aligned
            crops) against their base's target; by default they are counted and skipped.

    Returns:
        The report dict (keys in the module docstring); values are floats with NaN / inf, see
        `to_json` for the JSON form.

    Raises:
        UsageError: a folder is missing or holds no image, or no file pairs.
    """
    for flag, d in (("--pred", pred_dir), ("--target", target_dir)):
        if not Path(d).is_dir():
            raise UsageError(f"{flag} {d}: no such folder")
    if size < 0:
        raise UsageError(f"--size must be >= 0 (0 compares native sizes), got {size}")
    pred_dir, target_dir = Path(pred_dir), Path(target_dir)
    pairing = pair_folders(pred_dir, target_dir, include_extras=include_extras)
    if not pairing.pairs:
        raise UsageError(
            f"no image pairs between --pred {pred_dir} ({len(pairing.unmatched_pred)} unmatched) and --target "
            f"{target_dir} ({len(pairing.unmatched_target)} unmatched): files pair by relative path without extension"
        )

    messages: list[str] = []

    def notice(msg: str) -> None:
        messages.append(msg)
        say(msg)

    metrics = ["psnr_db", "ssim", "ms_ssim"]
    face = None
    if identity:
        try:
            face = FaceIdentity()
            metrics += ["id_cosine", "id_distance"]
        except (MissingWeightsError, ImportError) as e:
            notice(f"identity left out: {' '.join(str(e).split())}")
    lpips_model = None
    if lpips:
        try:
            lpips_model = load_lpips(lpips_net, backbone_path=lpips_backbone)
            metrics.append("lpips")
        except PSPError as e:
            notice(f"LPIPS left out: {' '.join(str(e).split())}")

    rows, failures = [], []
    items = progress(pairing.pairs) if progress is not None else pairing.pairs
    for name, pred_path, target_path in items:
        row: dict[str, Any] = {"name": name, "pred": str(pred_path), "target": str(target_path)}
        try:
            a = _load_rgb(pred_path, size)
            b = _load_rgb(target_path, size)
            if a.shape != b.shape:
                raise InputImageError(f"{name}: sizes differ: pred {a.shape[1]}x{a.shape[0]}, target "
                                      f"{b.shape[1]}x{b.shape[0]} (size 0 compares native sizes; resize both with "
                                      "--size N)")
            row["size"] = [a.shape[1], a.shape[0]]
            row.update(_pair_metrics(a, b, face, lpips_model))
        except PSPError as e:
            failures.append({"name": name, "pred": str(pred_path), "target": str(target_path),
                             "reason": " ".join(str(e).split())})
            continue
        except Exception as e:  # noqa: BLE001 - one bad pair never aborts the rest; recorded with its reason
            failures.append({"name": name, "pred": str(pred_path), "target": str(target_path),
                             "reason": f"{name}: {type(e).__name__}: {' '.join(str(e).split())}"})
            continue
        rows.append(row)

    for rel, reason in pairing.ambiguous:
        failures.append({"name": rel, "pred": None, "target": None, "reason": f"ambiguous: {reason}"})

    summary = {m: _summary([r[m] for r in rows]) for m in metrics}
    if "id_distance" in summary:
        d = np.asarray([r["id_distance"] for r in rows], dtype=np.float64)
        summary["id_distance"]["below_0.6"] = int((d[np.isfinite(d)] < DLIB_SAME_PERSON).sum())
    return {
        "settings": {
            "pred": str(pred_dir), "target": str(target_dir), "size": size,
            "resize": f"PIL bilinear to {size}x{size}" if size else "none (native size)",
            "metrics": metrics, "lpips_net": lpips_net if lpips_model is not None else None,
            "lpips_backbone": (str(lpips_backbone or lpips_backbone_path(lpips_net))
                               if lpips_model is not None else None),
            "ssim": {"window": SSIM_WINDOW, "sigma": SSIM_SIGMA, "data_range": 1.0,
                     "ms_ssim_weights": list(MS_SSIM_WEIGHTS)},
            "identity": {"model": FACE_MODEL_FILES["recognition"], "same_person_below": DLIB_SAME_PERSON}
            if face is not None else None,
            "std": "population (ddof=0), over finite values",
        },
        "pairs": rows,
        "summary": summary,
        "counts": {"pairs": len(pairing.pairs), "ok": len(rows), "failed": len(failures),
                   "unmatched_pred": len(pairing.unmatched_pred), "unmatched_target": len(pairing.unmatched_target),
                   "extras_skipped": len(pairing.extras)},
        "failures": failures,
        "unmatched": {"pred": pairing.unmatched_pred, "target": pairing.unmatched_target},
        "extras_skipped": pairing.extras,
        "runtime": runtime_stats(pred_dir),
        "messages": messages,
    }


def _pair_metrics(a: np.ndarray, b: np.ndarray, face: FaceIdentity | None, lpips_model) -> dict:
    """Every metric of one pair of [H, W, 3] uint8 images; NaN + a note where one cannot be computed."""
    x = torch.from_numpy(a).permute(2, 0, 1)[None].double().div(255)  # [1, 3, H, W] in [0, 1]
    y = torch.from_numpy(b).permute(2, 0, 1)[None].double().div(255)
    out: dict[str, Any] = {"psnr_db": float(psnr(x, y)[0])}
    notes: dict[str, str] = {}
    for key, fn in (("ssim", ssim), ("ms_ssim", ms_ssim)):
        try:
            out[key] = float(fn(x, y)[0])
        except ValueError as e:
            out[key], notes[key] = math.nan, str(e)
    if face is not None:
        out["id_cosine"], out["id_distance"], reason = face.compare(a, b)
        if reason:
            notes["identity"] = reason
    if lpips_model is not None:
        try:
            with torch.no_grad():
                out["lpips"] = float(lpips_model(x.float().mul(2).sub(1), y.float().mul(2).sub(1))[0])
        except ValueError as e:
            out["lpips"], notes["lpips"] = math.nan, str(e)
    out["notes"] = notes
    return out


# ------------------------------------------------------------------------------------------------
# Output


def to_json(obj: Any) -> Any:
    """The report with NaN as None and +/-inf as "inf"/"-inf" (strict JSON)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


_LABELS = {"psnr_db": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "id_cosine": "ID cosine",
           "id_distance": "ID distance", "lpips": "LPIPS"}


def format_report(report: dict) -> str:
    """The human table: summary per metric, failures, unmatched files, runtime."""
    c = report["counts"]
    s = report["settings"]
    lines = [f"{c['ok']} of {c['pairs']} pairs compared at "
             f"{str(s['size']) + 'x' + str(s['size']) if s['size'] else 'native size'}; {c['failed']} failed; "
             f"unmatched: {c['unmatched_pred']} pred, {c['unmatched_target']} target"]
    if c["extras_skipped"]:
        lines.append(f"skipped {c['extras_skipped']} engine.run extra output(s) (_mix<k>, _grid, _coupled, _aligned; "
                     "--include-extras scores them against their input's target)")
    lines.append("")
    lines.append(f"{'metric':<16}{'mean':>10}{'std':>10}{'n':>6}  notes")
    for m, st in report["summary"].items():
        label = _LABELS[m] + (f" ({s['lpips_net']})" if m == "lpips" else "")
        notes = []
        if st["n_inf"]:
            notes.append(f"{st['n_inf']} identical pair(s) (inf) left out of mean/std")
        if st["n_nan"]:
            notes.append(f"{st['n_nan']} pair(s) without a value (see notes in the JSON)")
        if "below_0.6" in st and st["count"]:
            notes.append(f"{st['below_0.6']} of {st['count']} below 0.6 (same person)")
        lines.append(f"{label:<16}{st['mean']:>10.4f}{st['std']:>10.4f}{st['count']:>6}  {'; '.join(notes)}")
    for f in report["failures"]:
        lines.append(f"failed: {f['reason'] if f['reason'].startswith(f['name']) else f['name'] + ': ' + f['reason']}")
    for side in ("pred", "target"):
        for rel in report["unmatched"][side]:
            lines.append(f"unmatched {side}: {rel}")
    rt = report.get("runtime")
    if rt:
        lines += ["", f"runtime of the run in {rt['manifest']}: {rt['images']} images, backend {rt['backend']}",
                  f"{'stage':<16}{'mean ms':>10}{'p50 ms':>10}{'p90 ms':>10}"]
        for stage, st in rt["stages_ms"].items():
            lines.append(f"{stage:<16}{st['mean']:>10.1f}{st['p50']:>10.1f}{st['p90']:>10.1f}")
        lines.append(f"throughput: {rt['images_per_s']:.2f} img/s (images / summed per-image ms)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m engine.metrics",
        description="Compare outputs with targets: PSNR, SSIM, MS-SSIM, dlib identity similarity, LPIPS, and the "
                    "runtime of the engine.run that wrote --pred. Files pair by relative path without extension.",
        epilog="Exit codes: 0 ok, 1 some pairs failed (reasons listed), 2 usage error.",
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of outputs (e.g. an engine.run --output)")
    p.add_argument("--target", required=True, metavar="DIR", help="folder of ground-truth images")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the full report as JSON")
    p.add_argument("--size", type=int_at_least(0), default=256, metavar="PX",
                   help="resize both images to PX x PX, bilinear, as the official script (default 256); "
                        "0 compares native sizes")
    p.add_argument("--lpips-net", default="alex", choices=["alex", "vgg", "squeeze"],
                   help="LPIPS backbone (default alex, as official pSp)")
    p.add_argument("--lpips-backbone", metavar="FILE", default=None,
                   help="torchvision ImageNet weights of the LPIPS backbone (e.g. alexnet-owt-7be5be79.pth; default: "
                        "the torch hub cache, $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--include-extras", action="store_true",
                   help="also score engine.run's extra outputs (<name>_mix<k>.png, _grid.jpg, _coupled.jpg, "
                        "_aligned.png) against the target of <name>; by default they are counted and skipped")
    p.add_argument("--no-id", action="store_true", help="skip dlib identity similarity")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name (default `sys.argv[1:]`).

    Returns:
        0 ok, 1 some pairs failed, 2 usage error.
    """
    return run_cli(build_parser(), _run, argv, interrupted="no report written")


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    def progress(items):
        return tqdm(items, unit="pair", file=sys.stderr, dynamic_ncols=True, disable=None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pytorch-msssim's size warnings: sizes are checked first
        report = evaluate(args.pred, args.target, size=args.size, lpips_net=args.lpips_net,
                          identity=not args.no_id, lpips=not args.no_lpips, lpips_backbone=args.lpips_backbone,
                          say=say, progress=progress, include_extras=args.include_extras)
    print(format_report(report), flush=True)
    if args.json:
        text = json.dumps(to_json(report), indent=1, allow_nan=False) + "\n"
        try:
            atomic_write(args.json, lambda f: f.write(text.encode("utf-8")))
        except OSError as e:
            raise OSError(f"cannot write {args.json}: {e}") from None
        say(f"report written to {args.json}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
