"""``python -m training fit|evaluate|reproduce|campaign``: the experiment command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from napari_sdunet.batches import AugmentConfig
from napari_sdunet.models import list_models
from napari_sdunet.tasks import TASKS


def _size(text: str) -> list[int]:
    """'144x192' (HxW) or '96' -> [H, W]."""
    parts = [int(p) for p in text.lower().split("x")]
    return parts * 2 if len(parts) == 1 else parts


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data-root", help="folder holding nuclei_96/, polyps/, ... (default ../shared/data)")
    p.add_argument("--source", help="training data folder (path or name under the data root)")
    p.add_argument("--test-source", help="liver: folder of HU test volumes (default liver/)")
    p.add_argument("--input-size", type=_size, help="model input HxW, e.g. 96x128 (default: the paper's)")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="liver: HU window for HU-volume data (default [-40, 160]; the paper's is -1000 1000)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, help="default: Table 5 (nuclei 1e-3, polyps/liver 1e-4)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--patience", type=int, default=30, help="validations without improvement (0: off)")
    p.add_argument("--val-every", type=int, default=0, help="steps between validations (0: each epoch)")
    p.add_argument("--augment", nargs="*", default=[], choices=list(AugmentConfig.KINDS))
    p.add_argument("--flip-tta", action="store_true", help="test-time flips at evaluation")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-val", type=int)
    p.add_argument("--limit-test", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--base-filters", type=int, help="override the network width")
    p.add_argument("--time-budget", type=float, help="minutes of training; then stop and keep the best weights")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast on CPU (about 2x faster steps on CPUs with AVX-512 BF16 or AMX)")


def _spec_kwargs(a: argparse.Namespace) -> dict:
    over = {"base_filters": a.base_filters} if a.base_filters else {}
    return dict(task=a.task, data_root=a.data_root, source=a.source, test_source=a.test_source,
                input_size=a.input_size, epochs=a.epochs, max_steps=a.max_steps, lr=a.lr, batch_size=a.batch_size,
                patience=a.patience or None, val_every=a.val_every, augment=a.augment, flip_tta=a.flip_tta,
                limit_train=a.limit_train, limit_val=a.limit_val, limit_test=a.limit_test, model_overrides=over,
                lr_schedule=a.lr_schedule, threads=a.threads, device=a.device, ct_window=a.ct_window,
                time_budget_s=a.time_budget * 60 if a.time_budget else None, cpu_bf16=a.bf16)


def cmd_fit(a: argparse.Namespace) -> int:
    from .runner import RunSpec, run_fit

    gate = None if math.isnan(a.warm_gate_bias) else a.warm_gate_bias
    spec = RunSpec(arch=a.arch, out=a.out, seed=a.seed, init_from=a.init_from, warm_gate_bias=gate, **_spec_kwargs(a))
    rec = run_fit(spec, progress=not a.no_progress)
    if rec is None:  # a DDP rank other than 0
        print(f"rank {os.environ.get('RANK')} finished")
        return 0
    print(f"rank {os.environ.get('RANK', 0)} finished")
    print(json.dumps({"fit": rec["fit"], "test": {k: v for k, v in rec["test"].items() if k != "volumes"}}, indent=2))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from napari_sdunet.zoo import load_pretrained, resolve_model

    from .runner import test_model

    model, config = load_pretrained(a.model)
    task = a.task or config.get("task")
    prep = config.get("preprocessing", {})
    if prep.get("mode") == "tiles":  # a native-resolution model: score whole images through the plugin's path
        from .campaign_ship import native_test

        res = native_test(resolve_model(a.model), task, a.source or "nuclei", a.data_root, a.limit_test)
    else:
        size = prep.get("input_size") or list(TASKS[task].preprocessing.input_size)
        res = test_model(model, task, size, a.data_root, a.source, a.flip_tta, a.limit_test, prep.get("ct_window"))
    text = json.dumps(res, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    from .reproduce import reproduce

    rows = reproduce(a.task, a.runs, a.out, archs=a.archs, spec_kwargs=_spec_kwargs(a), progress=not a.no_progress,
                     warm_start=a.warm_start)
    print((Path(a.out) / "table.md").read_text())
    print(f"{len(rows)} runs; table and plot in {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "campaign":  # its own sub-commands (run / status / ship)
        from .campaign import main as campaign_main

        return campaign_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fit", help="train one network and test it")
    _add_common(p)
    p.add_argument("--arch", required=True, choices=list_models())
    p.add_argument("--out", required=True, help="run folder (model/, log.csv, metrics.json, state/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", help="checkpoint folder to warm-start from (e.g. a U-Net for an SDU-Net)")
    p.add_argument("--warm-gate-bias", type=float, default=3.0,
                   help="after a warm start, open the ResSDN gates towards the copied conv (bias; nan: off)")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("evaluate", help="test a model folder or shipped model on a task's test split")
    p.add_argument("model", help="shipped model name (e.g. sdunet-nuclei) or checkpoint folder")
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--data-root")
    p.add_argument("--source", help="test data folder (path or name under the data root)")
    p.add_argument("--flip-tta", action="store_true")
    p.add_argument("--limit-test", type=int)
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("reproduce", help="train the four networks N times; Table-2-style table + plot")
    _add_common(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--archs", nargs="+", default=list_models(), choices=list_models())
    p.add_argument("--out", required=True)
    p.add_argument("--warm-start", action="store_true",
                   help="start SD networks from the same run of their baseline (U-Net / U-Net++) in --out")
    p.set_defaults(func=cmd_reproduce)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
