"""The one training loop, shared by ``training/`` (from scratch) and fine-tuning.

Pure torch, no Qt. ``fit`` trains a model on (image, mask) datasets with the paper's recipe
(0.5 BCE + soft-Dice loss, Adam, early stopping on validation Dice, keep the best weights), and
reports progress through a callback, stops when ``should_stop()`` is true, resumes from a state
folder, runs mixed precision on CUDA, and works under torch DDP (``torchrun``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .batches import BatchSource
from .devices import pick_device
from .events import Progress
from .inference import predict_probabilities
from .losses import dice_bce_loss, hard_dice


@dataclass
class FitConfig:
    """Training settings. ``max_steps`` caps the run; ``val_every`` counts steps (0: once an epoch)."""

    epochs: int = 100
    max_steps: int | None = None
    lr: float = 1e-4
    batch_size: int = 20
    val_batch_size: int | None = None  # None: batch_size (validation crops larger than the patches want fewer)
    weight_decay: float = 0.0
    val_every: int = 0
    patience: int | None = 30
    amp: bool = True  # float16 autocast + grad scaling on CUDA
    cuda_bf16: bool = False  # with ``amp``: bfloat16 autocast on CUDA instead (no grad scaling: fp32's range)
    cpu_bf16: bool = False  # bfloat16 autocast on CPU: ~2x faster steps where the CPU has AVX-512 BF16 / AMX
    seed: int = 0
    num_workers: int = 0
    trainable: str = "all"  # "all" or "decoder"
    lr_schedule: str = "constant"  # "constant" or "cosine" (after ``warmup_steps`` of linear warm-up)
    grad_clip: float | None = None
    val_flip_tta: bool = False
    validate_on_stop: bool = False  # when cancelled, validate the last steps before keeping the best weights
    optimizer: str = "adam"  # "adam" (the paper's) or "adamw" (decoupled weight decay)
    warmup_steps: int = 0
    min_lr_factor: float = 0.0  # cosine decays to lr * min_lr_factor
    channels_last: bool = False  # NHWC weights and inputs (faster convolutions on many CPUs)
    state_every_s: float | None = None  # also rewrite the resume state after this many seconds
    val_metric: str = "image"  # "image" or "group" (per CT volume): see VAL_METRICS
    micro_batches: int = 1  # each step's batch in this many parts, gradients summed: less activation memory


def lr_factor(cfg: FitConfig, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up, then constant or cosine.

    A pure function of the step, so a resumed run continues the schedule exactly.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    span = max(1, total - cfg.warmup_steps)
    t = min(max(step - cfg.warmup_steps, 0), span) / span
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class FitResult:
    best_val_dice: float
    best_step: int
    steps: int
    cancelled: bool
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    cpu_seconds: float = 0.0  # process CPU time over all sessions of this run (resumes included)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """A torch.device as given; a name is checked by :func:`napari_sdunet.devices.pick_device`."""
    if isinstance(device, torch.device):
        return device
    return pick_device(str(device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1



#: validation scores: "image", the mean per-image Dice; "group", the mean over groups (a CT volume's
#: slices, ``SegDataset.groups``) of the Dice pooled over each group's images, the per-volume 3-D Dice
#: a liver model is tested with (per-slice means are ruled by a few false pixels on liver-free slices)
VAL_METRICS = ("image", "group")


def dice_score(probs: torch.Tensor, target: torch.Tensor, metric: str = "image",
               groups: Sequence[str] | None = None, threshold: float = 0.5) -> float:
    """Dice of thresholded probabilities (N, 1, H, W) against masks by ``metric`` (see :data:`VAL_METRICS`)."""
    if metric == "image":
        return float(hard_dice(probs, target, threshold).mean()) if len(probs) else math.nan
    if metric != "group":
        raise ValueError(f"val metric must be one of {VAL_METRICS}, got {metric!r}")
    if groups is None or len(groups) != len(probs) or any(g in ("", None) for g in groups):
        raise ValueError("the 'group' validation metric needs a group (e.g. the CT volume) for every image")
    p = (probs > threshold).flatten(1)
    t = (target > 0.5).flatten(1)
    inter, den = (p & t).sum(1).double(), (p.sum(1) + t.sum(1)).double()
    scores = []
    for g in dict.fromkeys(groups):
        sel = torch.tensor([x == g for x in groups])
        d = den[sel].sum()
        scores.append(float(2 * inter[sel].sum() / d) if d > 0 else 1.0)
    return float(np.mean(scores))


@torch.no_grad()
def evaluate_dice(model: torch.nn.Module, data: Dataset, batch_size: int = 20,
                  device: str | torch.device = "cpu", flip_tta: bool = False, metric: str = "image") -> float:
    """Dice (threshold 0.5, empty/empty = 1) of ``model`` on ``data``: the mean per image, or per group
    (``metric="group"``, the groups of a :class:`~napari_sdunet.batches.SegDataset`)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    scores, preds, targets = [], [], []
    for x, y in DataLoader(data, batch_size=batch_size):
        p = predict_probabilities(model, x.to(device), flip_tta).cpu()
        if metric == "image":  # per-image scores: the maps need not be kept
            scores.append(hard_dice(p, y))
        else:  # pooled over groups: keep the thresholded maps (uint8)
            preds.append((p > 0.5).to(torch.uint8))
            targets.append((y > 0.5).to(torch.uint8))
    model.train(was_training)
    if metric == "image":
        return float(torch.cat(scores).mean()) if scores else math.nan
    if not preds:
        return math.nan
    return dice_score(torch.cat(preds), torch.cat(targets), metric, getattr(data, "groups", None))


