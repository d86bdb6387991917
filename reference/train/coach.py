"""The training loop: model init, steps, validation, checkpoints in the official layout, resume.

Source: eladrich/pixel2style2pixel@5cfff38 `training/coach.py` (`Coach`: loop, intervals, validation,
`checkpoint_me`, `__get_save_dict`), `models/psp.py` (`load_weights`, `forward(x, return_latents=True)`
with `resize=True, randomize_noise=True` during training), `scripts/train.py` (`opt.json`).

Steps are numbered as official `global_step`: step s performs one optimizer update; validation runs
when `s % val_interval == 0` or at `max_steps`, a checkpoint `iteration_s.pt` when
`s % save_interval == 0` or at `max_steps` (save_interval defaults to max_steps); the run ends after
step `max_steps` (so `max_steps + 1` updates). At step 0 validation is a 5-batch sanity pass that is
not recorded, as official. Official also writes `iteration_0.pt` after the first update (a side
effect of `0 % save_interval == 0`); we skip that file.

Beside each `iteration_s.pt` a `train_state.pt` (step, batch counter, optimizer state, noise RNG,
best validation loss, opts; tensors and plain values only, so it loads with weights_only=True)
lets `--resume` continue exactly: the resumed run computes what the uninterrupted run computes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..plumbing.files import atomic_write
from ..images import atomic_write_image, tensor_to_uint8

from ..checkpoint import read_checkpoint, save_checkpoint
from ..plumbing.errors import CheckpointError
from ..psp import PSP, load_psp, load_stylegan2
from ..sr import parse_factors
from .data import EpochBatches, PairedDataset, TrainDataError, check_pairs, collate, pair_folders, test_batches
from .losses import PSPLoss
from .optim import make_optimizer
from .options import RESUME_OVERRIDABLE, TrainConfigError, absolute_paths, saved_opts

TRAIN_STATE = "train_state.pt"
TRAIN_STATE_FORMAT = "psp-engine/train-state/v1"
ARCH_KEYS = ("encoder_type", "input_nc", "label_nc", "output_size", "learn_in_w", "start_from_latent_avg",
             "dataset_type", "resize_factors")
SANITY_BATCHES = 5  # official validate(): at step 0, stop after batch index 4


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Model


def psp_forward(net: PSP, x: torch.Tensor, noise: list[torch.Tensor] | None, image_size: int = 256
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Official `pSp.forward(x, resize=True, return_latents=True)`, any encoder input size.

    Args:
        net: the model.
        x: `[B, input_nc, S, S]` float32 encoder input.
        noise: per-layer noise `[B, 1, r, r]` (training: fresh normal noise, official
            `randomize_noise=True`), or None for the stored buffers.
        image_size: side of y_hat (official `face_pool` = AdaptiveAvgPool2d((256, 256))).

    Returns:
        `(y_hat [B, 3, image_size, image_size], w_plus [B, n_styles, 512])`, w_plus as given to the generator.
    """
    codes = net.encoder(x)
    if net.learn_in_w:
        if net.start_from_latent_avg:
            codes = codes + net.latent_avg[0]
        w_plus = codes[:, None, :].repeat(1, net.n_styles, 1)
    else:
        w_plus = codes + net.latent_avg if net.start_from_latent_avg else codes
    img = net.decoder.synthesis(w_plus, noise)
    return F.adaptive_avg_pool2d(img, (image_size, image_size)), w_plus


def estimate_latent_avg(decoder: torch.nn.Module, n: int, seed: int, chunk: int = 10_000) -> torch.Tensor:
    """Mean of `mapping(z)` over `n` standard-normal z: official `decoder.mean_latent(int(1e5))[0]`.

    Args:
        decoder: the StyleGAN2 `Generator`.
        n: number of z samples (official 100000).
        seed: the run seed (z comes from a private generator; the global RNG is untouched).
        chunk: samples per mapping call (bounds memory).

    Returns:
        `[512]` float32 on the decoder's device.
    """
    g = torch.Generator().manual_seed(int(seed) + 7_919)
    device = next(decoder.parameters()).device
    total = torch.zeros(512, dtype=torch.float64, device=device)
    with torch.no_grad():
        done = 0
        while done < n:
            m = min(chunk, n - done)
            z = torch.randn(m, 512, generator=g).to(device)
            total += decoder.mapping(z).double().sum(0)
            done += m
    return (total / n).float()


