"""Face alignment for pSp inputs: dlib HOG detection, 68 landmarks, the FFHQ crop.

Source: the FFHQ alignment of NVlabs/ffhq-dataset `download_ffhq.py::recreate_aligned_images`,
as used by eladrich/pixel2style2pixel `scripts/align_all_parallel.py::align_face` (output 256,
transform 256) and by the FFHQ dataset itself (output 1024, transform 4096). pSp's FFHQ encoders
were trained on crops made this way, so photos should be aligned the same way before encoding.

Where this module departs from the official script, on purpose:
- A photo without a detected face raises `NoFaceError` naming the file (the official
  `get_landmark` fails with `UnboundLocalError: shape`, and `align_all_parallel.py` then skips the
  file without a word).
- Detections need a score of at least `MIN_SCORE` and a box of at least `MIN_FACE_SIZE` px
  (`all_faces` keeps every detection of dlib's default threshold, as the official code sees them).
  Every face that passes is returned, most confident first, or only the largest with
  `largest_face`. The official code keeps the landmarks of the LAST detection, which is neither
  the best nor the largest: on `skimage_astronaut.png` it is a false positive on the mission patch.
- The image is read by `reference.images.read_image` (EXIF orientation applied, alpha over white,
  16-bit scaled) instead of `PIL.Image.open`, and greyscale photos are aligned as RGB.
- `PIL.Image.ANTIALIAS` (removed in Pillow 10) is its alias `Image.LANCZOS`.

The 68-point model is dlib's `shape_predictor_68_face_landmarks.dat`, taken from the
`face-recognition-models` package (no download). It was trained on the iBUG 300-W data set, whose
licence excludes commercial use; see the README.

CLI: `python -m engine.align --input photos/ --output aligned/` (see `main`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli, say
from reference.plumbing.errors import InputImageError, PSPError, UsageError
from reference.images import MAX_PIXELS, atomic_write_image, read_image

from .inputs import find_inputs, plan_jobs

LANDMARKS_MODEL = "shape_predictor_68_face_landmarks.dat"
N_LANDMARKS = 68
# dlib's detector threshold offset: 0 is what `detector(img, upsample)` (the official call) uses;
# lower values add detections, mostly false positives. `all_faces` keeps every detection at it.
DETECTOR_THRESHOLD = 0.0
# The defaults that decide what a face is (dlib HOG scores at upsample 1, measured on the shared photos):
# real faces score 0.65 (restyle_merkel_512) to 3.08, a profile 0.95; the false positive on the
# astronaut's mission patch (skimage_astronaut.png) scores 0.117 with a 90x91 px box, as large as her
# face (1.164, 91x91 px), so the score separates them and the size cannot. 0.4 leaves a margin of
# 0.28 above the patch and 0.25 below the weakest real face.
MIN_SCORE = 0.4
# Smallest face box side kept, px: a smaller face has too few pixels for a 1024 px crop (its FFHQ
# quad is about 2.2x the box, upscaled over 7x) and dlib's landmarks get unreliable. The smallest
# real face of the shared photos is 91 px (the astronaut).
MIN_FACE_SIZE = 64
DEFAULT_UPSAMPLE = 1  # as official pSp's `detector(img, 1)`
CLI_OUTPUT_SIZE = 1024  # px; see build_parser's --output-size help
FFHQ_SUPERSAMPLING = 4  # the FFHQ dataset warps to 4096 px and downsizes to 1024


INSTALL_HINT = "pip install -e '.[align]' (in the psp-engine checkout)"


class AlignmentSetupError(PSPError):
    """A package alignment needs (dlib, the landmark model) is not installed."""


class NoFaceError(InputImageError):
    """The dlib detector found no face in an image."""


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face.

    Attributes:
        box: (left, top, right, bottom) px in image coordinates, dlib's detection rectangle
            (right/bottom inclusive); it can reach a few px past the image edge.
        score: dlib HOG detector confidence (`detector.run` score; > 0 is a detection at the
            default threshold, higher is more confident). Not a probability.
        landmarks: [68, 2] float64, (x, y) px of the iBUG 300-W points (0-16 jaw, 17-26 brows,
            27-35 nose, 36-41 left eye, 42-47 right eye (in image order), 48-67 mouth). Read-only.
    """

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> int:
        """Box area, px^2."""
        left, top, right, bottom = self.box
        return (right - left + 1) * (bottom - top + 1)


