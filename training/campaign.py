"""The training campaign: a committed queue of runs, trained one at a time, resumable over days.

``python -m training campaign run training/campaign.toml`` trains every unfinished run of the file in
order; ``campaign status`` prints where each stands. A run folder (``runs_dir/<name>``, git-ignored,
configurable) holds the resume state (weights, optimizer, step, best-so-far, RNG states, CPU seconds),
rewritten atomically every few minutes and on SIGTERM / Ctrl-C, so a ``kill -9`` loses at most that
much. On a machine without the folder a run continues from the shipped weights it produced earlier
(their config records the campaign step), with a fresh optimizer, and says so in its log.

Each run entry is ``arch x recipe x budget``; a recipe (also in the file) names the task, data,
patch size, optimiser, schedule and augmentation. The precision (fp32 or bf16 autocast, both
channels_last) is chosen by timing a few steps of each on the host at start.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_sdunet.tasks import TASKS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the campaign needs the `tomli` package there
    import tomli as tomllib  # type: ignore[no-redef]

#: Keys a recipe may set, with their defaults.
RECIPE_DEFAULTS: dict[str, Any] = {
    "task": None, "source": None, "native": False, "patch": None, "input_size": None, "val_crop": 256,
    "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 100,
    "min_lr_factor": 0.02, "val_every": 200, "patience": 12, "tile_size": [256, 256], "tile_overlap": 32,
    "augment": {}, "grad_clip": None, "model": {}, "val_metric": "image",
}
#: keys added after runs were shipped: left out of a recipe's digest while they hold their default, so
#: that the shipped runs of recipes that do not set them keep their digest (and are not trained again)
LATER_KEYS = {"val_metric": "image"}
RUN_KEYS = {"name", "arch", "recipe", "steps", "budget_cpu_hours", "init", "seed", "ship", "micro_batches"}


class CampaignError(ValueError):
    """The campaign file or a run folder is not usable as given."""


@dataclass
class Recipe:
    name: str
    task: str
    source: str | None
    native: bool
    patch: list[int] | None
    input_size: list[int] | None
    val_crop: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_factor: float
    val_every: int
    patience: int | None
    tile_size: list[int]
    tile_overlap: int
    augment: dict[str, Any]
    grad_clip: float | None
    model: dict[str, Any]  # create_model overrides (e.g. base_filters); empty: the paper preset
    val_metric: str = "image"  # "image" or "group": the per-volume Dice of the liver (train_loop.VAL_METRICS)

    def digest(self) -> str:
        """Short hash of the recipe, so a shipped model is only continued by the recipe that made it."""
        d = asdict(self)
        for k, default in LATER_KEYS.items():
            if d.get(k) == default:
                del d[k]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class RunEntry:
    name: str
    arch: str
    recipe: Recipe
    steps: int
    budget_cpu_hours: float | None = None
    init: str = "none"  # "none" | "shipped" | "baseline" | a checkpoint folder
    seed: int = 0
    ship: bool = True
    #: on a CPU, each step's batch in this many pieces (gradients summed): the same batch and loss in less
    #: memory (BatchNorm sees the pieces). Not part of the recipe: how a host fits the step, like threads.
    micro_batches: int = 1

    @property
    def task(self) -> str:
        return self.recipe.task


@dataclass
class Campaign:
    path: Path
    runs_dir: Path
    state_every_s: float
    runs: list[RunEntry] = field(default_factory=list)
    max_rss_gb: float | None = None  # a run whose peak RSS passes this says so in its log

    def run_dir(self, entry: RunEntry) -> Path:
        return self.runs_dir / entry.name

    def entries(self, names: list[str]) -> list[RunEntry]:
        """The runs of these names, in the order given; an unknown name is a :class:`CampaignError`."""
        by_name = {e.name: e for e in self.runs}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise CampaignError(f"no run named {', '.join(unknown)} in {self.path}")
        return [by_name[n] for n in names]


def load_campaign(path: str | os.PathLike, runs_dir: str | None = None) -> Campaign:
    """Parse and check a campaign TOML file (``[campaign]``, ``[recipe.NAME]``, ``[[run]]``)."""
    from napari_sdunet.models import list_models
    from napari_sdunet.train_loop import VAL_METRICS

    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CampaignError(f"cannot read campaign file {path}: {e}") from None
    head = doc.get("campaign", {})
    where = runs_dir or os.environ.get("SDUNET_RUNS") or head.get("runs_dir") or "~/.cache/napari-sdunet/campaign"
    recipes = {}
    for name, raw in doc.get("recipe", {}).items():
        unknown = set(raw) - set(RECIPE_DEFAULTS)
        if unknown:
            raise CampaignError(f"recipe {name!r}: unknown keys {sorted(unknown)}")
        vals = {**copy.deepcopy(RECIPE_DEFAULTS), **raw}
        if vals["task"] not in TASKS:
            raise CampaignError(f"recipe {name!r}: task must be one of {sorted(TASKS)}")
        if vals["val_metric"] not in VAL_METRICS:
            raise CampaignError(f"recipe {name!r}: val_metric must be one of {VAL_METRICS} (group: per CT volume)")
        recipes[name] = Recipe(name=name, **vals)
    runs, seen = [], set()
    for raw in doc.get("run", []):
        unknown = set(raw) - RUN_KEYS
        if unknown:
            raise CampaignError(f"run {raw.get('name')!r}: unknown keys {sorted(unknown)}")
        if raw.get("recipe") not in recipes:
            raise CampaignError(f"run {raw.get('name')!r}: recipe {raw.get('recipe')!r} is not defined")
        if raw.get("arch") not in list_models():
            raise CampaignError(f"run {raw.get('name')!r}: arch must be one of {list_models()}")
        name = raw.get("name") or f"{raw['arch']}-{recipes[raw['recipe']].task}"
        if name in seen:
            raise CampaignError(f"two runs are named {name!r}")
        seen.add(name)
        micro = raw.get("micro_batches", 1)
        if not isinstance(micro, int) or not 1 <= micro <= recipes[raw["recipe"]].batch_size:
            raise CampaignError(f"run {name!r}: micro_batches must be a whole number from 1 to the batch size "
                                f"({recipes[raw['recipe']].batch_size}), got {micro!r}")
        runs.append(RunEntry(name=name, arch=raw["arch"], recipe=recipes[raw["recipe"]], steps=int(raw["steps"]),
                             budget_cpu_hours=raw.get("budget_cpu_hours"), init=raw.get("init", "none"),
                             seed=int(raw.get("seed", 0)), ship=bool(raw.get("ship", True)), micro_batches=micro))
    max_rss = head.get("max_rss_gb")
    return Campaign(path=path, runs_dir=Path(where).expanduser(),
                    state_every_s=float(head.get("state_every_minutes", 5)) * 60, runs=runs,
                    max_rss_gb=float(max_rss) if max_rss is not None else None)


# -- host ------------------------------------------------------------------------------------------

def host_cpu() -> str:
    """The CPU model, with whether it has AMX (bf16 autocast is fast there) or AVX-512 BF16."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    extra = "AMX" if "amx_tile" in flags else ("AVX-512 BF16, no AMX" if "avx512_bf16" in flags else "no AMX")
    return f"{name} ({extra})"


