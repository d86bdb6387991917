"""`python -m engine.serve`: pSp inversion as an HTTP service on Ray Serve, with a web page.

Source: Ray Serve's FastAPI ingress and `@serve.batch` dynamic batching; the work per request is
the engine's (`reference.images` reading and conversion, `Engine.encode` / `synthesize`,
`engine.latents` for edits and style mixing), so the service's PNG of an image equals
`engine.run`'s `<name>.png` (same backend, same torch thread count, the request alone in its batch).

API (JSON errors are `{"error": "<one line naming the problem>"}` with a 4xx/5xx status):
    GET  /                 the web page (engine/web); HEAD too
    GET  /healthz          {"status": "ok"} as soon as the replica runs (the model may still load); HEAD too
    GET  /readyz           {"status": "ready"} once the model is loaded and warmed up; before, 503
                           {"status": "loading", "stage", "elapsed_s"} (or "failed" with "error"); HEAD too
    GET  /metrics          Prometheus text format, this replica's: psp_request_total{route,status},
                           psp_request_duration_seconds{route} (histogram), psp_batch_size{stage}
                           (histogram), psp_queue_depth, psp_request_in_progress, psp_model_ready
    GET  /v1/info          the model (sizes, n_styles, backend, precision, edit directions, is_demo), limits, batching
    GET  /v1/stats         this replica's batches: requests per batch of the encoder and the generator
    POST /v1/invert        multipart: image (file); optional resize (bool), n_outputs (K), seed,
                           latent_mask ("8-17"), mix_alpha, edit ("name:strength", repeatable).
                           JSON {"image": PNG base64, "mixes": [PNG base64] * K, "w_plus": float32
                           [n_styles][512] as JSON numbers (the edited latents), "size", "n_styles",
                           "timings_ms"}; with `Accept: image/png`, the PNG of the inversion itself.
    POST /v1/synthesize    JSON {"w_plus": [n_styles][512] (or [1][n_styles][512], or a w [512]),
                           "edits": {"name": strength}, "resize": bool}, or multipart latent (.npy,
                           read with allow_pickle=False) plus optional edit/resize fields -> image/png.

Limits (`Gate`, the ASGI middleware in front of every route): upload bytes (413, Content-Length or
counted as a chunked body streams), JSON nesting depth (400), pixels before decoding (400), a bounded
queue per replica (`max_ongoing_requests` running + `max_queued_requests` waiting; beyond that 503
with `Retry-After`), and a time limit per request counted from its arrival at the replica, queue
wait included (504 JSON with `Retry-After`; Serve's proxy limit is set `PROXY_MARGIN_S` later, so
its own 408 does not answer first). The service binds to 127.0.0.1 unless `--host` says otherwise.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (`request: Request`)
# from the functions themselves, which `serve.ingress` pickles by value without module globals.

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter as PromCounter, Gauge, Histogram, generate_latest
from ray import serve
from ray.serve.config import BackpressureConfig

from reference.plumbing.cli import int_at_least, run_cli, say
from reference.plumbing.errors import PSPError, UsageError
from reference.images import input_channels, png_bytes, read_input, tensor_to_uint8, to_input_tensor  # png_bytes: engine.run's .png bytes

from export.backends import BACKENDS, PRECISIONS, check_calibration

from .. import demo
from .. import latents as lt

WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
MODEL_ROUTES = frozenset({"/v1/invert", "/v1/synthesize"})  # POSTs that queue for the model
PROBE_SLOTS = 8  # Serve admits this many requests beyond the model's slots: probes, /metrics and the page never wait
PROXY_MARGIN_S = 5.0  # Serve's proxy gives up (408) this long after our own limit (504)
MAX_JSON_DEPTH = 8  # the API's deepest JSON is 4 levels ({"w_plus": [1][n_styles][512]})


@dataclass(frozen=True)
class ServeOptions:
    """What `python -m engine.serve` runs: the model, the limits and the batching.

    Attributes:
        checkpoint: pSp checkpoint file; None: the built-in demo checkpoint (`engine.demo`, as
            `engine.run` without --checkpoint), resolved by `start` before any replica starts.
        is_demo: the checkpoint is the demo's (set by `start`; `/v1/info` reports it).
        backend, device, precision, trust_pickle, calibration: as `engine.load`.
        edit_dir: folder of edit directions (`<name>.npy`, as `--edit` takes), or None.
        replicas: model replicas (each loads the engine once).
        cpus_per_replica: CPUs each replica reserves and runs torch on.
        gpus_per_replica: GPUs each replica reserves.
        max_batch_size, batch_wait_timeout_s: dynamic batching (`@serve.batch`).
        max_upload_bytes: largest request body (B).
        max_pixels: largest image (width*height), checked before decoding.
        max_n_outputs: largest K of style mixing per request.
        request_timeout_s: per-request time limit (s), counted from the request's arrival at the
            replica (queue wait included): 504 + Retry-After after it.
        max_ongoing_requests, max_queued_requests: model requests (invert, synthesize) per replica
            running at once and waiting for a slot; beyond both, 503 + Retry-After.
        retry_after_s: the Retry-After of a 503 or 504 (s).
    """

    checkpoint: str | None = None
    is_demo: bool = False
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "auto"
    trust_pickle: bool = False
    calibration: str | None = None
    edit_dir: str | None = None
    replicas: int = 1
    cpus_per_replica: int = 1
    gpus_per_replica: float = 0.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    max_n_outputs: int = 8
    request_timeout_s: float = 60.0
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    retry_after_s: float = 1.0


class ApiError(Exception):
    """A request the service refuses: HTTP `status`, a one-line message and optional response `headers`."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