def _latent_avg_full(net: PSP, latent_avg: torch.Tensor) -> torch.Tensor:
    """`[512]`, `[1, 512]` or `[n_styles, 512]` -> `[n_styles, 512]` (the form `PSP.latent_avg` keeps)."""
    return latent_avg.detach().float().reshape(-1, 512).expand(net.n_styles, 512).clone()


def _fresh_storage(net: torch.nn.Module) -> None:
    """Give every parameter and buffer its own memory (loaded tensors may be memory-mapped files)."""
    for t in list(net.parameters()) + list(net.buffers()):
        t.data = t.data.clone()


def init_model(opts: Mapping[str, Any], say: Callable[[str], None] = _say) -> tuple[PSP, torch.Tensor | None]:
    """Build the model to train, as official `pSp.load_weights` + the `latent_avg` estimate of `Coach`.

    Source: official `models/psp.py::load_weights`: from `checkpoint_path` (encoder, decoder and
    latent_avg, strict), else the encoder from IR-SE-50 ArcFace weights (strict=False; the input
    layer skipped when the input is not RGB) and the decoder from the StyleGAN2 `g_ema` with its
    `latent_avg` repeated to n_styles (1 for learn_in_w); a missing latent_avg is estimated with
    `mean_latent(1e5)`.

    Args:
        opts: resolved training opts (`checkpoint_path`, `stylegan_weights`, `ir_se50_weights`, the
            architecture keys, `seed`, `latent_avg_samples`).
        say: where notes go.

    Returns:
        `(net, latent_avg as the official checkpoint stores it or None)`; `net` on the CPU, fp32,
        with `net.latent_avg` `[n_styles, 512]`.

    Raises:
        CheckpointError: an unreadable or mismatching checkpoint / weight file.
        TrainConfigError: a StyleGAN2 generator of another size than --output-size.
    """
    arch = {k: opts[k] for k in ARCH_KEYS}
    latent_avg = None
    if opts.get("checkpoint_path"):
        path = opts["checkpoint_path"]
        ckpt = read_checkpoint(path)
        latent_avg = ckpt.get("latent_avg") if isinstance(ckpt.get("latent_avg"), torch.Tensor) else None
        # Official __load_latent_avg leaves None when the file has none, and Coach estimates it (below).
        net = load_psp(ckpt, opts={**arch, "start_from_latent_avg": arch["start_from_latent_avg"] and
                                   latent_avg is not None})
        net.start_from_latent_avg = bool(arch["start_from_latent_avg"])
        _fresh_storage(net)
        say(f"initialised from pSp checkpoint {path}")
        if opts.get("stylegan_weights"):
            say(f"note: --stylegan-weights {opts['stylegan_weights']} is ignored: --checkpoint holds the decoder "
                "(as official pSp)")
    else:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(int(opts["seed"]))
            net = PSP(arch)
        if opts.get("stylegan_weights"):
            gen, la = load_stylegan2(opts["stylegan_weights"])
            if gen.size != net.output_size:
                raise TrainConfigError(
                    f"{opts['stylegan_weights']}: a {gen.size} px generator, but --output-size is {net.output_size}; "
                    f"pass --output-size {gen.size}")
            net.decoder.load_state_dict(gen.state_dict(), strict=True)
            if la is not None:
                latent_avg = la[None] if net.learn_in_w else la[None].repeat(net.n_styles, 1)
            say(f"decoder from StyleGAN2 checkpoint {opts['stylegan_weights']}")
        else:
            say("note: no --checkpoint or --stylegan-weights: the generator is randomly initialised "
                "(pSp trains an encoder for a pretrained generator; this is only useful for tests)")
        if opts.get("ir_se50_weights"):
            _load_encoder_backbone(net, opts["ir_se50_weights"], say)
        else:
            say("note: no --ir-se50-weights: the encoder starts from random weights (official pSp starts its "
                "IR-SE-50 body from ArcFace model_ir_se50.pth)")
        net.face_pool = torch.nn.AdaptiveAvgPool2d((256, 256))
    if latent_avg is None and net.start_from_latent_avg:
        n = int(opts["latent_avg_samples"])
        t0 = time.perf_counter()
        latent_avg = estimate_latent_avg(net.decoder, n, int(opts["seed"]))
        say(f"latent_avg estimated as the mean of mapping(z) over {n} samples ({time.perf_counter() - t0:.1f} s)")
    if latent_avg is not None and net.start_from_latent_avg:
        net.latent_avg = _latent_avg_full(net, latent_avg)
    else:
        net.latent_avg = torch.zeros(net.n_styles, 512)
    return net, (latent_avg.detach().float().clone() if latent_avg is not None else None)


