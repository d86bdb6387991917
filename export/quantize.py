"""int8 graphs for the openvino backend: NNCF post-training quantization of the cached fp32 graphs.

Source: NNCF's post-training quantization for OpenVINO models (`nncf.quantize(model,
nncf.Dataset, subset_size, preset, fast_bias_correction, ignored_scope=nncf.IgnoredScope(types,
patterns))`), OpenVINO's IR (`ov.save_model`, `Core.read_model`), and the recipe measured in
benchmarks/RESULTS.md "Issue 20: int8".

What is quantized is a `Recipe` (`RECIPES`, default `DEFAULT_RECIPE`): which parts ("encoder",
"generator") and, in each, which operations keep float inputs. NNCF's default places int8
quantizers on the inputs of nearly every operation, the network's own input and the style path
included; measured on the rule checkpoints, that puts the generator's images 49% off (the W+ input
and the styles that feed the demodulation quantized to 256 levels) and the encoder's w_plus 3.4%
off. The recipes quantize only the convolutions' inputs and weights, and leave out of int8 what
measured layer by layer breaks the contract (`python -m benchmarks.int8_choices`).

Calibration (`Calibration`): NNCF needs example inputs of each quantized part to set its ranges.
- a folder of the user's images (`--calibration DIR`): the encoder is calibrated on them (read as
  `engine.run` reads inputs, per the checkpoint's `label_nc`), the generator on the w_plus the fp32
  encoder gives them;
- by default, one the model makes itself: W+ drawn through the checkpoint's own mapping network
  (z ~ N(0, I), seeded; half the draws style-mixed at a random layer) for the generator, and the
  images the fp32 generator renders from them (256 px, rounded to 8 bits as a saved image) for the
  encoder. With a trained checkpoint those are faces of its domain, and no data has to ship.
  Sketch and segmentation encoders have no such images: they need `--calibration`.

The quantized parts are cached beside the fp32 graphs: `<cache>/onnx/<graph name>.int8-<key>.xml`
(+ `.bin`, + a sidecar with the sizes and sha256 of both), keyed by the fp32 graph's recorded file
digests (so: the checkpoint and the export version), the calibration set's identity, the recipe
and NNCF's version (`int8_path`). The sidecar also records every choice made (recipe, ignored
operations, calibration, sample count). Like the fp32 graphs, they are checked before use and a
damaged one is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from reference.description import ModelDescription, read_sidecar, verify_artifact, write_sidecar
from reference.plumbing.errors import UsageError

QUANTIZE_VERSION = "1"  # part of the cache key: bump when the quantization code changes its result
INT8_KIND = "openvino-int8"  # the sidecar kind of a quantized graph
CALIBRATION_SIZE = 32  # samples of a self-made calibration set (NNCF's default subset is 300; measured in RESULTS.md)
CALIBRATION_SEED = 20210  # the z draws of the self-made set
MAX_CALIBRATION_FILES = 300  # images read from a --calibration folder (NNCF's default subset size)

# Operations whose inputs stay float in every recipe: the model's input and style path (the W+
# input's Gather, the style affines and demodulation: MatMul, Power, Sqrt, Divide), the
# element-wise arithmetic (residual adds, the SE gates, batch-norm scales, the noise and bias adds,
# the modulation Multiply), the pooling and resampling. Only Convolution / GroupConvolution (and
# the transposed convolutions of the up-sampling) remain candidates.
FLOAT_OPS = ("Parameter", "Gather", "MatMul", "Add", "Subtract", "Multiply", "Divide", "Power", "Sqrt",
             "ReduceMean", "Concat", "Interpolate", "Sigmoid", "PRelu", "Relu", "Clamp", "MVN")


@dataclass(frozen=True)
class Recipe:
    """One way of quantizing the graphs (a row of `RECIPES`).

    Attributes:
        name: the recipe's name (recorded in the sidecar and the cache key).
        summary: one phrase for reports.
        parts: the parts quantized; the others run their fp32 graph (in bf16 where the CPU has bf16 units).
        float_ops: operation types (OpenVINO type names) whose inputs stay float (NNCF ignored scope by type).
        float_patterns: per part, regular expressions over operation names whose inputs stay float.
        preset: NNCF's preset: "performance" (symmetric) or "mixed" (asymmetric activations).
        fast_bias_correction: NNCF's fast bias correction (False: the slower full one).
    """

    name: str
    summary: str
    parts: tuple[str, ...] = ("encoder", "generator")
    float_ops: tuple[str, ...] = FLOAT_OPS
    float_patterns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    preset: str = "performance"
    fast_bias_correction: bool = True

    def key(self) -> str:
        """The recipe's fields as one string (part of the cache key)."""
        d = asdict(self)
        d["float_patterns"] = {k: list(v) for k, v in sorted(dict(self.float_patterns).items())}
        return json.dumps(d, sort_keys=True)