# ------------------------------------------------------------------------------------------------
# dlib and its models


def model_path(filename: str = LANDMARKS_MODEL) -> Path:
    """Path of a dlib model file shipped by the `face-recognition-models` package.

    Source: `face_recognition_models/__init__.py` (its `pose_predictor_model_location()` etc.),
    found without importing that `__init__`, which needs `pkg_resources` (setuptools < 81).

    Args:
        filename: file under the package's `models/` folder, e.g.
            "shape_predictor_68_face_landmarks.dat".

    Returns:
        The existing file's path.

    Raises:
        AlignmentSetupError: the package or the file is missing (names the pip package).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder, "models", filename)
        if path.is_file():
            return path
    where = f"not in {locations[0]}/models" if locations else "the package is not installed"
    raise AlignmentSetupError(
        f"{filename}: dlib model file not found ({where}); face alignment needs the face-recognition-models "
        f"package: {INSTALL_HINT}"
    )


def _dlib():
    try:
        import dlib
    except ImportError:
        raise AlignmentSetupError(f"face alignment needs dlib, which is not installed: {INSTALL_HINT}") from None
    return dlib


def check_setup() -> None:
    """Check that alignment can run (dlib imports, the landmark model is installed), before any slow work.

    Raises:
        AlignmentSetupError: naming what is missing and `pip install -e '.[align]'`.
    """
    _dlib()
    model_path(LANDMARKS_MODEL)


@functools.lru_cache(maxsize=None)
def _detector():
    return _dlib().get_frontal_face_detector()


@functools.lru_cache(maxsize=None)
def _predictor():
    return _dlib().shape_predictor(str(model_path(LANDMARKS_MODEL)))


# ------------------------------------------------------------------------------------------------
# Detection


def detect_faces(image: Image.Image, name: str = "image", upsample: int = 1) -> list[Face]:
    """Find every face with dlib's HOG detector and its 68 landmarks.

    Source: official pSp `scripts/align_all_parallel.py::get_landmark` (`detector(img, 1)`,
    `predictor(img, d)`), keeping every detection with its score instead of the last one.

    Args:
        image: PIL image, any mode (converted to RGB), e.g. from `reference.images.read_image`.
        name: file name for error messages.
        upsample: times the image is doubled before detecting (1 as pSp: finds faces down to
            about 40 px; 0 is 4x faster and misses faces under about 80 px). >= 0.

    Returns:
        Faces sorted by detector score, most confident first (ties: larger box first); empty
        when there is none.

    Raises:
        ValueError: upsample < 0.
        AlignmentSetupError: dlib or the landmark model is missing.
    """
    if upsample < 0:
        raise ValueError(f"upsample must be >= 0, got {upsample}")
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))  # [H, W, 3] uint8
    predictor = _predictor()
    rects, scores, _ = _detector().run(rgb, upsample, DETECTOR_THRESHOLD)
    faces = []
    for rect, score in zip(rects, scores):
        shape = predictor(rgb, rect)
        lm = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)  # [68, 2]
        lm.setflags(write=False)
        faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), float(score), lm))
    faces.sort(key=lambda f: (-f.score, -f.area))
    return faces


# ------------------------------------------------------------------------------------------------
# Alignment


def face_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ crop square of a face: centred below the eyes, rotated with the eye line.

    Source: NVlabs/ffhq-dataset `download_ffhq.py::recreate_aligned_images` ("Choose oriented
    crop rectangle"): eye and mouth centres from the 68 points, side = max(4 x eye distance,
    3.6 x eye-to-mouth distance), centre = eye midpoint + 0.1 x eye-to-mouth vector.

    Args:
        landmarks: [68, 2] float, (x, y) px.

    Returns:
        quad [4, 2] float64 corners (top-left, bottom-left, bottom-right, top-right) px, and its
        side qsize, px.

    Raises:
        ValueError: landmarks not [68, 2] finite, or collapsed (eyes and mouth at one point).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (N_LANDMARKS, 2) or not np.isfinite(lm).all():
        raise ValueError(f"landmarks must be a finite [68, 2] array of (x, y) px, got shape {lm.shape}")
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5  # outer mouth corners
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]  # eye line blended with the normal of eye-to-mouth
    norm = np.hypot(*x)
    half = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    if norm < 1e-6 or half < 1.0:
        raise ValueError("landmarks are degenerate: the eyes and mouth are (almost) at one point")
    x *= half / norm
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def align_face(image: Image.Image, landmarks: np.ndarray, output_size: int = 256,
               transform_size: int | None = None, enable_padding: bool = True) -> Image.Image:
    """Crop, rotate and scale one face to the FFHQ layout.

    Source: NVlabs/ffhq-dataset `download_ffhq.py::recreate_aligned_images`, as in official pSp
    `scripts/align_all_parallel.py::align_face`: oriented quad (`face_quad`), shrink the photo
    by an integer factor when the quad is over 4x the transform size, crop to the quad plus a
    10% border, reflect-pad where the quad leaves the photo (blurred towards the edge, then
    blended to the median colour), warp the quad to a square (`Image.QUAD`, bilinear), and
    downsize with Lanczos when `output_size < transform_size`.

    Args:
        image: the photo the landmarks were found on, any mode (converted to RGB).
        landmarks: [68, 2] float, (x, y) px (`Face.landmarks`).
        output_size: side of the result, px (pSp: 256; FFHQ: 1024). >= 1.
        transform_size: side of the warp before the final resize, px, >= output_size; None
            means output_size (pSp). FFHQ uses 4096 for 1024: the bilinear warp does not
            filter, so warping 4x larger then downsizing avoids aliasing on large photos.
        enable_padding: fill the part of the quad outside the photo by reflection and blur
            (FFHQ and pSp do); False leaves it black.

    Returns:
        RGB PIL image, output_size x output_size.

    Raises:
        ValueError: bad landmarks (see `face_quad`), output_size < 1 or transform_size <
            output_size.
    """
    transform_size = output_size if transform_size is None else transform_size
    if output_size < 1 or transform_size < output_size:
        raise ValueError(f"need 1 <= output_size <= transform_size, got {output_size} and {transform_size}")
    quad, qsize = face_quad(landmarks)
    img = image.convert("RGB")

    # Shrink: integer downscale when the quad is more than 4x the output size.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        size = (int(np.rint(img.size[0] / shrink)), int(np.rint(img.size[1] / shrink)))
        img = img.resize(size, Image.LANCZOS)
        quad /= shrink
        qsize /= shrink

    # Crop to the quad's bounding box plus a border.
    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top = np.floor(quad.min(axis=0)).astype(int)
    right, bottom = np.ceil(quad.max(axis=0)).astype(int)
    crop = (max(left - border, 0), max(top - border, 0), min(right + border, img.size[0]),
            min(bottom + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[:2]

    # Pad by reflection where the quad (plus border) leaves the photo.
    left, top = np.floor(quad.min(axis=0)).astype(int)
    right, bottom = np.ceil(quad.max(axis=0)).astype(int)
    pad = (max(-left + border, 0), max(-top + border, 0), max(right - img.size[0] + border, 0),
           max(bottom - img.size[1] + border, 0))
    if enable_padding and max(pad) > border - 4:
        img, quad = _reflect_pad(img, quad, qsize, pad)

    # Warp the quad to a square, then downsize.
    img = img.transform((transform_size, transform_size), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.LANCZOS)
    return img


def _reflect_pad(img: Image.Image, quad: np.ndarray, qsize: float, pad: Sequence[int]) -> tuple[Image.Image, np.ndarray]:
    """FFHQ's padding: reflect by at least 0.3 qsize, blur and fade to the median towards the edges."""
    from scipy.ndimage import gaussian_filter

    left, top, right, bottom = np.maximum(pad, int(np.rint(qsize * 0.3)))
    a = np.pad(np.asarray(img, dtype=np.float32), ((top, bottom), (left, right), (0, 0)), "reflect")  # [H, W, 3]
    h, w, _ = a.shape
    yy, xx, _ = np.ogrid[:h, :w, :1]
    # 0 inside the photo, rising to 1 at the outer edge of the padding.
    mask = np.maximum(1.0 - np.minimum(np.float32(xx) / left, np.float32(w - 1 - xx) / right),
                      1.0 - np.minimum(np.float32(yy) / top, np.float32(h - 1 - yy) / bottom))
    blur = qsize * 0.02
    a += (gaussian_filter(a, [blur, blur, 0]) - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
    padded = Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
    return padded, quad + (left, top)


def is_face(face: Face) -> bool:
    """Whether a detection counts as a face by default: score >= `MIN_SCORE` and both box sides >=
    `MIN_FACE_SIZE` px (see their comments for the measurements behind them)."""
    left, top, right, bottom = face.box
    return face.score >= MIN_SCORE and min(right - left + 1, bottom - top + 1) >= MIN_FACE_SIZE


def align_image(image: Image.Image, name: str = "image", largest_face: bool = False, output_size: int = 256,
                transform_size: int | None = None, upsample: int = 1,
                all_faces: bool = False) -> list[tuple[Face, Image.Image]]:
    """Detect the faces of a photo and align each one (`detect_faces`, `is_face`, then `align_face`).

    Source: official pSp `scripts/align_all_parallel.py::align_face` (which aligns only the last
    detection and fails on a photo without a face).

    Args:
        image: PIL image, any mode, e.g. from `reference.images.read_image`.
        name: file name for error messages.
        largest_face: align only the face with the largest detection box (ties: the more
            confident one), e.g. the subject of a portrait with people in the background.
        output_size, transform_size: as `align_face`.
        upsample: as `detect_faces`.
        all_faces: keep every detection (dlib's default threshold) instead of those `is_face` accepts.

    Returns:
        (face, aligned RGB image output_size x output_size) per face, most confident first; one
        item with largest_face.

    Raises:
        NoFaceError: no face detected ("<name>: no face found ...").
        ValueError: bad sizes or upsample.
        AlignmentSetupError: dlib or the landmark model is missing.
    """
    transform_size = output_size if transform_size is None else transform_size
    if output_size < 1 or transform_size < output_size:  # checked before the (slow) detection
        raise ValueError(f"need 1 <= output_size <= transform_size, got {output_size} and {transform_size}")
    detections = detect_faces(image, name=name, upsample=upsample)
    faces = detections if all_faces else [f for f in detections if is_face(f)]
    if not faces:
        weak = len(detections)
        left_out = (f"; {weak} weaker or smaller detection(s) left out (score < {MIN_SCORE} or box < {MIN_FACE_SIZE} px), "
                    "--all-faces keeps them" if weak else "")
        raise NoFaceError(
            f"{name}: no face found (dlib HOG detector at upsample {upsample}, which finds frontal and three-quarter "
            f"faces of at least ~{80 >> min(upsample, 3)} px{left_out}); for smaller faces try --upsample {upsample + 1}"
        )
    if largest_face:
        faces = [max(faces, key=lambda f: f.area)]  # max keeps the first (most confident) of equal areas
    out = []
    for face in faces:
        try:
            out.append((face, align_face(image, face.landmarks, output_size, transform_size)))
        except ValueError as e:  # degenerate landmarks: not a usable face
            raise InputImageError(f"{name}: face at {face.box} cannot be aligned: {e}") from None
    return out


# ------------------------------------------------------------------------------------------------
# CLI


def output_paths(out_dir: Path, base, n_faces: int) -> list[Path]:
    """Output files of one input: `<base>.png` for one face, `<base>_face<i>.png` for several.

    Args:
        out_dir: output folder.
        base: the job's output base (`engine.batch.Job.base`), relative, without extension.
        n_faces: number of aligned faces, >= 1.

    Returns:
        One path per face, most confident first.
    """
    stem = out_dir / Path(base)
    if n_faces == 1:
        return [stem.with_name(stem.name + ".png")]
    return [stem.with_name(f"{stem.name}_face{i}.png") for i in range(n_faces)]


def _done(out_dir: Path, base) -> bool:
    """An input is done when `<base>.png` or `<base>_face0.png` exists (face0 is written last)."""
    stem = out_dir / Path(base)
    return any(stem.with_name(stem.name + suffix).is_file() for suffix in (".png", "_face0.png"))


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m engine.align",
        description="Detect faces (dlib HOG, 68 landmarks) and crop each one the FFHQ way, as pSp's "
                    "FFHQ encoders expect. Writes <name>.png for a photo with one face, <name>_face0.png, "
                    "<name>_face1.png, ... (most confident first) for several; output folders mirror the "
                    "inputs'. A rerun skips inputs whose outputs exist.",
        epilog="Exit codes: 0 all ok or skipped, 1 some inputs failed (no face, unreadable; reasons on "
               "stderr), 2 usage error, 130 interrupted (rerun to resume). The 68-point landmark model was trained "
               "on iBUG 300-W, which is licensed for non-commercial use only.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) or glob patterns (quote them)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (created if missing)")
    add_face_arguments(p)
    p.add_argument("--output-size", type=int_at_least(1), default=CLI_OUTPUT_SIZE, metavar="N",
                   help=f"side of the aligned crops, px (default {CLI_OUTPUT_SIZE}: the FFHQ crop, the images "
                        "pSp's FFHQ encoders were trained on (they are resized to 256 when encoded) and the "
                        "size users keep for other tools; pSp's own align script uses 256)")
    p.add_argument("--transform-size", type=int_at_least(1), default=None, metavar="N",
                   help=f"side of the bilinear warp before the Lanczos resize to --output-size, px, >= "
                        f"--output-size (default {FFHQ_SUPERSAMPLING}x --output-size as the FFHQ dataset, "
                        "which avoids aliasing on large photos; pSp's script uses --output-size, faster)")
    p.add_argument("--max-pixels", type=int_at_least(1), default=MAX_PIXELS, metavar="N",
                   help=f"reject images with more pixels than this, before decoding (default {MAX_PIXELS:,})")
    return p


