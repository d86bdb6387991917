"""Batch inversion on a Ray cluster: `python -m engine.run ... --ray ADDRESS`.

Source: Ray Data's batch-inference recipe (a dataset of inputs, CPU tasks to read them, a pool of
actors that load the model once and run `map_batches`); the per-item work is `engine.batch`'s own
stages, so outputs, manifest and exit codes are those of the single-process run.

Pipeline (one Ray Data dataset, streamed):
    1. the driver lists the inputs and drops those the manifest has as done (counted "skipped");
    2. `read` (Ray tasks, CPU): `engine.batch.read_items` per input -> one row per item (an input,
       or each aligned face), or a row saying why the input failed / has no face;
    3. `Invert` (an actor pool, `--num-actors`, `--gpus-per-actor`; each actor loads the engine
       once with `engine.load`): `invert_items` on batches of `--batch-size` rows, then
       `write_item` for each item (outputs go straight to the output folder, atomically; to an
       output URI through the actor's own local folder, see `engine.cluster.remote`);
    4. the driver iterates the result rows and records them with `engine.batch.Recorder`: it is
       the manifest's only writer.

Guarantees, as in the single-process run: a bad file is a "failed" row, never a failed job. An
actor that dies is restarted by Ray and its batch retried (Ray Data's actor pools use
`max_restarts=-1`, `max_task_retries=-1`); outputs are written atomically, so a retried batch
overwrites identical files, and the driver records each input once, from the one result row Ray
returns for it. A killed driver leaves a manifest of the inputs it recorded; outputs written
after its last record are redone by a rerun (same bytes).

Byte-identity with the single-process run holds where the arithmetic is the same: the same torch
thread count (an actor runs `--cpus-per-actor` threads, 1 by default; a single process uses every
core, and oneDNN's reductions, hence the last bits, depend on the thread count) and the same
batches (`--batch-size 1`, or no failed input). Tested on the `engine` backend against a
single-process run on 1 thread. Otherwise results differ at float32 rounding, as they do between
batch sizes in the single-process run.

Inputs and outputs are what every node can reach: local paths that are the same on every node (a
shared filesystem), or URIs of `pyarrow.fs` (`file://`, `s3://`, `gs://`, `hdfs://`, `abfs://`) or of
any installed fsspec implementation (`engine.cluster.remote`). An input URI is listed on the driver; read
tasks fetch each file's bytes and decode them as a local file; actors upload outputs to the output
URI atomically; the manifest is kept in a local staging folder and copied to the output URI
periodically and at the end, and a rerun resumes from the URI's copy.

Fault injection for tests: with `$PSP_ENGINE_FAULT_ONCE` naming a file that exists and holds a
number N (empty: 1), the first actor to start its N-th batch removes the file and kills its own
process (`os._exit`), once per run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch

from reference.plumbing.errors import UsageError

from ..api import Engine
from ..batch import (STAGES, Inverted, Recorder, RunOptions, Summary, _ms, _Ready, invert_items, prepare_run,
                    read_error, read_items, write_item)
from ..inputs import Job, file_ids
from ..manifest import InputStat, Manifest
from .ray_local import join_ray, start_local_ray
from .remote import RemoteFile, RemoteOutput, input_digest, input_stat

FAULT_ENV = "PSP_ENGINE_FAULT_ONCE"


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how wide the distributed run goes.

    Attributes:
        address: "local" (start a Ray instance here with the CPUs this process may use), or a Ray
            address ("auto", "ray://host:10001", "host:6379").
        num_actors: model actors; None: one per GPU share with `gpus_per_actor`, else the
            cluster's CPUs minus one (at least 1), leaving a CPU for the read tasks.
        gpus_per_actor: GPUs each actor reserves (0: CPU actors).
        cpus_per_actor: CPUs each actor reserves; it runs torch on that many threads.
    """

    address: str = "local"
    num_actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: int = 1


