"""The run manifest: `manifest.jsonl` in the output folder, one JSON record per input per run.

Format (one object per line, UTF-8, keys sorted):
    input           absolute path of the input file (the key a rerun matches on)
    input_size      bytes, and `input_mtime_ns`: the input's stat when it was processed
    status          "ok" | "failed" | "skipped"
    outputs         paths of the files written, relative to the output folder (POSIX "/")
    error           one-line reason for "failed", else null
    timings_ms      {"read", "encode", "synthesize", "write"} in ms for this input; encode and
                    synthesize are the batch's time divided by the images in it
    fingerprint     hex digest of `config` (see `fingerprint`)
    config          what the fingerprint hashes: checkpoint identity, backend, output options
    time            UTC time the record was written, ISO 8601

Records are appended while a run goes: each is one `write()` of a whole line on a file opened
with O_APPEND, then flush + fsync, so a crash loses at most the line being written, and a torn
last line is ignored on reading. Opening the manifest for a run compacts it first (rewritten
atomically, in file order): per input only its latest record that is not "skipped" and a later
"skipped" one with a reason (e.g. no face found) are kept, unreadable lines are dropped. Inputs skipped because
they are done get no record. So the manifest stays proportional to the inputs however often a
folder is rerun. Compaction assumes one writer: the CLIs hold the folder's lock
(`reference.files.folder_lock`) while the manifest is open.

Resuming: an input is skipped when its latest record that is not "skipped" is "ok", has the
current fingerprint, the input's size and mtime are unchanged, and all its outputs still exist.
Looking only at the *latest* such record matters: a run with other options (another fingerprint)
overwrites the same output paths, so an older "ok" no longer describes the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from reference.files import atomic_write_bytes

MANIFEST_NAME = "manifest.jsonl"
STATUSES = ("ok", "failed", "skipped")
# Bump when the meaning or naming of output files changes, so old runs are not reused.
OUTPUT_FORMAT_VERSION = 1


def checkpoint_identity(path: str | os.PathLike) -> dict:
    """Identity of a checkpoint file: resolved path, size and mtime.

    Not a content hash on purpose: hashing a 1.2 GB checkpoint costs seconds on every run. A
    checkpoint replaced in place changes its mtime; a copy at another path counts as another
    checkpoint (a rerun redoes the work, which is safe).

    Args:
        path: the checkpoint file (must exist).

    Returns:
        `{"path": str, "size": int, "mtime_ns": int}`.
    """
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(config: Mapping[str, Any]) -> str:
    """Short stable digest of a run's output-determining config.

    Args:
        config: JSON-serialisable dict: checkpoint identity, backend and every option that
            changes the output files (resize, couple, latents); not device or batch size, which
            change results only within float32 rounding.

    Returns:
        The first 16 hex digits of SHA-256 over the canonical JSON of `config` plus
        `OUTPUT_FORMAT_VERSION`.
    """
    blob = json.dumps({"config": config, "format": OUTPUT_FORMAT_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass
class InputStat:
    """What a record remembers of an input file to tell whether it changed."""

    path: str  # absolute
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "InputStat":
        """Stat `path`; a file that cannot be stat'ed gets size and mtime -1 (reading it will fail)."""
        p = os.path.abspath(path)
        try:
            st = os.stat(p)
        except OSError:
            return cls(p, -1, -1)
        return cls(p, st.st_size, st.st_mtime_ns)