# NNCF matches ignored-scope patterns from the start of an operation's name (`re.match`)
HEADS = (r".*/encoder/(coarse|middle|fine)/", r".*/encoder/latlayer", r".*/encoder/(output|linear|Gemm)")  # map2style heads, FPN
BODY = (r".*/encoder/backbone/",)  # the IR-SE-50 body

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("nncf-default", "NNCF's defaults: every quantizable input of both parts (the W+ input and the style "
           "path included)", float_ops=()),
    Recipe("convs", "the convolutions of both parts; everything else float"),
    Recipe("encoder-convs", "the encoder's convolutions; the generator float", ("encoder",)),
    Recipe("encoder-convs-mixed", "as encoder-convs with NNCF's mixed preset (asymmetric activations)", ("encoder",),
           preset="mixed"),
    Recipe("encoder-body", "the convolutions of the encoder's IR-SE-50 body, mixed preset; its map2style heads and "
           "the generator float", ("encoder",), float_patterns={"encoder": HEADS}, preset="mixed"),
    Recipe("encoder-heads", "the convolutions of the encoder's map2style heads, mixed preset; its body and the "
           "generator float", ("encoder",), float_patterns={"encoder": BODY}, preset="mixed"),
)}
DEFAULT_RECIPE = "encoder-convs-mixed"


@dataclass(frozen=True)
class Calibration:
    """The calibration set: a folder of the user's images, or one the model makes itself.

    Attributes:
        folder: the user's images (`--calibration DIR`), or None for the self-made set.
        size: samples of the self-made set.
        seed: its random seed.
    """

    folder: Path | None = None
    size: int = CALIBRATION_SIZE
    seed: int = CALIBRATION_SEED

    def files(self) -> list[Path]:
        """The folder's images, sorted, at most `MAX_CALIBRATION_FILES`.

        Raises:
            UsageError: the folder does not exist or holds no image.
        """
        from reference.plumbing.files import scan_folder

        if self.folder is None:
            return []
        if not Path(self.folder).is_dir():
            raise UsageError(f"--calibration {self.folder}: not a folder; give a folder of example inputs "
                             "(images of the kind this checkpoint encodes)")
        files = scan_folder(self.folder)[:MAX_CALIBRATION_FILES]
        if not files:
            raise UsageError(f"--calibration {self.folder}: no image found; give a folder of example inputs")
        return files

    def identity(self) -> str:
        """What the cache key records: `self:<size>:<seed>`, or `dir:` and the sha256 of the folder's
        images' names and contents (the same images under another folder name are the same set)."""
        if self.folder is None:
            return f"self:{self.size}:{self.seed}"
        from reference.plumbing.digests import file_sha256

        h = hashlib.sha256()
        for f in self.files():
            h.update(f"{f.relative_to(self.folder).as_posix()}\0{file_sha256(f)}\n".encode())
        return f"dir:{h.hexdigest()}"

    def describe(self) -> str:
        """One phrase for messages and sidecars."""
        if self.folder is None:
            return f"self-made ({self.size} W+ drawn through the checkpoint's mapping network, seed {self.seed})"
        return f"{len(self.files())} images of {self.folder}"