# -- training state for resume (safetensors + JSON, no pickle) -----------------------------------

def _save_state(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                best_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"opt.{pid}.{k}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "state.safetensors"))
    np_state = np.random.get_state()
    meta = dict(meta, param_groups=opt_state["param_groups"], rng_torch=torch.get_rng_state().tolist(),
                rng_numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                rng_python=_jsonable(random.getstate()))
    (tmp / "state.json").write_text(json.dumps(meta))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        os.replace(folder, old)
        os.replace(tmp, folder)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, folder)


def _load_state(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(torch.tensor(meta["rng_torch"], dtype=torch.uint8))
    if "rng_numpy" in meta:
        kind, keys, *rest = meta["rng_numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        random.setstate(_tuples(meta["rng_python"]))
    else:  # states written before full RNG states were kept
        np.random.seed(meta["rng_numpy_seed"])
    return best, meta


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


# -- the parts of a run ---------------------------------------------------------------------------

def select_trainable(model: torch.nn.Module, trainable: str) -> list[torch.nn.Parameter]:
    """Mark what trains (``"all"``, or ``"decoder"``: the decoder half) and return those parameters."""
    if trainable == "decoder":
        params = model.decoder_parameters()  # each network says (SegmentationModel.decoder_parameters)
    elif trainable == "all":
        params = list(model.parameters())
    else:
        raise ValueError(f"trainable must be 'all' or 'decoder', got {trainable!r}")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def make_optimizer(params: list[torch.nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'adamw', got {cfg.optimizer!r}")


def training_batches(train: Any, cfg: FitConfig, rank: int = 0, world: int = 1) -> BatchSource:
    """The run's batches: a :class:`~napari_sdunet.batches.BatchSource` as given, or the batches of a
    :class:`~napari_sdunet.batches.SegDataset` (``cfg.batch_size``, seed ``cfg.seed``, no augmentation);
    under DDP each rank takes its own share of every step."""
    from .batches import BatchSource, SegDataset

    if isinstance(train, SegDataset):
        train = train.batches(cfg.batch_size, seed=cfg.seed)
    if not isinstance(train, BatchSource):
        raise TypeError(f"fit trains on a SegDataset or a BatchSource, got {type(train).__name__}")
    return train.shard(rank, world) if world > 1 else train


def plan_steps(cfg: FitConfig, source: BatchSource) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run: what fit does and what every report announces."""
    steps_per_epoch = source.steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return steps_per_epoch, total


@dataclass
class Validator:
    """Validation Dice every few steps, the best weights so far and the patience count."""

    val_set: Dataset | None
    batch_size: int
    device: torch.device
    flip_tta: bool = False
    metric: str = "image"
    best_dice: float = -1.0
    best_step: int = 0
    checks_since_best: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return self.val_set is not None and len(self.val_set) > 0

    def keep(self, model: torch.nn.Module, step: int) -> None:
        self.best_state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        self.best_step = step

    def __call__(self, model: torch.nn.Module, step: int, epoch: int, loss: float, seconds: float,
                 world: int = 1, rank: int = 0) -> float:
        """Validate at ``step``; keeps the weights when they beat the best (always, without data)."""
        vd = math.nan
        if self.has_data:
            vd = (evaluate_dice(model, self.val_set, self.batch_size, self.device, self.flip_tta, self.metric)
                  if rank == 0 else 0.0)
            if world > 1:  # every rank must take the same early-stopping decision
                t = torch.tensor([vd], device=self.device if self.device.type == "cuda" else "cpu")
                torch.distributed.broadcast(t, 0)
                vd = float(t)
        if not self.has_data or vd > self.best_dice:
            if not math.isnan(vd):
                self.best_dice = vd
            self.checks_since_best = 0
            self.keep(model, step)
        else:
            self.checks_since_best += 1
        self.history.append({"step": step, "epoch": epoch, "loss": loss, "val_dice": vd, "seconds": seconds})
        return vd

    def patience_spent(self, patience: int | None) -> bool:
        return patience is not None and self.checks_since_best >= patience


def accumulate_gradients(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, parts: int,
                         scaler: torch.amp.GradScaler | None, dtype: torch.dtype, autocast: bool,
                         world: int = 1) -> float:
    """Forward and backward one batch in ``parts`` pieces, summing the gradients; returns the batch loss.

    Each piece's loss is weighted by its share of the batch, so the summed gradient is the whole batch's
    (the loss is a mean over samples and pixels); only BatchNorm sees smaller batches. A batch that
    does not fit in memory at once trains in pieces that do. ``scaler``: CUDA float16's grad scaler, or None.
    """
    xs, ys = x.chunk(parts), y.chunk(parts)
    total = 0.0
    for i, (xc, yc) in enumerate(zip(xs, ys)):
        last = i == len(xs) - 1
        sync = net.no_sync() if world > 1 and not last else contextlib.nullcontext()  # one all-reduce a step
        with sync:
            with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
                logits = net(xc)
            loss = dice_bce_loss(logits.float(), yc) * (xc.shape[0] / x.shape[0])
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
    return total


def fit(
    model: torch.nn.Module,
    train_set: Any,
    val_set: Dataset | None,
    config: FitConfig,
    *,
    device: str | torch.device = "auto",
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    state_dir: str | os.PathLike | None = None,
    state_every: int | None = 50,
    start_step: int = 0,
    start_cpu_seconds: float = 0.0,
    start_best_dice: float = -1.0,
    forget_best: bool = False,
) -> FitResult:
    """Train ``model`` in place; at the end it holds the best-validation weights.

    ``train_set``: a :class:`~napari_sdunet.batches.SegDataset` or a
    :class:`~napari_sdunet.batches.BatchSource` (batches as a function of the step, augmented or not);
    ``val_set`` any dataset of ``(image (C,H,W), mask (1,H,W))`` at one size. Without a validation set
    the final weights are kept. ``state_dir``: if it holds a saved state, training resumes from it;
    the state is rewritten every ``state_every`` steps (None: never by count), every
    ``config.state_every_s`` seconds and at the end. Without a saved state, ``start_*`` continue an
    earlier run whose weights the model already holds (on a new machine: from the shipped weights,
    with a fresh optimizer). ``forget_best``: resume, but score the best-so-far anew (its validation
    was measured another way).
    """
    cfg = config
    dev = resolve_device(device)
    rank, world = _dist()
    seed_everything(cfg.seed + rank)
    model.to(dev).train()
    train_params = select_trainable(model, cfg.trainable)
    net: torch.nn.Module = model
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = make_optimizer(train_params, cfg)
    source = training_batches(train_set, cfg, rank, world)
    steps_per_epoch, total = plan_steps(cfg, source)
    val_every = cfg.val_every or steps_per_epoch
    lr_factor(cfg, 0, total)  # rejects an unknown schedule before any work
    use_amp = cfg.amp and dev.type == "cuda"
    use_bf16 = (cfg.cpu_bf16 and dev.type == "cpu") or (use_amp and cfg.cuda_bf16)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not use_bf16)
    autocast_dtype = torch.bfloat16 if use_bf16 else torch.float16

    if cfg.val_metric not in VAL_METRICS:
        raise ValueError(f"val_metric must be one of {VAL_METRICS}, got {cfg.val_metric!r}")
    val = Validator(val_set, cfg.val_batch_size or cfg.batch_size, dev, cfg.val_flip_tta, cfg.val_metric,
                    best_dice=float(start_best_dice), best_step=int(start_step))
    val.keep(model, int(start_step))
    step = int(start_step)
    cpu_before = float(start_cpu_seconds)
    sdir = Path(state_dir) if state_dir else None
    if sdir is not None and (sdir / "state.json").is_file():
        val.best_state, meta = _load_state(sdir, model, opt)
        val.best_dice, val.best_step, step = meta["best_dice"], meta["best_step"], meta["step"]
        val.checks_since_best, val.history = meta["checks_since_best"], meta["history"]
        cpu_before = float(meta.get("cpu_seconds", 0.0))
        if forget_best:  # the best-so-far was scored another way: the next validation sets it anew
            val.best_dice, val.checks_since_best = -1.0, 0
    t0 = time.perf_counter()
    cancelled = stopped_early = False

    def report(p: Progress) -> None:
        if on_progress is not None and rank == 0:
            on_progress(p)

    cpu0 = time.process_time()
    last_save = time.perf_counter()

    def checkpoint_state() -> None:
        nonlocal last_save
        if sdir is not None and rank == 0:
            _save_state(sdir, model, opt, val.best_state, dict(
                step=step, best_dice=val.best_dice, best_step=val.best_step,
                checks_since_best=val.checks_since_best, history=val.history, config=asdict(cfg),
                cpu_seconds=cpu_before + time.process_time() - cpu0,
                lr_factor=lr_factor(cfg, max(step - 1, 0), total), total_steps=total))
        last_save = time.perf_counter()

    running: list[float] = []

    def validate(epoch: int) -> None:
        mean_loss = float(np.mean(running)) if running else math.nan
        running.clear()
        vd = val(model, step, epoch, mean_loss, time.perf_counter() - t0, world, rank)
        report(Progress("val", step, total, epoch, loss=mean_loss, val_dice=vd, best_val_dice=val.best_dice,
                        seconds=time.perf_counter() - t0))

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    micro = int(cfg.micro_batches)
    if micro < 1:
        raise ValueError(f"micro_batches must be >= 1, got {cfg.micro_batches!r}")
    while step < total and not (cancelled or stopped_early):
        epoch = step // steps_per_epoch
        if should_stop is not None and should_stop():
            cancelled = True
            break
        x, y = source.batch(step)  # a function of the step: the same batches after a resume
        x = x.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
        y = y.to(dev, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(cfg, step, total)
        opt.zero_grad(set_to_none=True)
        loss = accumulate_gradients(net, x, y, micro, scaler, autocast_dtype, use_amp or use_bf16, world)
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(train_params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        step += 1
        running.append(loss)
        report(Progress("step", step, total, epoch, loss=running[-1], best_val_dice=val.best_dice,
                        seconds=time.perf_counter() - t0))
        if step % val_every == 0 or step == total:
            validate(epoch)
            stopped_early = val.patience_spent(cfg.patience)
        if (state_every and step % state_every == 0) or (
                cfg.state_every_s is not None and time.perf_counter() - last_save > cfg.state_every_s):
            checkpoint_state()
    if cancelled and cfg.validate_on_stop and running:  # steps since the last validation
        validate(step // steps_per_epoch)
    checkpoint_state()
    model.load_state_dict(val.best_state)
    model.eval()
    seconds = time.perf_counter() - t0
    report(Progress("done", step, total, step // steps_per_epoch, best_val_dice=val.best_dice, seconds=seconds))
    return FitResult(val.best_dice, val.best_step, step, cancelled, stopped_early, seconds, val.history,
                     cpu_seconds=cpu_before + time.process_time() - cpu0)