class Manifest:
    """Append-only JSON-lines manifest of one output folder (see the module docstring).

    Use as a context manager: `with Manifest(out_dir, config) as m: ...`.

    Args:
        out_dir: the output folder; the manifest is `out_dir / "manifest.jsonl"`.
        config: the run's config (hashed by `fingerprint`, stored in every record).
        run: facts of this run stored in every record but not fingerprinted (e.g. why this backend
            and precision were chosen).
        exists: whether an output (its relative POSIX name) exists, for `done`; default: a file of
            that name under `out_dir`. Outputs uploaded elsewhere pass their own
            (`engine.remote.RemoteOutput.exists`; the manifest then lives in a local staging folder).
    """

    def __init__(self, out_dir: str | os.PathLike, config: Mapping[str, Any], run: Mapping[str, Any] | None = None,
                 exists: Callable[[str], bool] | None = None):
        self.out_dir = Path(os.path.abspath(out_dir))  # outputs are stored relative to it
        self.exists = exists or (lambda rel: (self.out_dir / rel).is_file())
        self.path = self.out_dir / MANIFEST_NAME
        self.config = dict(config)
        self.fingerprint = fingerprint(self.config)
        self.run = dict(run or {})
        self.n_unreadable = 0  # lines ignored on reading (torn or edited)
        self._latest: dict[str, dict] = {}  # input -> latest non-"skipped" record
        self._keep: list[int] = []  # indices into the file's lines that compaction keeps, in order
        self._n_lines = 0
        self._file = None
        self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        last: dict[str, int] = {}  # input -> line of its latest non-"skipped" record
        last_skip: dict[str, int] = {}  # input -> line of its latest "skipped" record
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f):
                self._n_lines = n + 1
                try:
                    rec = json.loads(raw)
                    key, status = rec["input"], rec["status"]
                except (ValueError, KeyError, TypeError):
                    self.n_unreadable += 1
                    continue
                if status != "skipped":
                    self._latest[key] = rec
                    last[key] = n
                elif rec.get("error"):  # a reason (no face): kept; a no-op skip is not worth a line
                    last_skip[key] = n
        keep = set(last.values()) | {n for key, n in last_skip.items() if n > last.get(key, -1)}
        self._keep = sorted(keep)

    def __enter__(self) -> "Manifest":
        """Open for appending; compact first when the file holds lines no rerun needs (module docstring)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self._n_lines > len(self._keep):
            keep = set(self._keep)
            with open(self.path, "rb") as f:
                kept = [raw.rstrip(b"\n") + b"\n" for n, raw in enumerate(f) if n in keep]
            atomic_write_bytes(self.path, b"".join(kept))
        self._file = open(self.path, "ab")
        if self._file.tell() > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line: end it so the next record stays parseable
                    self._file.write(b"\n")
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def done(self, stat: InputStat) -> dict | None:
        """The record that makes `stat`'s input skippable, or None if it must be (re)done."""
        rec = self._latest.get(stat.path)
        if not rec or rec.get("status") != "ok" or rec.get("fingerprint") != self.fingerprint:
            return None
        if rec.get("input_size") != stat.size or rec.get("input_mtime_ns") != stat.mtime_ns:
            return None
        outputs = rec.get("outputs") or []
        if not outputs or not all(self.exists(o) for o in outputs):
            return None
        return rec

    def append(self, stat: InputStat, status: str, outputs: list[str | os.PathLike] = (),
               error: str | None = None, timings_ms: Mapping[str, float] | None = None) -> dict:
        """Append one record (one write, flush, fsync) and return it.

        Args:
            stat: the input's path and stat.
            status: "ok", "failed" or "skipped".
            outputs: files written (absolute, or relative to the output folder).
            error: reason for "failed" (newlines are folded to keep one line).
            timings_ms: per-stage ms.

        Raises:
            ValueError: unknown status. RuntimeError: the manifest is not open.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self._file is None:
            raise RuntimeError("Manifest.append outside `with Manifest(...)`")
        rec = {
            "input": stat.path,
            "input_size": stat.size,
            "input_mtime_ns": stat.mtime_ns,
            "status": status,
            "outputs": [self._relative(o) for o in outputs],
            "error": " ".join(str(error).split()) if error is not None else None,
            "timings_ms": {k: round(float(v), 3) for k, v in (timings_ms or {}).items()},
            "fingerprint": self.fingerprint,
            "config": self.config,
            "run": self.run,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            line = (json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8 (surrogate escapes): \u escapes round-trip
            line = (json.dumps(rec, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        if status != "skipped":
            self._latest[stat.path] = rec
        return rec

    def _relative(self, p: str | os.PathLike) -> str:
        """A written file's path relative to the output folder (`p` absolute, or already relative to it)."""
        p = Path(p)
        if p.is_absolute():
            p = Path(os.path.relpath(p, self.out_dir))
        return p.as_posix()


def read_records(out_dir: str | os.PathLike) -> list[dict]:
    """All parseable records of `out_dir/manifest.jsonl`, in file order (empty if none)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                records.append(json.loads(raw))
            except ValueError:
                continue
    return records
