"""Files: the one atomic writer, the one folder scanner, the engine's cache folder.

Every floor writes through `atomic_write` (checkpoints, images, latents, ONNX graphs, TensorRT
plans, sidecars, manifests): a file appears complete under its final name or not at all.
Temp files are named `.<stem>.<random>.psp-tmp` in the destination's folder, never longer than the
file system's name limit, so `sweep_temp_files` can remove what a killed process left behind.

Source: POSIX `rename(2)` atomicity (`os.replace`); `tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

TEMP_SUFFIX = ".psp-tmp"  # every temp file of this project ends so (see `sweep_temp_files`)
NAME_MAX = 255  # bytes: the file-name limit of ext4, xfs, btrfs, tmpfs, APFS, NTFS
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff",
                              ".webp", ".gif"})


def cache_dir() -> Path:
    """The engine's cache folder: `$PSP_ENGINE_CACHE` if set and non-empty, else `~/.cache/psp-engine`."""
    env = os.environ.get("PSP_ENGINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "psp-engine"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temp name beside `path`: `.<name, cut to fit>.<8 hex>.psp-tmp`, at most `NAME_MAX` bytes."""
    path = Path(path)
    tail = f".{secrets.token_hex(4)}{TEMP_SUFFIX}"
    room = NAME_MAX - 1 - len(tail.encode())
    name = path.name.encode()[:room].decode("utf-8", "ignore")
    return path.with_name(f".{name}{tail}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` to write by name (for writers that take a file name, such as
    `torch.onnx.export`); renamed over `path` when the block ends without an error, removed otherwise.

    Yields:
        The temp `Path` (`temp_path(path)`; not created yet). Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file so that it either appears complete or not at all.

    `write(f)` fills a temp file in the same folder (`temp_path`), which is flushed, fsynced and
    renamed over `path` (`os.replace`, atomic on POSIX and Windows). On any error (Ctrl-C included)
    the temp file is removed and `path` is untouched. Parent folders are created. The file gets the
    usual 0666 & ~umask mode.

    Args:
        path: destination file.
        write: callable writing the content to a binary file object.

    Returns:
        The destination `Path`.

    Raises:
        OSError: the folder cannot be created or written.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "inf" / "nan": strict JSON has no such numbers
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write strict JSON (indented; non-finite floats as the strings "inf"/"nan") atomically."""
    return atomic_write_bytes(path, json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """`atomic_write` of bytes (str is written as UTF-8)."""
    blob = data.encode() if isinstance(data, str) else bytes(data)
    return atomic_write(path, lambda f: f.write(blob))


def atomic_copy(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a file atomically (for large files: streamed, 16 MiB at a time)."""
    import shutil

    def write(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 16 << 20)

    return atomic_write(dest, write)


def sweep_temp_files(folder: str | os.PathLike, older_than_s: float = 0.0, recursive: bool = True) -> list[Path]:
    """Remove the temp files (`*.psp-tmp`) that killed processes left in `folder`.

    Only names this project makes are touched. A temp file younger than `older_than_s` seconds may
    belong to a process still writing and is kept.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for dirpath, _, filenames in walker:
        for f in filenames:
            if f.startswith(".") and f.endswith(TEMP_SUFFIX):
                p = Path(dirpath, f)
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime >= older_than_s:
                        p.unlink()
                        removed.append(p)
    return removed


def is_under(path: str | os.PathLike, folder: str | os.PathLike | None) -> bool:
    """Whether `path` is `folder` or inside it, comparing real paths (symlinks resolved)."""
    if folder is None:
        return False
    a, b = os.path.realpath(path), os.path.realpath(folder)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def scan_folder(folder: str | os.PathLike, skip: str | os.PathLike | None = None,
                extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Files under `folder`, recursively, whose extension is in `extensions` (lower case, compared
    case-insensitively; default the image files), hidden files and folders skipped, sorted within
    each folder; `skip` a folder never entered (compared by real path, so a symlink into it is
    recognised)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        if skip is not None and is_under(dirpath, skip):
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not is_under(Path(dirpath, d), skip))
        files += [Path(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in extensions]
    return files
