"""`python -m engine.cache`: list what the engine's cache folder holds, and remove entries.

The cache folder (`reference.plumbing.files.cache_dir()`: `$PSP_ENGINE_CACHE`, else `~/.cache/psp-engine`)
holds what the engine makes once and reuses:
- `demo_*.pt` + its sidecar `demo_*.pt.json` (size and sha256 at the build): the random-weight
  demo checkpoint (`engine.demo`, about 1.2 GB);
- `onnx/<stem>-<key>.<part>.onnx` + their weights `.onnx.data` and JSON sidecars: the graphs the
  onnxruntime and openvino backends export on first use of a checkpoint (`export.backends.graph.cache_paths`; about the checkpoint's
  size). One entry per `<stem>-<key>`; the sidecar records the source checkpoint's path and the
  size and sha256 of each file;
- `onnx/<stem>-<key>.<part>.int8-<key2>.xml` + `.bin` + sidecar: a graph quantized for `--precision int8`
  (`export.quantize.int8_path`: keyed by the fp32 graph, the calibration set and the recipe), part
  of the entry `<stem>-<key>`;
- `ov_cache/<stem>-<key>.<part>[.int8-<key2>]/`: OpenVINO's compiled blobs of one graph, with their sizes and
  digests in `ov_cache/<stem>-<key>.<part>.json` (`export.backends.graph.compiled_model_cache`), one entry
  per graph; loose files in `ov_cache/` were written by older versions and are never used;
- `digests.json`: sha256 digests remembered per file version (`reference.plumbing.digests`);
- `*.psp-tmp`: temp files (and an export's temp folders) of writes a killed process never finished
  (`reference.plumbing.files.temp_path`, `atomic_files`).

`--verify` checks every entry's files against the sizes and digests recorded when it was written
and lists the damaged ones (truncated, changed bytes, missing or unrecorded files); exit code 1
when there are any. A run never uses a damaged entry either: it rebuilds it, with a one-line note.

Entries are removed with `--prune` (damaged entries; ONNX graphs whose source checkpoint is gone or has changed since
the export, and compiled blobs whose graph is gone, so no run can use them again; temp files untouched for `STALE_TEMP_S`), `--all`, or
`--older-than DAYS` (last use older than that); `--dry-run` lists what would go. A run that needs a
removed entry rebuilds it. Last use is the newest access or modification time of the entry's files
(access times are as fresh as the file system's mount options allow: `relatime` updates them at
most daily).

Exit codes: 0 done; 1 `--verify` found damaged entries; 2 usage error (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from reference.plumbing.cli import ArgumentParser, argparse_type, run_cli
from reference.description import verify_artifact
from reference.plumbing.digests import MEMO_NAME
from reference.plumbing.files import TEMP_SUFFIX, cache_dir

ONNX_DIR = "onnx"  # engine.api: the graph backends' cache, cache_dir() / "onnx"
COMPILED_DIRS = ("ov_cache",)  # compiled-model caches (OpenVINO `CACHE_DIR`: `export.backends.graph.COMPILED_DIR`)
STALE_TEMP_S = 600.0  # s: a temp file untouched this long belongs to no live writer (writers touch theirs continuously)
DAY_S = 86400.0


@dataclass
class Entry:
    """One removable thing in the cache.

    Attributes:
        kind: "checkpoint", "onnx", "compiled", "digests", "temp" or "other".
        name: path relative to the cache folder (for ONNX graphs, `onnx/<stem>-<key>`).
        files: the files it consists of.
        source: the checkpoint an ONNX entry was exported from (None when unknown).
        stale: why `--prune` removes it ("" when it does not; damaged entries included).
        damaged: what `scan(verify=True)` found wrong with its files against their recorded sizes
            and digests ("" when nothing, or not verified).
    """

    kind: str
    name: str
    files: list[Path] = field(default_factory=list)
    source: str | None = None
    stale: str = ""
    damaged: str = ""

    @property
    def size(self) -> int:
        """Bytes on disk (apparent size) of the entry's files."""
        return sum(_stat(p).st_size for p in self.files if _stat(p) is not None)

    @property
    def last_use(self) -> float:
        """Newest access or modification time of its files (s since the epoch; 0 when none can be read)."""
        stats = [s for s in map(_stat, self.files) if s is not None]
        return max((max(s.st_atime, s.st_mtime) for s in stats), default=0.0)


