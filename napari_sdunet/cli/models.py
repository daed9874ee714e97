"""``napari-sdunet models``: the architectures, task presets and their parameter counts."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list architectures, presets, parameter counts and shipped weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import count_parameters, create_model, list_models
    from ..tasks import TASKS
    from ..zoo import list_pretrained, list_user_models

    archs = list_models()
    print("preset   " + "".join(f"{a:>12}" for a in archs))
    for task in TASKS:
        counts = [count_parameters(create_model(a, task=task)) for a in archs]
        print(f"{task:<9}" + "".join(f"{c:>12,}" for c in counts))
    print("\nshipped models: " + (", ".join(list_pretrained()) or "none"))
    print("user models:    " + (", ".join(list_user_models()) or "none"))
    return 0
