"""The run manifest: `manifest.jsonl` in the output folder, one JSON record per input per run.

Format (one object per line, UTF-8, keys sorted):
    input           absolute path of the input file (the key a rerun matches on)
    input_size      bytes, and `input_mtime_ns`: the input's stat when it was processed
    input_sha256    hex SHA-256 of the input's bytes (null where it was not known: an input
                    behind a URI that no stage hashed, or a record of an older version)
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
(`reference.plumbing.files.folder_lock`) while the manifest is open.

Resuming: an input is skipped when its latest record that is not "skipped" is "ok", has the
current fingerprint, the input's size and mtime are unchanged, all its outputs still exist, and
each of them was last made from this input. Looking
only at the *latest* such record matters: a run with other options (another fingerprint)
overwrites the same output paths, so an older "ok" no longer describes the files on disk.

Provenance: every output file belongs to the latest "ok" record that lists it (its *owner*). An
input is the same input as an owner when it has the same path or the same digest (a moved or
copied folder of the same files), and then reuses or redoes the owner's outputs. An input that
would write an output owned by *another* input (another path, other content: `a/x.png` and then
`b/x.png` into one folder) is a conflict (`Manifest.conflict`): the CLIs stop that input with a
message naming both files unless `--overwrite` is given. A rerun never counts an input done whose
outputs were last made from another input.

Unreadable lines (torn, edited, or of the wrong types, e.g. an "input" that is a list) are skipped;
their line numbers are in `Manifest.bad_lines`, for the CLIs' one warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from reference.plumbing.digests import file_sha256
from reference.plumbing.files import atomic_write_bytes

MANIFEST_NAME = "manifest.jsonl"
STATUSES = ("ok", "failed", "skipped")
# Bump when the meaning or naming of output files changes, so old runs are not reused.
OUTPUT_FORMAT_VERSION = 1


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
    """What a record remembers of an input file to tell whether it changed, and whose it is."""

    path: str  # absolute (or, for an input behind a URI, the URI)
    size: int  # bytes
    mtime_ns: int
    sha256: str | None = None  # hex SHA-256 of the bytes; None until known (see `input_digest`)

    @classmethod
    def of(cls, path: str | os.PathLike) -> "InputStat":
        """Stat `path`; a file that cannot be stat'ed gets size and mtime -1 (reading it will fail)."""
        p = os.path.abspath(path)
        try:
            st = os.stat(p)
        except OSError:
            return cls(p, -1, -1)
        return cls(p, st.st_size, st.st_mtime_ns)


