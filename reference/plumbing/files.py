"""Files: the one atomic writer, the one folder scanner, the engine's cache folder.

Every floor writes through `atomic_write` (checkpoints, images, latents, ONNX graphs, TensorRT
plans, sidecars, manifests): a file appears complete under its final name or not at all.
Temp files are named `.<stem>.<random>.psp-tmp` in the destination's folder, never longer than the
file system's name limit, so `sweep_temp_files` can remove what a killed process left behind.

Source: POSIX `rename(2)` atomicity (`os.replace`); `tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .errors import PSPError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock falls back to the holder's pid
    fcntl = None

LOCK_NAME = ".psp-engine.lock"  # the advisory lock of a folder a run writes into (see `folder_lock`)
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
    name = os.fsencode(path.name)[:room]  # bytes as the file system sees them (undecodable names included)
    while name:  # do not cut a UTF-8 sequence in two
        try:
            name.decode("utf-8")
            break
        except UnicodeDecodeError as e:
            if e.start < len(name) - 3:  # not a cut at the end: the name is not UTF-8; keep its bytes
                break
            name = name[:e.start]
    return path.with_name(f".{os.fsdecode(name)}{tail}")


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


@contextlib.contextmanager
def atomic_files(path: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside `path` for a writer that makes `path` plus companion files named after it
    (an ONNX graph and its external data `<name>.data`): what the block writes in the folder is moved
    beside `path` when the block ends without an error, `path` itself last, each file by an atomic
    rename; on an error the folder and all in it are removed. Readers that look for `path` therefore
    see its companions complete.

    Yields:
        The temp folder (`temp_path(path)`, created); write `<folder>/<path.name>` and companions there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        written = sorted(tmp.iterdir(), key=lambda f: f.name == path.name)  # `path` last
        for f in written:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Remove the temp files and folders (`.*.psp-tmp`) that killed processes left in `folder`.

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
    if recursive:
        walker = os.walk(folder)
    else:
        names = os.listdir(folder)
        dirs = [n for n in names if (folder / n).is_dir()]
        walker = [(str(folder), dirs, [n for n in names if n not in dirs])]
    for dirpath, dirnames, filenames in walker:
        for f in filenames + dirnames:
            if f.startswith(".") and f.endswith(TEMP_SUFFIX):
                p = Path(dirpath, f)
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime >= older_than_s:
                        if p.is_dir() and not p.is_symlink():  # an `atomic_files` folder
                            shutil.rmtree(p)
                        else:
                            p.unlink()
                        removed.append(p)
        dirnames[:] = [d for d in dirnames if not (d.startswith(".") and d.endswith(TEMP_SUFFIX))]
    return removed


class FolderBusyError(PSPError):
    """Another live process holds the folder's lock (`folder_lock`)."""


def _read_holder(path: Path) -> dict:
    """The `{"pid", "host", "started"}` a lock file records ({} when unreadable or empty)."""
    try:
        holder = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: object) -> bool:
    """Whether process `pid` exists on this host (a pid we may not signal exists)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(folder: Path, holder: dict) -> FolderBusyError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    return FolderBusyError(f"{folder} is in use by another psp-engine run ({who}); wait for it to finish, or "
                           "write into another folder")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the advisory lock of `folder` (created if missing) for the block: one writer per folder.

    The lock is `fcntl.flock` on `folder/.psp-engine.lock`, which records the holder's pid, host and
    start time (JSON). The kernel drops a flock when its holder dies (SIGKILL included), so a lock
    file left by a dead process is taken over; where flock is not available (Windows, some network
    file systems) a lock file whose pid is dead on this host counts as stale. The file is removed
    on release.

    Yields:
        The lock file's `Path`.

    Raises:
        FolderBusyError: a live process holds the lock (the message names its pid, host and start).
        OSError: the folder cannot be created or the lock file written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(folder, _read_holder(path)) from None
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            holder = _read_holder(path)  # no flock here: the recorded pid decides
            if holder.get("host") == me["host"] and holder.get("pid") != me["pid"] and _pid_alive(holder.get("pid")):
                os.close(fd)
                raise _busy(folder, holder) from None
        try:  # a holder that just released may have unlinked the file we locked: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


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
