"""Training-step cost of the four networks in fp32, fp32 + channels_last and bf16 autocast, side by side (CPU).

    python benchmarks/bench_train_step.py --threads 1 --task nuclei
    python benchmarks/bench_train_step.py --modes fp32 bf16_cl --archs sdunet unet

One step = forward, the recipe's loss, backward and an Adam update on a random batch of the task's
preset size (batch 20, Table 5). Prints the best of ``--repeats`` steps (interleaved across networks
and modes) after one warm-up round, the ratios between modes, and the step-time ratios SDU-Net / U-Net and
SDNU-Net / U-Net++ at the same precision (issue 13's targets). ``bf16_cl`` is what the training
campaign runs: ``model.to(memory_format=torch.channels_last)``, channels_last input and
``torch.autocast("cpu", dtype=torch.bfloat16)``.

It also counts each network's model FLOPs per step (convolutions and SDN sweeps, forward + backward =
3x forward; BatchNorm, activations, pooling and the gate elementwise work are not counted) and prints the
GFLOP/s each step reaches, so that a step-time ratio splits into the FLOP ratio times the ratio of the two
networks' rates: a ratio below the FLOP ratio needs the SD network to run faster per FLOP than its baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_sdunet.losses import dice_bce_loss  # noqa: E402
from napari_sdunet.models import create_model, list_models  # noqa: E402
from napari_sdunet.models.sdn.layer import SDN  # noqa: E402
from napari_sdunet.tasks import TASKS  # noqa: E402

#: mode -> (bf16 autocast, channels_last)
MODES = {"fp32": (False, False), "fp32_cl": (False, True), "bf16_cl": (True, True), "bf16": (True, False)}
#: SD network -> its convolutional baseline
PAIRS = {"sdunet": "unet", "sdnunet": "unetpp"}


def sweep_flops(h: int, w: int, S: int, B: int, directions=(0, 2)) -> float:
    """Forward FLOPs of an SDN layer's sweeps: 24 S^2 per updated cell (12 S^2 MACs: 9 S^2 recurrent,
    3 S^2 prior); the first line of each sweep has no previous line and is not updated."""
    cells = sum(h * (w - 1) if d in (0, 1) else w * (h - 1) for d in directions)
    return 24.0 * S * S * cells * B


def step_flops(arch: str, task: str, size: list[int], batch: int) -> float:
    """Model FLOPs of one training step: 3x the forward FLOPs of the convolutions and the SDN sweeps."""
    model = create_model(arch, task).eval()
    total = [0.0]

    def conv(m: torch.nn.Module, inp, out) -> None:
        # a Conv2d's weight is (out, in/groups, kh, kw): each output value costs in/groups*kh*kw MACs;
        # a ConvTranspose2d's is (in, out/groups, kh, kw): each input value costs out/groups*kh*kw MACs
        per = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        total[0] += 2.0 * per * (inp[0].numel() if isinstance(m, torch.nn.ConvTranspose2d) else out.numel())

    def sdn(m: SDN, inp, out) -> None:
        b, _, h, w = inp[0].shape
        total[0] += sweep_flops(h, w, m.cells[0].state, b, m.directions)

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(conv)
        elif isinstance(m, SDN):
            m.register_forward_hook(sdn)
    with torch.no_grad():
        model(torch.zeros(batch, model.in_channels, *size))
    return 3.0 * total[0]


def make_step(arch: str, task: str, size: list[int], batch: int, mode: str, sdn_impl: str | None = None):
    """A closure running one training step of ``arch`` in ``mode`` on a fixed random batch."""
    bf16, channels_last = MODES[mode]
    torch.manual_seed(0)
    model = create_model(arch, task, **({"sdn_impl": sdn_impl} if sdn_impl else {}))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(batch, model.in_channels, *size).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, *size) > 0.5).float()

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = dice_bce_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def step_seconds(arch: str, task: str, size: list[int], batch: int, mode: str, repeats: int,
                 sdn_impl: str | None = None) -> float:
    """Best of ``repeats`` training steps of ``arch`` in ``mode`` (after one warm-up step)."""
    step = make_step(arch, task, size, batch, mode, sdn_impl)
    step()
    return min(step() for _ in range(repeats))


def run(archs: list[str], modes: list[str], task: str, size: list[int], batch: int, repeats: int,
        sdn_impl: str | None = None, echo=print) -> dict[str, dict[str, float]]:
    """Seconds per step, ``{arch: {mode: s}}``: best of ``repeats`` after a warm-up.

    The repeats are interleaved (every network and mode once, then again), so that load from other
    jobs on a shared machine hits all of them alike and the ratios stay comparable.
    """
    steps = {(a, m): make_step(a, task, size, batch, m, sdn_impl if a in PAIRS else None)
             for a in archs for m in modes}
    res: dict[str, dict[str, float]] = {a: {} for a in archs}
    for rep in range(repeats + 1):  # round 0 warms up allocators and kernels
        for (arch, mode), step in steps.items():
            t = step()
            if rep:
                res[arch][mode] = min(res[arch].get(mode, float("inf")), t)
                echo(f"  step {arch:>8} {mode:>8}: {t:7.2f} s (round {rep})", flush=True)
    return res


def table(res: dict[str, dict[str, float]], modes: list[str], flops: dict[str, float] | None = None) -> list[str]:
    """Markdown table: seconds per step per mode, ratios to the first mode, and SD / baseline ratios;
    with ``flops`` (model FLOPs per step) also GFLOP per step, GFLOP/s per mode and the FLOP ratios."""
    lines = ["| network | " + " | ".join(f"{m} s/step" for m in modes) + " | "
             + " | ".join(f"{modes[0]} / {m}" for m in modes[1:]) + " |",
             "|---|" + "---:|" * (2 * len(modes) - 1)]
    for arch, row in res.items():
        cells = [f"{row[m]:.2f}" for m in modes] + [f"{row[modes[0]] / row[m]:.2f}x" for m in modes[1:]]
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    pairs = [(sd, base) for sd, base in PAIRS.items() if sd in res and base in res]
    if pairs:
        lines += ["", "| step-time ratio | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
        for sd, base in pairs:
            lines.append(f"| {sd} / {base} | " + " | ".join(f"{res[sd][m] / res[base][m]:.2f}" for m in modes) + " |")
    if flops:
        lines += ["", "| network | GFLOP/step | " + " | ".join(f"{m} GFLOP/s" for m in modes) + " |",
                  "|---|---:|" + "---:|" * len(modes)]
        for arch, row in res.items():
            lines.append(f"| {arch} | {flops[arch] / 1e9:.1f} | "
                         + " | ".join(f"{flops[arch] / row[m] / 1e9:.1f}" for m in modes) + " |")
        if pairs:
            # step-time ratio = FLOP ratio x (baseline GFLOP/s / SD GFLOP/s): the second factor per mode
            lines += ["", "| pair | FLOP ratio | " + " | ".join(f"{m}: baseline / SD GFLOP/s" for m in modes) + " |",
                      "|---|---:|" + "---:|" * len(modes)]
            for sd, base in pairs:
                fr = flops[sd] / flops[base]
                lines.append(f"| {sd} / {base} | {fr:.2f} | " + " | ".join(
                    f"{(res[sd][m] / res[base][m]) / fr:.2f}" for m in modes) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="nuclei", choices=sorted(TASKS))
    ap.add_argument("--size", help="HxW (default: the preset's input size)")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--archs", nargs="+", default=list_models(), choices=list_models())
    ap.add_argument("--modes", nargs="+", default=["fp32", "fp32_cl", "bf16_cl"], choices=list(MODES))
    ap.add_argument("--sdn-impl", default=None, help="sweep implementation of the SD networks (default: auto)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    size = [int(v) for v in a.size.split("x")] if a.size else list(TASKS[a.task].preprocessing.input_size)
    print(f"{a.task} {size[0]}x{size[1]}, batch {a.batch}, {a.threads} thread(s), best of {a.repeats} steps")
    res = run(a.archs, a.modes, a.task, size, a.batch, a.repeats, a.sdn_impl)
    flops = {arch: step_flops(arch, a.task, size, a.batch) for arch in a.archs}
    print()
    print("\n".join(table(res, a.modes, flops)))


if __name__ == "__main__":
    main()