# -- metrics (this replica's process: each replica imports this module and keeps its own) ------------
# Names and labels follow Triton Inference Server's and BentoML's conventions (a `_total` request
# counter by endpoint and status, a latency histogram in seconds, a batch-size histogram, gauges for
# the queue and the requests in flight); `prometheus_client` writes the text format.

# The replica's routes reach them through `Gate.metrics` (`Gate` travels to the replica by reference;
# the replica's methods by value, with copies of the module globals they name).
METRICS = CollectorRegistry(auto_describe=True)
REQUESTS = PromCounter("psp_request", "HTTP requests answered by this replica, by route template and status",
                       ["route", "status"], registry=METRICS)
LATENCY = Histogram("psp_request_duration_seconds", "time from a request's arrival at this replica to its answer",
                    ["route"], registry=METRICS,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf")))
BATCH_SIZE = Histogram("psp_batch_size", "requests per batch of a batched model stage (encode, synthesize)",
                       ["stage"], registry=METRICS, buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")))
QUEUE_DEPTH = Gauge("psp_queue_depth", "model requests waiting in this replica for a running slot", registry=METRICS)
IN_PROGRESS = Gauge("psp_request_in_progress", "model requests running in this replica", registry=METRICS)
READY = Gauge("psp_model_ready", "1 once this replica's model is loaded and warmed up", registry=METRICS)


def retry_after(opts: "ServeOptions") -> dict:
    """The `Retry-After` header (whole seconds, at least 1) of a 503 or 504 of `opts`."""
    return {"Retry-After": str(max(1, math.ceil(opts.retry_after_s)))}


class Gate:
    """ASGI middleware in front of every route: body limit, admission, queue, time limit, metrics.

    - A body over `max_upload_bytes` is answered 413: at once from Content-Length, else counted as a
      chunked body streams (whatever the route made of the cut body, the client gets the 413).
    - Model requests (POST `MODEL_ROUTES`) run `max_ongoing_requests` at a time; up to
      `max_queued_requests` more wait for a slot (`psp_queue_depth`); beyond, 503 + Retry-After.
    - A model request not answered `request_timeout_s` after it arrived (queue wait included) gets
      504 JSON + Retry-After; Serve's proxy limit is `PROXY_MARGIN_S` later (`start`).
    - Every request is counted (`psp_request_total{route,status}`, `psp_request_duration_seconds`).

    The options are a class attribute, set by the replica (the app object is built at import, in
    every replica process). Source: the ASGI 3 HTTP spec (scope, receive, send messages).
    """

    opts = ServeOptions()
    metrics, ready = METRICS, READY  # the registry and psp_model_ready, for the replica's methods

    def __init__(self, app):
        self.app = app
        self.slots: asyncio.Semaphore | None = None  # made in the replica's event loop, on first use
        self.waiting = 0
        self.running = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        opts = Gate.opts
        limit = opts.max_upload_bytes
        state = {"status": None, "over": False, "replaced": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] = state.get("seen", 0) + len(message.get("body", b""))
                if state["seen"] > limit:
                    state["over"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                if state["over"]:  # the route answered a cut body (e.g. 400 malformed): the client gets 413
                    state["replaced"] = True
                    return await self._answer(send, state, 413, _too_large(limit))
                state["status"] = message["status"]
            elif state["replaced"]:
                return None
            await send(message)

        path = scope.get("path", "")
        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await self._answer(send, state, 413, _too_large(limit))
            elif scope.get("method") == "POST" and path in MODEL_ROUTES:
                await self._model_request(scope, limited_receive, guarded_send, send, state, opts)
            else:
                await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if state["status"] is None:
                await self._answer(send, state, 413, _too_large(limit))
        except BaseException:
            state["status"] = state["status"] or 500
            raise
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or (path if path in MODEL_ROUTES else "other")
            REQUESTS.labels(label, str(state["status"] or 500)).inc()
            LATENCY.labels(label).observe(time.perf_counter() - t0)

    async def _model_request(self, scope, receive, guarded_send, send, state, opts):
        if self.slots is None:
            self.slots = asyncio.Semaphore(opts.max_ongoing_requests)
        if self.waiting + self.running >= opts.max_ongoing_requests + opts.max_queued_requests:
            return await self._answer(send, state, 503, f"the service is busy ({self.running} requests running, "
                                      f"{self.waiting} waiting); retry later", retry_after(opts))

        async def queued():
            self.waiting += 1
            QUEUE_DEPTH.set(self.waiting)
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
                QUEUE_DEPTH.set(self.waiting)
            self.running += 1
            IN_PROGRESS.set(self.running)
            try:
                await self.app(scope, receive, guarded_send)
            finally:
                self.running -= 1
                IN_PROGRESS.set(self.running)
                self.slots.release()

        try:
            await asyncio.wait_for(queued(), opts.request_timeout_s)
        except asyncio.TimeoutError:
            if state["status"] is None:
                await self._answer(send, state, 504, f"the request took over the service's limit of "
                                   f"{opts.request_timeout_s:g} s (queue wait included); retry later or with a "
                                   "smaller request", retry_after(opts))

    @staticmethod
    async def _answer(send, state: dict, status: int, message: str, headers: dict | None = None) -> None:
        """Send our own JSON error `{"error": message}` (the response has not started)."""
        state["status"] = status
        body = json.dumps({"error": " ".join(message.split())}).encode()
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """Raised by `Gate`'s receive once a body passes the limit."""


def _too_large(limit: int) -> str:
    return (f"request body over the service's limit of {limit:,} bytes; send a smaller image "
            "(the limit is max_upload_bytes in GET /v1/info)")


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH):
    """A request body -> its JSON value, nesting bounded before parsing.

    Args:
        raw: the body (bytes, UTF-8 JSON).
        max_depth: deepest nesting of arrays and objects accepted.

    Raises:
        ApiError(400): not JSON, or nested deeper than `max_depth` (counted on the bytes, strings
            left out, so a deep body never reaches the recursive parser).
    """
    flat = re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', raw)  # strings cannot hold brackets that count
    b = np.frombuffer(flat, np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}")))
    depth = int(np.cumsum(step).max()) if step.size else 0
    if depth > max_depth:
        raise ApiError(400, f"body: JSON nested {depth} levels deep; the API takes at most {max_depth} "
                            '(e.g. {"w_plus": [[...512 numbers] x n_styles]})')
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "body: not valid JSON") from None


app = FastAPI(title="psp-engine", docs_url=None, redoc_url=None)
app.add_middleware(Gate)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return _error(e.status, str(e), e.headers)


@app.exception_handler(PSPError)
async def _psp_error(request: Request, e: PSPError):
    return _error(400, str(e))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}" for err in e.errors()]
    return _error(422, "; ".join(parts))


