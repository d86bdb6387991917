"""`python -m engine.serve`: pSp inversion as an HTTP service on Ray Serve, with a web page.

Source: Ray Serve's FastAPI ingress and `@serve.batch` dynamic batching; the work per request is
the engine's (`reference.images` reading and conversion, `Engine.encode` / `synthesize`,
`engine.latents` for edits and style mixing), so the service's PNG of an image equals
`engine.run`'s `<name>.png` (same backend, same torch thread count, the request alone in its batch).

API (JSON errors are `{"error": "<one line naming the problem>"}` with a 4xx/5xx status):
    GET  /                 the web page (engine/web)
    GET  /healthz          {"status": "ok"}
    GET  /v1/info          the model (sizes, n_styles, backend, precision, edit directions), limits, batching
    GET  /v1/stats         this replica's batches: requests per batch of the encoder and the generator
    POST /v1/invert        multipart: image (file); optional resize (bool), n_outputs (K), seed,
                           latent_mask ("8-17"), mix_alpha, edit ("name:strength", repeatable).
                           JSON {"image": PNG base64, "mixes": [PNG base64] * K, "w_plus": float32
                           [n_styles][512] as JSON numbers (the edited latents), "size", "n_styles",
                           "timings_ms"}; with `Accept: image/png`, the PNG of the inversion itself.
    POST /v1/synthesize    JSON {"w_plus": [n_styles][512] (or [1][n_styles][512], or a w [512]),
                           "edits": {"name": strength}, "resize": bool}, or multipart latent (.npy,
                           read with allow_pickle=False) plus optional edit/resize fields -> image/png.

Limits: upload bytes (413), pixels before decoding (400), per-request timeout (504), a bounded
queue per replica (`max_ongoing_requests` running + `max_queued_requests` waiting; beyond that Serve
answers 503 with `Retry-After`). The service binds to 127.0.0.1 unless `--host` says otherwise.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (`request: Request`)
# from the functions themselves, which `serve.ingress` pickles by value without module globals.

import argparse
import asyncio
import base64
import io
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from ray.serve.config import BackpressureConfig

from reference.cli import int_at_least
from reference.errors import PSPError, UsageError
from reference.images import input_channels, read_input, tensor_to_uint8, to_input_tensor

from export.backends import BACKENDS, PRECISIONS

from . import latents as lt

WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


@dataclass(frozen=True)
class ServeOptions:
    """What `python -m engine.serve` runs: the model, the limits and the batching.

    Attributes:
        checkpoint: pSp checkpoint file (required: the service does not build the demo).
        backend, device, precision, trust_pickle: as `engine.load`.
        edit_dir: folder of edit directions (`<name>.npy`, as `--edit` takes), or None.
        replicas: model replicas (each loads the engine once).
        cpus_per_replica: CPUs each replica reserves and runs torch on.
        gpus_per_replica: GPUs each replica reserves.
        max_batch_size, batch_wait_timeout_s: dynamic batching (`@serve.batch`).
        max_upload_bytes: largest request body (B).
        max_pixels: largest image (width*height), checked before decoding.
        max_n_outputs: largest K of style mixing per request.
        request_timeout_s: per-request time limit (s): 504 after it.
        max_ongoing_requests, max_queued_requests: per replica; beyond both, 503 + Retry-After.
        retry_after_s: the Retry-After of a 503 (s).
    """

    checkpoint: str
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "auto"
    trust_pickle: bool = False
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
    """A request the service refuses: HTTP `status` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def png_bytes(rgb: np.ndarray) -> bytes:
    """`[H, W, 3]` uint8 -> PNG bytes, as `reference.images.atomic_write_image` saves a `.png`."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class BodyLimit:
    """ASGI middleware: a request body over `limit_bytes` is answered 413 before it is read whole.

    The limit is a class attribute, set by the replica from its options (the app object itself
    is built at import, in every replica process)."""

    limit_bytes = ServeOptions.max_upload_bytes

    def __init__(self, app):
        self.app = app

    @property
    def limit(self) -> int:
        return BodyLimit.limit_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _TooLarge.respond(send, self.limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _TooLarge.respond(send, self.limit)


class _TooLarge(Exception):
    @staticmethod
    async def respond(send, limit: int) -> None:
        body = json.dumps({"error": f"request body over the service's limit of {limit:,} bytes; send a smaller "
                                    "image (the limit is max_upload_bytes in GET /v1/info)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


app = FastAPI(title="psp-engine", docs_url=None, redoc_url=None)
app.add_middleware(BodyLimit)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return _error(e.status, str(e))


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

    def as_dict(self) -> dict:
        out = {}
        for stage, hist in self.sizes.items():
            batches, requests = sum(hist.values()), sum(k * v for k, v in hist.items())
            out[stage] = {"batches": batches, "requests": requests,
                          "mean_requests_per_batch": requests / batches if batches else 0.0,
                          "histogram": {str(k): v for k, v in sorted(hist.items())}}
        return out


def _web_file(name: str) -> bytes:
    return resources.files("engine").joinpath("web", name).read_bytes()


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
        from .api import load

        torch.set_num_threads(opts.cpus_per_replica)
        BodyLimit.limit_bytes = opts.max_upload_bytes
        self.opts = opts
        self.eng = load(opts.checkpoint, backend=opts.backend, device=opts.device, precision=opts.precision,
                        trust_pickle=opts.trust_pickle)
        self.edits = load_edit_dir(opts.edit_dir, self.eng.n_styles) if opts.edit_dir else {}
        self.stats = _Stats()
        for method in (self._encode_batch, self._synthesize_batch):
            method.set_max_batch_size(opts.max_batch_size)
            method.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

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

    async def _timed(self, coro):
        try:
            return await asyncio.wait_for(coro, self.opts.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took over the service's limit of {self.opts.request_timeout_s:g} s; "
                                "retry later or with a smaller request") from None

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def page(self):
        return HTMLResponse(_web_file("index.html"))

    @app.get("/static/{name}")
    async def static(self, name: str):
        if name not in WEB_FILES:
            raise ApiError(404, f"/static/{name}: no such file")
        return Response(_web_file(name), media_type=WEB_FILES[name])

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info(self):
        eng = self.eng
        try:
            default_mask = lt.default_latent_mask(eng.n_styles)
        except PSPError:
            default_mask = None
        return {
            "checkpoint": Path(eng.checkpoint).name, "backend": eng.backend, "device": str(eng.device),
            "precision": eng.precision, "why": eng.reason, "output_size": eng.output_size,
            "encoder_size": 256, "n_styles": eng.n_styles, "input_nc": eng.input_nc, "label_nc": eng.label_nc,
            "dataset_type": eng.dataset_type, "input_kind": eng.description.input_kind, "is_demo": eng.is_demo,
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
        return await self._timed(self._invert(request))

    @app.post("/v1/synthesize")
    async def synthesize(self, request: Request):
        return await self._timed(self._synthesize(request))

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
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "body: not valid JSON") from None
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


def build_app(opts: ServeOptions):
    """The Serve application of `opts` (not started; `serve.run` it, or `start`)."""
    deployment = PSPService.options(
        num_replicas=opts.replicas,
        max_ongoing_requests=opts.max_ongoing_requests,
        max_queued_requests=opts.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=opts.retry_after_s),
        ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": opts.gpus_per_replica},
    )
    return deployment.bind(opts)


def start(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Serve's HTTP proxy on `host:port` and run the app (Ray must be initialised).

    Raises:
        UsageError: a missing checkpoint or edit folder (checked before any replica starts).
    """
    if not Path(opts.checkpoint).is_file():
        raise UsageError(f"--checkpoint {opts.checkpoint}: no such file")
    if opts.edit_dir is not None and not Path(opts.edit_dir).is_dir():
        raise UsageError(f"--edit-dir {opts.edit_dir}: no such folder")
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": opts.request_timeout_s + 5})
    serve.run(build_app(opts), name="psp", route_prefix="/")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    _positive_int = int_at_least(1)
    p = argparse.ArgumentParser(prog="python -m engine.serve",
                                description="Serve pSp inversion over HTTP (Ray Serve, dynamic batching) with a web page at /.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="pSp checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="as engine.run (default auto)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help="as engine.run (default auto)")
    p.add_argument("--trust-pickle", action="store_true", help="as engine.run: only for checkpoints you trust")
    p.add_argument("--edit-dir", metavar="DIR", default=None, help="folder of edit directions <name>.npy for the sliders")
    p.add_argument("--replicas", type=_positive_int, default=1, help="model replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=_positive_int, default=1, help="CPUs (torch threads) per replica (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (default 0)")
    d = ServeOptions("")
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
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the service until Ctrl-C. Exit codes: 0 after Ctrl-C, 2 usage error."""
    args = build_parser().parse_args(argv)
    opts = ServeOptions(checkpoint=args.checkpoint, backend=args.backend, device=args.device, precision=args.precision,
                        trust_pickle=args.trust_pickle, edit_dir=args.edit_dir, replicas=args.replicas,
                        cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout,
                        max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels,
                        request_timeout_s=args.request_timeout, max_ongoing_requests=args.max_ongoing,
                        max_queued_requests=args.max_queued)
    import ray

    try:
        if not Path(opts.checkpoint).is_file():
            raise UsageError(f"--checkpoint {opts.checkpoint}: no such file")
        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False)
        start(opts, args.host, args.port)
        print(f"serving {opts.checkpoint} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
        while True:
            time.sleep(3600)
    except PSPError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