def input_digest(source: object) -> str | None:
    """The hex SHA-256 of a local input file's bytes (`reference.plumbing.digests.file_sha256`, not added to
    the checkpoint memo: inputs are many), or None for a file that cannot be read or an input that is
    not a local path (an `engine.cluster.remote.RemoteFile`: `engine.cluster.remote.input_digest` reads those)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        return file_sha256(source, remember=False)
    except OSError:
        return None


def valid_record(rec: object) -> bool:
    """Whether a parsed manifest line has the types a reader relies on: a dict whose "input" is a
    string, "status" one of `STATUSES`, and "outputs" (if present) a list of strings."""
    if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) or rec.get("status") not in STATUSES:
        return False
    outputs = rec.get("outputs", [])
    return isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)


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
            (`engine.cluster.remote.RemoteOutput.exists`; the manifest then lives in a local staging folder).
    """

    def __init__(self, out_dir: str | os.PathLike, config: Mapping[str, Any], run: Mapping[str, Any] | None = None,
                 exists: Callable[[str], bool] | None = None):
        self.out_dir = Path(os.path.abspath(out_dir))  # outputs are stored relative to it
        self.exists = exists or (lambda rel: (self.out_dir / rel).is_file())
        self.path = self.out_dir / MANIFEST_NAME
        self.config = dict(config)
        self.fingerprint = fingerprint(self.config)
        self.run = dict(run or {})
        self.bad_lines: list[int] = []  # 1-based numbers of the lines ignored on reading (torn, edited, wrong types)
        self._latest: dict[str, dict] = {}  # input -> latest non-"skipped" record
        self._owner: dict[str, dict] = {}  # output (relative, casefolded) -> the latest "ok" record listing it
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
                except ValueError:
                    rec = None
                if not valid_record(rec):
                    self.bad_lines.append(n + 1)
                    continue
                key, status = rec["input"], rec["status"]
                if status != "skipped":
                    self._note(rec)
                    last[key] = n
                elif rec.get("error"):  # a reason (no face): kept; a no-op skip is not worth a line
                    last_skip[key] = n
        keep = set(last.values()) | {n for key, n in last_skip.items() if n > last.get(key, -1)}
        self._keep = sorted(keep)

    def unreadable_warning(self) -> str | None:
        """One warning line naming the ignored lines (at most 10 numbers), or None when there are none."""
        if not self.bad_lines:
            return None
        shown = ", ".join(map(str, self.bad_lines[:10])) + (", ..." if len(self.bad_lines) > 10 else "")
        return (f"warning: ignored {len(self.bad_lines)} unreadable line(s) of {self.path} (line {shown}: not a "
                "JSON record with a string \"input\", a known \"status\" and a list of \"outputs\"); their inputs "
                "are redone, and this run drops those lines")

    def _note(self, rec: dict) -> None:
        """`rec` (not "skipped") becomes its input's latest record; an "ok" one owns its outputs."""
        self._latest[rec["input"]] = rec
        if rec["status"] == "ok":
            for o in rec.get("outputs") or []:
                self._owner[o.casefold()] = rec

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

    def done(self, stat: InputStat, names: Sequence[str] = (),
             digest_of: Callable[[InputStat], str | None] | None = None) -> dict | None:
        """The record that makes `stat`'s input skippable, or None if it must be (re)done.

        Args:
            stat: the input; its `sha256` is filled in when a decision needed it (from its record
                when size and mtime are unchanged, else from `digest_of`).
            names: output names (relative POSIX) the input would write, main image first: an input
                without a record of its own (a moved folder) is done when the owner of the first
                of them that has one holds the same content (same digest).
            digest_of: computes the input's digest when needed (default: none is computed, so an
                input without a record of its own is never done).

        Returns:
            The "ok" record with the current fingerprint, same content, every output present and
            each output last made from it; else None.
        """
        rec = self._latest.get(stat.path)
        if rec is None:
            rec = next((self._owner[n.casefold()] for n in names if n.casefold() in self._owner), None)
            if rec is None or self._latest.get(rec["input"]) is not rec or not self._same_content(rec, stat, digest_of):
                return None
        elif not self._unchanged(rec, stat):
            return None
        if rec.get("status") != "ok" or rec.get("fingerprint") != self.fingerprint:
            return None
        outputs = rec.get("outputs") or []
        if not outputs or not all(self._owner.get(o.casefold()) is rec and self.exists(o) for o in outputs):
            return None
        return rec

    def conflict(self, stat: InputStat, names: Sequence[str],
                 digest_of: Callable[[InputStat], str | None] | None = None) -> str | None:
        """Why writing `names` for `stat`'s input would replace another input's outputs, or None.

        Args:
            stat: the input (its `sha256` is filled in from `digest_of` when an owner is found).
            names: output names (relative POSIX) the input would write.
            digest_of: as in `done`.

        Returns:
            None when every name that exists is unowned, owned by this input's path, or owned by a
            record of the same content; else one line naming the output, both inputs and the fixes.
        """
        for n in names:
            owner = self._owner.get(n.casefold())
            if owner is None or owner["input"] == stat.path or self._same_content(owner, stat, digest_of):
                continue
            if not self.exists(n):
                continue  # removed since: nothing to replace
            return (f"{stat.path}: its output {self.out_dir / n} was made from another input, {owner['input']} "
                    "(other path and content; e.g. two folders holding an x.png run into one --output); not "
                    "replaced. Use another --output folder, or pass --overwrite to replace it")
        return None

    @staticmethod
    def _unchanged(rec: dict, stat: InputStat) -> bool:
        """Whether `stat`'s input (same path) is as `rec` saw it: same size and mtime, as before digests
        were recorded (a touched file is redone); its digest is then taken from `rec`."""
        if rec.get("input_size") != stat.size or rec.get("input_mtime_ns") != stat.mtime_ns:
            return False
        if stat.sha256 is None:
            stat.sha256 = rec.get("input_sha256")
        return True

    @staticmethod
    def _same_content(rec: dict, stat: InputStat, digest_of) -> bool:
        """Whether `rec` records the digest `stat`'s input has (computed with `digest_of` if needed)."""
        known = rec.get("input_sha256")
        if not isinstance(known, str):
            return False
        if stat.sha256 is None and digest_of is not None:
            stat.sha256 = digest_of(stat)
        return stat.sha256 == known

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
            "input_sha256": stat.sha256,
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
            self._note(rec)
        return rec

    def _relative(self, p: str | os.PathLike) -> str:
        """A written file's path relative to the output folder (`p` absolute, or already relative to it)."""
        p = Path(p)
        if p.is_absolute():
            p = Path(os.path.relpath(p, self.out_dir))
        return p.as_posix()


def read_records(out_dir: str | os.PathLike) -> list[dict]:
    """All readable records of `out_dir/manifest.jsonl` (`valid_record`), in file order (empty if none)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if valid_record(rec):
                records.append(rec)
    return records