class _Stats:
    """Requests per batch of each batched stage, for GET /v1/stats."""

    def __init__(self):
        self.sizes = {"encode": Counter(), "synthesize": Counter()}

    def record(self, stage: str, n: int) -> None:
        self.sizes[stage][n] += 1
        BATCH_SIZE.labels(stage).observe(n)

    def as_dict(self) -> dict:
        out = {}
        for stage, hist in self.sizes.items():
            batches, requests = sum(hist.values()), sum(k * v for k, v in hist.items())
            out[stage] = {"batches": batches, "requests": requests,
                          "mean_requests_per_batch": requests / batches if batches else 0.0,
                          "histogram": {str(k): v for k, v in sorted(hist.items())}}
        return out


def _web_file(name: str) -> bytes:
    return resources.files("engine.serve").joinpath("web", name).read_bytes()


async def _form(request: Request):
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(415, f"content-type {ctype or 'missing'}: send multipart/form-data")
    try:
        return await request.form(max_files=2, max_fields=64)
    except Exception as e:  # noqa: BLE001 - starlette raises several types for a malformed body
        raise ApiError(400, f"malformed multipart body: {type(e).__name__}: {e}") from None


def _bool(value, name: str) -> bool:
    if value in (None, "", False, "false", "0", 0):
        return False
    if value in (True, "true", "1", 1):
        return True
    raise ApiError(422, f"{name}: expected true or false, got {value!r}")


def _int(value, name: str, lo: int, hi: int) -> int:
    if value in (None, ""):
        return lo
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"{name}: expected an integer, got {value!r}") from None
    if not lo <= v <= hi:
        raise ApiError(422, f"{name}: expected {lo}..{hi}, got {v}")
    return v


