"""File digests: the sha256 of a file's bytes, remembered per file version, and the records that
let a cached artifact be checked before it is used.

A digest costs a read of the whole file (sha256 runs at ~0.8 GB/s on this project's 2-core CI
machine: 1.5 s for the 1.2 GB demo checkpoint when its pages are cached). It is remembered in
`<cache>/digests.json` (`reference.plumbing.files.cache_dir()`), keyed by the file's device, inode, size,
mtime_ns and ctime_ns, so a process pays it only when the file changed since some process last
hashed it: any write to a file changes its ctime, which no user call can set back (`os.utime`
sets mtime and atime only), and a file replaced by another (rename, copy) is another inode or
another ctime. The memory is an optimisation only: it is written atomically
(`reference.plumbing.files.write_json`), bounded (`MAX_REMEMBERED` entries, `MAX_MEMO_BYTES` read), and a
missing, unreadable or unwritable one (a read-only cache) only means hashing again.

Records: `{"<file name>": {"size": bytes, "sha256": hex}}` for an artifact and its companion
files (an ONNX graph and its `.onnx.data`), written in the artifact's sidecar
(`reference.description.write_sidecar`) and checked by `verify_records`.

Source: `hashlib.sha256` (FIPS 180-4); `os.stat` fields (POSIX `stat(2)`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

from .files import cache_dir, write_json

MEMO_NAME = "digests.json"  # in the cache folder
MAX_REMEMBERED = 256  # digests kept in the memo (the oldest go first)
MAX_MEMO_BYTES = 1 << 20  # a larger memo file is not read (256 entries take ~50 KiB)
BLOCK = 8 << 20  # bytes read at a time

_memory: dict[str, str] = {}  # this process's digests by version key (never stale: the key is the version)


def _version(st: os.stat_result) -> str:
    """The key of one version of a file: device, inode, size, mtime_ns, ctime_ns."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def memo_path() -> Path:
    """Where digests are remembered: `cache_dir()/digests.json`."""
    return cache_dir() / MEMO_NAME


def _read_memo(path: Path) -> dict[str, dict]:
    try:
        if path.stat().st_size > MAX_MEMO_BYTES:
            return {}
        memo = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _remember(key: str, digest: str) -> None:
    """Add a digest to the memo file (read, add, keep the newest `MAX_REMEMBERED`, write atomically);
    a memo that cannot be written (read-only cache) is left as it is."""
    path = memo_path()
    memo = _read_memo(path)
    memo[key] = {"sha256": digest, "time": time.time()}
    entries = [(k, v) for k, v in memo.items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)]
    entries.sort(key=lambda kv: kv[1].get("time", 0) if isinstance(kv[1].get("time"), (int, float)) else 0)
    try:
        write_json(path, dict(entries[-MAX_REMEMBERED:]))
    except OSError:
        pass  # only a cost: the next process hashes the file again


def file_sha256(path: str | os.PathLike, remember: bool = True) -> str:
    """The sha256 of a file's bytes, read from memory when this version of the file was hashed before.

    Args:
        path: the file.
        remember: look the digest up in, and add it to, the memo file (`memo_path()`); this process
            remembers it in memory either way.

    Returns:
        64 lower-case hex digits.

    Raises:
        OSError: the file cannot be read.
    """
    import hashlib

    path = Path(path)
    key = _version(path.stat())
    if key in _memory:
        return _memory[key]
    if remember:
        known = _read_memo(memo_path()).get(key)
        if isinstance(known, dict) and isinstance(known.get("sha256"), str):
            _memory[key] = known["sha256"]
            return known["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        before = _version(os.fstat(f.fileno()))
        while block := f.read(BLOCK):
            h.update(block)
        after = _version(os.fstat(f.fileno()))
    digest = h.hexdigest()
    if before == after == key:  # not written while it was read
        _memory[key] = digest
        if remember:
            _remember(key, digest)
    return digest


def file_records(paths: Iterable[str | os.PathLike]) -> dict[str, dict]:
    """`{name: {"size": bytes, "sha256": hex}}` of the files that exist among `paths` (the digests
    remembered: a file recorded right after it was written is not hashed again at first use)."""
    records = {}
    for p in map(Path, paths):
        if p.is_file():
            records[p.name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return records


def verify_records(folder: str | os.PathLike, records: Mapping[str, object]) -> list[str]:
    """What is wrong with the files `records` describes (`file_records`), in `folder`.

    Sizes are compared first (a truncated file costs no read), then digests.

    Returns:
        One short phrase per bad file ("m.onnx.data: 1000 bytes, recorded 2000"); empty when every
        file matches. Malformed records count as bad.
    """
    folder = Path(folder)
    problems = []
    for name, rec in records.items():
        p = folder / name
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str)
                and Path(name).name == name):
            problems.append(f"{name}: malformed record")
            continue
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != rec["size"]:
            problems.append(f"{name}: {size} bytes, recorded {rec['size']}")
        elif file_sha256(p) != rec["sha256"]:
            problems.append(f"{name}: contents differ from the recorded sha256 (same size)")
    return problems


def checkpoint_identity(path: str | os.PathLike) -> dict:
    """The one identity of a checkpoint file: what the run manifest fingerprints
    (`engine.manifest`) and what the ONNX graph cache keys on (`export.backends.graph.cache_paths`).

    The digest of the contents, so a file replaced by another of the same size and mtime is
    another checkpoint, and a file only touched or copied is the same one. It costs one read of
    the file per version (`file_sha256`; remembered, so later runs pay a stat).

    Args:
        path: the checkpoint file (must exist).

    Returns:
        `{"path": resolved str, "size": int, "sha256": hex}`.

    Raises:
        OSError: the file cannot be read.
    """
    p = Path(path).resolve()
    return {"path": str(p), "size": p.stat().st_size, "sha256": file_sha256(p)}