def _load_encoder_backbone(net: PSP, path: str, say: Callable[[str], None]) -> None:
    """Official: `encoder.load_state_dict(ir_se50, strict=False)`, input layer skipped when input_nc != 3."""
    sd = read_checkpoint(path)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = dict(sd["state_dict"])
    if net.input_nc != 3:
        sd = {k: v for k, v in sd.items() if "input_layer" not in k}
    own = net.encoder.state_dict()
    matched = {k: v for k, v in sd.items() if k in own}
    if not any(k.startswith("body.") for k in matched):
        raise CheckpointError(f"{path}: not IR-SE-50 weights: no 'body.*' key matches the encoder "
                              "(expected TreB1eN's model_ir_se50.pth)")
    bad = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in matched.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: mis-shaped encoder weights: {', '.join(bad[:4])}")
    net.encoder.load_state_dict({k: v.float() for k, v in matched.items()}, strict=False)
    say(f"encoder backbone from {path}: {len(matched)} of {len(own)} tensors"
        + (" (input layer skipped: input_nc != 3)" if net.input_nc != 3 else ""))


# ------------------------------------------------------------------------------------------------
# Visualisation


def _input_rgb(x: torch.Tensor, label_nc: int) -> np.ndarray:
    """Encoder inputs `[B, C, S, S]` as `[B, S, S, 3]` uint8 (official `common.log_input_image`, grey maps)."""
    if label_nc == 0:
        return tensor_to_uint8(x)
    if label_nc == 1:
        return tensor_to_uint8(x.repeat(1, 3, 1, 1) * 2 - 1)
    ids = x.argmax(1, keepdim=True).float() / max(label_nc - 1, 1)
    return tensor_to_uint8(ids.repeat(1, 3, 1, 1) * 2 - 1)


def faces_grid(x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, label_nc: int, count: int = 2) -> np.ndarray:
    """Rows of `input | target | output` for the first `count` samples (official `vis_faces`), uint8."""
    n = min(count, y.shape[0])
    cols = [_input_rgb(x[:n].detach().cpu(), label_nc), tensor_to_uint8(y[:n]), tensor_to_uint8(y_hat[:n])]
    return np.concatenate([np.concatenate([c[i] for c in cols], axis=1) for i in range(n)], axis=0)


# ------------------------------------------------------------------------------------------------
# Coach