def _stat(p: Path) -> os.stat_result | None:
    try:
        return p.stat()
    except OSError:
        return None


def _sidecar_checkpoint(sidecar: Path) -> str | None:
    """The source checkpoint path a graph sidecar records: `model.checkpoint.path` (the one sidecar
    schema, `reference.description`) or `checkpoint.path` (sidecars written before it)."""
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    ckpt = (meta.get("model") or {}).get("checkpoint") if isinstance(meta.get("model"), dict) else None
    ckpt = ckpt or meta.get("checkpoint")
    return ckpt.get("path") if isinstance(ckpt, dict) and isinstance(ckpt.get("path"), str) else None


def _onnx_staleness(name: str, source: str | None, onnx_dir: Path) -> str:
    """Why an ONNX entry `<stem>-<key>` can never be used again, or "" when it can."""
    if source is None:
        return "no sidecar names its source checkpoint"
    ckpt = Path(source)
    if not ckpt.is_file():
        return f"source checkpoint {source} no longer exists"
    from export.backends.graph import cache_paths  # the cache key (checkpoint path, size, sha256, export version) in one place

    if cache_paths(ckpt, onnx_dir)["encoder"].name != f"{name}.encoder.onnx":
        return f"source checkpoint {source} changed since the export (or the export version did)"
    return ""


def _ir_of(f: Path) -> Path | None:
    """The int8 IR (`<name>.xml`) a file of an ONNX entry belongs to (the IR, its `.bin`, its sidecar), or None."""
    if ".int8-" not in f.name:
        return None
    base = f.name.split(".int8-", 1)
    return f.with_name(f"{base[0]}.int8-{base[1].split('.', 1)[0]}.xml")


def _graph_of(folder: Path, compiled: str) -> Path:
    """The graph a compiled-model folder `ov_cache/<graph>` was compiled from: `onnx/<graph>.onnx`,
    or the int8 IR `onnx/<graph>.xml` (`export.quantize`)."""
    name = Path(compiled).name
    return folder / ONNX_DIR / (name + (".xml" if ".int8-" in name else ".onnx"))


def _damage(entry: Entry, folder: Path) -> str:
    """What is wrong with an entry's files against the sizes and digests recorded when they were
    written ("" when nothing): the graphs of an ONNX entry (`export.backends.graph.graph_problems`), the blobs
    of a compiled-model folder (`export.backends.graph.compiled_problems`), the demo checkpoint
    (`reference.description.verify_artifact`). Reads each file once per file version
    (`reference.plumbing.digests` remembers the digests)."""
    from export.backends.graph import PARTS, compiled_problems, graph_problems

    if entry.kind == "onnx":
        paths = {part: folder / f"{entry.name}.{part}.onnx" for part in PARTS}
        problems = {part: probs for part, probs in graph_problems(paths).items()
                    if probs != ["missing"] or any(f.name.startswith(paths[part].name) for f in entry.files)}
        lines = [f"{paths[part].name}: {', '.join(probs)}" for part, probs in problems.items()]
        for ir in sorted({_ir_of(f) for f in entry.files if _ir_of(f)}):  # int8 graphs (export.quantize)
            if probs := verify_artifact(ir):
                lines.append(f"{ir.name}: {', '.join(probs)}")
        return "; ".join(lines)
    if entry.kind == "compiled" and (folder / entry.name).is_dir():
        return ", ".join(compiled_problems(folder / entry.name, _graph_of(folder, entry.name)))
    if entry.kind == "checkpoint":
        return ", ".join(verify_artifact(folder / entry.name))
    return ""


