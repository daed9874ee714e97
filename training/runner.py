"""One experiment: build a network, load the task's data, train with the shared loop, test, save.

Everything an experiment needs is in :class:`RunSpec`; :func:`run_fit` returns the test metrics and
writes ``<out>/model`` (checkpoint folder), ``<out>/log.csv`` (one row per validation) and
``<out>/metrics.json``. A run interrupted after a state save resumes from ``<out>/state``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from napari_sdunet.batches import AugmentConfig
from napari_sdunet.checkpoint import load_checkpoint, save_checkpoint
from napari_sdunet.events import Progress
from napari_sdunet.models import SegmentationModel, count_parameters, create_model
from napari_sdunet.tasks import TASKS
from napari_sdunet.train_loop import FitConfig, fit

from .datasets import LIVER_TEST_SOURCE, load_split, load_volumes, resolve_source
from .evaluate import evaluate_2d, evaluate_volumes


@dataclass
class RunSpec:
    task: str
    arch: str
    out: str
    data_root: str | None = None
    source: str | None = None  # training data folder (default: the task's, see datasets.DEFAULT_SOURCES)
    test_source: str | None = None  # liver: HU volumes folder (default liver/)
    input_size: list[int] | None = None  # None: the preset's (paper) size
    epochs: int = 100
    max_steps: int | None = None
    lr: float | None = None  # None: Table 5
    batch_size: int | None = None
    patience: int | None = 30
    val_every: int = 0
    seed: int = 0
    augment: list[str] = field(default_factory=list)
    flip_tta: bool = False
    init_from: str | None = None
    limit_train: int | None = None
    limit_val: int | None = None  # evenly spaced subsets (datasets.spread)
    limit_test: int | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    lr_schedule: str = "constant"
    threads: int | None = None
    device: str = "auto"
    time_budget_s: float | None = None  # stop training (keeping the best weights) after this long
    ct_window: list[float] | None = None  # liver: HU window of HU-volume sources (None: the preset's)
    warm_gate_bias: float | None = 3.0  # see warm_start; None: leave the ResSDN gates as initialised
    cpu_bf16: bool = False  # bfloat16 autocast when training on CPU (FitConfig.cpu_bf16)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def preprocessing_for(task: str, input_size: list[int] | None, ct_window: list[float] | None = None,
                      ) -> dict[str, Any]:
    """The preset's preprocessing record, with the input size (and CT window) actually trained with."""
    prep = TASKS[task].preprocessing.to_dict()
    if input_size:
        prep["input_size"] = list(input_size)
    if ct_window:
        prep["ct_window"] = [float(v) for v in ct_window]
    return prep


def warm_start(model: SegmentationModel, folder: str, gate_bias: float | None = 3.0) -> dict[str, Any]:
    """Copy every tensor of a checkpoint whose name and shape fit ``model``.

    A plain VGG block's second conv ``...3.weight`` maps onto a ResSDN block's parallel conv
    ``...3.cnn.weight``: U-Net -> SDU-Net and U-Net++ -> SDNU-Net transfer everything but the SDN paths.
    ``gate_bias``: open every ResSDN gate towards the copied conv (gate weights 0, bias ``gate_bias``,
    sigmoid(3) = 0.95), so the SD network starts as the baseline and learns how much SDN to mix in.
    """
    src, _ = load_checkpoint(folder)
    sstate = src.state_dict()
    own = model.state_dict()
    new, copied = {}, 0
    for k, v in own.items():
        cand = sstate.get(k)
        if cand is None and ".cnn." in k:
            cand = sstate.get(k.replace(".cnn.", "."))
        if cand is not None and cand.shape == v.shape:
            new[k] = cand.to(v.dtype)
            copied += 1
    model.load_state_dict(new, strict=False)
    gates = model.open_gates(gate_bias) if gate_bias is not None else 0
    return {"copied": copied, "total": len(own), "gate_bias": gate_bias, "gates_opened": gates}


