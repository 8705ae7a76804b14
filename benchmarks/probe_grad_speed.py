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

Reference, timed in the same process on the same model and samples: the straightforward
implementation, one ``pergrad.per_sample_grad_distance`` call per (lam, chunk) with the
``vmap`` method (what the probe did before it computed theta's gradients once per chunk
and switched to the per-layer identities). ratio = reference / probe; both give the same
table (the largest difference is printed).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _timing import add_machine_options, machine, timed

from atprobe.data import load_dataset
from atprobe.directions import directions, model_parameters, perturbed_parameters
from atprobe.pergrad import per_sample_grad_distance
from atprobe.probes import stability
from atprobe.probes._gradutil import make_objective, sample_batches
from atprobe.runtime import prepare_model
from atprobe.threat import ThreatModel


def reference_probe(model, data, config: stability.StabilityConfig) -> torch.Tensor:
    """Mean distance and cosine per (loss, direction, lam), the plain way (see the docstring)."""
    dirs = directions(model, config.directions, config.seed, config.ignore, norm=config.direction_norm, device="cpu")
    theta = model_parameters(model)
    batches = list(sample_batches(model, data, config.chunk_size))
    out = []
    for loss in config.losses:
        obj = make_objective(loss, config)
        for d in dirs:
            for lam in config.lambdas:
                point = perturbed_parameters(model, d, lam)
                pairs = [per_sample_grad_distance(model, obj, x, y, theta, point, chunk_size=config.chunk_size,
                                                  sample_ids=ids, method="vmap") for x, y, ids in batches]
                out.append([torch.cat([p[0] for p in pairs]).mean(), torch.cat([p[1] for p in pairs]).mean()])
    return torch.tensor(out, dtype=torch.float64)


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
    add_machine_options(parser)
    args = parser.parse_args()
    device, name = machine(args)
    data = load_dataset("synthetic").train.subset(slice(0, args.n))
    model = prepare_model(stability.init_model(args.arch, 10, seed=0), device).eval()
    lambdas = stability.parse_lambdas(args.lambdas)
    losses = tuple(s.strip() for s in args.losses.split(",") if s.strip())
    params = sum(p.numel() for p in model.parameters())

    per_loss: dict[str, float] = {}
    reference: dict[str, float] = {}
    diff: dict[str, float] = {}
    for loss in losses:
        config = stability.StabilityConfig(losses=(loss,), lambdas=lambdas, directions=args.directions,
                                           chunk_size=args.chunk_size, threat=ThreatModel(steps=args.steps))
        stability.probe(model, data.subset(slice(0, min(2, args.n))), config)  # warm-up
        reference_probe(model, data.subset(slice(0, min(2, args.n))), config)
        table = stability.probe(model, data, config)
        got = torch.tensor(table[["dist_mean", "cos_mean"]].to_numpy(), dtype=torch.float64)
        diff[loss] = (got - reference_probe(model, data, config)).abs().max().item()
        times, ref_times = [], []
        for _ in range(args.repeats):  # interleaved so load drift hits both
            times.append(timed(lambda: stability.probe(model, data, config), device))
            ref_times.append(timed(lambda: reference_probe(model, data, config), device))
        per_loss[loss] = statistics.median(times)
        reference[loss] = statistics.median(ref_times)
    total = sum(per_loss.values())
    points = args.n * len(lambdas) * args.directions
    print(f"stability arch={args.arch} params={params:,} n={args.n} lambdas={len(lambdas)} "
          f"directions={args.directions} steps={args.steps} chunk={args.chunk_size} device={name}")
    for loss, seconds in per_loss.items():
        print(f"  {loss:7s} {seconds:8.2f} s  {points / seconds:8.1f} sample-points/s"
              f"   reference {reference[loss]:8.2f} s"
              f"  ratio {reference[loss] / seconds:5.2f}  (max |difference| of the means {diff[loss]:.1e})")
    ref_total = sum(reference.values())
    print(f"  {'all':7s} {total:8.2f} s  {points * len(losses) / total:8.1f} sample-points/s"
          f"   reference {ref_total:8.2f} s"
          f"  ratio {ref_total / total:5.2f}")


if __name__ == "__main__":
    main()