def _float(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ApiError(422, f"{name}: expected a finite number")
    return v


def load_edit_dir(folder: str | os.PathLike, n_styles: int) -> dict[str, lt.Edit]:
    """Every `<name>.npy` direction of `folder`, loaded (`engine.latents.load_edit`), by name.

    Raises:
        UsageError: the folder does not exist or holds no .npy.
        LatentFileError: a bad direction file (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--edit-dir {folder}: no such folder")
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise UsageError(f"--edit-dir {folder}: no .npy direction in it")
    return {f.stem: lt.load_edit(lt.Edit(f, 1.0), n_styles) for f in files}


# The replica comes last: `serve.ingress` pickles the app and its routes when the class is defined,
# so every helper they use must exist by then.


@serve.deployment
@serve.ingress(app)
class PSPService:
    """The replica: loads the engine and the edit directions once, batches requests to the model.

    Args:
        opts: the service's `ServeOptions`.
    """

    def __init__(self, opts: ServeOptions):
        from ..cluster.ray_local import loopback_replica_grpc

        loopback_replica_grpc()  # on this project's own local instance: the replica's gRPC server on 127.0.0.1 too
        torch.set_num_threads(opts.cpus_per_replica)
        Gate.opts = opts
        self.opts = opts
        self.eng = None  # set by `_load` once the model is warm
        self.edits: dict[str, lt.Edit] = {}
        self.stage, self.error, self.t0 = "starting", None, time.monotonic()
        self.stats = _Stats()
        for method in (self._encode_batch, self._synthesize_batch):
            method.set_max_batch_size(opts.max_batch_size)
            method.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)
        # The model loads in the background, so /healthz and /readyz answer (and report progress)
        # while it does; the model routes answer 503 + Retry-After until it is ready.
        threading.Thread(target=self._load, name="psp-load", daemon=True).start()

    def _load(self) -> None:
        """Load the engine and the edit directions, run one warm-up inversion, then mark the replica ready."""
        from ..api import load

        opts = self.opts
        try:
            self.stage = f"loading {Path(opts.checkpoint).name} (backend {opts.backend}, {opts.device})"
            eng = load(opts.checkpoint, backend=opts.backend, device=opts.device, precision=opts.precision,
                       trust_pickle=opts.trust_pickle, calibration=opts.calibration)
            self.edits = load_edit_dir(opts.edit_dir, eng.n_styles) if opts.edit_dir else {}
            self.stage = f"warming up ({eng.backend}, {eng.precision}, {eng.output_size} px)"
            w = eng.encode(torch.zeros(1, eng.input_nc, eng.encoder_size, eng.encoder_size))
            eng.synthesize(w, False)
            self.eng = eng
            self.stage = "ready"
            Gate.ready.set(1)
        except Exception as e:  # noqa: BLE001 - reported by /readyz (and by the CLI, which then stops)
            self.error = " ".join(str(e).split()) if isinstance(e, PSPError) else f"{type(e).__name__}: {e}"
            self.stage = "failed"

    def _model(self):
        """The loaded engine, or ApiError 503 + Retry-After while it loads (500 if loading failed)."""
        if self.eng is not None:
            return self.eng
        if self.error is not None:
            raise ApiError(500, f"the model failed to load: {self.error}")
        raise ApiError(503, f"the model is still loading ({self.stage}); retry in a few seconds (GET /readyz "
                            "answers 200 once it is ready)", retry_after(self.opts))

    # -- batched model calls ---------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """x `[1, C, 256, 256]` per request -> w_plus `[1, n_styles, 512]` per request, one forward."""
        self.stats.record("encode", len(xs))
        w = await asyncio.to_thread(self.eng.encode, torch.cat(xs))
        return list(w.cpu().split(1))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _synthesize_batch(self, items: list[tuple[torch.Tensor, bool]]) -> list[np.ndarray]:
        """(w_plus `[n_i, n_styles, 512]`, resize) per request -> `[n_i, R, R, 3]` uint8 per request."""
        self.stats.record("synthesize", len(items))
        out: list[np.ndarray | None] = [None] * len(items)
        for resize in (False, True):
            idx = [i for i, (_, r) in enumerate(items) if r == resize]
            if not idx:
                continue
            w = torch.cat([items[i][0] for i in idx])
            img = tensor_to_uint8(await asyncio.to_thread(self.eng.synthesize, w, resize))
            start = 0
            for i in idx:
                n = items[i][0].shape[0]
                out[i], start = img[start:start + n], start + n
        return out

    # -- routes ----------------------------------------------------------------------------------

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page(self):
        return HTMLResponse(_web_file("index.html"))

    @app.get("/static/{name}")
    async def static(self, name: str):
        if name not in WEB_FILES:
            raise ApiError(404, f"/static/{name}: no such file")
        return Response(_web_file(name), media_type=WEB_FILES[name])

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self):
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self):
        if self.eng is not None:
            return {"status": "ready"}
        if self.error is not None:
            return JSONResponse({"status": "failed", "error": self.error}, status_code=503)
        return JSONResponse({"status": "loading", "stage": self.stage, "elapsed_s": round(time.monotonic() - self.t0, 1)},
                            status_code=503, headers=retry_after(self.opts))

    @app.get("/metrics")
    async def metrics(self):
        return Response(generate_latest(Gate.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info(self):
        eng = self._model()
        try:
            default_mask = lt.default_latent_mask(eng.n_styles)
        except PSPError:
            default_mask = None
        return {
            "checkpoint": Path(eng.checkpoint).name, "backend": eng.backend, "device": str(eng.device),
            "precision": eng.precision, "why": eng.reason, "output_size": eng.output_size,
            "encoder_size": eng.encoder_size, "n_styles": eng.n_styles, "input_nc": eng.input_nc, "label_nc": eng.label_nc,
            "dataset_type": eng.dataset_type, "input_kind": eng.description.input_kind,
            "is_demo": self.opts.is_demo or eng.is_demo,
            "edits": {name: {"shape": list(e.direction.shape), "sha256": e.sha256} for name, e in self.edits.items()},
            "default_latent_mask": default_mask,
            "limits": {k: getattr(self.opts, k) for k in ("max_upload_bytes", "max_pixels", "max_n_outputs",
                                                           "request_timeout_s", "max_ongoing_requests",
                                                           "max_queued_requests")},
            "batching": {"max_batch_size": self.opts.max_batch_size,
                         "batch_wait_timeout_s": self.opts.batch_wait_timeout_s, "replicas": self.opts.replicas},
        }

    @app.get("/v1/stats")
    async def stats(self):
        return {"replica_pid": os.getpid(), **self.stats.as_dict()}

    @app.post("/v1/invert")
    async def invert(self, request: Request):
        self._model()
        return await self._invert(request)

    @app.post("/v1/synthesize")
    async def synthesize(self, request: Request):
        self._model()
        return await self._synthesize(request)

    async def _invert(self, request: Request):
        t0 = time.perf_counter()
        form = await _form(request)
        upload = form.get("image")
        if upload is None or not hasattr(upload, "read"):
            raise ApiError(422, "image: missing; send the photo as a multipart file field named 'image'")
        data = await upload.read()
        name = upload.filename or "image"
        resize = _bool(form.get("resize"), "resize")
        k = _int(form.get("n_outputs"), "n_outputs", 0, self.opts.max_n_outputs)
        seed = _int(form.get("seed"), "seed", 0, 2**32 - 1)
        alpha = form.get("mix_alpha")
        mask_spec = form.get("latent_mask") or None
        try:
            alpha = lt.check_alpha(_float(alpha, "mix_alpha")) if alpha not in (None, "") else None
        except PSPError as e:
            raise ApiError(422, f"mix_alpha: {e}") from None
        try:  # the CLI's checks; their messages name the CLI's flag, renamed to the form's field
            if k and mask_spec is None:
                mask = lt.default_latent_mask(self.eng.n_styles)  # refused on a model without fine styles
            else:
                mask = lt.parse_latent_mask(mask_spec, self.eng.n_styles) if mask_spec else None
        except PSPError as e:
            raise ApiError(422, str(e).replace("--latent-mask", "latent_mask")) from None
        edits = self._edits([(s, None) for s in form.getlist("edit")])
        x = await asyncio.to_thread(self._read, data, name)
        t_read = time.perf_counter()
        w = lt.apply_edits(await self._encode_batch(x), edits)  # [1, n_styles, 512]
        t_enc = time.perf_counter()
        w_all = w
        if k:
            w_inject = await asyncio.to_thread(self.eng.mapping, torch.from_numpy(lt.mixing_z(seed, k)))
            w_all = torch.cat([w, lt.mix_with_w(w, w_inject.cpu(), mask, alpha).flatten(0, 1)])  # [1+K, S, 512]
        images = await self._synthesize_batch((w_all, resize))
        t_syn = time.perf_counter()
        if "image/png" in request.headers.get("accept", ""):
            return Response(png_bytes(images[0]), media_type="image/png")
        b64 = [base64.b64encode(png_bytes(im)).decode("ascii") for im in images]
        return {"image": b64[0], "mixes": b64[1:], "w_plus": w[0].numpy().astype(np.float32).tolist(),
                "size": int(images.shape[1]), "n_styles": self.eng.n_styles,
                "timings_ms": {"read": 1e3 * (t_read - t0), "encode": 1e3 * (t_enc - t_read),
                               "synthesize": 1e3 * (t_syn - t_enc)}}

    async def _synthesize(self, request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body = parse_json(await request.body())
            if not isinstance(body, dict) or "w_plus" not in body:
                raise ApiError(422, 'body: expected {"w_plus": [[...512 numbers] x n_styles], "edits": {...}}')
            w = await asyncio.to_thread(self._latent_from_json, body["w_plus"])
            edits_in = body.get("edits") or {}
            if not isinstance(edits_in, dict):
                raise ApiError(422, 'edits: expected {"name": strength, ...}')
            edits = self._edits([(n, s) for n, s in edits_in.items()])
            resize = _bool(body.get("resize"), "resize")
        elif ctype.startswith("multipart/form-data"):
            form = await _form(request)
            upload = form.get("latent")
            if upload is None or not hasattr(upload, "read"):
                raise ApiError(422, "latent: missing; send a .npy file field named 'latent' (or JSON {\"w_plus\": ...})")
            w = await asyncio.to_thread(self._latent_from_npy, await upload.read(), upload.filename or "latent.npy")
            edits = self._edits([(s, None) for s in form.getlist("edit")])
            resize = _bool(form.get("resize"), "resize")
        else:
            raise ApiError(415, f"content-type {ctype or 'missing'}: send application/json or multipart/form-data")
        images = await self._synthesize_batch((lt.apply_edits(w, edits), resize))
        return Response(png_bytes(images[0]), media_type="image/png")

    # -- helpers ---------------------------------------------------------------------------------

    def _edits(self, specs: list[tuple[str, object]]) -> list[lt.Edit]:
        """("name:strength", None) or ("name", strength) -> loaded edits; ApiError naming an unknown one."""
        out = []
        for spec, strength in specs:
            name = str(spec)
            if strength is None:
                name, _, text = name.partition(":")
                strength = text or 1.0
            strength = _float(strength, f"edit {spec!r} (name:strength): strength")
            if name not in self.edits:
                known = ", ".join(sorted(self.edits)) or "none (start the service with --edit-dir)"
                raise ApiError(422, f"edit {name!r}: no such direction; loaded: {known}")
            out.append(replace(self.edits[name], strength=strength))
        return out

    def _read(self, data: bytes, name: str) -> torch.Tensor:
        """Upload bytes -> x `[1, C, 256, 256]`, through the CLI's reader (a temporary file)."""
        if not data:
            raise ApiError(400, f"image {name!r}: empty upload")
        if input_channels(self.eng.label_nc) != self.eng.input_nc:
            raise ApiError(500, "the checkpoint's label_nc and input_nc disagree")
        with tempfile.NamedTemporaryFile(suffix=Path(name).suffix[:8]) as f:
            f.write(data)
            f.flush()
            try:
                image = read_input(f.name, self.eng.label_nc, max_pixels=self.opts.max_pixels)
                return to_input_tensor([image], self.eng.label_nc, names=[name])
            except PSPError as e:
                raise ApiError(400, str(e).replace(f.name, f"image {name!r}")) from None

    def _latent_from_npy(self, data: bytes, name: str) -> torch.Tensor:
        with tempfile.NamedTemporaryFile(suffix=".npy") as f:
            f.write(data)
            f.flush()
            try:
                w, _ = lt.load_latents(f.name, self.eng.n_styles)  # allow_pickle=False
            except PSPError as e:
                raise ApiError(400, str(e).replace(f.name, f"latent {name!r}")) from None
        if w.shape[0] != 1:
            raise ApiError(422, f"latent {name!r}: holds a batch of {w.shape[0]}; send one W+ [n_styles, 512]")
        return torch.from_numpy(np.ascontiguousarray(w))

    def _latent_from_json(self, value) -> torch.Tensor:
        try:
            a = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise ApiError(422, "w_plus: expected a nested list of numbers [n_styles][512]") from None
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return self._latent_from_npy(buf.getvalue(), "w_plus")


def build_app(opts: ServeOptions, verbose: bool = False):
    """The Serve application of `opts` (not started; `serve.run` it, or `start`); `verbose`: the
    replicas log at INFO (each request), else warnings and errors only.

    Serve hands a replica up to `max_ongoing_requests + max_queued_requests + PROBE_SLOTS` requests, so
    model requests queue in the replica (`Gate`), where the time limit counts their wait; Serve's own
    queue (`PROBE_SLOTS`, then 503 + Retry-After) only takes what a full replica's `Gate` would refuse anyway.
    """
    deployment = PSPService.options(
        num_replicas=opts.replicas,
        max_ongoing_requests=opts.max_ongoing_requests + opts.max_queued_requests + PROBE_SLOTS,
        max_queued_requests=PROBE_SLOTS,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=opts.retry_after_s),
        ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": opts.gpus_per_replica},
        logging_config=_serve_logging(verbose),
    )
    return deployment.bind(opts)


