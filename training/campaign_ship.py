"""Ship a campaign run as a package model (fp16 safetensors, config, card, learning curve).

A run replaces the shipped model of its name only when its best weights validate better than the
shipped ones on the run's own validation set (both measured here, the same way). The card states
the data and split, recipe and augmentation, warm start, steps / epochs / CPU-hours / host /
precision, validation Dice and test Dice (per image and the paper's batch-pooled), and links the
learning curve. Test metrics are measured on the fp16 weights as the package loads them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_sdunet.checkpoint import load_checkpoint, save_checkpoint
from napari_sdunet.train_loop import evaluate_dice

from .campaign import (
    RUNS_MARK,
    Campaign,
    RunEntry,
    build_data,
    campaign_record,
    log,
    portable_warm_start,
    shipped_folder,
    val_batch_size,
)
from .ship import DATA_TERMS, pct
from .targets import card_tests, figure_of, target_lines, warm_start_name, with_target

VAL_METRIC_TEXT = {"image": "per image, mean",
                   "group": "per volume: Dice pooled over each validation volume's slices, mean over volumes"}
NATIVE_TERMS = ("2018 Data Science Bowl stage1_train (BBBC038), all 670 images at their own resolution (`nuclei/`); "
                "80/10/10 random split (seed 42): 536 train / 67 val / 67 test")


def _best_weights(entry: RunEntry, camp: Campaign, partial: bool) -> torch.nn.Module:
    """The run's best model: its finished ``model/`` folder, or (partial) the best weights in its state,
    or (partial, no state here) the best weights ``campaign import`` brought from another machine."""
    from safetensors.torch import load_file

    from napari_sdunet.models import create_model

    rd = camp.run_dir(entry)
    if not partial or not (rd / "state" / "state.safetensors").is_file() and (rd / "model" / "config.json").is_file():
        model, _ = load_checkpoint(rd / "model")
        return model
    tensors = load_file(str(rd / "state" / "state.safetensors"))
    model = create_model(entry.arch, entry.task, **entry.recipe.model)
    model.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
    return model.eval()


def val_scores(model: torch.nn.Module, config_prep: dict[str, Any], val, metrics: list[str],
               batch_size: int = 8) -> dict[str, float]:
    """Validation Dice by each of ``metrics`` (per image; per group, e.g. CT volume) of a model fed the
    way its config says (resized or at native size)."""
    from napari_sdunet.train_loop import dice_score

    from .evaluate import predict_probs

    size = config_prep.get("input_size")
    if config_prep.get("mode") == "tiles" or size is None:
        return {m: evaluate_dice(model, val, batch_size=batch_size, metric=m) for m in metrics}
    probs = predict_probs(model, val.images, size)
    return {m: dice_score(probs, val.masks.float(), m, val.groups) for m in metrics}


def val_dice_of(model: torch.nn.Module, config_prep: dict[str, Any], val, batch_size: int = 8,
                metric: str = "image") -> float:
    """Validation Dice by ``metric`` (see :func:`val_scores`)."""
    return val_scores(model, config_prep, val, [metric], batch_size)[metric]


def comparable_metrics(entry: RunEntry) -> list[str]:
    """The recipe's validation metric first, and for CT volumes both: models of one task are ranked
    (the widgets' preselection) by a metric they all record."""
    first = entry.recipe.val_metric
    return [first] + [m for m in ("group", "image") if m != first and entry.task == "liver"]


def rescore_shipped(entry: RunEntry, camp: Campaign, *, data_root: str | None = None) -> dict[str, float]:
    """Score a shipped campaign model on its run's validation set by every comparable metric and record
    them in its config.json (``campaign.val_dice_by_metric``); the weights and card are left as they are."""
    from napari_sdunet.io import atomic_path

    folder = shipped_folder(entry)
    model, cfg = load_checkpoint(folder)
    _, val, _ = build_data(entry, data_root)
    scores = val_scores(model, cfg.get("preprocessing", {}), val, comparable_metrics(entry),
                        val_batch_size(entry.recipe))
    raw = json.loads((folder / "config.json").read_text())
    raw.setdefault("campaign", {})["val_dice_by_metric"] = {k: round(v, 6) for k, v in scores.items()}
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(raw, indent=2) + "\n")
    return scores


