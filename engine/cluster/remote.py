"""Inputs and outputs named by URI, for the distributed run: `--input s3://bucket/in --output gs://bucket/out`.

Source: `pyarrow.fs` (`FileSystem.from_uri`, `FileSelector`, `FileSystem.get_file_info`,
`open_input_stream`, `open_output_stream`, `move`, `create_dir`); for a scheme pyarrow does not
know, fsspec (`fsspec.core.url_to_fs`) wrapped as `pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))`,
so every scheme an installed fsspec implementation registers works (s3fs, gcsfs, adlfs, ...; fsspec's
chained URLs too, e.g. `zip://::s3://bucket/photos.zip`, `simplecache::s3://bucket/in`).

A URI is `scheme://...` (or an fsspec chain `scheme::...://...`); anything else is a local path.
Filesystem objects never travel between processes: every process (the driver, each Ray read task,
each model actor) resolves the URI itself, once (`resolve` keeps them per process).

Inputs (`find_inputs`, `plan_jobs`): a URI names a folder/prefix, listed recursively on the driver
for `reference.plumbing.files.IMAGE_EXTENSIONS` (case-insensitive; names with a hidden component skipped,
files before subfolders, each sorted, as `reference.plumbing.files.scan_folder` orders them), or one object,
taken whatever its extension. Each found file is a `RemoteFile`: the `--input` URI it was found
under and its path below it; its URI (the two joined, `join_uri`) is its key in the manifest, and
its size and mtime from the listing are what a rerun compares. Output names follow
`engine.inputs.plan_jobs` on the files' paths in their filesystem, so a folder URI gives the names a
local copy of the folder would. The read stage fetches the bytes (`RemoteFile.read_bytes`) and
decodes them with the code that decodes a local file (`reference.images.read_input(..., data=...)`).

Outputs (`RemoteOutput`): each model actor writes an item with `engine.batch.write_item` into a
temp folder of its own, `RemoteOutput.upload`s the files to `<output URI>/<the same relative
names>` (the .png last), and removes the temp folder. A file never appears half-written under its
final name: on object stores (`OBJECT_STORE_SCHEMES`) one PUT is atomic (the object appears when the
upload completes); elsewhere (file, hdfs, ...) it is written to a temp name beside it
(`reference.plumbing.files.temp_path`) and then renamed (`FileSystem.move`). Temp files a killed actor left
(`.*.psp-tmp`) are removed at the next run's start once older than an hour.

Manifest: the driver stays its only writer. It keeps `manifest.jsonl` and the run's lock
(`reference.plumbing.files.folder_lock`) in a local staging folder, `cache_dir()/staging/<sha256 of the URI>`,
and copies the manifest to `<output URI>/manifest.jsonl` every `SYNC_RECORDS` results or
`SYNC_SECONDS` s, and at the end of the run (also when it fails or is interrupted). At the start,
the URI's manifest replaces the staging copy unless the staging copy extends it (a driver of this
machine killed after its last copy), so a rerun from any machine resumes. Whether a done input's outputs still exist is read from one
recursive listing of the output URI.

Limits: the lock is the staging folder's, so two drivers on different machines writing into the
same output URI are not stopped; outputs written through pyarrow are not fsynced before the rename.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Sequence

from reference.plumbing.errors import InputImageError, UsageError
from reference.plumbing.files import IMAGE_EXTENSIONS, TEMP_SUFFIX, atomic_write_bytes, cache_dir, temp_path

from .. import inputs as local_inputs
from ..inputs import Job
from ..manifest import MANIFEST_NAME, InputStat
from ..manifest import input_digest as manifest_input_digest

if TYPE_CHECKING:  # annotations only: pyarrow comes with Ray (the `serve` extra) and is imported when used
    import pyarrow.fs

# Schemes whose writes are single atomic PUTs (and that have no cheap rename): no temp file.
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2"})
SYNC_RECORDS = 100  # results recorded between two copies of the manifest to the output URI
SYNC_SECONDS = 30.0  # s between two copies of the manifest to the output URI (checked at each record)
STAGING = "staging"  # the folder of `cache_dir()` holding the local side of output URIs

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*(?:::|://)")
_FIX = ("pyarrow.fs knows file, s3, gs, hdfs and abfs; for another scheme install its fsspec package "
        "(e.g. pip install s3fs, gcsfs, adlfs)")


def is_uri(text: str | os.PathLike) -> bool:
    """Whether `text` is a URI (`scheme://...`, or an fsspec chain `a::b://...`), not a local path."""
    text = str(text)
    return "://" in text and _URI.match(text) is not None


def scheme(uri: str) -> str:
    """The scheme of the filesystem that stores `uri`'s data: "s3" for `s3://b/k` and `simplecache::s3://b/k`."""
    link = [part for part in uri.split("::") if "://" in part][-1]
    return link.split("://", 1)[0].lower()