def _serve_logging(verbose: bool) -> dict:
    """Serve's `LoggingConfig` (as a dict) of the controller, proxy and replicas."""
    return {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def resolve_checkpoint(opts: ServeOptions, announce=None) -> ServeOptions:
    """`opts` with the checkpoint engine.run would use and `is_demo` set.

    Args:
        opts: `checkpoint` None for the built-in demo (`engine.demo.demo_checkpoint_path`, built on
            first use: about 1.2 GB, 20 s), else a file.
        announce: receives one-line notes of a demo build (and shows its progress bar), or None.

    Returns:
        `opts` with `checkpoint` a file path and `is_demo` True for the demo's file (given or not).

    Raises:
        UsageError: the checkpoint file does not exist.
    """
    if opts.checkpoint is None:
        return replace(opts, checkpoint=str(demo.demo_checkpoint_path(announce)), is_demo=True)
    path = Path(opts.checkpoint)
    if not path.is_file():
        raise UsageError(f"--checkpoint {path}: no such file; pass a pSp checkpoint (.pt), or leave --checkpoint "
                         "out to serve the built-in demo")
    return replace(opts, is_demo=opts.is_demo or _same_file(path, demo.demo_path()))


def start(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> ServeOptions:
    """Start Serve's HTTP proxy on `host:port` and deploy the app (Ray must be initialised); returns
    at once while the replicas load the model (`wait_ready` waits for it).

    Args:
        opts: the service; `checkpoint` None serves the demo (`resolve_checkpoint`).
        host, port: where the proxy listens.
        verbose: Serve's INFO logs (controller, proxy, replicas); else warnings and errors only.

    Returns:
        The options deployed (`resolve_checkpoint`'s).

    Raises:
        UsageError: a missing checkpoint or edit folder, a --calibration without --precision int8
            (checked before any replica starts).
    """
    opts = resolve_checkpoint(opts)
    check_calibration(opts.precision, opts.calibration)
    if opts.edit_dir is not None and not Path(opts.edit_dir).is_dir():
        raise UsageError(f"--edit-dir {opts.edit_dir}: no such folder")
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": opts.request_timeout_s + PROXY_MARGIN_S},
                logging_config=_serve_logging(verbose))
    serve.run(build_app(opts, verbose), name="psp", route_prefix="/")
    return opts


def wait_ready(url: str, timeout_s: float = 900.0, progress=None, poll_s: float = 0.25) -> list[dict]:
    """Poll `GET <url>/readyz` until a replica answers ready; the answers seen, in order.

    Args:
        url: the service's base URL (`http://127.0.0.1:8000`).
        timeout_s: how long to wait (s).
        progress: receives a line when the replica's stage changes and every 10 s, or None.
        poll_s: seconds between polls.

    Raises:
        PSPError: the model failed to load (the replica's error), or no ready answer within `timeout_s`.
    """
    t0, seen, last, last_said = time.monotonic(), [], None, 0.0
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/readyz", timeout=10) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                answer = json.loads(e.read())
            except ValueError:
                answer = {"status": "starting", "stage": f"HTTP {e.code}"}
        except (OSError, ValueError):
            answer = {"status": "starting", "stage": "the HTTP proxy is starting"}
        seen.append(answer)
        elapsed = time.monotonic() - t0
        if answer.get("status") == "ready":
            return seen
        if answer.get("status") == "failed":
            raise PSPError(f"the model failed to load in the replica: {answer.get('error')}")
        stage = answer.get("stage") or answer.get("status")
        if progress is not None and (stage != last or elapsed - last_said >= 10):
            progress(f"replica: {stage} ({elapsed:.0f} s)")
            last, last_said = stage, elapsed
        if elapsed > timeout_s:
            raise PSPError(f"the model was not ready after {timeout_s:g} s (last: {stage}); rerun with --verbose "
                           "to see Ray's logs")
        time.sleep(poll_s)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    _positive_int = int_at_least(1)
    p = argparse.ArgumentParser(prog="python -m engine.serve",
                                description="Serve pSp inversion over HTTP (Ray Serve, dynamic batching) with a web page at /.")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="official pSp checkpoint, e.g. psp_ffhq_encode.pt (default: the built-in DEMO checkpoint "
                        "with random weights, as engine.run; its outputs are not faces)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="as engine.run (default auto)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help="as engine.run (default auto)")
    p.add_argument("--calibration", metavar="DIR", default=None, help="as engine.run: --precision int8's calibration images")
    p.add_argument("--trust-pickle", action="store_true", help="as engine.run: only for checkpoints you trust")
    p.add_argument("--edit-dir", metavar="DIR", default=None, help="folder of edit directions <name>.npy for the sliders")
    p.add_argument("--replicas", type=_positive_int, default=1, help="model replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=_positive_int, default=1, help="CPUs (torch threads) per replica (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (default 0)")
    d = ServeOptions()
    p.add_argument("--max-batch-size", type=_positive_int, default=d.max_batch_size, help=f"default {d.max_batch_size}")
    p.add_argument("--batch-wait-timeout", type=float, default=d.batch_wait_timeout_s, metavar="S",
                   help=f"seconds a batch waits to fill (default {d.batch_wait_timeout_s})")
    p.add_argument("--max-upload-bytes", type=_positive_int, default=d.max_upload_bytes, help=f"default {d.max_upload_bytes}")
    p.add_argument("--max-pixels", type=_positive_int, default=d.max_pixels, help=f"default {d.max_pixels}")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="S",
                   help=f"per-request limit, then 504 (default {d.request_timeout_s:g})")
    p.add_argument("--max-ongoing", type=_positive_int, default=d.max_ongoing_requests,
                   help=f"requests a replica runs at once (default {d.max_ongoing_requests})")
    p.add_argument("--max-queued", type=_positive_int, default=d.max_queued_requests,
                   help=f"requests waiting per replica before 503 (default {d.max_queued_requests})")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Serve's logs (default: warnings and errors only)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the service until Ctrl-C (or SIGTERM). Exit codes: 0 after Ctrl-C, 2 usage or checkpoint error.

    stdout gets two lines: where it serves, once the model is ready (the first), and that it stopped
    (the last); progress and errors go to stderr (`reference.plumbing.cli.run_cli`).
    """
    return run_cli(build_parser(), _serve, argv)


def _quiet_ray(verbose: bool) -> None:
    """Unless `verbose`, this process prints only Ray's errors: a filter on the handlers of the "ray"
    logger (its children's records go through them; `ray.init` resets the logger's level, not its
    handlers' filters), and "ray.serve" at ERROR. The workers' output stays in Ray's log files
    (`log_to_driver=False`), and the replicas' and Serve's own loggers are at WARNING (`start`)."""
    import logging

    if verbose:
        return
    for handler in logging.getLogger("ray").handlers:
        handler.addFilter(lambda record: record.levelno >= logging.ERROR)
    logging.getLogger("ray.serve").setLevel(logging.ERROR)


def _serve(args: argparse.Namespace) -> int:
    opts = ServeOptions(checkpoint=args.checkpoint, backend=args.backend, device=args.device, precision=args.precision,
                        trust_pickle=args.trust_pickle, calibration=args.calibration, edit_dir=args.edit_dir, replicas=args.replicas,
                        cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout,
                        max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels,
                        request_timeout_s=args.request_timeout, max_ongoing_requests=args.max_ongoing,
                        max_queued_requests=args.max_queued)
    if opts.edit_dir is not None and not Path(opts.edit_dir).is_dir():
        raise UsageError(f"--edit-dir {opts.edit_dir}: no such folder")
    if args.checkpoint is None:
        say(demo.DEMO_NOTICE)
    opts = resolve_checkpoint(opts, say)  # the demo is built here, with its progress, before Ray starts
    url = f"http://{args.host}:{args.port}/"
    local = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::', '') else args.host}:{args.port}"
    import ray

    _quiet_ray(args.verbose)
    stopped = False
    try:
        t0 = time.perf_counter()
        say(f"starting Ray ({len(os.sched_getaffinity(0))} CPUs) ...")
        from ..cluster.ray_local import start_local_ray  # loopback only, token auth, files in a private folder

        start_local_ray(len(os.sched_getaffinity(0)), log_to_driver=args.verbose)
        say(f"starting Serve's HTTP proxy on {url} and {opts.replicas} replica(s) ...")
        start(opts, args.host, args.port, verbose=args.verbose)
        wait_ready(local, progress=say)
        say(f"ready in {time.perf_counter() - t0:.1f} s")
        print(f"serving {opts.checkpoint} on {url} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping ...")
        stopped = True
    finally:
        if ray.is_initialized():
            # The app is deleted (its replicas drain), then the instance this process started goes
            # with its Serve controller: `serve.shutdown()` would kill the controller during its own
            # graceful-shutdown task, and Ray prints that task's failure on stdout.
            with contextlib.suppress(Exception):
                serve.delete("psp")
            ray.shutdown()
    if stopped:
        print(f"stopped: {url} no longer serves", flush=True)
    return 0