def connect(address: str, say: Callable[[str], None] = lambda msg: None) -> tuple[bool, float]:
    """Connect this process to Ray (or reuse the Ray instance it already has).

    Args:
        address: "local" starts a Ray instance with `len(os.sched_getaffinity(0))` CPUs that only
            this machine can reach (`engine.cluster.ray_local.start_local_ray`: every port on 127.0.0.1,
            token authentication, its files in a private folder); anything else is passed to
            `engine.cluster.ray_local.join_ray` (a cluster the user started: its binding and token are theirs).
        say: receives one-line notes.

    Returns:
        `(started, seconds)`: whether this call started Ray (then `ray.shutdown()` is the
        caller's), and the time it took (s).

    Raises:
        UsageError: ray is not installed, the cluster cannot be reached, or the local instance's
            private folder is not this user's.
    """
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install -e '.[serve]'") from None
    t0 = time.perf_counter()
    if ray.is_initialized():
        say("ray: using the Ray instance already running in this process")
        return False, 0.0
    try:
        if address == "local":
            start_local_ray(len(os.sched_getaffinity(0)), log_to_driver=False)
        else:
            join_ray(address, log_to_driver=False)
    except UsageError:
        raise  # the local instance's private folder: the message names it and the fix
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"--ray {address}: cannot connect to the Ray cluster ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); start it with `ray start --head` or use --ray local") from None
    return True, time.perf_counter() - t0