def native_test(model_folder: Path, task: str, source: str, data_root: str | None, limit: int | None,
                split: str = "test") -> dict[str, Any]:
    """Per-image metrics on a 2-D split at its own resolution, through the plugin's inference path."""
    from napari_sdunet.inference import load_model, predict
    from napari_sdunet.metrics import summarize

    from .datasets import load_native

    data = load_native(task, split, source=source, data_root=data_root, limit=limit)
    loaded = load_model(model_folder, "cpu")
    preds, refs = [], []
    for im, mk in zip(data.images, data.masks):
        prob = predict(loaded, np.moveaxis(im.numpy(), 0, -1), "YXC")
        preds.append(prob >= 0.5)
        refs.append(mk[0].numpy() > 0)
    res: dict[str, Any] = summarize(preds, refs, paper_batch_size=20)
    res.update(source=source, scored_at="native resolution", inference=loaded.preprocessing.get("mode", "resize"))
    return res


def test_metrics(model_folder: Path, entry: RunEntry, data_root: str | None, limit: int | None) -> dict[str, Any]:
    """The card's test numbers (the test split is never used to select or tune anything)."""
    from .runner import test_model

    r = entry.recipe
    if r.native:
        out = {"native": native_test(model_folder, r.task, r.source or "nuclei", data_root, limit)}
        if r.task == "nuclei":  # the paper's protocol (96x96 images), for Table 2, where that set is at hand
            from .datasets import DataError

            try:
                out["nuclei_96"] = native_test(model_folder, r.task, "nuclei_96", data_root, limit)
            except DataError:
                pass
        return out
    model, config = load_checkpoint(model_folder)
    prep = config["preprocessing"]
    return {"preset": test_model(model, r.task, prep["input_size"], data_root, None if r.task == "liver" else
                                 r.source, False, limit, prep.get("ct_window"))}


def learning_curve(run_dir: Path, out: Path, title: str) -> Path | None:
    """PNG of training loss and validation Dice against step, from the run's log.csv."""
    path = run_dir / "log.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    changed = None
    if (run_dir / "run.json").is_file():  # validation scored another way from this step on
        changed = json.loads((run_dir / "run.json").read_text()).get("scoring_changed")
    if changed:
        at = int(changed["step"])
        before = [(s_, float(r["val_dice"])) for s_, r in zip(step, rows) if s_ <= at]
        after = [(s_, float(r["val_dice"])) for s_, r in zip(step, rows) if s_ > at]
        if before:
            ax.plot(*zip(*before), "o-", ms=3, color="C0", alpha=0.45, label="validation Dice (per image)")
        if after:
            ax.plot(*zip(*after), "o-", ms=3, color="C0",
                    label=f"validation Dice ({'per volume' if changed['val_metric'] == 'group' else 'per image'})")
        ax.axvline(at, color="grey", ls="--", lw=0.8)
    else:
        ax.plot(step, [float(r["val_dice"]) for r in rows], "o-", ms=3, label="validation Dice")
    ax.plot(step, [float(r["loss"]) for r in rows], "s-", ms=3, color="C1", label="training loss (mean since last val)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center right", fontsize=8)  # loss low, Dice high: the middle is free
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _metric_lines(task: str, tests: dict[str, Any]) -> list[str]:
    lines = []
    for key, m in tests.items():
        if task == "liver" and key == "preset":
            lines.append(f"- per-volume 3-D Dice on {m['n_volumes']} HU volumes of 3D-IRCADb-01 (window "
                         f"{m['ct_window']} HU): **{pct(m['dice_3d'])} ± {pct(m['dice_3d_sd'])}**")
            lines += [f"  - {v['id']}: {pct(v['dice_3d'])}" for v in m["volumes"]]
            s = m["slices_2d"]
            lines.append(f"- per-slice Dice {pct(s['dice'])}, batch-pooled Dice (paper) {pct(s['paper_batch_dice'])}")
            continue
        where = {"native": f"`{m.get('source')}/` test split at native resolution ({m.get('inference')} inference)",
                 "nuclei_96": "`nuclei_96/` test split (the paper's 96x96 protocol)",
                 "preset": f"test split, scored at {m.get('eval_size')}"}[key]
        lines.append(f"- {where}: per-image Dice **{pct(m['dice'])} ± {pct(m['dice_sd'])}**, Jaccard "
                     f"{pct(m['jaccard'])}, global Dice {pct(m['global_dice'])}, batch-pooled Dice (paper, "
                     f"batches of 20) {pct(m['paper_batch_dice'])} ({m['n']} images)")
    return lines