def upsample(args: argparse.Namespace) -> int:
    """`--upsample`, or its default `DEFAULT_UPSAMPLE` when not given."""
    return DEFAULT_UPSAMPLE if args.upsample is None else args.upsample


def add_face_arguments(p) -> None:
    """`--largest-face`, `--all-faces` and `--upsample N`: which detections are aligned, as engine.align and
    engine.run --align take them (`p` a parser or an argument group)."""
    p.add_argument("--largest-face", action="store_true",
                   help="only the face with the largest box of each photo (default: every face)")
    p.add_argument("--all-faces", action="store_true",
                   help=f"keep every detection of dlib's detector (default: those scoring at least {MIN_SCORE} "
                        f"with a box of at least {MIN_FACE_SIZE} px, which leaves out false positives such as "
                        "a badge or a patch)")
    p.add_argument("--upsample", type=int_at_least(0), default=None, metavar="N",
                   help=f"times the photo is doubled before detection (default {DEFAULT_UPSAMPLE} as pSp: faces down to "
                        "~40 px; each step costs ~4x time and memory)")


def main(argv: list[str] | None = None) -> int:
    """Run the alignment CLI.

    A photo without a face is "failed" (exit 1), here and in `engine.run --align` (`NoFaceError` is an
    `InputImageError`): the user asked for an output that was not made, so a script checking the exit
    code must learn of it, as for an unreadable file; the reason names the way out (`--upsample`,
    `--all-faces`), and a rerun tries the photo again.

    Args:
        argv: arguments without the program name (default `sys.argv[1:]`).

    Returns:
        The exit code: 0 all ok or skipped, 1 some inputs failed (no face included), 2 usage error.
    """
    return run_cli(build_parser(), _run, argv, interrupted="finished inputs are kept; rerun the same command to resume")