def default_actors(cluster: ClusterOptions) -> int:
    """The number of model actors when `--num-actors` is not given (see `ClusterOptions`): from the
    resources free now (`ray.available_resources`), so that a cluster partly held by other work (a
    Ray Serve deployment, another job) still schedules every actor and its read tasks."""
    import ray

    resources = ray.available_resources()
    if cluster.gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // cluster.gpus_per_actor))
    return max(1, (int(resources.get("CPU", 1)) - 1) // cluster.cpus_per_actor)


# ------------------------------------------------------------------------------------------------
# Rows: what travels between the stages (plain columns, so Ray Data can hold them in Arrow)


def _array_bytes(a: np.ndarray | None) -> tuple[bytes, list[int]]:
    if a is None:
        return b"", []
    return np.ascontiguousarray(a).tobytes(), list(a.shape)


def _bytes_array(data: bytes, shape, dtype) -> np.ndarray | None:
    shape = [int(s) for s in shape]
    return np.frombuffer(data, dtype=dtype).reshape(shape) if shape else None


def _job_row(job: Job, stat: InputStat) -> dict:
    """A job as plain columns; `root`, `rel`: a `RemoteFile`'s (both "" for a local file)."""
    root, rel = (job.source.root, job.source.rel) if isinstance(job.source, RemoteFile) else ("", "")
    return {"source": str(job.source), "root": root, "rel": rel, "base": str(job.base), "path": stat.path,
            "size": stat.size, "mtime_ns": stat.mtime_ns, "sha256": stat.sha256 or ""}


_JOB_COLUMNS = ("source", "root", "rel", "base", "path", "size", "mtime_ns", "sha256")


def _row_job(row) -> tuple[Job, InputStat]:
    stat = InputStat(str(row["path"]), int(row["size"]), int(row["mtime_ns"]), str(row["sha256"]) or None)
    root = str(row["root"])
    source = RemoteFile(root, str(row["rel"]), stat.size, stat.mtime_ns) if root else Path(str(row["source"]))
    return Job(source, PurePosixPath(str(row["base"]))), stat


def _item_row(base: dict, status: str, error: str = "", r: _Ready | None = None, read_ms: float = 0.0) -> dict:
    """A read-stage row: status "ready" (with the item) / "failed" (with the reason)."""
    x, x_shape = _array_bytes(r.x.numpy() if r is not None else None)
    display, display_shape = _array_bytes(r.display if r is not None else None)
    aligned, aligned_shape = _array_bytes(r.aligned if r is not None else None)
    return {**base, "status": status, "error": error, "item_base": str(r.job.base) if r is not None else base["base"],
            "n_items": r.n_items if r is not None else 1, "read_ms": r.read_ms if r is not None else read_ms,
            "x": x, "x_shape": x_shape, "display": display, "display_shape": display_shape,
            "aligned": aligned, "aligned_shape": aligned_shape}


def read_stage(row: dict, label_nc: int, opts: RunOptions) -> list[dict]:
    """Ray task body: read one input (`engine.batch.read_items`; an input behind a URI is fetched
    first, `engine.cluster.remote.RemoteFile.read_bytes`) into its item rows.

    Returns:
        One row per item ("ready"), or one row "failed" with the reason (a bad or missing file, no face).
    """
    job, stat = _row_job(row)
    t0 = time.perf_counter()
    try:
        data = job.source.read_bytes() if isinstance(job.source, RemoteFile) else None
        if data is not None and not row["sha256"]:  # the manifest records it (engine.manifest, "Provenance")
            row = {**row, "sha256": hashlib.sha256(data).hexdigest()}
        items = read_items(job, stat, label_nc, opts, t0, data=data)
    except Exception as e:  # noqa: BLE001 - a bad file is a failed row, never a failed job
        return [_item_row(row, "failed", read_error(job, e), read_ms=_ms(t0))]
    return [_item_row(row, "ready", r=r) for r in items]


class Invert:
    """The actor of the model stage: loads the engine once, then inverts and writes batches.

    Args:
        load_args: keyword arguments of `engine.load` (checkpoint, backend, device, trust_pickle).
        opts: the run's options (out_dir absolute).
        inputs: `engine.inputs.file_ids` of the run's inputs (an output never overwrites one).
        threads: torch's CPU threads (the actor's CPUs).
        fault_marker: see the module docstring (tests only), or None.
        output_uri: the `--output` URI, or None (outputs go to `opts.out_dir`). With a URI, each item
            is written by `write_item` into a temp folder of this actor's, uploaded
            (`engine.cluster.remote.RemoteOutput.upload`), and the temp folder removed.
    """

    def __init__(self, load_args: dict, opts: RunOptions, inputs: dict, threads: int = 1,
                 fault_marker: str | None = None, output_uri: str | None = None):
        from ..api import load

        torch.set_num_threads(threads)
        self.eng = load(**load_args)
        self.opts = opts
        self.inputs = inputs
        self.mixing = prepare_run(self.eng, [], opts)
        self.fault_marker = fault_marker
        self.calls = 0
        self.output = RemoteOutput(output_uri) if output_uri else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """Invert the "ready" rows of `batch` and write their outputs; pass the others through.

        Returns:
            Columns of result rows, one per input row: status "ok" (with `outputs`, newline-joined
            POSIX paths relative to the output folder or URI) / "failed", `error`, `n_items` and
            per-stage ms.
        """
        self._maybe_fail()
        opts = self.opts
        n = len(batch["source"])
        out = {k: [] for k in ("source", "path", "size", "mtime_ns", "sha256", "status", "error", "n_items", "outputs",
                               *(f"{s}_ms" for s in STAGES))}

        def emit(i: int, status: str, error: str = "", outputs: Sequence[str] = (), **ms: float) -> None:
            for k in ("source", "path", "size", "mtime_ns", "sha256", "n_items"):
                out[k].append(batch[k][i])
            out["status"].append(status)
            out["error"].append(error)
            out["outputs"].append("\n".join(outputs))
            for s in STAGES:
                out[f"{s}_ms"].append(float(ms.get(s, 0.0)))

        ready, rows = [], []
        for i in range(n):
            if batch["status"][i] != "ready":
                emit(i, str(batch["status"][i]), str(batch["error"][i]), read=batch["read_ms"][i])
                continue
            job, stat = _row_job({k: batch[k][i] for k in _JOB_COLUMNS})
            job = replace(job, base=PurePosixPath(str(batch["item_base"][i])))
            x = torch.from_numpy(_bytes_array(batch["x"][i], batch["x_shape"][i], np.float32).copy())
            ready.append(_Ready(job, stat, _bytes_array(batch["display"][i], batch["display_shape"][i], np.uint8), x,
                                float(batch["read_ms"][i]),
                                aligned=_bytes_array(batch["aligned"][i], batch["aligned_shape"][i], np.uint8),
                                n_items=int(batch["n_items"][i])))
            rows.append(i)
        if not ready:
            return out
        try:
            inv = invert_items(self.eng, torch.cat([r.x for r in ready]), opts, self.mixing)  # x [B, C, 256, 256]
        except RuntimeError as e:  # e.g. out of memory: every image of this batch fails, the run goes on
            for i, r in zip(rows, ready):
                emit(i, "failed", f"model failed on this batch: {type(e).__name__}: {e}", read=r.read_ms)
            return out
        for j, (i, r) in enumerate(zip(rows, ready)):
            t0 = time.perf_counter()
            if self.output is None:
                paths, reason = write_item(r, j, inv, opts, self.inputs)
                names = [p.relative_to(opts.out_dir).as_posix() for p in paths.values()] if paths is not None else None
            else:
                names, reason = self._write_to_uri(r, j, inv)
            if names is None:
                emit(i, "failed", reason, read=r.read_ms, encode=inv.encode_ms, synthesize=inv.synth_ms)
                continue
            k = r.n_items
            emit(i, "ok", outputs=names, read=r.read_ms * k, encode=inv.encode_ms * k, synthesize=inv.synth_ms * k,
                 write=_ms(t0) * k)
        return out

    def _write_to_uri(self, r: _Ready, j: int, inv: Inverted) -> tuple[list[str] | None, str | None]:
        """`write_item` into a temp folder, then upload to the output URI: `(names, None)`, the
        relative names written, or `(None, reason)`."""
        with tempfile.TemporaryDirectory(prefix="psp-engine-item-") as tmp:
            opts = replace(self.opts, out_dir=Path(tmp))
            paths, reason = write_item(r, j, inv, opts, self.inputs)
            if paths is None:
                return None, reason
            try:
                return self.output.upload(paths, opts.out_dir), None
            except Exception as e:  # noqa: BLE001 - any filesystem's failure fails this item, not the run
                return None, f"{r.job.source}: cannot write its outputs to {self.output.uri} ({type(e).__name__}: {e})"

    def _maybe_fail(self) -> None:
        self.calls += 1
        if not self.fault_marker:
            return
        try:
            text = Path(self.fault_marker).read_text().strip()
            if self.calls < int(text or 1):
                return
            os.unlink(self.fault_marker)
        except FileNotFoundError:
            return  # not set, or another actor took it
        os._exit(17)


def run_distributed(eng: Engine, jobs: Sequence[Job], opts: RunOptions, manifest: Manifest,
                    load_args: dict, cluster: ClusterOptions, progress=None,
                    output: RemoteOutput | None = None) -> tuple[Summary, int]:
    """`engine.batch.run_jobs` on a Ray cluster (pipeline in the module docstring).

    Ray must be connected (`connect`).

    Args:
        eng: the engine loaded on the driver (checks, mixing validation, the fingerprint).
        jobs: from `plan_jobs` (`engine.cluster.remote.plan_jobs` when inputs are URIs).
        opts: output options; `opts.out_dir` must be `manifest.out_dir` (with `output`, its staging folder).
        manifest: an open `Manifest` (written only here, on the driver).
        load_args: `engine.load` keyword arguments for the actors (the driver's resolved backend).
        cluster: actors and GPUs.
        progress: anything with `update(n)`, advanced once per input.
        output: the `--output` URI's `RemoteOutput` (outputs are uploaded there; its manifest is
            copied there every `engine.cluster.remote.SYNC_RECORDS` results or `SYNC_SECONDS` s; the final
            copy is the caller's), or None for a local output folder.

    Returns:
        `(summary, actors)`: the run's `Summary` and the number of model actors used.

    Raises:
        CheckpointError, UsageError: see `engine.batch.prepare_run`.
        OSError: the manifest cannot be written.
        ray.exceptions.RayError: the cluster failed beyond Ray's retries.
    """
    import ray

    prepare_run(eng, jobs, opts)
    opts = replace(opts, out_dir=Path(os.path.abspath(opts.out_dir)))
    t_start = time.perf_counter()
    rec = Recorder(manifest, progress, opts)
    todo = rec.todo(jobs, stat_of=input_stat, digest_of=input_digest)
    n_actors = cluster.num_actors or default_actors(cluster)
    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's own bar counts inputs
        ctx.verbose_stats_logs = False
        ds = ray.data.from_items([_job_row(job, stat) for job, stat in todo],
                                 override_num_blocks=min(len(todo), 1000))
        # Read tasks take half a CPU, or none when the actors hold every CPU (they would never be scheduled).
        free_cpus = ray.available_resources().get("CPU", 0) - n_actors * cluster.cpus_per_actor
        read_cpus = 0.5 if free_cpus >= 0.5 else 0
        ds = ds.flat_map(read_stage, fn_kwargs={"label_nc": eng.label_nc, "opts": opts}, num_cpus=read_cpus)
        ds = ds.map_batches(
            Invert, fn_constructor_kwargs={"load_args": load_args, "opts": opts, "threads": cluster.cpus_per_actor,
                                           "inputs": file_ids([job.source for job in jobs]),
                                           "fault_marker": os.environ.get(FAULT_ENV) or None,
                                           "output_uri": output.uri if output is not None else None},
            batch_size=opts.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cluster.cpus_per_actor, num_gpus=cluster.gpus_per_actor or None)
        for row in ds.iter_rows():
            stat = InputStat(str(row["path"]), int(row["size"]), int(row["mtime_ns"]), str(row["sha256"]) or None)
            source, status = str(row["source"]), str(row["status"])
            timings = {s: float(row[f"{s}_ms"]) for s in STAGES}
            if status == "ok":
                rec.written(stat, int(row["n_items"]), [opts.out_dir / p for p in str(row["outputs"]).split("\n")],
                            timings)
            else:
                rec.failed(source, stat, str(row["error"]), {k: v for k, v in timings.items() if v})
            if output is not None:
                output.record_made()
    rec.summary.seconds = time.perf_counter() - t_start
    return rec.summary, n_actors
