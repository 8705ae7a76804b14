"""PGD-10 speed: atprobe.attacks.pgd against the textbook loop, same model, same batch, same process.

    python benchmarks/pgd_speed.py --arch cnn-small --batch-size 256
    python benchmarks/pgd_speed.py --arch resnet18 --batch-size 512 --device cuda

Prints one line per arch: median seconds of each and ratio = reference / atprobe
(>= 1.0 means atprobe is no slower). The reference is what research scripts write: a
`for` loop over steps with `torch.autograd.grad` on a mean CE, fp32, in eval mode.
atprobe runs as the library does on that device (channels_last everywhere, bf16 autocast on CUDA).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from _timing import timed

from atprobe.attacks import PGDConfig, pgd
from atprobe.models import build_model
from atprobe.runtime import prepare_model, resolve_device


def reference_pgd(model, x, y, eps, alpha, steps, generator):
    """The textbook loop (Madry et al.), written plainly."""
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
    parser.add_argument("--arch", default="cnn-small")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    reference_model = build_model(args.arch, 10, mean=mean, std=std).to(device).eval()
    ours_model = prepare_model(build_model(args.arch, 10, mean=mean, std=std), device).eval()
    ours_model.load_state_dict(reference_model.state_dict())
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    x_ours = x.contiguous(memory_format=torch.channels_last)
    eps, alpha = 8 / 255, 2 / 255
    config = PGDConfig(eps=eps, alpha=alpha, steps=args.steps)

    def run_reference():
        reference_pgd(reference_model, x, y, eps, alpha, args.steps, torch.Generator(device).manual_seed(0))

    def run_ours():
        pgd(ours_model, x_ours, y, config, generator=torch.Generator(device).manual_seed(0))

    for fn in (run_reference, run_ours):  # warm-up (allocator, cuDNN autotune)
        fn()
    ref_times, our_times = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both equally
        ref_times.append(timed(run_reference, device))
        our_times.append(timed(run_ours, device))
    ref, ours = statistics.median(ref_times), statistics.median(our_times)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"pgd{args.steps} arch={args.arch} batch={args.batch_size} device={name}: "
          f"reference {ref:.4f}s atprobe {ours:.4f}s ratio {ref / ours:.3f} "
          f"({args.batch_size * args.repeats / sum(our_times):.0f} img/s atprobe)")


if __name__ == "__main__":
    main()
