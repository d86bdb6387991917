"""The one description of a loaded pSp model, carried by every backend and written as the one sidecar.

A `ModelDescription` is built once from the checkpoint (`describe(psp, checkpoint)`), then travels
with every backend model (`model.description`), into the `Engine`, and into the JSON sidecar of
every exported artifact: `<artifact>.json` beside `model.onnx`, `model.plan`, `model.pt2`
(`sidecar_path`). The sidecar schema is one for all artifacts:

    {"format": "psp-engine/sidecar", "version": 2,
     "model": ModelDescription fields (sizes, n_styles, opts, checkpoint, precision, latent_avg ...),
     "artifact": {"kind": "onnx" | "tensorrt-plan" | "aoti-package" | "openvino-cache" | "checkpoint",
                  "part": ..., "inputs": ..., ...},
     "files": {"<artifact name>": {"size": bytes, "sha256": hex}, "<artifact name>.data": ...}}

`files` (`reference.plumbing.digests.file_records`) records the artifact and its companion files as written,
so that a cache can check them before use (`verify_artifact`); sidecars written before it have none.

Source: the attributes the official pSp code reads from a checkpoint's `opts`
(eladrich/pixel2style2pixel `models/psp.py`, `options/test_options.py`); `n_styles` as official
`2*log2(output_size) - 2`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .plumbing.digests import file_records, verify_records
from .plumbing.errors import CheckpointError
from .plumbing.files import write_json

SIDECAR_FORMAT = "psp-engine/sidecar"
SIDECAR_VERSION = 2
PRECISIONS = ("fp32", "bf16", "fp16")
# px: the side of the encoder input, the one definition of this project (official test transforms
# `Resize((256, 256))`); also the side of the official `--resize_outputs` pooling (`pSp.face_pool`)
ENCODER_SIZE = 256
INPUT_KINDS = {0: "rgb", 1: "sketch"}  # label_nc > 1: "segmentation"
# what the encoder input is, per input kind (official `transforms_config.py` test transforms)
_RESIZE = f"resize {ENCODER_SIZE}x{ENCODER_SIZE} bilinear (PIL)"
PREPROCESSING = {
    "rgb": ["convert RGB", _RESIZE, "to float (u8/255 - 0.5)/0.5 in [-1, 1]", "NCHW"],
    "sketch": ["convert L", _RESIZE, "to float u8/255 in [0, 1]", "NCHW"],
    "segmentation": ["class-id map (mode L)", f"{_RESIZE} as official", "one-hot to label_nc channels", "NCHW"],
}
POSTPROCESSING = "img is unclamped; display as clamp((img + 1) / 2, 0, 1) * 255 truncated to uint8"
COMPANION_SUFFIXES = (".data",)  # files written beside an artifact and read with it (ONNX external data `m.onnx.data`)


def _json_opts(opts: Mapping[str, Any]) -> dict:
    return {k: v for k, v in opts.items() if isinstance(v, (str, int, float, bool, type(None)))}


def checkpoint_info(checkpoint: str | os.PathLike | None) -> dict | None:
    """`{"path", "size", "sha256_first_mib"}` of a checkpoint file (None for None): identifies the
    file an artifact was made from without reading all of it."""
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    with open(p, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": str(p.resolve()), "size": p.stat().st_size, "sha256_first_mib": head}


@dataclass(frozen=True)
class ModelDescription:
    """What a pSp model is, independently of the backend that runs it.

    Attributes:
        input_nc: encoder input channels (3 RGB, 1 sketch, label_nc for segmentation).
        label_nc: 0 RGB, 1 sketch, > 1 number of segmentation classes.
        output_size: generator resolution R (px; 256, 512 or 1024 for official checkpoints).
        n_styles: W+ styles, `2*log2(R) - 2`.
        dataset_type: the checkpoint's `opts["dataset_type"]` (e.g. "ffhq_encode").
        encoder_type: "GradualStyleEncoder", "BackboneEncoderUsingLastLayerIntoW" or "...IntoWPlus".
        learn_in_w: the encoder predicts one w repeated to every style.
        start_from_latent_avg: latent_avg is added to the codes.
        opts: the checkpoint's JSON-safe opts (inference defaults filled in).
        checkpoint: `checkpoint_info` of the source file, or None.
        precision: what the backend computes in: "fp32", "bf16" or "fp16" (activations; the style
            affines, demodulation, mapping and PixelNorm stay fp32 in every precision).
        backend: the backend name that runs it ("" for a bare description).
        latent_avg: `[n_styles][512]` floats (as added to the codes; zeros without latent_avg), or
            None where not recorded.
    """

    input_nc: int
    label_nc: int
    output_size: int
    n_styles: int
    dataset_type: str | None = None
    encoder_type: str | None = None
    learn_in_w: bool = False
    start_from_latent_avg: bool = True
    opts: dict = field(default_factory=dict)
    checkpoint: dict | None = None
    precision: str = "fp32"
    backend: str = ""
    latent_avg: list | None = field(default=None, repr=False, compare=False)

    @property
    def encoder_size(self) -> int:
        """The encoder input's side, px (`ENCODER_SIZE`, 256 for every pSp): x is `[B, input_nc, 256, 256]`."""
        return ENCODER_SIZE

    @property
    def input_kind(self) -> str:
        """"rgb", "sketch" or "segmentation"."""
        return INPUT_KINDS.get(self.label_nc, "segmentation")

    @property
    def preprocessing(self) -> dict:
        """The encoder input's preprocessing, for sidecars and services."""
        return {"input": self.input_kind, "steps": PREPROCESSING[self.input_kind]}

    def replace(self, **changes: Any) -> "ModelDescription":
        """A copy with fields changed (e.g. `precision`, `backend`)."""
        return dataclasses.replace(self, **changes)

    def to_json(self, latent_avg: bool = True) -> dict:
        """JSON-safe dict of every field (`latent_avg` left out unless asked), plus preprocessing."""
        d = dataclasses.asdict(self)
        if not latent_avg:
            d.pop("latent_avg")
        d["preprocessing"] = self.preprocessing
        d["postprocessing"] = POSTPROCESSING
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "sidecar") -> "ModelDescription":
        """Inverse of `to_json`.

        Raises:
            CheckpointError: a required field is missing (named with `where`).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise CheckpointError(f"{where}: model description lacks {', '.join(missing)}; re-export the artifact")
        return cls(**{k: v for k, v in d.items() if k in names})


def describe_opts(opts: Mapping[str, Any], checkpoint: str | os.PathLike | None = None, precision: str = "fp32",
                  backend: str = "", latent_avg: list | None = None) -> ModelDescription:
    """The description of the model a checkpoint's completed opts define, without its weights (what
    `engine.run` checks its manifest against before loading anything).

    Args:
        opts: the opts as `reference.psp.complete_opts` / `psp_opts` give them (inference defaults
            and `n_styles` filled in).
        checkpoint: its file (recorded by `checkpoint_info`), or None.
        precision, backend, latent_avg: as in `ModelDescription` (latent_avg None: not recorded).

    Raises:
        KeyError: opts that were not completed (a missing `input_nc`, `output_size`, `n_styles` ...).
    """
    return ModelDescription(
        input_nc=int(opts["input_nc"]), label_nc=int(opts["label_nc"] or 0), output_size=int(opts["output_size"]),
        n_styles=int(opts["n_styles"]), dataset_type=opts["dataset_type"], encoder_type=opts.get("encoder_type"),
        learn_in_w=bool(opts["learn_in_w"]), start_from_latent_avg=bool(opts["start_from_latent_avg"]),
        opts=_json_opts(opts), checkpoint=checkpoint_info(checkpoint), precision=precision, backend=backend,
        latent_avg=latent_avg,
    )


def describe(psp, checkpoint: str | os.PathLike | None = None, precision: str = "fp32",
             backend: str = "") -> ModelDescription:
    """The description of a loaded `reference.PSP`: `describe_opts` of its opts, with its latent_avg.

    Args:
        psp: a `reference.PSP` (its `opts` completed, its `latent_avg` `[n_styles, 512]`).
        checkpoint: its file (recorded by `checkpoint_info`), or None.
        precision, backend: as in `ModelDescription`.
    """
    la = psp.latent_avg.detach().float().cpu()
    if not psp.start_from_latent_avg:
        la = la * 0
    return describe_opts(psp.opts, checkpoint, precision, backend,
                         la.reshape(-1, 512).expand(int(psp.n_styles), 512).tolist())


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """The sidecar of an artifact: `<artifact>.json` (`m.onnx` -> `m.onnx.json`, `m.plan` -> `m.plan.json`)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def artifact_files(artifact: str | os.PathLike) -> list[Path]:
    """The files an artifact consists of: itself (a file, or every file in it when it is a folder,
    such as a compiled-model cache) and its companions that exist (`<artifact>.data`; an OpenVINO IR
    `<name>.xml`: `<name>.bin`)."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return sorted(p for p in artifact.iterdir() if p.is_file())
    companions = [artifact.with_name(artifact.name + s) for s in COMPANION_SUFFIXES]
    if artifact.suffix == ".xml":  # an OpenVINO IR: its weights `<name>.bin`
        companions.append(artifact.with_suffix(".bin"))
    return [artifact] + [c for c in companions if c.is_file()]


def write_sidecar(artifact: str | os.PathLike, description: ModelDescription | None, kind: str,
                  **artifact_info: Any) -> Path:
    """Write the one sidecar schema beside `artifact` (atomically), with the size and sha256 of
    every file of the artifact (`artifact_files`) as they are now.

    Args:
        artifact: the exported file (or folder: its files are recorded, by name).
        description: the model it holds (its `precision` is the artifact's); None for a checkpoint,
            whose own opts describe it (its sidecar records only its files; `read_sidecar` refuses it).
        kind: "onnx", "tensorrt-plan", "aoti-package", "openvino-cache" or "checkpoint".
        artifact_info: kind-specific facts (part, IO names/shapes/dtypes, opset, profiles, GPU ...).

    Returns:
        The sidecar path.

    Raises:
        OSError: a file cannot be read or the sidecar written.
    """
    files = artifact_files(artifact)
    return write_json(sidecar_path(artifact), {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
        "model": None if description is None else description.to_json(),
        "artifact": {"kind": kind, **artifact_info}, "files": file_records(files),
    })


def verify_artifact(artifact: str | os.PathLike) -> list[str]:
    """What is wrong with `artifact` against the sizes and digests its sidecar records (`files`).

    Sizes cost a stat; digests a read of each file per file version (`reference.plumbing.digests.file_sha256`
    remembers them), so a cache entry is checked on every use at the cost of a stat once verified.
    A folder artifact also fails on files in it that the sidecar does not record.

    Returns:
        One phrase per problem (a missing or unreadable sidecar, one without records, a missing,
        truncated or changed file, an unrecorded file); empty when the artifact is as written.
    """
    artifact = Path(artifact)
    path = sidecar_path(artifact)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"{path.name}: missing"]
    except (OSError, ValueError) as e:
        return [f"{path.name}: unreadable ({e})"]
    records = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(records, dict) or not records:
        return [f"{path.name}: records no sizes and digests (written by an older version)"]
    folder = artifact if artifact.is_dir() else artifact.parent
    problems = verify_records(folder, records)
    if artifact.is_dir():
        problems += [f"{p.name}: not recorded" for p in artifact_files(artifact) if p.name not in records]
    elif artifact.name not in records:
        problems.append(f"{artifact.name}: not recorded")
    return problems


def read_sidecar(artifact: str | os.PathLike, kind: str | None = None) -> tuple[ModelDescription, dict]:
    """Read the sidecar of `artifact`.

    Args:
        artifact: the exported file.
        kind: the expected artifact kind, or None for any.

    Returns:
        `(description, artifact_info)`; artifact_info includes "kind".

    Raises:
        CheckpointError: missing or unreadable sidecar, another format or version, another kind;
            the message says how to re-export.
    """
    path = sidecar_path(artifact)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the sidecar of {Path(artifact).name} is missing; export it again "
                              "(python -m export.onnx / export.tensorrt / export.aoti write it)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable sidecar ({e}); export the artifact again") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or meta.get("version") != SIDECAR_VERSION:
        fmt = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a psp-engine sidecar of version {SIDECAR_VERSION} (found {fmt}); "
                              "export the artifact again with this version")
    info = meta.get("artifact") or {}
    if kind is not None and info.get("kind") != kind:
        raise CheckpointError(f"{path}: describes a {info.get('kind')!r} artifact, expected {kind!r}")
    return ModelDescription.from_json(meta.get("model") or {}, str(path)), info