def portable_path(path: Path) -> str:
    """``path`` as a shipped record shows it: relative to the checkout (or a worktree of it, or the working
    folder), else its name alone, never the training machine's absolute path."""
    if not path.is_absolute():
        return path.as_posix()
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


def model_card(entry: RunEntry, rec: dict[str, Any], tests: dict[str, Any], val_dice: float,
               old_val: float | None, partial: bool) -> str:
    r = entry.recipe
    data, terms = DATA_TERMS[r.task]
    if r.native:
        data = NATIVE_TERMS
    warm = rec.get("warm_start")
    warm_txt = "none (random init)"
    if warm:
        warm = portable_warm_start(warm)
        src, name = warm["source"], warm["model"]
        shown = f"the folder `{src}`"
        if src.startswith("napari_sdunet/weights/"):
            shown = f"the shipped `{name}` weights of that time (git history of `{src}`)"
        elif src.startswith(RUNS_MARK):
            shown = (f"the best weights of the finished `{name}` run (its run folder, `{src}`; shipped as "
                     f"`{name}` when they validated best)")
        warm_txt = (f"{shown} ({warm['copied']}/{warm['total']} tensors copied where name and shape "
                    f"match; {warm['gates_opened']} ResSDN gates opened towards the copied conv)")
    for c in rec.get("continued") or []:
        warm_txt += (f"; continued on a new machine at step {c['step']} ({c['cpu_hours']:.2f} CPU-h before, on "
                     f"{c.get('host') or 'another host'}) from this run's own shipped weights, with a fresh optimizer "
                     "(run folders do not survive a change of machine; the learning curve holds the steps since then)")
    aug = ", ".join(f"{k}={v}" for k, v in r.augment.items()) or "none"
    spe = rec.get("steps_per_epoch") or 1
    lines = [
        f"# {entry.name}", "",
        f"{entry.arch} for {r.task} segmentation (napari-sdunet), trained by the CPU training campaign "
        f"(`training/campaign.toml`, run `{entry.name}`, recipe `{r.name}`)"
        + (" -- **best weights so far of an unfinished run**" if partial else "") + ".", "",
        "## Data", f"- {data}", f"- Terms: {terms}", "",
        "## Inference",
        (f"- native pixel size, overlapping {r.tile_size[0]}x{r.tile_size[1]} tiles (overlap {r.tile_overlap}) "
         "blended at the seams; the widget's / CLI's scale setting resizes the image first"
         if r.native else f"- frames resized to {rec['preprocessing']['input_size']} (HxW)"),
        "",
        "## Recipe",
        f"- loss 0.5 BCE + (1 - soft Dice); {r.optimizer} lr {r.lr:g} (weight decay {r.weight_decay:g}), "
        f"{r.warmup_steps} warm-up steps then cosine to {r.min_lr_factor:g} x lr over {entry.steps} steps; "
        f"batch {r.batch_size}"
        + (f" (as {rec['micro_batches']} micro-batches, gradients summed, to keep the step's memory down)"
           if (rec.get("micro_batches") or 1) > 1 else "")
        + (f", random {r.patch[0]}x{r.patch[1]} patches" if r.patch else "")
        + f"; validation every {r.val_every} steps, best kept, patience {r.patience}",
        f"- augmentation (image and mask alike; intensity on the image): {aug}",
        f"- warm start: {warm_txt}",
        f"- trained {rec['step']} steps ({rec['step'] / spe:.1f} epochs of {spe} steps), {rec['cpu_hours']:.2f} "
        f"CPU-hours, on {rec['host']} with {rec['threads']} threads, {rec['precision']} "
        "(chosen by timing steps at start) + channels_last",
        "",
        "## Validation", f"- best validation Dice ({VAL_METRIC_TEXT[entry.recipe.val_metric]}) {pct(val_dice)} "
                         f"at step {rec['best_step']}"
        + (f"; the model it replaced: {pct(old_val)}" if old_val is not None else ""),
        *([f"- the recipe changed at step {rec['scoring_changed']['step']}: validation is scored "
           f"{VAL_METRIC_TEXT[rec['scoring_changed']['val_metric']]} from there on (the learning curve's "
           "earlier points are scored per image), and "
           + ("the best weights were chosen among the later points"
              if rec["best_step"] >= rec["scoring_changed"]["step"]
              else "these weights, from before the change, were scored that way at ship time")]
          if rec.get("scoring_changed") else []),
        "- learning curve: ![learning curve](learning_curve.png)", "",
        "## Test metrics (fp16 weights as shipped; the test split was never used for selection)",
        *_metric_lines(r.task, tests), "",
        "## Provenance",
        f"- command: `python -m training campaign run training/campaign.toml --only {entry.name}`, then "
        f"`python -m training campaign ship training/campaign.toml {entry.name}{' --partial' if partial else ''}`",
        f"- test metrics again: `python -m training evaluate {entry.name}`",
    ]
    return "\n".join(lines) + "\n"