def scan(folder: Path | None = None, now: float | None = None, verify: bool = False) -> list[Entry]:
    """The entries of the cache folder (see the module docstring), sorted by kind then name.

    Args:
        folder: the cache folder (default `cache_dir()`).
        now: the current time (s since the epoch), for temp-file staleness (default `time.time()`).
        verify: check every graph, compiled blob and demo checkpoint against its recorded sizes and
            digests (`Entry.damaged`; a damaged entry is stale). Costs a read of each file whose
            digest is not remembered for its current version (~0.8 GB/s).

    Returns:
        Entries; empty when the folder does not exist.
    """
    folder = cache_dir() if folder is None else Path(folder)
    now = time.time() if now is None else now
    if not folder.is_dir():
        return []
    entries: list[Entry] = []
    groups: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(folder)
        for d in [d for d in dirnames if d.endswith(TEMP_SUFFIX)]:  # an unfinished export's folder
            dirnames.remove(d)
            p = Path(dirpath, d)
            st = _stat(p)
            old = st is not None and now - st.st_mtime >= STALE_TEMP_S
            inside = sorted(f for f in p.rglob("*") if f.is_file())
            entries.append(Entry("temp", (rel_dir / d).as_posix(), inside,
                                 stale="unfinished temp folder" if old else ""))
        for f in sorted(filenames):
            p = Path(dirpath, f)
            rel = (rel_dir / f).as_posix()
            if f.endswith(TEMP_SUFFIX):
                st = _stat(p)
                old = st is not None and now - st.st_mtime >= STALE_TEMP_S
                entries.append(Entry("temp", rel, [p], stale="unfinished temp file" if old else ""))
            elif rel_dir.parts[:1] == (ONNX_DIR,) and len(rel_dir.parts) == 1:
                stem = f.split(".", 1)[0]  # <stem>-<key>: the checkpoint stem has no dot (Path.stem of a .pt)
                entry = groups.setdefault(stem, Entry("onnx", f"{ONNX_DIR}/{stem}"))
                entry.files.append(p)
                if f.endswith(".json") and entry.source is None:
                    entry.source = _sidecar_checkpoint(p)
            elif rel_dir.parts[:1] and rel_dir.parts[0] in COMPILED_DIRS and len(rel_dir.parts) >= 2:
                name = "/".join(rel_dir.parts[:2])  # ov_cache/<graph>/...: one entry per graph
                groups.setdefault(name, Entry("compiled", name)).files.append(p)
            elif rel_dir.parts[:1] and rel_dir.parts[0] in COMPILED_DIRS:
                graph = Path(dirpath, f.removesuffix(".json").removesuffix(".lock"))
                if f.endswith((".json", ".lock")) and graph.is_dir():  # the sidecar and lock of a graph's folder
                    groups.setdefault(f"{rel_dir.parts[0]}/{graph.name}", Entry("compiled", f"{rel_dir.parts[0]}/{graph.name}")).files.append(p)
                else:
                    entries.append(Entry("compiled", rel, [p], stale="written by an older version, never used"))
            elif rel_dir == Path(".") and f == MEMO_NAME:
                entries.append(Entry("digests", rel, [p]))
            elif rel_dir == Path(".") and f.endswith((".pt", ".pt.json")):
                name = f.removesuffix(".json")
                groups.setdefault(name, Entry("checkpoint", name)).files.append(p)
            else:
                entries.append(Entry("other", rel, [p]))
    for stem, entry in groups.items():
        if entry.kind == "onnx":
            entry.stale = _onnx_staleness(stem, entry.source, folder / ONNX_DIR)
        elif entry.kind == "compiled":
            graph = _graph_of(folder, entry.name)
            if not graph.is_file():
                entry.stale = f"its graph {ONNX_DIR}/{graph.name} is gone"
        if verify and not entry.stale:
            entry.damaged = _damage(entry, folder)
            if entry.damaged:
                entry.stale = f"damaged: {entry.damaged}"
        entries.append(entry)
    order = {"checkpoint": 0, "onnx": 1, "compiled": 2, "digests": 3, "temp": 4, "other": 5}
    return sorted(entries, key=lambda e: (order[e.kind], e.name))


def select(entries: list[Entry], prune: bool = False, everything: bool = False,
           older_than_days: float | None = None, now: float | None = None) -> list[Entry]:
    """The entries to remove: with `everything` all; else those `prune` marks stale and those whose
    last use is more than `older_than_days` days ago."""
    now = time.time() if now is None else now
    return [e for e in entries
            if everything or (prune and e.stale)
            or (older_than_days is not None and now - e.last_use > older_than_days * DAY_S)]


