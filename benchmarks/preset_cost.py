"""Compute each training preset needs: forward FLOPs of its architecture (counted by
``torch.utils.flop_counter`` on one 32x32 image), times the passes an epoch makes, times the
epochs; and the GPU hours that is at a given sustained throughput.

    python benchmarks/preset_cost.py                          # every preset, 50 TFLOP/s sustained
    python benchmarks/preset_cost.py --tflops 120 --preset table1-cifar10-pgd fig2-pgd-random
    python benchmarks/preset_cost.py --calibrate-img-s 2400   # measured PGD-AT img/s of resnet18

Passes per image, in units of one forward pass F: a PGD step is a forward and an input
gradient (2F, no weight gradients); a training step 3F (forward, backward to activations and
weights). So PGD-AT with K steps costs (2K + 3)F per training image, TRADES (1 + 2K + 6)F (the
natural forward for the attack's target, K steps, training on natural and adversarial),
FGSM-RS (2 + 3)F, standard 3F; every epoch's curves cost (2K' + 2)F per evaluated image
(``eval_attack`` with K' steps plus the natural pass) on ``eval_n`` test and ``train_eval_n``
training images (0 = all).

The sustained throughput is an assumption until measured (no GPU was lent to the session that
wrote this): ``--calibrate-img-s`` replaces it by the one that ``benchmarks/train_throughput.py
--arch resnet18 --device cuda`` reports for PGD-AT (training images per second), scaled to
every architecture by its FLOPs.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from atprobe.attacks import parse_attack
from atprobe.models import build_model
from atprobe.presets import PRESETS, preset_config

#: Training and test images of each dataset the presets use.
SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "svhn": (73_257, 26_032)}
CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}


@functools.cache
def forward_flops(arch: str, classes: int) -> float:
    """FLOPs of one forward pass of one 32x32 image."""
    model = build_model(arch, classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    return float(counter.get_total_flops())


def passes_per_training_image(method: str, steps: int) -> int:
    return {"pgd_at": 2 * steps + 3, "trades": 1 + 2 * steps + 6, "fgsm_rs": 5, "standard": 3}[method]


def config_flops(config) -> tuple[float, float]:
    """(FLOPs of the whole run, FLOPs of one forward pass) of a ``TrainConfig`` (its
    ``train_n`` images when set; the curves every ``eval_every`` epochs)."""
    c = config.resolved(num_classes=CLASSES[config.dataset])
    n_train, n_test = SIZES[c.dataset]
    n_train = c.train_n or n_train
    f = forward_flops(c.arch, CLASSES[c.dataset])
    eval_steps = parse_attack(c.eval_attack, c.threat).steps
    evaluated = (c.eval_n or n_test) + (c.train_eval_n or n_train)
    evals = len(range(c.eval_every, c.epochs + 1, c.eval_every)) + (c.epochs % c.eval_every != 0)
    training = c.epochs * n_train * passes_per_training_image(c.method, c.threat.steps)
    return (training + evals * evaluated * (2 * eval_steps + 2)) * f, f


def run_flops(name: str) -> tuple[float, float]:
    """(FLOPs of the whole run, FLOPs of one forward pass) of preset ``name``."""
    return config_flops(preset_config(name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="*", default=None, help="default: every preset")
    parser.add_argument("--tflops", type=float, default=50.0, help="assumed sustained TFLOP/s (default 50)")
    parser.add_argument("--calibrate-img-s", type=float, default=None,
                        help="measured resnet18 PGD-AT training img/s on the GPU (replaces --tflops)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tflops = args.tflops
    if args.calibrate_img_s:
        tflops = args.calibrate_img_s * passes_per_training_image("pgd_at", 10) * forward_flops("resnet18", 10) / 1e12
    print(f"sustained throughput: {tflops:.1f} TFLOP/s" + (" (calibrated)" if args.calibrate_img_s else " (assumed)"))
    print(f"{'preset':32} {'arch':12} {'epochs':>6} {'GFLOP/fwd':>9} {'PFLOP':>9} {'GPU h':>7}")
    for name in args.preset or list(PRESETS):
        total, f = run_flops(name)
        c = preset_config(name)
        hours = total / tflops / 1e12 / 3600
        print(f"{name:32} {c.arch:12} {c.epochs:>6} {f / 1e9:>9.2f} {total / 1e15:>9.0f} {hours:>7.1f}")


if __name__ == "__main__":
    main()