def ship_run(entry: RunEntry, camp: Campaign, *, data_root: str | None = None, partial: bool = False,
             limit: int | None = None, force: bool = False, dest: Path | None = None) -> Path | None:
    """Write the run's best weights into the package when they validate better (``force``: always)."""
    rd = camp.run_dir(entry)
    rec = json.loads((rd / ("run.json" if partial else "done.json")).read_text())
    if partial and (rd / "state" / "state.json").is_file():
        meta = json.loads((rd / "state" / "state.json").read_text())
        rec.update(step=meta["step"], best_val_dice=meta["best_dice"], best_step=meta["best_step"],
                   cpu_hours=round(meta.get("cpu_seconds", 0.0) / 3600, 4))
    _, val, prep = build_data(entry, data_root, limit)
    model = _best_weights(entry, camp, partial)
    vb = val_batch_size(entry.recipe)  # the run's own validation batch: same memory bound as training
    metric = entry.recipe.val_metric
    new_scores = val_scores(model, prep, val, comparable_metrics(entry), vb)
    new_val = new_scores[metric]
    target = (dest / entry.name) if dest else shipped_folder(entry)
    old_val = None
    same: dict[str, Any] = {}
    if (target / "config.json").is_file():
        old, old_cfg = load_checkpoint(target)
        same = old_cfg.get("campaign") or {}
        if same.get("run") == entry.name and same.get("step") == rec.get("step"):  # shipped again (a new card)
            old_val = same.get("replaced_val_dice")
        else:
            old_val = val_dice_of(old, old_cfg.get("preprocessing", {}), val, vb, metric)
    if old_val is not None and new_val <= old_val and not force:
        if rec.get("finished") and same.get("run") == entry.name and same.get("partial"):
            return _finished_on_shipped(entry, camp, rec, target, old_val, new_val)
        log(rd, f"not shipped: validation Dice {new_val:.4f} <= shipped {old_val:.4f}")
        return None
    tmp_target = target.with_name(target.name + ".new")
    folder = save_checkpoint(model, tmp_target, task=entry.task, preprocessing=prep, half=True)
    tests = test_metrics(folder, entry, data_root, limit)
    crec = campaign_record(dict(rec, name=entry.name))
    crec.update(val_dice_shipped=new_val, partial=partial, replaced_val_dice=old_val, val_metric=metric,
                val_dice_by_metric={k: round(v, 6) for k, v in new_scores.items()})
    card = model_card(entry, rec, tests, new_val, old_val, partial)
    card = with_target(card, target_lines(entry.name, entry.arch, entry.task, tests, target.parent,
                                          started_from=warm_start_name(rec)))
    shipped, _ = load_checkpoint(folder)
    primary = "native" if "native" in tests else "preset"
    others = {k: v for k, v in tests.items() if k != primary}
    folder = save_checkpoint(shipped, target, task=entry.task, preprocessing=prep, half=True,
                             extra={"name": entry.name, "campaign": crec,
                                    "metrics": dict(tests[primary], protocol=primary,
                                                    measured_on="shipped fp16 weights"),
                                    "metrics_other": others,
                                    "command": f"python -m training campaign run {portable_path(camp.path)} "
                                               f"--only {entry.name}"}, card=card)
    learning_curve(rd, folder / "learning_curve.png", f"{entry.name} ({entry.recipe.name})")
    import shutil

    shutil.rmtree(tmp_target, ignore_errors=True)
    log(rd, f"shipped to {folder}: validation Dice {new_val:.4f} (was {old_val}); tests {json.dumps(_short(tests))}")
    return folder