def join_uri(root: str, rel: str) -> str:
    """`rel` (a POSIX path, "" for `root` itself) below URI `root`, keeping a `?query`.

    In an fsspec chain the path goes into the first link that has `://` (`zip://a::file:///x.zip`
    + "b.jpg" -> `zip://a/b.jpg::file:///x.zip`; `simplecache::s3://b/in` + "x" -> `simplecache::s3://b/in/x`).
    """
    links = root.split("::")
    i = next(j for j, link in enumerate(links) if "://" in link)
    head, q, query = links[i].partition("?")
    prefix, rest = head.split("://", 1)
    rest = rest.rstrip("/") or rest  # "file:///" keeps its root
    if rel:
        rest = f"{rest}/{rel}" if rest and not rest.endswith("/") else rest + rel
    links[i] = f"{prefix}://{rest}{q}{query}"
    return "::".join(links)


def _join_path(base: str, rel: str) -> str:
    """Path `rel` below `base` in one filesystem ("" base: the filesystem's root, as fsspec archives have)."""
    if not rel:
        return base
    base = base.rstrip("/") or base
    return f"{base}/{rel}" if base and not base.endswith("/") else base + rel


def _pyarrow_fs():
    try:
        import pyarrow.fs
    except ImportError:
        raise UsageError("URIs need pyarrow, which comes with Ray: pip install -e '.[serve]'") from None
    return pyarrow.fs


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


