"""Where models live: weights shipped in the package, and the user's own (fine-tuned) models.

A model is named ``<arch>-<task>`` (e.g. ``sdnunet-polyps``) or given as a checkpoint folder.
Nothing here touches the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import CONFIG, CheckpointError, load_checkpoint

if TYPE_CHECKING:
    import torch

PACKAGE_WEIGHTS = Path(__file__).with_name("weights")

#: callbacks told when a model folder is written (see :func:`on_models_changed`)
_LISTENERS: list[Callable[[Path | None], None]] = []


def on_models_changed(callback: Callable[[Path | None], None]) -> Callable[[], None]:
    """Call ``callback(folder)`` whenever a model is saved (by fine-tuning, training, the CLI) in this
    process; returns the function that unsubscribes it. The widgets' model pickers listen here.
    Callbacks may run in a worker thread: a GUI listener hands the news to its own thread."""
    _LISTENERS.append(callback)

    def unsubscribe() -> None:
        if callback in _LISTENERS:
            _LISTENERS.remove(callback)

    return unsubscribe


def models_changed(folder: Path | None = None) -> None:
    """Tell every listener that the model list changed (:func:`~napari_sdunet.checkpoint.save_checkpoint`
    calls it after each model it writes)."""
    for callback in list(_LISTENERS):
        callback(folder)


def user_models_dir() -> Path:
    """Folder of user models: $NAPARI_SDUNET_MODELS, else $XDG_DATA_HOME/napari-sdunet/models."""
    env = os.environ.get("NAPARI_SDUNET_MODELS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "napari-sdunet" / "models"


def _models_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / CONFIG).is_file() and not p.name.startswith("."))


def list_pretrained() -> list[str]:
    """Names of the models shipped with the package."""
    return _models_in(PACKAGE_WEIGHTS)


def list_user_models() -> list[str]:
    """Names of the models in :func:`user_models_dir` (e.g. fine-tuned ones)."""
    return _models_in(user_models_dir())


def resolve_model(name_or_folder: str | os.PathLike) -> Path:
    """A shipped model name, a user model name, or a checkpoint folder -> its folder."""
    if not isinstance(name_or_folder, (str, os.PathLike)):
        raise CheckpointError(f"a model is a name (see `napari-sdunet models`) or a checkpoint folder, "
                              f"got {name_or_folder!r}")
    p = Path(name_or_folder).expanduser()
    if str(name_or_folder).strip() and (p / CONFIG).is_file():
        return p
    for base in (PACKAGE_WEIGHTS, user_models_dir()):
        if (base / str(name_or_folder) / CONFIG).is_file():
            return base / str(name_or_folder)
    known = list_pretrained() + list_user_models()
    raise CheckpointError(f"no model named {str(name_or_folder)!r} and no checkpoint folder there; "
                          f"available models: {', '.join(known) or 'none'}")


def load_pretrained(name: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a shipped or user model by name (or a checkpoint folder): ``(model, config)``."""
    return load_checkpoint(resolve_model(name), device=device)


# ----------------------------------------------------------------------------- what each model is good for

#: metric keys of ``config.json`` → ``metrics``, in order of preference, with how to name them.
_TEST_METRICS = (("dice", "test Dice"), ("dice_3d", "test 3-D Dice"))


def model_summary(config: dict[str, Any]) -> dict[str, Any]:
    """What a model's ``config.json`` says about it: ``task``, ``arch``, the test Dice (``test_dice``,
    ``test_metric``), the best validation Dice of its training (``val_dice``), and for a fine-tuned
    model its held-out Dice after fine-tuning (``finetuned_dice``). Missing values are None; nothing
    is ever assumed from the model's name."""
    metrics = config.get("metrics") or {}
    test_dice = test_metric = None
    for key, label in _TEST_METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            test_dice, test_metric = float(value), label
            break
    fit = (config.get("training") or {}).get("fit") or {}
    val = fit.get("best_val_dice")
    campaign = config.get("campaign") or {}  # a model of the training campaign (training/campaign.toml)
    if isinstance(campaign.get("val_dice_shipped"), (int, float)):
        val = campaign["val_dice_shipped"]
    by_metric = {k: float(v) for k, v in (campaign.get("val_dice_by_metric") or {}).items()
                 if isinstance(v, (int, float))}
    ft = config.get("finetune") or {}
    ft_dice = ft.get("dice_after")
    return {
        "task": config.get("task"),
        "arch": config.get("arch"),
        "test_dice": test_dice,
        "test_metric": test_metric,
        "val_dice": float(val) if isinstance(val, (int, float)) else None,
        # the validation Dice by metric ("image": per image; "group": per CT volume), where recorded
        "val_dice_by_metric": by_metric,
        "val_metric": campaign.get("val_metric", "image") if isinstance(val, (int, float)) else None,
        "finetuned_dice": float(ft_dice) if isinstance(ft_dice, (int, float)) else None,
        "finetuned_from": ft.get("base_model"),
    }


def summary_of(name_or_folder: str | os.PathLike) -> dict[str, Any]:
    """:func:`model_summary` of a model name or folder (an unreadable config gives an empty summary)."""
    from .checkpoint import read_config

    try:
        return model_summary(read_config(resolve_model(name_or_folder)))
    except (CheckpointError, OSError, ValueError):
        return model_summary({})


def describe(name: str, summary: dict[str, Any], origin: str) -> str:
    """A model's label in the widgets: name, task and the Dice its config records, e.g.
    ``sdunet-polyps: polyps, test Dice 0.624 (shipped)``."""
    parts = [summary.get("task") or "task unknown"]
    if summary.get("finetuned_dice") is not None:
        parts.append(f"fine-tuned, held-out Dice {summary['finetuned_dice']:.3f}")
    elif summary.get("test_dice") is not None:
        parts.append(f"{summary['test_metric']} {summary['test_dice']:.3f}")
    else:
        parts.append("no test Dice recorded")
    return f"{name}: {', '.join(parts)} ({origin})"


def best_shipped_for_task(task: str) -> str | None:
    """The shipped model for ``task`` with the best validation Dice recorded in its ``config.json``
    (``campaign`` → ``val_dice_by_metric`` when all validated models of the task record one metric, per
    CT volume first; else each one's own ``val_dice_shipped`` or ``training`` → ``fit`` → ``best_val_dice``;
    models without one rank after those with one, then by their recorded test Dice); None when no
    shipped model is trained for ``task``."""
    summaries = {name: summary_of(name) for name in list_pretrained()}
    summaries = {n: s for n, s in summaries.items() if s["task"] == task}
    if not summaries:
        return None
    # rank by a validation metric every validated model records (a liver model validated per volume
    # must not be ranked against another's per-slice mean); else by each one's own validation Dice
    validated = [s for s in summaries.values() if s["val_dice"] is not None]
    common = [m for m in ("group", "image") if validated and all(m in s["val_dice_by_metric"] for s in validated)]
    ranked = []
    for name, s in summaries.items():
        val = s["val_dice"] if s["val_dice"] is not None else -1.0
        if common and s["val_dice"] is not None:
            val = s["val_dice_by_metric"][common[0]]
        test = s["test_dice"] if s["test_dice"] is not None else -1.0
        ranked.append((val, test, name))
    ranked.sort(key=lambda r: (-r[0], -r[1], r[2]))
    return ranked[0][2]
