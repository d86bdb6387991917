"""Inputs of a batch run: `--input` expansion, output names (one `Job` per input), collisions.

Naming rule: each input's path relative to the deepest folder holding all inputs is mirrored
under the output folder, with the extension replaced (`<rel>/<stem>.png`, ...). Inputs whose
`<rel>/<stem>` would collide (`x.jpg` and `x.png` in one folder, compared case-insensitively) keep
their whole name instead: `<rel>/x.jpg.png`, `<rel>/x.png.png`; so does an input whose stem is
empty or only dots (`..jpg` -> `..jpg.png`), which would otherwise name a folder. The root depends
on the set of inputs, so rerun with the same `--input` arguments to resume. See `engine.batch` for
the outputs.

Safety rule: the output folder never overlaps the inputs harmfully. An input folder that is the
output folder or inside it is refused; an output folder inside an input folder is not searched
(real paths, symlinks resolved); every output path must lie inside the output folder (real path)
and must not be an input file (`engine.batch.check_output_names`, before the model loads, and again before each
write).
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from reference.plumbing.errors import UsageError
from reference.plumbing.files import IMAGE_EXTENSIONS, is_under, scan_folder



def find_inputs(specs: Sequence[str], exclude: str | os.PathLike | None = None) -> list[Path]:
    """Expand `--input` arguments into image files.

    Args:
        specs: files (taken whatever their extension), folders (searched recursively for
            `IMAGE_EXTENSIONS`, case-insensitive; hidden files and folders skipped), or glob
            patterns (`**` recursive; matched folders are searched, matched files filtered by
            extension).
        exclude: a folder never searched (the output folder, so outputs are not re-read as inputs);
            compared by real path.

    Returns:
        Files in argument order (sorted within a folder or pattern), each once.

    Raises:
        UsageError: an argument that is not a file or folder and matches nothing; a folder
            argument that is `exclude` or inside it (outputs would mix with the inputs); no image
            found at all.
    """
    skip = exclude
    found: dict[str, Path] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            if is_under(p, skip):
                where = "is" if os.path.realpath(p) == os.path.realpath(skip) else "is inside"
                raise UsageError(f"--input {spec} {where} the --output folder {exclude}: the outputs would be written "
                                 "among (and over) the inputs; choose an --output folder outside the inputs")
            matches = scan_folder(p, skip)
        elif p.is_file():
            matches = [p]
        elif glob.has_magic(spec):
            hits = sorted(glob.glob(spec, recursive=True))
            if not hits:
                raise UsageError(f"--input {spec}: the pattern matches no file")
            matches = []
            for h in map(Path, hits):
                if h.is_dir():
                    matches += scan_folder(h, skip)
                elif h.suffix.lower() in IMAGE_EXTENSIONS and not is_under(h, skip):
                    matches.append(h)
        else:
            raise UsageError(f"--input {spec}: no such file or folder")
        for m in matches:
            found.setdefault(os.path.abspath(m), m)
    if not found:
        raise UsageError(
            f"no image found in --input {' '.join(specs)} (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return list(found.values())


@dataclass(frozen=True)
class Job:
    """One input file and the base of its output names.

    Attributes:
        source: the input file as found: a local `Path`, or with `--ray` an
            `engine.cluster.remote.RemoteFile` (a file behind a URI; `str` gives its URI).
        base: output path relative to the output folder, without extension (POSIX).
    """

    source: Path
    base: PurePosixPath

    def outputs(self, out_dir: Path, save_latents: bool, couple_outputs: bool, n_outputs: int = 0,
                save_aligned: bool = False) -> dict[str, Path]:
        """Output files of this job: "image" (.png), optional "latent" (.npy) and "coupled" (.jpg);
        with `n_outputs` K > 0 also "mix<k>" (.png) and, with latents, "mix<k>_latent" (.npy) for
        k < K, and "grid" (.jpg); with `save_aligned` "aligned" (.png, the aligned crop).

        Raises:
            ValueError: a base that is absolute, empty, or has a `.`/`..` component (it would name
                a file outside `out_dir`; `plan_jobs` never makes one).
        """
        if self.base.is_absolute() or not self.base.name or any(part in (".", "..") for part in self.base.parts):
            raise ValueError(f"{self.source}: output base {str(self.base)!r} would leave the output folder")
        stem = out_dir / Path(self.base)
        paths = {"image": stem.with_name(stem.name + ".png")}
        if save_aligned:
            paths["aligned"] = stem.with_name(stem.name + "_aligned.png")
        if save_latents:
            paths["latent"] = stem.with_name(stem.name + ".npy")
        if couple_outputs:
            paths["coupled"] = stem.with_name(stem.name + "_coupled.jpg")
        for k in range(n_outputs):
            paths[f"mix{k}"] = stem.with_name(f"{stem.name}_mix{k}.png")
            if save_latents:
                paths[f"mix{k}_latent"] = stem.with_name(f"{stem.name}_mix{k}.npy")
        if n_outputs:
            paths["grid"] = stem.with_name(stem.name + "_grid.jpg")
        return paths

    def face(self, i: int) -> "Job":
        """The job of face `i` of a photo with several faces: base `<base>_face<i>`."""
        return Job(self.source, PurePosixPath(f"{self.base}_face{i}"))


def file_ids(paths: Sequence[str | os.PathLike]) -> dict[tuple[int, int], str]:
    """`{(st_dev, st_ino): path}` of the files that exist (the identity `os.path.samefile` compares);
    anything that is not a local path (an `engine.cluster.remote.RemoteFile`) has none and is passed over."""
    ids = {}
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            continue
        with contextlib.suppress(OSError):
            st = os.stat(p)
            ids.setdefault((st.st_dev, st.st_ino), str(p))
    return ids


def unsafe_output(path: Path, out_dir: Path, inputs: dict[tuple[int, int], str]) -> str | None:
    """Why writing `path` would be harmful, or None: it lies outside `out_dir` (real paths, so a
    symlinked subfolder pointing elsewhere counts as outside), or it is one of the `inputs`
    (`file_ids` of the input files)."""
    if not is_under(path, out_dir) or os.path.realpath(path) == os.path.realpath(out_dir):
        return f"{path} is outside the --output folder {out_dir}"
    try:
        st = os.stat(path)
    except OSError:
        return None
    source = inputs.get((st.st_dev, st.st_ino))
    return f"{path} is the input {source}: it would be overwritten" if source is not None else None


def plan_jobs(files: Sequence[Path]) -> list[Job]:
    """Give each input file a collision-free output base (rule in the module docstring).

    Args:
        files: input files (relative or absolute).

    Returns:
        One `Job` per file, in order.
    """
    absolute = [Path(os.path.abspath(f)) for f in files]
    root = Path(os.path.commonpath([str(f.parent) for f in absolute])) if absolute else Path()
    rel = [PurePosixPath(f.relative_to(root).as_posix()) for f in absolute]
    stems = [r.with_suffix("") if r.suffix and r.stem.strip(".") else r for r in rel]
    counts = Counter(str(s).casefold() for s in stems)
    return [Job(f, s if counts[str(s).casefold()] == 1 else r) for f, s, r in zip(files, stems, rel)]


