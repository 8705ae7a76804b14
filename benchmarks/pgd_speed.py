"""PGD-10 speed: atprobe.attacks.pgd against the textbook loop, same model, same batch, same process.

    python benchmarks/pgd_speed.py --arch cnn-small --batch-size 128 --threads 1
    python benchmarks/pgd_speed.py --arch resnet18 --batch-size 512 --device cuda

Prints one line per arch: median seconds of each loop and ratio = textbook / atprobe
(>= 1.0 means atprobe is no slower).

The reference (``textbook``) is the plain L-inf loop of Madry et al. as research scripts
write it, on the very model atprobe attacks (channels_last, eval mode) and the same
channels_last batch: a uniform start, then per step ``delta.requires_grad_()``, forward,
summed CE, ``torch.autograd.grad``, a sign step, a clamp to the ball and to the [0,1] box.
It is the floor the library must reach: atprobe's extras (keyed per-sample starts,
restarts, any loss, mode and flag restoring) must cost nothing measurable. ``--nchw`` adds
the older reference, the same loop on an NCHW copy of the model with a mean CE, which
shows what channels_last itself gains.
atprobe runs as the library does on that device (bf16 autocast on CUDA, fp32 on the CPU).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from _timing import add_machine_options, machine, timed

from atprobe.attacks import PGDConfig, pgd
from atprobe.models import build_model
from atprobe.runtime import prepare_model
from atprobe.starts import Starts


def textbook_pgd(model, x, y, eps, alpha, steps, generator):
    """The textbook L-inf PGD loop (Madry et al.), written plainly."""
    delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_()
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def nchw_pgd(model, x, y, eps, alpha, steps, generator):
    """The research-script loop on an NCHW model: rand start, mean CE."""
    delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["cnn-small"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--nchw", action="store_true", help="also time the NCHW research-script loop")
    add_machine_options(parser, device="auto")
    args = parser.parse_args()
    device, name = machine(args)
    eps, alpha = 8 / 255, 2 / 255
    config = PGDConfig(eps=eps, alpha=alpha, steps=args.steps)

    for arch in args.arch:
        torch.manual_seed(0)
        mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
        model = prepare_model(build_model(arch, 10, mean=mean, std=std), device).eval()
        x = torch.rand(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        starts = Starts(0, torch.arange(args.batch_size, device=device))
        runs = {
            "textbook": lambda: textbook_pgd(model, x, y, eps, alpha, args.steps,
                                             torch.Generator(device).manual_seed(0)),
            "atprobe": lambda: pgd(model, x, y, config, starts=starts),
        }
        if args.nchw:
            nchw_model = build_model(arch, 10, mean=mean, std=std).to(device).eval()
            nchw_model.load_state_dict(model.state_dict())
            x_nchw = x.contiguous()
            runs["nchw"] = lambda: nchw_pgd(nchw_model, x_nchw, y, eps, alpha, args.steps,
                                            torch.Generator(device).manual_seed(0))

        for run in runs.values():  # warm-up (allocator, cuDNN autotune)
            run()
        times: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.repeats):  # interleaved so load drift hits all equally
            for key, run in runs.items():
                times[key].append(timed(run, device))
        med = {key: statistics.median(t) for key, t in times.items()}
        line = (f"pgd{args.steps} arch={arch} batch={args.batch_size} device={name}: "
                f"textbook {med['textbook']:.4f}s atprobe {med['atprobe']:.4f}s "
                f"ratio {med['textbook'] / med['atprobe']:.3f}")
        if args.nchw:
            line += f" (nchw {med['nchw']:.4f}s, ratio {med['nchw'] / med['atprobe']:.3f})"
        line += f" ({args.batch_size * args.repeats / sum(times['atprobe']):.0f} img/s atprobe)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