class Coach:
    """pSp training, official `training/coach.py::Coach`.

    Args:
        opts: resolved opts (`options.resolve_opts`). With `resume`: `exp_dir` and the options to
            change (keys of `options.RESUME_OVERRIDABLE`); every other key given must equal the run's.
        resume: continue the run in `opts["exp_dir"]` from its last `train_state.pt`.
        say: where progress lines go (default stderr).

    Attributes:
        net: the `PSP` being trained (train mode; encoder, and decoder with train_decoder, trainable).
        step: the next step to run.
        opts: the run's opts.

    Raises:
        TrainConfigError: exp_dir already holds a run (without resume) or nothing to resume; options
            that conflict with the resumed run.
        TrainDataError: missing folders, no pairs, fewer pairs than a batch.
        CheckpointError, MissingWeightsError: weight files (named, with the fix).
    """

    def __init__(self, opts: Mapping[str, Any], resume: bool = False, say: Callable[[str], None] = _say):
        self.say = say
        self.exp_dir = Path(os.path.abspath(opts["exp_dir"]))
        self.ckpt_dir = self.exp_dir / "checkpoints"
        self.log_dir = self.exp_dir / "logs"
        state = self._read_state(opts) if resume else None
        if state is None:
            self._check_fresh()
            self.opts = dict(opts)
        else:
            self.opts = self._resumed_opts(state["opts"], opts)
        self.opts["exp_dir"] = str(self.exp_dir)
        device = self.opts.get("train_device") or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise TrainConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
        self.opts["train_device"] = str(device)
        self.device = torch.device(device)
        self.image_size = int(self.opts["image_size"])
        if self.image_size != 256:
            say(f"note: --image-size {self.image_size}: sources and targets are {self.image_size} px instead of the "
                "official 256; the encoder is trained on inputs that inference (256 px) never gives it. Use this "
                "for tests and smoke runs only")
        if self.opts["save_interval"] is None:
            self.opts["save_interval"] = self.opts["max_steps"]  # official Coach.__init__

        self.train_set, self.test_set = self._datasets()
        self.loss = PSPLoss(self.opts, self.device)  # before the model: missing weight files fail fast

        if state is None:
            self.net, self.latent_avg_saved = init_model(self.opts, say)
            self.step, self.batches_done, self.best_val_loss = 0, 0, None
        else:
            ckpt_path = self.ckpt_dir / str(state["checkpoint"])
            ckpt = read_checkpoint(ckpt_path)
            self.net = load_psp(ckpt, opts={k: self.opts[k] for k in ARCH_KEYS})
            _fresh_storage(self.net)
            la = ckpt.get("latent_avg")
            self.latent_avg_saved = la.float().clone() if isinstance(la, torch.Tensor) else None
            self.step, self.batches_done = int(state["step"]) + 1, int(state["batches_done"])
            self.best_val_loss = state.get("best_val_loss")
        self.net.to(self.device)
        self.net.train()
        self.net.requires_grad_(False)
        self.net.encoder.requires_grad_(True)
        if self.opts["train_decoder"]:
            self.net.decoder.requires_grad_(True)

        params = list(self.net.encoder.parameters())
        if self.opts["train_decoder"]:
            params += list(self.net.decoder.parameters())
        self.optimizer = make_optimizer(str(self.opts["optim_name"]), params, float(self.opts["learning_rate"]))
        self.noise_rng = torch.Generator().manual_seed(int(self.opts["seed"]))
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.noise_rng.set_state(state["noise_rng"])
            say(f"resuming {self.exp_dir} at step {self.step} from {state['checkpoint']}")
        self.seen_errors: set[str] = set()
        if state is None:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.exp_dir / "opt.json",
                         lambda f: f.write(json.dumps(saved_opts(self.opts), indent=4, sort_keys=True).encode()))
        self._log("resume" if state is not None else "start", {"opts": saved_opts(self.opts)})

    # -- setup ----------------------------------------------------------------------------------
    def _check_fresh(self) -> None:
        if (self.ckpt_dir / TRAIN_STATE).exists():
            raise TrainConfigError(
                f"{self.exp_dir} already holds a training run ({self.ckpt_dir / TRAIN_STATE}): pass --resume to "
                "continue it, or choose another --exp-dir")
        if self.ckpt_dir.is_dir() and any(self.ckpt_dir.iterdir()):
            raise TrainConfigError(f"{self.ckpt_dir} is not empty: choose another --exp-dir (official pSp refuses an "
                                   "existing experiment folder too)")

    def _read_state(self, opts: Mapping[str, Any]) -> dict:
        path = self.ckpt_dir / TRAIN_STATE
        if not path.is_file():
            raise TrainConfigError(f"nothing to resume: {path} not found (start the run without --resume)")
        state = read_checkpoint(path)
        if state.get("format") != TRAIN_STATE_FORMAT:
            raise CheckpointError(f"{path}: not a train state of this trainer (format {state.get('format')!r})")
        if not (self.ckpt_dir / str(state["checkpoint"])).is_file():
            raise CheckpointError(f"{path}: its checkpoint {state['checkpoint']} is missing from {self.ckpt_dir}")
        return state

    def _resumed_opts(self, run_opts: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
        opts = dict(run_opts)
        given = absolute_paths(given)
        conflicts = [k for k in given if k not in RESUME_OVERRIDABLE | {"exp_dir", "preset"}
                     and k in opts and given[k] != opts[k]]
        if conflicts:
            raise TrainConfigError(
                f"--resume continues the run in {self.exp_dir} with its own settings; these options differ from it: "
                + ", ".join(f"{k}={given[k]!r} (run: {opts[k]!r})" for k in sorted(conflicts)))
        for k in given:
            if k in RESUME_OVERRIDABLE:
                opts[k] = given[k]
        if opts.get("save_interval") is None:
            opts["save_interval"] = opts["max_steps"]
        return opts

    def _datasets(self) -> tuple[PairedDataset, PairedDataset | None]:
        o = self.opts
        factors = parse_factors(o["resize_factors"])
        pairs, lone_src, lone_tgt = pair_folders(o["source"], o["target"], "--source/--target")
        self._report_unpaired(lone_src, lone_tgt, "train")
        train = PairedDataset(pairs, o["dataset_type"], int(o["label_nc"] or 0), self.image_size, factors,
                              int(o["seed"]), train=True)
        EpochBatches(len(train), int(o["batch_size"]))  # fewer pairs than a batch: fail now
        test = None
        if o.get("test_source"):
            tpairs, lone_src, lone_tgt = pair_folders(o["test_source"], o["test_target"], "--test-source/--test-target")
            self._report_unpaired(lone_src, lone_tgt, "test")
            test = PairedDataset(tpairs, o["dataset_type"], int(o["label_nc"] or 0), self.image_size, factors,
                                 int(o["seed"]), train=False)
        self.say(f"{len(train)} training pair(s)" + (f", {len(test)} test pair(s)" if test else
                                                     " (no --test-source: no validation, no best_model.pt)"))
        return train, test

    def _report_unpaired(self, lone_src: list[str], lone_tgt: list[str], split: str) -> None:
        for names, what in ((lone_src, "source image(s) without a target"),
                            (lone_tgt, "target image(s) without a source")):
            if names:
                self.say(f"warning: {len(names)} {split} {what}, left out (e.g. {', '.join(names[:3])})")

    # -- logging ----------------------------------------------------------------------------------
    def _log(self, event: str, fields: Mapping[str, Any], file: str = "metrics.jsonl") -> None:
        folder = self.ckpt_dir if file == "timestamp.jsonl" else self.log_dir
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"event": event, "step": self.step if hasattr(self, "step") else 0, "time": round(time.time(), 3),
                 **fields}
        with open(folder / file, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def _record_errors(self, errors: list[str]) -> None:
        for msg in errors:
            if msg not in self.seen_errors:
                self.seen_errors.add(msg)
                self.say(f"skipping a sample: {msg}")
                self._log("skip", {"error": msg})

    def _save_images(self, title: str, x, y, y_hat, name: str) -> None:
        grid = faces_grid(x, y, y_hat, int(self.opts["label_nc"] or 0))
        atomic_write_image(self.log_dir / "images" / title / name, grid)

    # -- one step ---------------------------------------------------------------------------------
    def _noise(self, batch: int, rng: torch.Generator) -> list[torch.Tensor]:
        """Fresh normal noise for every generator layer, `[batch, 1, r, r]` each (official randomize_noise)."""
        return [torch.randn((batch, *buf.shape[1:]), generator=rng).to(self.device)
                for buf in self.net.decoder.stored_noise()]

    def forward(self, x: torch.Tensor, rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(y_hat, w_plus)` for a batch; random noise from `rng`, or the stored noise when None."""
        noise = self._noise(x.shape[0], rng) if rng is not None else None
        return psp_forward(self.net, x, noise, self.image_size)

    def train(self) -> dict:
        """Run steps `self.step .. max_steps` (official `Coach.train`).

        Returns:
            `{"step": last step run, "loss": its loss dict, "best_val_loss", "checkpoint": last iteration file}`
            (`step` -1 when the run had already finished).

        Raises:
            TrainDataError: a whole epoch without one readable sample.
        """
        o = self.opts
        max_steps = int(o["max_steps"])
        result = {"step": self.step - 1, "loss": None, "best_val_loss": self.best_val_loss, "checkpoint": None}
        if self.step > max_steps:
            self.say(f"{self.exp_dir}: already trained to step {self.step - 1} (max_steps {max_steps}): nothing to do")
            return result
        # Denormal floats slow CPU kernels 10x and more (randomly initialised nets produce them); flush them.
        ftz = self.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            return self._train(result, max_steps)
        finally:
            if ftz:
                torch.set_flush_denormal(False)

    def _train(self, result: dict, max_steps: int) -> dict:
        o = self.opts
        sampler = EpochBatches(len(self.train_set), int(o["batch_size"]), int(o["seed"]), start=self.batches_done)
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=int(o["workers"]), collate_fn=collate)
        empty_run = 0
        t_last, steps_since = time.perf_counter(), 0
        self.net.train()
        for batch in loader:
            self.batches_done += 1
            self._record_errors(batch.errors)
            if batch.x is None:
                empty_run += 1
                if empty_run >= sampler.n_batches:
                    raise TrainDataError(f"no readable training pair in a whole epoch ({len(self.train_set)} pairs); "
                                         f"first error: {next(iter(self.seen_errors), '?')}")
                continue
            empty_run = 0
            x, y = batch.x.to(self.device), batch.y.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            y_hat, w_plus = self.forward(x, self.noise_rng)
            loss, loss_dict, _ = self.loss(x, y, y_hat, w_plus, self.net.latent_avg)
            if not math.isfinite(loss_dict["loss"]):
                raise TrainConfigError(f"step {self.step}: the loss is {loss_dict['loss']} (diverged); lower "
                                       "--learning-rate or resume from an earlier checkpoint")
            loss.backward()
            self.optimizer.step()
            steps_since += 1

            s = self.step
            if s % int(o["image_interval"]) == 0 or (s < 1000 and s % 25 == 0):
                self._save_images("train/faces", x, y, y_hat.detach(), f"{s:04d}.jpg")
            if s % int(o["board_interval"]) == 0:
                now = time.perf_counter()
                ms = (now - t_last) / steps_since * 1000
                t_last, steps_since = now, 0
                self._log("train", {**loss_dict, "ms_per_step": round(ms, 1)})
                values = ", ".join(f"{k} {v:.4f}" for k, v in loss_dict.items())
                self.say(f"step {s}: {values} ({ms:.0f} ms/step)")

            val_loss_dict = None
            if self.test_set is not None and (s % int(o["val_interval"]) == 0 or s == max_steps):
                val_loss_dict = self.validate()
                if val_loss_dict and (self.best_val_loss is None or val_loss_dict["loss"] < self.best_val_loss):
                    self.best_val_loss = val_loss_dict["loss"]
                    self.checkpoint_me(val_loss_dict, is_best=True)
            # Official also saves at step 0 (0 % save_interval == 0); we save there only when it is the last step.
            if s == max_steps or (s > 0 and s % int(o["save_interval"]) == 0):
                path = self.checkpoint_me(val_loss_dict if val_loss_dict is not None else loss_dict, is_best=False)
                result["checkpoint"] = str(path)
            result.update(step=s, loss=loss_dict, best_val_loss=self.best_val_loss)
            if s == max_steps:
                self.say(f"finished training at step {s}")
                self._log("done", {})
                break
            self.step += 1
        return result

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Mean loss over the test set (official `Coach.validate`: eval mode, random noise).

        Returns:
            The mean of the per-batch loss dicts, or None at step 0 (a 5-batch sanity pass, as official).
        """
        self.net.eval()
        rng = torch.Generator().manual_seed(int(self.opts["seed"]) * 1_000_003 + self.step + 1)
        batches = test_batches(len(self.test_set), int(self.opts["test_batch_size"]))
        loader = DataLoader(self.test_set, batch_sampler=batches, num_workers=int(self.opts["test_workers"]),
                            collate_fn=collate)
        agg: list[dict] = []
        try:
            for i, batch in enumerate(loader):
                self._record_errors(batch.errors)
                if batch.x is None:
                    continue
                x, y = batch.x.to(self.device), batch.y.to(self.device)
                y_hat, w_plus = self.forward(x, rng)
                _, loss_dict, _ = self.loss(x, y, y_hat, w_plus, self.net.latent_avg)
                agg.append(loss_dict)
                self._save_images("test/faces", x, y, y_hat, f"{i:04d}_{self.step:04d}.jpg")
                if self.step == 0 and i + 1 >= SANITY_BATCHES:
                    return None
        finally:
            self.net.train()
        if self.step == 0 or not agg:
            return None
        mean = {k: sum(d[k] for d in agg if k in d) / sum(1 for d in agg if k in d) for k in agg[0]}
        self._log("test", mean)
        self.say(f"step {self.step} test: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
        return mean

    # -- checkpoints ------------------------------------------------------------------------------
    def save_dict(self) -> dict:
        """The official checkpoint: `{'state_dict': encoder.* + decoder.*, 'opts', 'latent_avg'}`.

        Source: official `Coach.__get_save_dict` (`latent_avg` only with start_from_latent_avg, in the
        form it was loaded: `[n_styles, 512]`, `[1, 512]` for learn_in_w, or `[512]` when estimated).
        """
        sd = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
        out = {"state_dict": sd, "opts": saved_opts(self.opts)}
        if self.opts["start_from_latent_avg"] and self.latent_avg_saved is not None:
            out["latent_avg"] = self.latent_avg_saved.clone()
        return out

    def checkpoint_me(self, loss_dict: Mapping[str, float], is_best: bool) -> Path:
        """Write `best_model.pt` or `iteration_<step>.pt` (atomically); after an iteration file, the
        `train_state.pt` that resumes from it. Returns the checkpoint path."""
        name = "best_model.pt" if is_best else f"iteration_{self.step}.pt"
        path = save_checkpoint(self.save_dict(), self.ckpt_dir / name)
        if not is_best:
            state = {
                "format": TRAIN_STATE_FORMAT,
                "step": self.step,
                "batches_done": self.batches_done,
                "checkpoint": name,
                "optimizer": self.optimizer.state_dict(),
                "noise_rng": self.noise_rng.get_state(),
                "best_val_loss": self.best_val_loss,
                "opts": saved_opts(self.opts),
                "torch_version": str(torch.__version__),
            }
            save_checkpoint(state, self.ckpt_dir / TRAIN_STATE)
        self._log("checkpoint", {"file": name, "best": is_best, "best_val_loss": self.best_val_loss,
                                 "loss": dict(loss_dict)}, file="timestamp.jsonl")
        self.say(f"saved {path}")
        return path


def check_data(opts: Mapping[str, Any], say: Callable[[str], None] = _say) -> int:
    """Read every train (and test) pair once with the run's transforms; print each unusable file.

    Args:
        opts: resolved opts (`options.resolve_opts`).
        say: where the lines go.

    Returns:
        The number of unusable pairs (0: all good).

    Raises:
        TrainDataError: a missing folder or no pairs.
    """
    o = dict(opts)
    bad = 0
    for split, (src, tgt) in (("train", (o["source"], o["target"])), ("test", (o["test_source"], o["test_target"]))):
        if not src:
            continue
        pairs, lone_src, lone_tgt = pair_folders(src, tgt, "--source/--target" if split == "train"
                                                 else "--test-source/--test-target")
        ds = PairedDataset(pairs, o["dataset_type"], int(o["label_nc"] or 0), int(o["image_size"]),
                           parse_factors(o["resize_factors"]), int(o["seed"]), train=split == "train")
        errors = check_pairs(ds)
        for e in errors:
            say(e)
        say(f"{split}: {len(pairs) - len(errors)} of {len(pairs)} pair(s) usable"
            + (f"; {len(lone_src)} source / {len(lone_tgt)} target image(s) unpaired" if lone_src or lone_tgt else ""))
        bad += len(errors)
    return bad
