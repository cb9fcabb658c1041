"""Cost of one pretraining step: Barlow Twins vs Momentum2-Teacher, and momentum BN vs plain BN teacher.

    python bench/bench_pretrain.py [--size 64] [--batch 16] [--steps 3] [--trunk resnet50]

Prints seconds per optimiser step (forward + backward + update, both views) and the ratios. Momentum BN
should cost about the same as a plain BN teacher (it only mixes statistics); M2T's extra cost over Barlow
Twins is the teacher's two forward passes and the predictor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import isc.models.trunks as backbones  # noqa: E402
from isc.losses.barlow_twins import BarlowTwinsLoss  # noqa: E402
from isc.losses.byol import BYOLLoss  # noqa: E402
from isc.train.optim import LARS, param_groups  # noqa: E402
from lightning_modules.barlow_twins import BarlowTwins  # noqa: E402
from lightning_modules.momentum2_teacher import Momentum2Teacher  # noqa: E402


def seconds_per_step(model: torch.nn.Module, step: object, batch: tuple, steps: int) -> float:
    opt = torch.optim.SGD(param_groups(model, 0.01), momentum=0.9)
    if isinstance(model, BarlowTwins):
        opt = LARS(param_groups(model, 0.01, 0.001))
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators
        start = time.perf_counter()
        opt.zero_grad()
        loss = step(batch)  # type: ignore[operator]
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trunk", default="resnet50", choices=["resnet50", "resnet152", "resnet50_ibn_a"])
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size)
    batch = ((x, x.flip(-1)), torch.arange(args.batch))
    trunk = getattr(backbones, args.trunk)

    def no_opt(groups: object) -> None:
        return None

    bt = BarlowTwins(trunk(), BarlowTwinsLoss(), no_opt, projector_dims=(2048, 2048, 2048))
    results = {
        "barlow_twins": seconds_per_step(
            bt, lambda b: bt.loss(bt.embed(b[0][0]), bt.embed(b[0][1])), batch, args.steps
        )
    }
    for name, momentum_bn in (("m2t_momentum_bn", True), ("byol_plain_bn", False)):
        m2t = Momentum2Teacher(trunk(), BYOLLoss(), no_opt, momentum_bn=momentum_bn)

        def step(b: tuple, m: Momentum2Teacher = m2t) -> torch.Tensor:
            (x1, x2), _ = b
            q1, q2 = m.student_predict(x1), m.student_predict(x2)
            with torch.no_grad():
                k1, k2 = m.teacher_embed(x2), m.teacher_embed(x1)
            return m.loss(q1, q2, k1, k2)

        results[name] = seconds_per_step(m2t, step, batch, args.steps)
    print(f"{args.trunk} at {args.size}px, batch {args.batch}, {torch.get_num_threads()} threads")
    for name, s in results.items():
        print(f"  {name:18s} {s:7.3f} s/step  ({args.batch / s:6.1f} images/s)")
    print(f"  ratio m2t / barlow_twins        {results['m2t_momentum_bn'] / results['barlow_twins']:.2f}")
    print(f"  ratio momentum BN / plain BN    {results['m2t_momentum_bn'] / results['byol_plain_bn']:.2f}")


if __name__ == "__main__":
    main()