@functools.lru_cache(maxsize=64)
def resolve(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem holding `uri` and the path of `uri` in it; kept per process (64 URIs).

    Source: `pyarrow.fs.FileSystem.from_uri`; for a scheme it does not know, `fsspec.core.url_to_fs`
    wrapped in `pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))`.

    Args:
        uri: a URI (`is_uri`).

    Returns:
        `(filesystem, path)`: a `pyarrow.fs.FileSystem` and `uri`'s path in it (for object stores
        "bucket/key"; for fsspec archives "" is the archive's root).

    Raises:
        UsageError: naming `uri` and the fix: a scheme neither pyarrow.fs nor fsspec knows, an
            fsspec implementation that is not installed, fsspec missing, or a filesystem that
            cannot be reached (e.g. S3 without network or credentials).
    """
    pafs = _pyarrow_fs()
    name = scheme(uri) if "://" in uri else "?"
    try:
        return pafs.FileSystem.from_uri(uri)  # also `fsspec+<scheme>://` and `hf://`, through fsspec
    except ImportError as e:
        raise UsageError(f"{uri}: {_one_line(e)} (the fsspec implementation of {name!r} is not installed)") from None
    except OSError as e:
        raise UsageError(f"{uri}: cannot open its filesystem ({_one_line(e)}); check the address, the network "
                         "and the credentials") from None
    except ValueError:  # pyarrow.lib.ArrowInvalid: a scheme (or a chained URL) pyarrow does not parse
        pass
    try:
        import fsspec.core
    except ImportError:
        raise UsageError(f"{uri}: pyarrow.fs does not know the scheme {name!r} and fsspec is not installed; "
                         f"{_FIX}") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:  # a known protocol whose package is missing; fsspec's message names it
        raise UsageError(f"{uri}: {_one_line(e)} (the fsspec implementation of {name!r} is not installed)") from None
    except ValueError as e:
        if "protocol not known" in str(e).lower():
            raise UsageError(f"{uri}: no filesystem knows the scheme {name!r}; {_FIX}") from None
        raise UsageError(f"{uri}: fsspec cannot open it ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - any implementation's failure to connect is a usage error here
        raise UsageError(f"{uri}: fsspec cannot open it ({type(e).__name__}: {_one_line(e)})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _place(uri: str | None, fs, path: str) -> tuple[str, str, str]:
    """Where a path is, comparable across URIs and local paths: `("local", "", realpath)` on this
    machine's disk, else `(scheme, host, path)`."""
    pafs = _pyarrow_fs()
    if uri is None or isinstance(fs, pafs.LocalFileSystem):
        return "local", "", os.path.realpath(path)
    links = [link for link in uri.split("::") if "://" in link]
    host = (links[-1].split("://", 1)[1].split("/", 1)[0].split("?", 1)[0] if len(links) == 1
            else "::".join(uri.split("::")[1:]))
    return scheme(uri), host, path.rstrip("/")


def _inside(a: tuple[str, str, str], b: tuple[str, str, str] | None) -> bool:
    """Whether place `a` is place `b` or below it."""
    if b is None or a[:2] != b[:2]:
        return False
    return a[2] == b[2] or a[2].startswith(b[2].rstrip("/") + "/") or (b[2] in ("", "/") and a[2] != "")


# ------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class RemoteFile:
    """An input file found under an `--input` URI (plain fields: it pickles into Ray tasks).

    Attributes:
        root: the `--input` URI it was found under.
        rel: its POSIX path below `root` ("" when `root` names the file itself).
        size: bytes, and `mtime_ns`: from the listing (-1 where the filesystem has none).
    """

    root: str
    rel: str
    size: int = -1
    mtime_ns: int = -1

    def __str__(self) -> str:
        return join_uri(self.root, self.rel)

    def locate(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """`(filesystem, path)` of the file (`resolve` of `root`, so once per process and root).

        Raises:
            UsageError: as `resolve`.
        """
        fs, base = resolve(self.root)
        return fs, _join_path(base, self.rel)

    def stat(self) -> InputStat:
        """The manifest's view of the file: its URI, size and mtime from the listing."""
        return InputStat(str(self), self.size, self.mtime_ns)

    def read_bytes(self) -> bytes:
        """The file's content (`FileSystem.open_input_stream`, no decompression).

        Raises:
            InputImageError: the file is gone or cannot be read (the message starts with its URI).
        """
        try:
            fs, path = self.locate()
            with fs.open_input_stream(path, compression=None) as f:
                return f.read()
        except FileNotFoundError:
            raise InputImageError(f"{self}: no such file") from None
        except (OSError, UsageError) as e:
            raise InputImageError(f"{self}: cannot read it ({type(e).__name__}: {_one_line(e)})") from None


Source = Path | RemoteFile


def input_stat(source: Source) -> InputStat:
    """`InputStat` of an input: a `RemoteFile`'s from its listing, a local file's from `os.stat`."""
    return source.stat() if isinstance(source, RemoteFile) else InputStat.of(source)


def input_digest(source: Source) -> str | None:
    """The hex SHA-256 of an input's bytes: a `RemoteFile` is read for it (`read_bytes`; the run asks
    only where a decision needs it: the manifest has another input's outputs under its names), a
    local file as `engine.manifest.input_digest`; None when it cannot be read."""
    if not isinstance(source, RemoteFile):
        return manifest_input_digest(source)
    try:
        return hashlib.sha256(source.read_bytes()).hexdigest()
    except InputImageError:
        return None


def _scan_order(rel: str) -> tuple:
    """Sort key giving `reference.plumbing.files.scan_folder`'s order: a folder's files (sorted), then its subfolders."""
    parts = rel.split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def _list_uri(spec: str, out_place: tuple | None, output: str) -> list[RemoteFile]:
    """The image files `--input` URI `spec` names (module docstring), outputs excluded."""
    pafs = _pyarrow_fs()
    try:
        fs, base = resolve(spec)
    except UsageError as e:
        raise UsageError(f"--input {e}") from None
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return [RemoteFile(spec, "", int(info.size), _mtime_ns(info))]
        if info.type != pafs.FileType.Directory:
            raise UsageError(f"--input {spec}: no such file or folder")
        place = _place(spec, fs, base)
        if _inside(place, out_place):
            where = "is" if place == out_place else "is inside"
            raise UsageError(f"--input {spec} {where} the --output {output}: the outputs would be written among "
                             "(and over) the inputs; choose an --output outside the inputs")
        entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:
        raise UsageError(f"--input {spec}: cannot list it ({_one_line(e)})") from None
    prefix = base.rstrip("/")
    found = []
    for e in entries:
        if e.type != pafs.FileType.File:
            continue
        if prefix:
            if not e.path.startswith(prefix + "/"):
                continue  # not below the listed folder (never seen; a filesystem that renames paths)
            rel = e.path[len(prefix) + 1:]
        else:
            rel = e.path.lstrip("/")
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if hidden or PurePosixPath(rel).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if out_place is not None and _inside(_place(spec, fs, e.path), out_place):
            continue  # an output of an earlier run below the input folder
        found.append(RemoteFile(spec, rel, int(e.size), _mtime_ns(e)))
    return sorted(found, key=lambda f: _scan_order(f.rel))


def _mtime_ns(info) -> int:
    return int(info.mtime_ns) if info.mtime_ns is not None else -1


def find_inputs(specs: Sequence[str], output: Path | RemoteOutput) -> list[Source]:
    """`engine.inputs.find_inputs` for `--input` arguments that may be URIs.

    Local paths go through `engine.inputs.find_inputs` (the output folder excluded); each URI is
    listed (module docstring). A file found twice is kept once, first place first.

    Args:
        specs: `--input` arguments: local files, folders, patterns, and URIs (folder/prefix or object).
        output: the local output folder, or the `RemoteOutput`.

    Returns:
        The local files (`Path`) then the `RemoteFile`s, in argument order.

    Raises:
        UsageError: a URI whose filesystem cannot be opened or listed, one that names nothing, a
            folder URI that is the output or inside it; as `engine.inputs.find_inputs` for local
            paths; no image found at all.
    """
    if isinstance(output, RemoteOutput):
        out_place, out_local, out_name = output.place(), output.local_path(), output.uri
    else:
        out_place, out_local, out_name = ("local", "", os.path.realpath(output)), output, str(output)
    local = [s for s in specs if not is_uri(s)]
    files: list[Source] = list(local_inputs.find_inputs(local, exclude=out_local)) if local else []
    seen = {("local", "", os.path.realpath(f)) for f in files}
    for spec in specs:
        if not is_uri(spec):
            continue
        for f in _list_uri(spec, out_place, out_name):
            fs, path = f.locate()
            key = _place(f.root, fs, path)
            if key not in seen:
                seen.add(key)
                files.append(f)
    if not files:
        raise UsageError(f"no image found in --input {' '.join(specs)} "
                         f"(extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def plan_jobs(files: Sequence[Source]) -> list[Job]:
    """`engine.inputs.plan_jobs` for local files and `RemoteFile`s: each named by its path in its
    filesystem (`/bucket/in/a.jpg` for `s3://bucket/in/a.jpg`), so the naming rule is the local one.

    Returns:
        One `Job` per file, in order; `job.source` is the file as given (`Path` or `RemoteFile`).
    """
    keys = [f if isinstance(f, Path) else Path("/" + f.locate()[1].lstrip("/")) for f in files]
    return [Job(f, job.base) for f, job in zip(files, local_inputs.plan_jobs(keys))]


# ------------------------------------------------------------------------------------------------
# Outputs


class RemoteOutput:
    """An `--output` URI: where outputs are uploaded, the local staging folder, the manifest's copies.

    Cheap to make (nothing is resolved until used): each model actor makes its own from the URI.

    Args:
        uri: the `--output` URI (a trailing "/" is dropped).

    Attributes:
        uri: the URI; staging: the local folder holding the manifest and the lock
            (`cache_dir()/staging/<first 16 hex of sha256(uri)>`); object_store: whether writes are
            single PUTs (`OBJECT_STORE_SCHEMES`) rather than a temp file and a rename.
    """

    def __init__(self, uri: str):
        self.uri = join_uri(uri, "")
        self.staging = cache_dir() / STAGING / hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        self.object_store = scheme(self.uri) in OBJECT_STORE_SCHEMES
        self._present: set[str] | None = None  # output names listed under the URI (lazily)
        self._dirs: set[str] = set()  # folders created by this process
        self._since_sync = 0
        self._last_sync = time.monotonic()

    def locate(self, rel: str = "") -> tuple[pyarrow.fs.FileSystem, str]:
        """`(filesystem, path)` of output `rel` (a relative POSIX name; "" for the output folder).

        Raises:
            UsageError: as `resolve`.
            ValueError: `rel` is absolute or has a `.`/`..` component (it would leave the output).
        """
        parts = PurePosixPath(rel).parts
        if rel and (rel.startswith("/") or any(p in (".", "..") for p in rel.split("/")) or not parts):
            raise ValueError(f"{self.uri}: output name {rel!r} would leave the output folder")
        fs, base = resolve(self.uri)
        return fs, _join_path(base, rel)

    def place(self) -> tuple[str, str, str]:
        """The output's place (see `_place`), to keep inputs and outputs apart."""
        fs, base = self.locate()
        return _place(self.uri, fs, base)

    def local_path(self) -> Path | None:
        """The output as a local folder when the URI is on this machine's disk (`file://`), else None."""
        fs, base = self.locate()
        return Path(base) if isinstance(fs, _pyarrow_fs().LocalFileSystem) else None

    def check(self) -> None:
        """Open the output's filesystem and refuse an output that is a file (before the model loads).

        Raises:
            UsageError: as `resolve` (prefixed `--output`), the URI names a file, or it cannot be read.
        """
        try:
            fs, base = self.locate()
            if fs.get_file_info(base).type == _pyarrow_fs().FileType.File:
                raise UsageError(f"{self.uri} is a file; --output names a folder (a prefix on object stores)")
        except UsageError as e:
            raise UsageError(f"--output {e}") from None
        except OSError as e:
            raise UsageError(f"--output {self.uri}: cannot read it ({_one_line(e)})") from None

    def put(self, rel: str, data: bytes) -> str:
        """Write output `rel` atomically (module docstring): one PUT, or a temp name then a rename.

        Returns:
            The output's URI.

        Raises:
            OSError: the filesystem refused the write. ValueError: a name outside the output.
        """
        fs, path = self.locate(rel)
        if self.object_store:
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
            return join_uri(self.uri, rel)
        parent = posixpath.dirname(path)
        if parent and parent not in self._dirs:
            fs.create_dir(parent, recursive=True)
            self._dirs.add(parent)
        tmp = posixpath.join(parent, temp_path(posixpath.basename(path)).name)
        try:
            with fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
            try:
                fs.move(tmp, path)
            except OSError:  # HDFS's rename does not replace: remove the old file first (the new one is whole)
                if fs.get_file_info(path).type != _pyarrow_fs().FileType.File:
                    raise
                fs.delete_file(path)
                fs.move(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise
        return join_uri(self.uri, rel)

    def upload(self, files: dict[str, Path], local_root: Path) -> list[str]:
        """Upload an item's files, written by `engine.batch.write_item` under `local_root`, to the same
        relative names under the URI, each with `put`, "image" (the .png) last as `write_item` writes it.

        Args:
            files: by kind, as `write_item` returns them.
            local_root: the folder `write_item` wrote under (the run's `out_dir` there).

        Returns:
            The relative POSIX names written, in `files`' order.

        Raises:
            OSError: an upload failed (the files uploaded before it stay; the input is recorded failed).
        """
        rels = {kind: p.relative_to(local_root).as_posix() for kind, p in files.items()}
        for kind in sorted(files, key=lambda k: k == "image"):
            self.put(rels[kind], files[kind].read_bytes())
        return list(rels.values())

    def read(self, rel: str) -> bytes | None:
        """The content of output `rel`, or None when it does not exist.

        Raises:
            OSError: it exists but cannot be read.
        """
        fs, path = self.locate(rel)
        try:
            with fs.open_input_stream(path, compression=None) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _listing(self) -> list:
        pafs = _pyarrow_fs()
        fs, base = self.locate()
        return [e for e in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                if e.type == pafs.FileType.File]

    def exists(self, rel: str) -> bool:
        """Whether output `rel` exists; from one recursive listing of the URI, made at the first call
        (the `exists` of `engine.manifest.Manifest`: outputs of inputs it has as done)."""
        if self._present is None:
            _, base = self.locate()
            prefix = base.rstrip("/")
            self._present = {e.path[len(prefix):].lstrip("/") for e in self._listing()}
        return rel in self._present

    def start(self, say: Callable[[str], None], temp_age_s: float) -> None:
        """At a run's start (the staging folder locked): take the URI's manifest (module docstring)
        and remove temp files older than `temp_age_s` that killed actors left (not on object stores).

        Raises:
            OSError: the URI's manifest cannot be read, or the staging copy written.
        """
        remote = self.read(MANIFEST_NAME)
        local = self.staging / MANIFEST_NAME
        if remote is not None and not (local.is_file() and local.read_bytes().startswith(remote)):
            atomic_write_bytes(local, remote)
        if self.object_store:
            return
        fs, _ = self.locate()
        now_ns = time.time_ns()
        stale = [e.path for e in self._listing() if e.base_name.startswith(".") and e.base_name.endswith(TEMP_SUFFIX)
                 and e.mtime_ns is not None and now_ns - e.mtime_ns >= temp_age_s * 1e9]
        for path in stale:
            with contextlib.suppress(OSError):
                fs.delete_file(path)
        if stale:
            say(f"removed {len(stale)} temp file(s) left by an interrupted run in {self.uri}")

    def push_manifest(self) -> None:
        """Copy the staging manifest to `<uri>/manifest.jsonl` (atomically, `put`), if there is one.

        Raises:
            OSError: the copy failed.
        """
        local = self.staging / MANIFEST_NAME
        if local.is_file():
            self.put(MANIFEST_NAME, local.read_bytes())
        self._since_sync, self._last_sync = 0, time.monotonic()

    def record_made(self) -> None:
        """Called after the driver records each result (an input, or one face of it): copies the
        manifest every `SYNC_RECORDS` results or `SYNC_SECONDS` s.

        Raises:
            OSError: the copy failed.
        """
        self._since_sync += 1
        if self._since_sync >= SYNC_RECORDS or time.monotonic() - self._last_sync >= SYNC_SECONDS:
            self.push_manifest()
