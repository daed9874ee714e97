"""Campaign runs on a lent GPU: pack what they need, bring their weights back.

A device call carries the checkout and at most 64 MiB in all, not ``../shared/data``, and brings back
at most 8 files of 16 MiB. So ``campaign pack`` writes the runs' train and validation splits (the uint8
tensors the recipe's loader gives, compressed; a run reads them with ``campaign run --pack``) and the
weights they start from into one folder; ``campaign export`` writes a run's best weights (split into
files of at most 15 MiB, with SHA-256 sums), its record and its logs; ``campaign import`` checks them
and makes a run folder here, which ``campaign ship`` ships (test metrics are measured here, on the
data) and from which ``campaign run`` continues an unfinished run on the CPU. Every file is written
atomically; nothing is unpickled (numpy archives are read with ``allow_pickle=False``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from napari_sdunet.checkpoint import file_sha256 as _sha256

from .campaign import (
    Campaign,
    CampaignError,
    RunEntry,
    _write_json,
    data_identity,
    initial_weights,
    recipe_split,
    shipped_campaign_record,
    shipped_folder,
)

PACK_FORMAT = "napari-sdunet-campaign-pack"
EXPORT_FORMAT = "napari-sdunet-campaign-export"
MIB = 2**20


def _data_key(entry: RunEntry, split: str, limit: int | None) -> str:
    ident = dict(data_identity(entry), split=split, limit=limit)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return f"{entry.task}-{split}-{digest}.npz"




# -- data ---------------------------------------------------------------------------------------------

def save_split(ds, path: Path) -> None:
    """A SegDataset's uint8 tensors (stacked or one per image), ids and groups as a compressed archive."""
    import torch

    arrays: dict[str, np.ndarray] = {"ids": np.array(ds.ids, dtype=str), "groups": np.array(ds.groups, dtype=str)}
    if ds.stacked:
        items = [("images", ds.images), ("masks", ds.masks)]
    else:
        items = [(f"image_{i}", x) for i, x in enumerate(ds.images)]
        items += [(f"mask_{i}", m) for i, m in enumerate(ds.masks)]
    for key, t in items:
        if t.dtype != torch.uint8:
            raise CampaignError(f"cannot pack {key}: {t.dtype} tensors (the packs hold the loaders' uint8 tensors)")
        arrays[key] = t.numpy()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def load_split_file(path: Path):
    """The SegDataset that :func:`save_split` wrote."""
    import torch

    from napari_sdunet.batches import SegDataset

    with np.load(path, allow_pickle=False) as z:
        ids, groups = [str(v) for v in z["ids"]], [str(v) for v in z["groups"]]
        if "images" in z.files:
            images, masks = torch.from_numpy(z["images"]), torch.from_numpy(z["masks"])
        else:
            images = [torch.from_numpy(z[f"image_{i}"]) for i in range(len(ids))]
            masks = [torch.from_numpy(z[f"mask_{i}"]) for i in range(len(ids))]
    return SegDataset(images, masks, ids, groups)


def packed_split(pack: str | os.PathLike, entry: RunEntry, split: str, limit: int | None = None):
    """The run's ``split`` from a pack folder, or a clear error when the pack does not hold it."""
    pack = Path(pack)
    manifest = _read_manifest(pack)
    name = _data_key(entry, split, limit)
    if name not in manifest.get("data", {}):
        raise CampaignError(f"pack {pack} holds no {split} split for run {entry.name} "
                            f"(limit {limit}); write it with `campaign pack ... {entry.name}`")
    path = pack / "data" / name
    if _sha256(path) != manifest["data"][name]["sha256"]:
        raise CampaignError(f"{path}: checksum differs from the pack's manifest (a broken copy?)")
    return load_split_file(path)


