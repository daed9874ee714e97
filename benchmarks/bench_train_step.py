"""Training-step cost of the four networks, float32 vs bfloat16 autocast, measured side by side (CPU).

    python benchmarks/bench_train_step.py --threads 2 --task nuclei

One step = forward, the recipe's loss, backward and an Adam update on a random batch of the task's
preset size (batch 20, Table 5). Prints the median of ``--repeats`` steps after one warm-up step per
network and precision, and the fp32 / bf16 ratio. bf16 autocast is what ``python -m training --bf16``
uses; it pays off on CPUs with AVX-512 BF16 or AMX.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_sdunet.losses import dice_bce_loss
from napari_sdunet.models import TASKS, create_model, list_models


def step_seconds(arch: str, task: str, size: list[int], batch: int, bf16: bool, repeats: int) -> float:
    torch.manual_seed(0)
    model = create_model(arch, task)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(batch, model.in_channels, *size)
    y = (torch.rand(batch, 1, *size) > 0.5).float()
    times = []
    for _ in range(repeats + 1):  # the first step warms up allocators and kernels
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = dice_bce_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="nuclei", choices=sorted(TASKS))
    ap.add_argument("--size", help="HxW (default: the preset's input size)")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--archs", nargs="+", default=list_models(), choices=list_models())
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    size = [int(v) for v in a.size.split("x")] if a.size else TASKS[a.task]["preprocessing"]["input_size"]
    print(f"{a.task} {size[0]}x{size[1]}, batch {a.batch}, {a.threads} thread(s), median of {a.repeats} steps")
    print(f"{'network':<10} {'fp32 s/step':>12} {'bf16 s/step':>12} {'fp32/bf16':>10}")
    for arch in a.archs:
        f32 = step_seconds(arch, a.task, size, a.batch, False, a.repeats)
        b16 = step_seconds(arch, a.task, size, a.batch, True, a.repeats)
        print(f"{arch:<10} {f32:>12.2f} {b16:>12.2f} {f32 / b16:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