def physical_cores() -> int:
    """Physical cores (hyper-threads not counted): the thread count that trains fastest."""
    cores = set()
    try:
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                cores.add((phys, core))
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- data and model ---------------------------------------------------------------------------------

def _augment(recipe: Recipe):
    from napari_sdunet.batches import AugmentConfig

    a = dict(recipe.augment)
    if "scale" in a:
        a["scale"] = tuple(float(v) for v in a["scale"])
    try:
        return AugmentConfig(**a)
    except TypeError as e:
        raise CampaignError(f"recipe {recipe.name!r}: bad augment table: {e}") from None


def val_batch_size(r: Recipe) -> int:
    """Validation batch: at most twice the pixels of a training batch.

    The native nuclei runs train on small patches and validate on 256x256 crops; at the training batch
    size an SD network's validation held 7 GB (SDU-Net, 12 crops), the campaign's peak. The Dice does not
    depend on the batch (eval-mode BatchNorm, per-image scores), so only memory changes.
    """
    if not (r.native and r.patch):
        return r.batch_size
    per_batch = r.batch_size * r.patch[0] * r.patch[1]
    return max(1, min(r.batch_size, 2 * per_batch // (int(r.val_crop) ** 2)))


def data_identity(entry: RunEntry) -> dict[str, Any]:
    """What decides a run's training and validation tensors (runs that share it share their data)."""
    from .runner import preprocessing_for

    r = entry.recipe
    prep = {} if r.native else preprocessing_for(r.task, r.input_size)
    return {"task": r.task, "source": r.source, "native": r.native, "input_size": prep.get("input_size"),
            "ct_window": prep.get("ct_window")}


def recipe_split(entry: RunEntry, split: str, data_root: str | None = None, limit: int | None = None):
    """The run's ``split`` ("train" or "val") as its recipe loads it, before validation crops and batching."""
    from .datasets import load_native, load_split

    d = data_identity(entry)
    if d["native"]:
        return load_native(d["task"], split, source=d["source"], data_root=data_root, limit=limit)
    return load_split(d["task"], split, source=d["source"], data_root=data_root, size=d["input_size"],
                      ct_window=d["ct_window"], limit=limit)


def build_data(entry: RunEntry, data_root: str | None = None, limit: int | None = None,
               pack: str | os.PathLike | None = None):
    """(train BatchSource, val SegDataset, preprocessing record) of a run's recipe.

    ``pack``: a folder written by ``campaign pack`` (a lent GPU's call carries it instead of the data):
    the splits come from there, the same tensors the data folders give.
    """
    from .runner import preprocessing_for

    r = entry.recipe
    if pack is not None:
        from .campaign_device import packed_split

        tr, val = (packed_split(pack, entry, s, limit) for s in ("train", "val"))
    else:
        tr, val = (recipe_split(entry, s, data_root, limit) for s in ("train", "val"))
    if r.native:
        val = val.center_crops(int(r.val_crop))
        patch = r.patch or list(TASKS[r.task].preprocessing.input_size)
        train = tr.batches(r.batch_size, patch=patch, augment=_augment(r), seed=entry.seed)
        prep = preprocessing_for(r.task, list(patch))
        prep.update(mode="tiles", tile_size=list(r.tile_size), tile_overlap=int(r.tile_overlap))
        return train, val, prep
    prep = preprocessing_for(r.task, r.input_size)
    train = tr.batches(r.batch_size, patch=r.patch, augment=_augment(r), seed=entry.seed)
    return train, val, prep


def shipped_folder(entry: RunEntry) -> Path:
    from napari_sdunet.zoo import PACKAGE_WEIGHTS

    return PACKAGE_WEIGHTS / entry.name


def shipped_campaign_record(entry: RunEntry) -> dict[str, Any] | None:
    """The campaign record of the shipped model of this run, when this recipe made it."""
    cfg = shipped_folder(entry) / "config.json"
    if not cfg.is_file():
        return None
    rec = json.loads(cfg.read_text()).get("campaign")
    if rec and rec.get("run") == entry.name and rec.get("recipe_digest") == entry.recipe.digest():
        return rec
    return None


def continuation(entry: RunEntry, camp: Campaign) -> tuple[Path, dict[str, Any], str] | None:
    """(weights folder, campaign record, what) that an unfinished run without resume state continues from:
    its shipped weights, or the best weights ``campaign import`` brought from another machine (a lent
    GPU); the later step wins."""
    options = []
    rec = shipped_campaign_record(entry)
    if rec is not None:
        options.append((int(rec["step"]), shipped_folder(entry), rec, "the shipped weights"))
    rd = camp.run_dir(entry)
    if (rd / "run.json").is_file() and (rd / "model" / "config.json").is_file():
        imp = json.loads((rd / "run.json").read_text())
        if imp.get("imported") and imp.get("recipe_digest") == entry.recipe.digest():
            options.append((int(imp["step"]), rd / "model", imp, f"the weights imported from {imp.get('host')}"))
    if not options:
        return None
    _, folder, rec, what = max(options, key=lambda o: o[0])
    return folder, rec, what


def initial_weights(entry: RunEntry, camp: Campaign) -> str | None:
    """Folder to warm-start from (``init``): the shipped model, the baseline of the same task, a path."""
    from napari_sdunet.models import get_arch

    if entry.init == "none":
        return None
    if entry.init == "shipped":
        f = shipped_folder(entry)
        return str(f) if (f / "config.json").is_file() else None
    if entry.init == "baseline":
        base = get_arch(entry.arch).baseline
        if base is None:
            raise CampaignError(f"run {entry.name}: {entry.arch} has no baseline to warm-start from")
        for other in camp.runs:
            if other.arch == base and other.task == entry.task:
                model = camp.run_dir(other) / "model"
                if (model / "config.json").is_file():
                    return str(model)
        from napari_sdunet.zoo import PACKAGE_WEIGHTS

        f = PACKAGE_WEIGHTS / f"{base}-{entry.task}"
        return str(f) if (f / "config.json").is_file() else None
    return str(Path(entry.init).expanduser())


def choose_precision(model, train, steps: int = 2, micro_batches: int = 1) -> dict[str, Any]:
    """Time ``steps`` training steps (after one warm-up) in fp32 and in bf16 autocast, both
    channels_last, on a copy of the model; return the faster and the measured seconds per step."""
    import torch

    from napari_sdunet.train_loop import accumulate_gradients

    x, y = train.batch(0)
    x = x.contiguous(memory_format=torch.channels_last)
    times = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        m = copy.deepcopy(model).to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
        best = math.inf
        for k in range(steps + 1):
            t = time.perf_counter()
            opt.zero_grad()
            accumulate_gradients(m, x, y, micro_batches, None, torch.bfloat16, bf16)
            opt.step()
            if k:
                best = min(best, time.perf_counter() - t)
        times[name] = round(best, 3)
        del m, opt
    pick = "bf16" if times["bf16"] < times["fp32"] else "fp32"
    return {"precision": pick, "step_seconds": times}


# -- one run ----------------------------------------------------------------------------------------

class _Stop:
    """SIGTERM / SIGINT ask the run to save and stop; a second signal stops at once.

    ``deadline`` (``time.time()`` seconds): the wall-clock end of the whole command (``--max-minutes``,
    e.g. a lent GPU's few minutes); the run saves and stops there as on SIGTERM.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self.asked = False
        self.deadline = deadline

    def due(self) -> bool:
        if not self.asked and self.deadline is not None and time.time() >= self.deadline:
            self.asked = True
            print("time limit (--max-minutes) reached: saving the state and stopping after this step", flush=True)
        return self.asked

    def __call__(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print(f"signal {signum}: saving the state and stopping after this step", flush=True)


def log(run_dir: Path, text: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
    print(line, flush=True)
    with open(run_dir / "log.txt", "a") as f:
        f.write(line + "\n")


def _write_json(path: Path, obj: Any) -> None:
    from napari_sdunet.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def resolve_device(device: str = "cpu") -> str:
    """"cpu", "cuda", or "auto" (CUDA when torch sees a GPU, else the CPU)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CampaignError("--device cuda: torch sees no CUDA GPU here")
    if device not in ("cpu", "cuda"):
        raise CampaignError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def host_gpu() -> str:
    import torch

    return f"{torch.cuda.get_device_name()} (CUDA)"


def train_run(entry: RunEntry, camp: Campaign, *, data_root: str | None = None, threads: int | None = None,
              limit: int | None = None, stop: _Stop | None = None, precision: str | None = None,
              progress: bool = True, device: str = "cpu", pack: str | None = None) -> dict[str, Any]:
    """Train (or resume) one run until its steps, budget, early stop or a stop signal; returns its record.

    ``device="cuda"``: the same run on a GPU (bf16 autocast unless ``precision="fp32"``; the SD layers take
    the Triton sweep there); its hours are counted and recorded like CPU-hours, its host is the GPU's name.
    """
    import torch

    from napari_sdunet.checkpoint import load_checkpoint
    from napari_sdunet.events import Progress
    from napari_sdunet.models import create_model, get_arch
    from napari_sdunet.train_loop import FitConfig, fit

    from .runner import warm_start

    rd = camp.run_dir(entry)
    rd.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    n_threads = threads or physical_cores()
    torch.set_num_threads(n_threads)
    host = host_gpu() if device == "cuda" else host_cpu()
    r = entry.recipe
    train, val, prep = build_data(entry, data_root, limit, pack)
    torch.manual_seed(entry.seed)
    model = create_model(entry.arch, r.task, **r.model)
    state = rd / "state"
    info_path = rd / "run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    start = dict(step=0, cpu_seconds=0.0, best_dice=-1.0)
    forget_best = False
    if (state / "state.json").is_file():
        log(rd, f"resuming from {state} (weights, optimizer, step, RNG states)")
        if info.get("recipe_digest") not in (None, r.digest()):
            forget_best = True
            meta0 = json.loads((state / "state.json").read_text())
            info["scoring_changed"] = {"step": int(meta0["step"]), "val_metric": r.val_metric,
                                       "from_digest": info["recipe_digest"]}
            log(rd, f"the recipe changed since the state was saved (digest {info['recipe_digest']} -> {r.digest()}): "
                    f"the best-so-far is scored anew at the next validation (validation: {r.val_metric})")
    else:
        cont = continuation(entry, camp)
        if cont is not None:
            folder, rec, what = cont
            shipped, _ = load_checkpoint(folder)
            model.load_state_dict({k: v.float() for k, v in shipped.state_dict().items()})
            start = dict(step=int(rec["step"]), cpu_seconds=float(rec["cpu_hours"]) * 3600,
                         best_dice=float(rec["best_val_dice"]))
            # the run's history travels with its weights: where it started from, and each change of machine
            info["warm_start"] = rec.get("warm_start")
            info["continued"] = [*(rec.get("continued") or []), {
                "step": start["step"], "cpu_hours": round(float(rec["cpu_hours"]), 4), "host": rec.get("host")}]
            info.pop("imported", None)
            log(rd, f"no run folder state on this machine: warm start from {what} {folder}"
                    f" (campaign step {start['step']}, {rec['cpu_hours']:.2f} CPU-h so far), fresh optimizer")
        else:
            src = initial_weights(entry, camp)
            if src:
                warm = warm_start(model, src, gate_bias=3.0 if get_arch(entry.arch).has_sdn else None)
                info["warm_start"] = dict(warm, source=src)
                log(rd, f"warm start from {src}: {warm['copied']}/{warm['total']} tensors copied, "
                        f"{warm['gates_opened']} SDN gates opened")
            else:
                info["warm_start"] = None
                log(rd, "training from scratch (random initialisation)")
    micro = entry.micro_batches if device == "cpu" else 1  # a GPU holds the whole batch
    if precision is None and device == "cuda":
        choice = {"precision": "bf16", "step_seconds": {}}
        log(rd, f"on {host}: bf16 autocast + channels_last (no timing: a GPU's bf16 is its fast path)")
    elif precision is None:
        if (info.get("host") == host and info.get("threads") == n_threads and "precision" in info
                and info.get("micro_batches", 1) == micro):
            choice = {"precision": info["precision"], "step_seconds": info["step_seconds"]}
            log(rd, f"precision {choice['precision']} (measured earlier on this host: {choice['step_seconds']} s/step)")
        else:
            choice = choose_precision(model, train, micro_batches=micro)
            log(rd, f"timed training steps on {host}, {n_threads} threads: {choice['step_seconds']} s/step; "
                    f"using {choice['precision']} + channels_last")
    else:
        choice = {"precision": precision, "step_seconds": info.get("step_seconds", {})}
    info.update(name=entry.name, arch=entry.arch, task=r.task, recipe=r.name, recipe_digest=r.digest(),
                steps=entry.steps, host=host, threads=n_threads, precision=choice["precision"], device=device,
                micro_batches=micro,
                step_seconds=choice["step_seconds"], steps_per_epoch=train.steps_per_epoch,
                n_train=len(train), n_val=len(val), preprocessing=prep)
    _write_json(info_path, info)
    cfg = FitConfig(epochs=math.ceil(entry.steps / train.steps_per_epoch) + 1, max_steps=entry.steps, lr=r.lr,
                    batch_size=r.batch_size, weight_decay=r.weight_decay, val_every=r.val_every,
                    patience=r.patience, cpu_bf16=choice["precision"] == "bf16", seed=entry.seed,
                    amp=device == "cuda" and choice["precision"] == "bf16", cuda_bf16=True,
                    lr_schedule="cosine", warmup_steps=r.warmup_steps, min_lr_factor=r.min_lr_factor,
                    optimizer=r.optimizer, channels_last=True, state_every_s=camp.state_every_s,
                    grad_clip=r.grad_clip, validate_on_stop=False, val_batch_size=val_batch_size(r),
                    val_metric=r.val_metric, micro_batches=micro)
    budget_s = entry.budget_cpu_hours * 3600 if entry.budget_cpu_hours else None
    stop = stop or _Stop()
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    last_print = [0.0]
    csv_path = rd / "log.csv"
    if not csv_path.exists():
        csv_path.write_text("step,epoch,loss,val_dice,best_val_dice,cpu_hours,lr_factor\n")
    known_cpu = [start["cpu_seconds"]]
    warned_rss: list[float] = []

    def on_progress(p: Progress) -> None:
        now = time.perf_counter()
        if p.kind == "val":
            from napari_sdunet.train_loop import lr_factor

            cpu_h = (known_cpu[0] + time.process_time() - cpu_start) / 3600
            with open(csv_path, "a") as f:
                f.write(f"{p.step},{p.epoch},{p.loss:.5f},{p.val_dice:.5f},{p.best_val_dice:.5f},{cpu_h:.4f},"
                        f"{lr_factor(cfg, p.step - 1, p.total_steps):.4f}\n")
            rss = peak_rss_gb()
            log(rd, f"step {p.step}/{p.total_steps} epoch {p.epoch}: loss {p.loss:.4f} val Dice {p.val_dice:.4f} "
                    f"(best {p.best_val_dice:.4f}), {cpu_h:.2f} CPU-h, peak RSS {rss:.2f} GB")
            if camp.max_rss_gb and rss > camp.max_rss_gb and not warned_rss:
                warned_rss.append(rss)
                log(rd, f"peak RSS {rss:.2f} GB is over the campaign's max_rss_gb = {camp.max_rss_gb:g}: "
                        f"give this run more micro_batches (now {micro}) in {camp.path.name}")
            if p.step > start_step:  # wall seconds per step in this session, for the ETA
                info["rate_s_per_step"] = round((now - t_start) / (p.step - start_step), 3)
                _write_json(info_path, dict(info, step=p.step, best_val_dice=p.best_val_dice))
        elif progress and p.kind == "step" and now - last_print[0] > 60:
            last_print[0] = now
            rate = (now - t_start) / max(1, p.step - start_step)
            print(f"  {entry.name} step {p.step}/{p.total_steps} loss {p.loss:.4f} ({rate:.2f} s/step)", flush=True)

    def should_stop() -> bool:
        if stop.due():
            return True
        if budget_s is not None and known_cpu[0] + time.process_time() - cpu_start > budget_s:
            log(rd, f"CPU budget of {entry.budget_cpu_hours} h reached")
            return True
        return False

    # the step where this session starts (for the rate): the saved state's, or the continued run's
    start_step = start["step"]
    if (state / "state.json").is_file():
        meta = json.loads((state / "state.json").read_text())
        start_step = int(meta["step"])
        known_cpu[0] = float(meta.get("cpu_seconds", 0.0))
    log(rd, f"training {entry.arch} on {r.task} (recipe {r.name}): step {start_step} of {entry.steps}, "
            f"{train.steps_per_epoch} steps/epoch, batch {r.batch_size}"
            + (f" in {micro} micro-batches" if micro > 1 else "") + f", patch {train.patch}")
    res = fit(model, train, val, cfg, device=device, on_progress=on_progress, should_stop=should_stop,
              state_dir=state, state_every=None, start_step=start["step"],
              start_cpu_seconds=start["cpu_seconds"], start_best_dice=start["best_dice"], forget_best=forget_best)
    finished = not res.cancelled or (budget_s is not None and res.cpu_seconds > budget_s)
    record = dict(info, step=res.steps, best_val_dice=res.best_val_dice, best_step=res.best_step,
                  cpu_hours=round(res.cpu_seconds / 3600, 4), stopped_early=res.stopped_early,
                  finished=finished, peak_rss_gb=round(peak_rss_gb(), 2),
                  seconds_this_session=round(time.perf_counter() - t_start, 1))
    _write_json(info_path, record)
    if finished:
        from napari_sdunet.checkpoint import save_checkpoint

        save_checkpoint(model, rd / "model", task=r.task, preprocessing=prep,
                        extra={"campaign": campaign_record(record)})
        _write_json(rd / "done.json", record)
        log(rd, f"finished at step {res.steps}: best val Dice {res.best_val_dice:.4f} at step {res.best_step}, "
                f"{record['cpu_hours']:.2f} CPU-h")
    else:
        log(rd, f"stopped at step {res.steps} (state saved); `campaign run` resumes it")
    return record


RUNS_MARK = "<runs>"  # stands for the campaign's run folder in a shipped record


def portable_warm_start(warm: dict[str, Any] | None) -> dict[str, Any] | None:
    """A warm-start record without the training machine's paths, with the name of the model it started from.

    Shipped weights become ``napari_sdunet/weights/NAME``, a finished run's folder ``<runs>/NAME/model``, any
    other folder ``<folder>/NAME``. Records already in this form are returned as they are."""
    if not warm or not warm.get("source") or "model" in warm:  # none, or already portable
        return warm
    src = Path(str(warm["source"]))
    posix = src.as_posix()
    if "napari_sdunet/weights/" in posix:  # this checkout's, or a campaign worktree's
        source, model = f"napari_sdunet/weights/{src.name}", src.name
    elif src.name == "model":  # a run folder's best weights
        source, model = f"{RUNS_MARK}/{src.parent.name}/model", src.parent.name
    else:
        source, model = f"<folder>/{src.name}", src.name
    return dict(warm, source=source, model=model)


def campaign_record(rec: dict[str, Any]) -> dict[str, Any]:
    """What a shipped model's config keeps of its run, so that a new machine can continue it (no paths of
    the machine that trained it)."""
    keys = ("name", "arch", "task", "recipe", "recipe_digest", "steps", "step", "best_val_dice", "best_step",
            "cpu_hours", "host", "threads", "precision", "finished", "warm_start", "continued", "n_train",
            "n_val", "steps_per_epoch", "device", "imported", "scoring_changed", "micro_batches")
    out = {k: rec.get(k) for k in keys}
    out["run"] = out.pop("name")
    out["warm_start"] = portable_warm_start(out["warm_start"])
    return out


def run_campaign(camp: Campaign, *, only: list[str] | None = None, data_root: str | None = None,
                 threads: int | None = None, limit: int | None = None, ship: bool = True,
                 precision: str | None = None, device: str = "cpu", max_minutes: float | None = None,
                 pack: str | None = None) -> int:
    """Train the unfinished runs in order (one at a time) until all are done, a signal stops it, or
    ``max_minutes`` of wall time have passed."""
    if only:
        camp.entries(only)  # an unknown name is refused before any work
    device = resolve_device(device)
    stop = _Stop(deadline=time.time() + max_minutes * 60 if max_minutes else None)
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for entry in camp.runs:
            if only and entry.name not in only:
                continue
            rd = camp.run_dir(entry)
            if (rd / "done.json").is_file() or (shipped_campaign_record(entry) or {}).get("finished"):
                continue  # finished here, or finished elsewhere and shipped by this recipe
            rec = train_run(entry, camp, data_root=data_root, threads=threads, limit=limit, stop=stop,
                            precision=precision, device=device, pack=pack)
            if stop.asked:
                return 0
            if rec["finished"] and ship and entry.ship:
                from .campaign_ship import ship_run

                ship_run(entry, camp, data_root=data_root, limit=limit)
            if stop.due():
                return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


# -- status -----------------------------------------------------------------------------------------

def _steps_per_epoch(entry: RunEntry, info: dict[str, Any], shipped: dict[str, Any] | None) -> int:
    """Steps per epoch from the run folder, else from the shipped record (older records only hold the
    training set's size: one process draws ``batch_size`` items a step); 0 when unknown."""
    spe = info.get("steps_per_epoch") or (shipped or {}).get("steps_per_epoch")
    if not spe and (shipped or {}).get("n_train"):
        from napari_sdunet.batches import steps_per_epoch

        spe = steps_per_epoch(int(shipped["n_train"]), entry.recipe.batch_size)
    return int(spe or 0)


def status_rows(camp: Campaign) -> list[dict[str, Any]]:
    """One row per run: step/total, epoch, best val Dice, CPU-hours, precision, host, ETA."""
    rows = []
    for entry in camp.runs:
        rd = camp.run_dir(entry)
        info = json.loads((rd / "run.json").read_text()) if (rd / "run.json").is_file() else {}
        meta = {}
        if (rd / "state" / "state.json").is_file():
            meta = json.loads((rd / "state" / "state.json").read_text())
        shipped = shipped_campaign_record(entry) if not meta else None
        if not meta and info.get("imported"):  # brought from another machine: its record is the latest
            shipped = {k: info.get(k) for k in ("step", "cpu_hours", "best_val_dice", "finished")}
        if not info and shipped:  # finished on another machine: what its shipped record says
            info = {k: shipped[k] for k in ("precision", "host", "threads") if k in shipped}
        step = int(meta.get("step", (shipped or {}).get("step", 0)))
        spe = _steps_per_epoch(entry, info, shipped)
        cpu_h = float(meta.get("cpu_seconds", 0.0)) / 3600 if meta else float((shipped or {}).get("cpu_hours", 0))
        best = meta.get("best_dice", (shipped or {}).get("best_val_dice"))
        done = (rd / "done.json").is_file() or bool((shipped or {}).get("finished"))
        per_step = info.get("rate_s_per_step")
        if per_step is None and info.get("step_seconds"):
            per_step = info["step_seconds"].get(info.get("precision", "fp32"))
        eta_h = None if done or per_step is None else max(0, entry.steps - step) * per_step / 3600
        if entry.budget_cpu_hours and eta_h is not None:  # CPU-hours over the threads = wall hours
            eta_h = min(eta_h, max(0.0, entry.budget_cpu_hours - cpu_h) / max(1, info.get("threads", 1)))
        rows.append({
            "run": entry.name, "state": "done" if done else ("started" if meta else (
                "imported" if info.get("imported") else "shipped" if shipped else "queued")),
            "step": step, "steps": entry.steps,
            "epoch": f"{step / spe:.1f}/{entry.steps / spe:.1f}" if spe else "-",
            "best_val_dice": None if best is None or best < 0 else round(float(best), 4),
            "cpu_hours": round(cpu_h, 2), "precision": info.get("precision", "-"), "host": info.get("host", "-"),
            "eta_hours": None if eta_h is None else round(eta_h, 2),
        })
    return rows


def format_status(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The status table as aligned text, or as a markdown table (for training/CAMPAIGN.md)."""
    cols = ["run", "state", "step", "epoch", "best_val_dice", "cpu_hours", "precision", "eta_hours", "host"]
    table = [cols] + [["-" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in table]
        lines.insert(1, "|" + "---|" * len(cols))
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training campaign", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "train the unfinished runs, one at a time"),
                        ("status", "print where each run stands"),
                        ("ship", "write a run's best weights into the package (fp16 + card)"),
                        ("pack", "write what some runs need (data splits, start weights) into one folder, "
                                 "for a machine without ../shared/data (a lent GPU)"),
                        ("export", "write runs' best weights, records and logs as a few small files "
                                   "(to bring them back from a lent GPU)"),
                        ("import", "turn exported files into run folders here, ready for `campaign ship`"),
                        ("rescore", "record shipped models' validation Dice by every metric their task is "
                                    "ranked by (per image; per CT volume), in their config.json"),
                        ("cards", "rewrite the Target section of shipped models' cards from training/targets.toml "
                                  "(their own recorded test figures; nothing is trained or measured)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("file", help="campaign TOML file, e.g. training/campaign.toml")
        p.add_argument("--runs-dir", help="run folders (default: $SDUNET_RUNS, the file's runs_dir, "
                                          "~/.cache/napari-sdunet/campaign)")
        p.add_argument("--data-root", help="folder holding nuclei/, polyps/, ... (default ../shared/data)")
        if name == "run":
            p.add_argument("--only", nargs="+", help="run only these runs (by name)")
            p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                           help="cpu (default), cuda, or auto (CUDA when torch sees a GPU)")
            p.add_argument("--max-minutes", type=float,
                           help="save and stop after this many minutes of wall time (a lent GPU's call)")
            p.add_argument("--pack", help="read the data from a `campaign pack` folder instead of --data-root")
            p.add_argument("--threads", type=int, help="torch threads (default: the physical cores)")
            p.add_argument("--precision", choices=["fp32", "bf16"], help="skip the timing and use this")
            p.add_argument("--limit", type=int, help="at most this many images per split (smoke tests)")
            p.add_argument("--no-ship", action="store_true", help="do not write finished runs into the package")
        if name == "ship":
            p.add_argument("run", help="run name")
            p.add_argument("--partial", action="store_true",
                           help="ship the best weights so far of an unfinished run")
            p.add_argument("--if-better", action="store_true",
                           help="only when they validate better than the shipped model, as `campaign run` does "
                                "at a run's end (a finished run that does not keeps its own shipped partial and "
                                "marks it finished)")
            p.add_argument("--limit", type=int, help="at most this many test images (smoke tests)")
        if name == "rescore":
            p.add_argument("runs", nargs="+", help="run names (their shipped models)")
        if name == "cards":
            p.add_argument("runs", nargs="*", help="run names (default: every shipped campaign model)")
        if name in ("pack", "export"):
            p.add_argument("runs", nargs="+", help="run names")
            p.add_argument("--out", required=True, help="folder to write")
            p.add_argument("--max-part-mb", type=float, default=15.0,
                           help="largest file written (default 15 MiB: the device tool brings back <= 16 MiB)")
        if name == "pack":
            p.add_argument("--max-mb", type=float, default=56.0,
                           help="refuse a pack larger than this (default 56 MiB: a device call carries "
                                "64 MiB with the code)")
            p.add_argument("--limit", type=int, help="at most this many images per split (smoke tests)")
        if name == "export":
            p.add_argument("--half", action="store_true", help="fp16 weights (half the files; fp32 by default)")
        if name == "import":
            p.add_argument("folder", help="the exported files (e.g. the device call's files_at)")
            p.add_argument("--force", action="store_true",
                           help="replace a run folder here that has its own saved state (it is kept aside)")
        if name == "status":
            p.add_argument("--json", action="store_true")
            p.add_argument("--markdown", action="store_true", help="a markdown table (training/CAMPAIGN.md)")
    a = ap.parse_args(argv)
    try:
        camp = load_campaign(a.file, a.runs_dir)
        if a.cmd == "status":
            rows = status_rows(camp)
            print(json.dumps(rows, indent=2) if a.json else format_status(rows, markdown=a.markdown))
            return 0
        if a.cmd == "rescore":
            from .campaign_ship import rescore_shipped

            for entry in camp.entries(a.runs):
                print(entry.name, json.dumps(rescore_shipped(entry, camp, data_root=a.data_root)))
            return 0
        if a.cmd == "cards":
            from napari_sdunet.zoo import PACKAGE_WEIGHTS

            from .targets import refresh_cards

            names = [e.name for e in camp.entries(a.runs)] if a.runs else None
            for card in refresh_cards(PACKAGE_WEIGHTS, names):
                print(card)
            return 0
        if a.cmd in ("pack", "export", "import"):
            from . import campaign_device as dev

            if a.cmd == "pack":
                out = dev.pack_runs(camp, a.runs, a.out, data_root=a.data_root, limit=a.limit,
                                    max_mb=a.max_mb, max_part_mb=a.max_part_mb)
            elif a.cmd == "export":
                out = dev.export_runs(camp, a.runs, a.out, half=a.half, max_part_mb=a.max_part_mb)
            else:
                out = dev.import_runs(camp, a.folder, force=a.force)
            print(json.dumps(out, indent=2))
            return 0
        if a.cmd == "ship":
            from .campaign_ship import ship_run

            entry = camp.entries([a.run])[0]
            print(ship_run(entry, camp, data_root=a.data_root, partial=a.partial, limit=a.limit,
                           force=not a.if_better))
            return 0
        return run_campaign(camp, only=a.only, data_root=a.data_root, threads=a.threads, limit=a.limit,
                            ship=not a.no_ship, precision=a.precision, device=a.device,
                            max_minutes=a.max_minutes, pack=a.pack)
    except CampaignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
