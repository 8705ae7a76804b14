"""Wall time of the ``stability`` probe (atprobe.probes.stability): per-sample gradient
distances along random filter-normalized directions, adversarial examples re-crafted at
every point.

    python benchmarks/probe_grad_speed.py                    # cnn-small, n=64, 5 lambdas, 1 direction, CPU
    python benchmarks/probe_grad_speed.py --threads 1        # stable numbers on a shared machine
    python benchmarks/probe_grad_speed.py --arch resnet18 --device cuda --n 256

Prints the median seconds of one ``stability.probe`` call per loss and in all, and the
throughput in sample-points per second: one sample at one (direction, lam) point of one
loss, which costs two PGD runs (one per parameter point, for the adversarial losses) and
two per-sample gradients. The model is freshly initialized (``--init``-style, as in
Fig. 4(a)) and the samples are the first n of the synthetic training split.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _timing import timed

from atprobe.data import load_dataset
from atprobe.probes import stability
from atprobe.runtime import prepare_model, resolve_device



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn-small")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--lambdas", default="-0.05:0.05:5")
    parser.add_argument("--directions", type=int, default=1)
    parser.add_argument("--losses", default="pgd_at,trades,clean")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of the adversarial losses")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 gives stable numbers on a shared, loaded machine")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    data = load_dataset("synthetic").train.subset(slice(0, args.n))
    model = prepare_model(stability.init_model(args.arch, 10, seed=0), device).eval()
    lambdas = stability.parse_lambdas(args.lambdas)
    losses = tuple(s.strip() for s in args.losses.split(",") if s.strip())
    params = sum(p.numel() for p in model.parameters())

    per_loss: dict[str, float] = {}
    for loss in losses:
        config = stability.StabilityConfig(losses=(loss,), lambdas=lambdas, directions=args.directions,
                                           steps=args.steps, chunk_size=args.chunk_size)
        stability.probe(model, data.subset(slice(0, min(2, args.n))), config)  # warm-up
        times = [timed(lambda: stability.probe(model, data, config), device) for _ in range(args.repeats)]
        per_loss[loss] = statistics.median(times)
    total = sum(per_loss.values())
    points = args.n * len(lambdas) * args.directions
    print(f"stability arch={args.arch} params={params:,} n={args.n} lambdas={len(lambdas)} "
          f"directions={args.directions} steps={args.steps} chunk={args.chunk_size} device={name}")
    for loss, seconds in per_loss.items():
        print(f"  {loss:7s} {seconds:8.2f} s  {points / seconds:8.1f} sample-points/s")
    print(f"  {'all':7s} {total:8.2f} s  {points * len(losses) / total:8.1f} sample-points/s "
          f"({args.n / total:.2f} samples/s through all {len(losses)} losses x {len(lambdas) * args.directions} points)")


if __name__ == "__main__":
    main()