def _run(args: argparse.Namespace) -> int:
    transform_size = args.transform_size or args.output_size * FFHQ_SUPERSAMPLING
    if transform_size < args.output_size:
        raise UsageError(f"--transform-size {transform_size} is smaller than --output-size {args.output_size}")
    max_pixels = args.max_pixels

    out_dir = Path(args.output)
    jobs = plan_jobs(find_inputs(args.input, exclude=out_dir))
    check_setup()
    ok = failed = skipped = n_faces = 0
    for job in jobs:
        if _done(out_dir, job.base):
            skipped += 1
            continue
        try:
            image = read_image(job.source, max_pixels=max_pixels)
            aligned = align_image(image, name=str(job.source), largest_face=args.largest_face,
                                  output_size=args.output_size, transform_size=transform_size,
                                  upsample=upsample(args), all_faces=args.all_faces)
            paths = output_paths(out_dir, job.base, len(aligned))
            # Last to first: <base>_face0.png, the resume marker, appears only when all are written.
            for path, (_, crop) in reversed(list(zip(paths, aligned))):
                atomic_write_image(path, np.asarray(crop))
        except PSPError as e:
            say(f"failed: {e}")
            failed += 1
        except OSError as e:
            say(f"failed: {job.source}: cannot write the output ({type(e).__name__}: {e})")
            failed += 1
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the run; reported
            say(f"failed: {job.source}: unexpected {type(e).__name__}: {e}")
            failed += 1
        else:
            ok += 1
            n_faces += len(aligned)
    say(f"{ok} ok ({n_faces} faces), {failed} failed, {skipped} skipped; aligned crops in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