def _csv_logger(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists()
    f = open(path, "a", newline="")
    w = csv.writer(f)
    if fresh:
        w.writerow(["step", "epoch", "loss", "val_dice", "best_val_dice", "seconds"])
    return f, w


def init_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU.

    Returns ``(rank, world_size, device)``; each rank uses GPU LOCAL_RANK when CUDA is there.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    dist = torch.distributed
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def run_fit(spec: RunSpec, progress: bool = True) -> dict[str, Any] | None:
    """Train and test one network; see the module docstring for what is written.

    Under torchrun every rank trains (DDP); only rank 0 tests and writes files, and only rank 0
    returns the record (other ranks return None).
    """
    from tqdm.auto import tqdm

    if spec.threads:
        torch.set_num_threads(spec.threads)
    rank, world, device = init_distributed(spec.device)
    out = Path(spec.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    t_task = TASKS[spec.task]
    prep = preprocessing_for(spec.task, spec.input_size, spec.ct_window)
    size = prep["input_size"]
    common = dict(source=spec.source, data_root=spec.data_root, size=size, ct_window=prep["ct_window"])
    train_set = load_split(spec.task, "train", limit=spec.limit_train, **common)
    val = load_split(spec.task, "val", limit=spec.limit_val, **common)
    batch_size = spec.batch_size or t_task.batch_size
    train = train_set.batches(batch_size, augment=AugmentConfig.from_kinds(spec.augment), seed=spec.seed)
    torch.manual_seed(spec.seed)
    model = create_model(spec.arch, spec.task, **spec.model_overrides)
    warm = warm_start(model, spec.init_from, spec.warm_gate_bias) if spec.init_from else None
    cfg = FitConfig(epochs=spec.epochs, max_steps=spec.max_steps, lr=spec.lr or t_task.lr,
                    batch_size=batch_size, patience=spec.patience,
                    val_every=spec.val_every, seed=spec.seed, lr_schedule=spec.lr_schedule,
                    validate_on_stop=True, cpu_bf16=spec.cpu_bf16)
    f, writer = _csv_logger(out / "log.csv") if rank == 0 else (None, None)
    bar = tqdm(total=None, desc=f"{spec.arch}-{spec.task}", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)

    def on_progress(p: Progress) -> None:
        if p.kind == "step":
            bar.total = p.total_steps
            bar.n = p.step
            bar.set_postfix(loss=f"{p.loss:.3f}", best=f"{p.best_val_dice:.3f}", refresh=False)
            bar.refresh()
        elif p.kind == "val" and writer is not None:
            writer.writerow([p.step, p.epoch, f"{p.loss:.5f}", f"{p.val_dice:.5f}", f"{p.best_val_dice:.5f}",
                             f"{p.seconds:.1f}"])
            f.flush()

    t0 = time.perf_counter()
    deadline = None if not spec.time_budget_s else t0 + spec.time_budget_s

    def should_stop() -> bool:
        stop = deadline is not None and time.perf_counter() > deadline
        if world > 1:  # every rank must stop at the same step: rank 0 decides
            flag = torch.tensor([float(stop)], device=device if device.startswith("cuda") else "cpu")
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    try:
        res = fit(model, train, val, cfg, device=device, on_progress=on_progress, should_stop=should_stop,
                  state_dir=out / "state" if rank == 0 else None)
    finally:
        bar.close()
        if f is not None:
            f.close()
    train_s = time.perf_counter() - t0
    if world > 1:
        torch.distributed.barrier()
        if rank != 0:
            return None
    metrics = test_model(model, spec.task, size, spec.data_root, spec.test_source or (
        None if spec.task == "liver" else spec.source), spec.flip_tta, spec.limit_test, prep["ct_window"])
    record = {
        "spec": asdict(spec), "fit": {"best_val_dice": res.best_val_dice, "best_step": res.best_step,
                                      "steps": res.steps, "stopped_early": res.stopped_early,
                                      "cancelled": res.cancelled, "seconds": round(train_s, 1)},
        "fit_config": asdict(cfg), "n_train": len(train_set), "n_val": len(val), "parameters": count_parameters(model),
        "warm_start": warm, "test": metrics, "commit": git_commit(),
        "hardware": _hardware(),
    }
    save_checkpoint(model, out / "model", task=spec.task, preprocessing=prep,
                    extra={"training": {k: record[k] for k in ("spec", "fit", "fit_config", "n_train", "n_val",
                                                               "warm_start", "commit", "hardware")},
                           "metrics": metrics})
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def test_model(model: torch.nn.Module, task: str, model_size: list[int], data_root: str | None,
               source: str | None, flip_tta: bool = False, limit: int | None = None,
               ct_window: list[float] | None = None) -> dict[str, Any]:
    """Test metrics of ``model``: the 2-D test split at the preset size, or the liver HU volumes."""
    prep = TASKS[task].preprocessing
    if task == "liver":
        root = resolve_source(task, source or LIVER_TEST_SOURCE, data_root)
        vols = load_volumes(root, "test", data_root=Path(data_root) if data_root else None, limit=limit)
        return evaluate_volumes(model, vols, model_size, ct_window or list(prep.ct_window), flip_tta)
    test = load_split(task, "test", source=source, data_root=data_root, size=list(prep.input_size), limit=limit)
    return evaluate_2d(model, test, model_size, flip_tta)
