"""Training throughput: images/s of PGD-AT and its cost relative to standard training.

    python benchmarks/train_throughput.py --arch cnn-small --batch-size 128 --iters 10
    python benchmarks/train_throughput.py --arch resnet18 --batch-size 512 --device cuda --iters 50

For each arch, times `--iters` optimizer steps of the library's own training step
(`atprobe.train.training_loss` + backward + SGD) for `standard` and `pgd_at` on the
same model and the same device-resident batches, in the same process, and prints

    images/s of each, and ratio = t(PGD-AT step) / ((steps + 1) * t(standard step)).

PGD-AT with K steps costs K forward+backward passes w.r.t. the input plus one training
forward+backward, so ~1.0 is the compute floor: below 1.0 the attack's passes are
cheaper than training passes (no weight gradients), above it there is overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _timing import sync

from atprobe.data import iterate_batches, make_synthetic
from atprobe.models import build_model
from atprobe.runtime import make_generator, prepare_model, resolve_device
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig, training_loss, training_starts


def time_steps(config: TrainConfig, model, optimizer, batches, device) -> float:
    """Seconds per optimizer step, median over the batches (after one warm-up step)."""
    times = []
    for i, batch in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        step = training_loss(model, batch.x, batch.y, config, epoch=0, amp=config.amp,
                             starts=training_starts(config, 0, batch.index))
        optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        optimizer.step()
        sync(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="repeatable; default cnn-small and resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    train_split, _ = make_synthetic(n_train=args.batch_size * (args.iters + 1), n_test=10)
    split = train_split.to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    for arch in args.arch or ["cnn-small", "resnet18"]:
        torch.manual_seed(0)
        model = prepare_model(build_model(arch, 10), device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batches = list(iterate_batches(split, args.batch_size, shuffle=True, augment=True, drop_last=True,
                                       generator=make_generator(0, device), channels_last=True))
        seconds = {}
        for method in ("standard", "pgd_at"):
            config = TrainConfig(method=method, threat=ThreatModel(steps=args.steps)).resolved()
            seconds[method] = time_steps(config, model, optimizer, batches, device)
        ratio = seconds["pgd_at"] / ((args.steps + 1) * seconds["standard"])
        print(f"{arch} batch={args.batch_size} device={name}: "
              f"standard {args.batch_size / seconds['standard']:.1f} img/s, "
              f"pgd_at({args.steps}) {args.batch_size / seconds['pgd_at']:.1f} img/s, "
              f"ratio to (steps+1) standard steps {ratio:.3f}")


if __name__ == "__main__":
    main()