def recipe_for(name: str | None) -> Recipe:
    """The `RECIPES` row `name` (None: `DEFAULT_RECIPE`).

    Raises:
        UsageError: an unknown name (the message lists them).
    """
    name = name or DEFAULT_RECIPE
    if name not in RECIPES:
        raise UsageError(f"unknown int8 recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]


def int8_path(graph: Path, calibration: Calibration, recipe: Recipe) -> Path:
    """Where the int8 version of the fp32 graph `graph` is cached: `<graph without .onnx>.int8-<key>.xml`,
    key = sha256 of the graph's recorded files (its sidecar: sizes and digests, so the checkpoint and
    export version), the calibration identity, the recipe, `QUANTIZE_VERSION` and NNCF's version.

    Raises:
        CheckpointError: the graph's sidecar is missing or unreadable.
    """
    import nncf

    meta = json.loads(Path(str(graph) + ".json").read_text())
    key = hashlib.sha256("|".join([json.dumps(meta.get("files"), sort_keys=True), calibration.identity(),
                                   recipe.key(), QUANTIZE_VERSION, nncf.__version__]).encode()).hexdigest()[:16]
    return graph.with_name(f"{graph.name.removesuffix('.onnx')}.int8-{key}.xml")


def nncf_missing() -> str | None:
    """Why int8 cannot be built here ("pip install nncf"), or None when NNCF is installed."""
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        return "--precision int8 needs NNCF: pip install 'psp-engine[int8]' (or pip install nncf)"
    return None


# ------------------------------------------------------------------------------------------------
# Calibration data


def _openvino_f32(graph: Path) -> Callable[[np.ndarray], np.ndarray]:
    """An fp32 OpenVINO compile of `graph` (no compiled-model cache: used once) as a callable."""
    import openvino as ov

    from .backends.graph import physical_cores

    compiled = ov.Core().compile_model(str(graph), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                           "INFERENCE_NUM_THREADS": physical_cores(),
                                                           "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda a: np.array(request.infer({0: np.ascontiguousarray(a, np.float32)})[0], np.float32, copy=True)


def self_made_w_plus(checkpoint: Path, n_styles: int, size: int, seed: int) -> np.ndarray:
    """W+ drawn through the checkpoint's own mapping network: z ~ N(0, I) (seeded), w = mapping(z)
    (no truncation, no latent_avg: StyleGAN2's W), repeated to `n_styles`; every second sample
    style-mixed with another draw from a random layer on (Karras et al. 2020, style mixing), so the
    set covers W+ and not only W.

    Returns:
        `[size, n_styles, 512]` float32.

    Raises:
        CheckpointError: the checkpoint's mapping network is missing or mis-shaped.
    """
    from reference.psp import load_mapping

    g = torch.Generator().manual_seed(seed)
    mapping = load_mapping(checkpoint)
    with torch.inference_mode():
        w = mapping(torch.randn(size, 512, generator=g)).float()
        w2 = mapping(torch.randn(size, 512, generator=g)).float()
    w_plus = w[:, None].repeat(1, n_styles, 1)
    cut = torch.randint(1, n_styles, (size,), generator=g)
    for i in range(1, size, 2):
        w_plus[i, cut[i]:] = w2[i]
    return w_plus.numpy()


def rendered_inputs(generator: Callable[[np.ndarray], np.ndarray], w_plus: np.ndarray) -> np.ndarray:
    """The encoder inputs of the self-made set: each W+ rendered by the fp32 generator, pooled to 256 px
    (`reference.psp.face_pool`, the official resize) and rounded to 8 bits as a saved image would be.

    Returns:
        `[N, 3, 256, 256]` float32 in [-1, 1].
    """
    from reference.psp import face_pool

    out = []
    for i in range(len(w_plus)):
        img = torch.from_numpy(generator(w_plus[i : i + 1]))
        img = face_pool(img) if img.shape[-1] != 256 else img
        out.append((torch.round((img.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1).numpy())
    return np.concatenate(out).astype(np.float32)


def folder_inputs(calibration: Calibration, description: ModelDescription) -> np.ndarray:
    """The encoder inputs of a `--calibration` folder, read as `engine.run` reads inputs.

    Returns:
        `[N, input_nc, 256, 256]` float32.

    Raises:
        UsageError: no image. InputImageError: an unreadable image (named).
    """
    from reference.images import read_input, to_input_tensor

    files = calibration.files()
    label_nc = int(description.opts.get("label_nc", 0) or 0)
    names = [str(f) for f in files]
    return to_input_tensor([read_input(f, label_nc) for f in names], label_nc, names=names).numpy()


# ------------------------------------------------------------------------------------------------
# Quantization


def quantize_part(graph: Path, samples: np.ndarray, recipe: Recipe, part: str):
    """NNCF post-training quantization of one fp32 graph.

    Args:
        graph: the fp32 ONNX graph (`export.backends.graph.cached_graphs`).
        samples: calibration inputs of that part, `[N, ...]` float32 (one sample per NNCF item).
        recipe: what to quantize.
        part: "encoder" or "generator" (for `recipe.float_patterns`).

    Returns:
        The quantized `openvino.Model`.
    """
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(graph))
    scope = nncf.IgnoredScope(types=list(recipe.float_ops), patterns=list(recipe.float_patterns.get(part, ())),
                              validate=False)
    return nncf.quantize(model, nncf.Dataset([samples[i : i + 1] for i in range(len(samples))]),
                         preset=nncf.QuantizationPreset(recipe.preset), subset_size=len(samples),
                         fast_bias_correction=recipe.fast_bias_correction, ignored_scope=scope)


def _quantize_worker(graphs: dict[str, str], checkpoint: str, targets: dict[str, str], calibration: Calibration,
                     recipe: Recipe, notify: Callable[[str], None]) -> dict[str, float]:
    """Make the calibration set and quantize each part of `targets` (in the child process of
    `cached_int8_graphs`: NNCF's and the fp32 compiles' memory ends with it). Sends one line per step."""
    import logging

    import nncf
    import openvino as ov

    from reference.plumbing.files import atomic_files

    nncf.set_log_level(logging.ERROR)  # its INFO lists every operation left float: hundreds of lines
    description, _ = read_sidecar(Path(graphs["generator"]), "onnx")
    t0 = time.perf_counter()
    w_plus = x = None
    if calibration.folder is None:
        w_plus = self_made_w_plus(Path(checkpoint), description.n_styles, calibration.size, calibration.seed)
        if "encoder" in targets:
            x = rendered_inputs(_openvino_f32(Path(graphs["generator"])), w_plus)
    else:
        x = folder_inputs(calibration, description)
        if "generator" in targets:
            encoder = _openvino_f32(Path(graphs["encoder"]))
            w_plus = np.concatenate([encoder(x[i : i + 2]) for i in range(0, len(x), 2)])
    notify(f"  calibration set: {calibration.describe()}, made in {time.perf_counter() - t0:.1f} s")
    seconds = {}
    for part, target in targets.items():
        t1 = time.perf_counter()
        notify(f"  {part}: quantizing ({recipe.name}: {recipe.summary}) ...")
        model = quantize_part(Path(graphs[part]), x if part == "encoder" else w_plus, recipe, part)
        out = Path(target)
        with atomic_files(out) as tmp:
            ov.save_model(model, str(tmp / out.name))
        write_sidecar(out, description.replace(precision="int8"), INT8_KIND, part=part,
                      graph=Path(graphs[part]).name, recipe=asdict(recipe) | {"float_patterns": dict(recipe.float_patterns)},
                      calibration=calibration.identity(), calibration_set=calibration.describe(),
                      quantize_version=QUANTIZE_VERSION)
        seconds[part] = time.perf_counter() - t1
        notify(f"  {part}: {out.name}, {seconds[part]:.1f} s")
    return seconds


def cached_int8_graphs(graphs: dict[str, Path], checkpoint: Path, calibration: Calibration | None = None,
                       recipe: Recipe | None = None, announce: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The graphs the int8 precision runs: per part, its quantized IR (`int8_path`) where the recipe
    quantizes it, else its fp32 graph; quantized first where missing or damaged.

    Args:
        graphs: `{"encoder": onnx, "generator": onnx}` fp32 graphs (`cached_graphs`).
        checkpoint: the pSp checkpoint (its mapping network makes the self-made calibration set).
        calibration: the calibration set (default: self-made).
        recipe: what to quantize (default `RECIPES[DEFAULT_RECIPE]`).
        announce: one line per step (calibration, each part's quantization, its time).

    Returns:
        `{"encoder": path, "generator": path}` (`.xml` for quantized parts, `.onnx` for float ones).

    Raises:
        UsageError: NNCF missing; a self-made calibration for a checkpoint that takes no RGB input
            (sketch, segmentation: use --calibration); a bad --calibration folder; a cache folder
            that cannot be written.
    """
    calibration = calibration or Calibration()
    recipe = recipe or RECIPES[DEFAULT_RECIPE]
    if (why := nncf_missing()) is not None:
        raise UsageError(why)
    description, _ = read_sidecar(graphs["generator"], "onnx")
    if calibration.folder is None and description.input_nc != 3 and "encoder" in recipe.parts:
        raise UsageError(f"--precision int8 of {checkpoint.name}: its encoder takes {description.input_kind} inputs "
                         f"({description.input_nc} channels), which the generator cannot render for a self-made "
                         "calibration set; give --calibration DIR with a few dozen example inputs")
    if calibration.folder is not None:
        calibration.files()  # a bad folder fails before anything else
    out = {part: int8_path(path, calibration, recipe) if part in recipe.parts else path for part, path in graphs.items()}
    todo = {part: p for part, p in out.items() if part in recipe.parts and verify_artifact(p)}
    if not todo:
        return out
    from filelock import FileLock

    from reference.plumbing.child import call_in_child

    folder = next(iter(todo.values())).parent
    if not os.access(folder, os.W_OK):
        raise UsageError(f"the engine cache {folder} is not writable and the int8 graphs of {checkpoint.name} must be "
                         "made in it; set PSP_ENGINE_CACHE to a writable folder")
    with FileLock(str(next(iter(todo.values()))) + ".lock"):
        todo = {part: p for part, p in todo.items() if verify_artifact(p)}  # another process may have made them
        if not todo:
            return out
        say = announce or (lambda line: None)
        for part, p in todo.items():
            if p.exists():
                say(f"damaged int8 graph {p.name} ({', '.join(verify_artifact(p))}): not used, quantizing it again")
        say(f"quantizing {checkpoint.name} to int8 (NNCF, recipe {recipe.name}; once per checkpoint and calibration "
            f"set, cached in {folder})")
        t0 = time.perf_counter()
        call_in_child(_quantize_worker, ({k: str(v) for k, v in graphs.items()}, str(checkpoint),
                                         {k: str(v) for k, v in todo.items()}, calibration, recipe),
                      say, what="int8 quantization process")
        say(f"quantized in {time.perf_counter() - t0:.1f} s")
    return out