def _read_manifest(pack: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((pack / "pack.json").read_text())
    except (OSError, ValueError) as e:
        raise CampaignError(f"{pack} is not a campaign pack (no readable pack.json: {e})") from None
    if manifest.get("format") != PACK_FORMAT:
        raise CampaignError(f"{pack}/pack.json is not a campaign pack manifest")
    return manifest


def start_weights(entry: RunEntry, camp: Campaign) -> tuple[str, Path] | None:
    """(name under the package's weights folder, folder here) of the weights a run starts from elsewhere.

    The shipped weights of the run itself when it continues, else its ``init``: a lent machine finds
    them under the same name in its ``napari_sdunet/weights``."""
    if shipped_campaign_record(entry) is not None:
        return entry.name, shipped_folder(entry)
    src = initial_weights(entry, camp)
    if src is None:
        return None
    if entry.init == "shipped":
        return entry.name, Path(src)
    if entry.init == "baseline":
        from napari_sdunet.models import get_arch

        return f"{get_arch(entry.arch).baseline}-{entry.task}", Path(src)
    raise CampaignError(f"run {entry.name}: init {entry.init!r} is a path; a pack carries only package weights")


def pack_runs(camp: Campaign, names: list[str], out: str | os.PathLike, *, data_root: str | None = None,
              limit: int | None = None, max_mb: float = 56.0, max_part_mb: float = 15.0) -> dict[str, Any]:
    """Write ``out``/pack.json, data/*.npz and weights/<name>/ for the runs; refuse one over ``max_mb``."""
    out = Path(out)
    entries = camp.entries(names)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    (tmp / "weights").mkdir()
    manifest: dict[str, Any] = {"format": PACK_FORMAT, "version": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "campaign": camp.path.as_posix(), "runs": {}, "data": {}, "weights": {}}
    for entry in entries:
        files = []
        for split in ("train", "val"):
            name = _data_key(entry, split, limit)
            if name not in manifest["data"]:
                path = tmp / "data" / name
                ds = recipe_split(entry, split, data_root, limit)
                save_split(ds, path)
                manifest["data"][name] = {"sha256": _sha256(path), "bytes": path.stat().st_size, "items": len(ds),
                                          **data_identity(entry), "split": split, "limit": limit}
            files.append(name)
        start = start_weights(entry, camp)
        if start is not None:
            wname, folder = start
            if wname not in manifest["weights"]:
                dest = tmp / "weights" / wname
                dest.mkdir()
                for f in ("config.json", "model.safetensors"):
                    shutil.copy2(folder / f, dest / f)
                manifest["weights"][wname] = {"bytes": sum(p.stat().st_size for p in dest.iterdir())}
        manifest["runs"][entry.name] = {"data": files, "start_weights": start[0] if start else None,
                                        "recipe_digest": entry.recipe.digest()}
        local = camp.run_dir(entry) / "state" / "state.json"
        if local.is_file():  # progress here that the pack does not carry: say so before the device time is spent
            step = json.loads(local.read_text())["step"]
            manifest["runs"][entry.name]["warning"] = (
                f"a saved state at step {step} here is not carried (the lent machine starts from "
                f"{start[0] if start else 'scratch'}); `campaign ship ... {entry.name} --partial` first to carry it")
    total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    manifest["bytes"] = total
    big = [p for p in tmp.rglob("*") if p.is_file() and p.stat().st_size > max_part_mb * MIB]
    if total > max_mb * MIB:
        sizes = ", ".join(f"{p.relative_to(tmp)} {p.stat().st_size / MIB:.1f} MiB"
                          for p in sorted(tmp.rglob("*"), key=lambda p: -p.stat().st_size)[:5] if p.is_file())
        shutil.rmtree(tmp)
        raise CampaignError(f"the pack would be {total / MIB:.1f} MiB, over --max-mb {max_mb:g} "
                            f"(largest: {sizes}); pack fewer runs per call")
    manifest["files_over_part_limit"] = [str(p.relative_to(tmp)) for p in big]  # fine to carry, not to bring back
    _write_json(tmp / "pack.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    warnings = {k: v["warning"] for k, v in manifest["runs"].items() if "warning" in v}
    return {"pack": str(out), "mib": round(total / MIB, 2), "runs": list(manifest["runs"]), "warnings": warnings,
            "data": {k: v["items"] for k, v in manifest["data"].items()}, "weights": list(manifest["weights"])}


# -- weights back ---------------------------------------------------------------------------------------

def _best_state(entry: RunEntry, camp: Campaign) -> tuple[dict[str, Any], dict[str, Any]]:
    """(best weights, record) of a run folder: the finished model, else the best weights of its state."""
    from safetensors.torch import load_file

    from napari_sdunet.checkpoint import load_checkpoint

    rd = camp.run_dir(entry)
    if (rd / "done.json").is_file():
        model, _ = load_checkpoint(rd / "model")
        return model.state_dict(), json.loads((rd / "done.json").read_text())
    if not (rd / "state" / "state.json").is_file():
        raise CampaignError(f"run {entry.name} has no saved state in {rd}: nothing to export")
    rec = json.loads((rd / "run.json").read_text())
    meta = json.loads((rd / "state" / "state.json").read_text())
    rec.update(step=meta["step"], best_val_dice=meta["best_dice"], best_step=meta["best_step"],
               cpu_hours=round(meta.get("cpu_seconds", 0.0) / 3600, 4), finished=False, history=meta.get("history"))
    tensors = load_file(str(rd / "state" / "state.safetensors"))
    return {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}, rec


def export_runs(camp: Campaign, names: list[str], out: str | os.PathLike, *, half: bool = False,
                max_part_mb: float = 15.0) -> dict[str, Any]:
    """``out``/<run>.export.json and <run>.partN.safetensors (best weights, at most ``max_part_mb`` each)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    for entry in camp.entries(names):
        state, rec = _best_state(entry, camp)
        rd = camp.run_dir(entry)
        dtype = torch.float16 if half else torch.float32
        parts: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state.items():
            v = (v.to(dtype) if v.is_floating_point() else v).contiguous()
            n = v.numel() * v.element_size()
            if parts[-1] and size + n > max_part_mb * MIB * 0.98:  # leave room for the header
                parts.append({})
                size = 0
            parts[-1][k] = v
            size += n
        files = []
        for i, part in enumerate(parts):
            path = out / f"{entry.name}.part{i}.safetensors"
            tmp = path.with_name(path.name + ".tmp")
            save_file(part, str(tmp))
            os.replace(tmp, path)
            files.append({"file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size})
        logs = {f: (rd / f).read_text() for f in ("log.txt", "log.csv") if (rd / f).is_file()}
        _write_json(out / f"{entry.name}.export.json", {
            "format": EXPORT_FORMAT, "version": 1, "run": entry.name, "recipe_digest": entry.recipe.digest(),
            "record": rec, "finished": bool(rec.get("finished")), "dtype": str(dtype).removeprefix("torch."),
            "parts": files, "logs": logs})
        done[entry.name] = {"finished": bool(rec.get("finished")), "step": rec.get("step"),
                            "best_val_dice": rec.get("best_val_dice"), "files": 1 + len(files)}
    return done


def import_runs(camp: Campaign, folder: str | os.PathLike, *, force: bool = False) -> dict[str, Any]:
    """Run folders here from exported files: ``model/`` (the best weights), run.json, logs, and done.json
    for a finished run. A run folder here with its own saved state is only replaced with ``force``."""
    import torch
    from safetensors.torch import load_file

    from napari_sdunet.checkpoint import save_checkpoint
    from napari_sdunet.models import create_model

    from .campaign import campaign_record

    folder = Path(folder)
    exports = sorted(folder.glob("*.export.json"))
    if not exports:
        raise CampaignError(f"{folder} holds no *.export.json (written by `campaign export`)")
    by_name = {e.name: e for e in camp.runs}
    done = {}
    for path in exports:
        doc = json.loads(path.read_text())
        if doc.get("format") != EXPORT_FORMAT:
            raise CampaignError(f"{path} is not a campaign export")
        entry = by_name.get(doc["run"])
        if entry is None:
            raise CampaignError(f"{path}: run {doc['run']!r} is not in {camp.path}")
        if doc["recipe_digest"] != entry.recipe.digest():
            raise CampaignError(f"{path}: run {entry.name} was trained with another recipe than {camp.path} "
                                f"now says ({doc['recipe_digest']} vs {entry.recipe.digest()})")
        state: dict[str, torch.Tensor] = {}
        for part in doc["parts"]:
            p = folder / part["file"]
            if not p.is_file() or _sha256(p) != part["sha256"]:
                raise CampaignError(f"{p}: missing or its checksum differs from {path.name}")
            state.update(load_file(str(p)))
        model = create_model(entry.arch, entry.task, **entry.recipe.model)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        rd = camp.run_dir(entry)
        if (rd / "state").exists():
            if not force:
                raise CampaignError(f"run {entry.name} has its own saved state here ({rd / 'state'}); "
                                    "--force keeps it aside and imports")
            os.replace(rd / "state", rd.with_name(f"{entry.name}.state-replaced-{int(time.time())}"))
        rd.mkdir(parents=True, exist_ok=True)
        rec = dict(doc["record"], imported={"from": str(folder), "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                            "host": doc["record"].get("host")})
        rec.pop("history", None)
        for name, text in doc.get("logs", {}).items():
            (rd / name).write_text(text)
        save_checkpoint(model, rd / "model", task=entry.task, preprocessing=rec.get("preprocessing"),
                        extra={"campaign": campaign_record(rec)})  # atomic: replaces an older model/
        _write_json(rd / "run.json", rec)
        if doc["finished"]:
            _write_json(rd / "done.json", rec)
        else:
            (rd / "done.json").unlink(missing_ok=True)
        done[entry.name] = {"run_dir": str(rd), "finished": doc["finished"], "step": rec.get("step"),
                            "best_val_dice": rec.get("best_val_dice"),
                            "next": f"python -m training campaign ship {camp.path.as_posix()} {entry.name}"
                                    + ("" if doc["finished"] else " --partial")}
    return done