def _finished_on_shipped(entry: RunEntry, camp: Campaign, rec: dict[str, Any], target: Path, old_val: float,
                         new_val: float) -> Path:
    """A run finished without beating its own earlier weights that were shipped as a partial: those weights
    stay (the rule: replace only what validates better), and their record and card now say that the run
    finished (steps, CPU-hours) and which of its steps they are. Nothing is trained or measured again but
    the validation Dice of both, which the caller measured."""
    from napari_sdunet.io import atomic_path

    rd = camp.run_dir(entry)
    raw = json.loads((target / "config.json").read_text())
    old = raw["campaign"]
    kept = {k: old[k] for k in ("best_step", "val_dice_by_metric") if k in old}
    crec = dict(old)
    crec.update(campaign_record(dict(rec, name=entry.name)))
    crec.update(kept, best_val_dice=old_val, val_dice_shipped=old_val, partial=False,
                val_metric=entry.recipe.val_metric, weights_of_step=old.get("best_step"),
                finished_best=new_val, finished_best_step=rec.get("best_step"))
    if rec.get("best_step") == old.get("best_step"):
        note = (f"the run finished at step {rec['step']}; no later step validated better than step "
                f"{rec.get('best_step')}, whose weights were shipped before (as a partial), so these stay "
                f"({pct(old_val)} as shipped in fp16, {pct(new_val)} in the run's fp32)")
    else:
        note = (f"the run finished at step {rec['step']}; its best weights (step {rec.get('best_step')}) validated "
                f"{pct(new_val)}, not better than these step-{old.get('best_step')} weights shipped before "
                f"({pct(old_val)}, measured the same way at ship time), so these stay")
    tests = card_tests(raw)
    card = model_card(entry, dict(rec, best_step=old.get("best_step")), tests, old_val, None, False)
    card = card.replace("## Validation\n", f"## Validation\n- {note}\n", 1)
    card = with_target(card, target_lines(entry.name, entry.arch, entry.task, tests, target.parent,
                                          started_from=warm_start_name(rec)))
    raw["campaign"] = crec
    with atomic_path(target / "config.json") as tmp:
        tmp.write_text(json.dumps(raw, indent=2) + "\n")
    with atomic_path(target / "README.md") as tmp:
        tmp.write_text(card)
    learning_curve(rd, target / "learning_curve.png", f"{entry.name} ({entry.recipe.name})")
    log(rd, f"finished; the shipped step-{old.get('best_step')} weights stay ({new_val:.4f} <= {old_val:.4f}); "
            f"their record and card say the run finished")
    return target


def _short(tests: dict[str, Any]) -> dict[str, float]:
    figures = {k: figure_of(m) for k, m in tests.items()}
    return {k: round(f if f is not None else float("nan"), 4) for k, f in figures.items()}