def remove(entries: list[Entry], folder: Path) -> int:
    """Delete the entries' files (and folders they leave empty under `folder`); the bytes freed."""
    freed = 0
    for e in entries:
        for p in e.files:
            st = _stat(p)
            try:
                p.unlink()
            except FileNotFoundError:
                continue  # removed meanwhile (another cleanup, a finished writer's rename)
            freed += st.st_size if st is not None else 0
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        if Path(dirpath) != folder and not os.listdir(dirpath):
            os.rmdir(dirpath)
    return freed


def human(n: float) -> str:
    """Bytes as B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_table(entries: list[Entry]) -> str:
    """One line per entry: kind, size, last use (local time), name, source or why it is stale."""
    lines = []
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_use)) if e.last_use else "?"
        note = f"from {e.source}" if e.source else ""
        if e.stale:
            note = f"stale: {e.stale}"
        files = f" ({len(e.files)} files)" if len(e.files) > 1 else ""
        lines.append(f"{e.kind:<10}  {human(e.size):>10}  {when}  {e.name}{files}  {note}".rstrip())
    return "\n".join(lines)


def _days(text: str) -> float:
    days = float(text)
    if not days >= 0:  # also refuses nan
        raise ValueError(text)
    return days


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m engine.cache",
        description="List what the engine's cache folder ($PSP_ENGINE_CACHE, else ~/.cache/psp-engine) holds: the "
                    "demo checkpoint, ONNX graphs exported for the onnxruntime and openvino backends, compiled-model "
                    "caches, unfinished temp files; with sizes and last use. With an option, remove entries (a run "
                    "that needs one again rebuilds it).",
        epilog="Exit codes: 0 done, 1 --verify found damaged entries, 2 usage error.")
    p.add_argument("--verify", action="store_true",
                   help="check every cached graph, compiled blob and demo checkpoint against the sizes and sha256 "
                        "digests recorded when it was written, and list the damaged ones (exit code 1 if any)")
    p.add_argument("--prune", action="store_true",
                   help="remove damaged entries (as --verify finds them), ONNX graphs whose source checkpoint no longer "
                        "exists or has changed, compiled blobs no run can use, and temp files "
                        f"untouched for {STALE_TEMP_S / 60:.0f} minutes")
    p.add_argument("--all", action="store_true", help="remove everything in the cache folder")
    p.add_argument("--older-than", type=argparse_type(_days, "a number of days >= 0"), default=None, metavar="DAYS",
                   help="remove entries last used more than DAYS days ago")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    return p


def _run(args: argparse.Namespace) -> int:
    folder = cache_dir()
    entries = scan(folder, verify=args.verify or args.prune)
    print(f"cache folder: {folder} (set PSP_ENGINE_CACHE to use another)")
    if not entries:
        print("empty" if folder.is_dir() else "does not exist yet: nothing is cached")
        return 0
    print(format_table(entries))
    print(f"total {human(sum(e.size for e in entries))} in {len(entries)} entries")
    damaged = [e for e in entries if e.damaged]
    if args.verify:
        if damaged:
            print(f"{len(damaged)} damaged entries (no run uses them; a run rebuilds them, "
                  "python -m engine.cache --prune removes them):")
            print("\n".join(f"{e.name}: {e.damaged}" for e in damaged))
        else:
            print("verified: every graph, compiled blob and demo checkpoint matches its recorded sizes and digests")
    if not (args.prune or args.all or args.older_than is not None):
        return 1 if damaged and args.verify else 0
    chosen = select(entries, args.prune, args.all, args.older_than)
    if not chosen:
        print("nothing to remove")
        return 0
    if args.dry_run:
        print(f"would remove {len(chosen)} entries, {human(sum(e.size for e in chosen))}:")
        print(format_table(chosen))
        return 0
    freed = remove(chosen, folder)
    print(f"removed {len(chosen)} entries, freed {human(freed)}:")
    print("\n".join(e.name for e in chosen))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the exit code (0 done, 2 usage error)."""
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
