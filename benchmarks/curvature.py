"""Input-Hessian Lanczos: batched over samples vs a per-sample loop, same model,
same samples, same iterations, same process.

    python benchmarks/curvature.py                                   # cnn-small, batch 64, CPU
    python benchmarks/curvature.py --arch resnet18 --batch-size 256 --device cuda

Both sides run ``atprobe.probes.curvature.input_hessian_eigenvalues`` with a fixed number
of Lanczos steps (``tol = 0``: no early stop, so both do exactly the same number of
Hessian-vector products): once on the whole batch (one double backward per step gives every
sample's product, samples do not interact in eval mode) and once per sample (batch of 1),
with the same per-sample random starts. Prints the median seconds of each, the ratio
loop / batched (> 1: batching is faster) and the largest relative difference of the
eigenvalues between the two (they are the same computation up to the batched kernels'
rounding).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _timing import timed

from atprobe.models import build_model
from atprobe.probes.curvature import input_hessian_eigenvalues
from atprobe.runtime import prepare_model, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn-small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    model = prepare_model(build_model(args.arch, 10, mean=mean, std=std), device).eval()
    x = torch.rand(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    ids = list(range(args.batch_size))
    out: dict[str, torch.Tensor] = {}

    def batched():
        out["batched"] = input_hessian_eigenvalues(model, x, y, iterations=args.iterations, tol=0.0,
                                                   sample_ids=ids)[0]

    def loop():
        out["loop"] = torch.cat([
            input_hessian_eigenvalues(model, x[i : i + 1], y[i : i + 1], iterations=args.iterations, tol=0.0,
                                      sample_ids=ids[i : i + 1])[0]
            for i in range(args.batch_size)
        ])

    for fn in (batched, loop):  # warm-up
        fn()
    t_batched, t_loop = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both equally
        t_loop.append(timed(loop, device))
        t_batched.append(timed(batched, device))
    a, b = out["batched"].double(), out["loop"].double()
    rel = ((a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float32).tiny)).max().item()
    tb, tl = statistics.median(t_batched), statistics.median(t_loop)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"curvature arch={args.arch} batch={args.batch_size} iterations={args.iterations} device={name}: "
          f"loop {tl:.3f}s batched {tb:.3f}s ratio {tl / tb:.2f} max rel diff {rel:.2e} "
          f"({args.batch_size / tb:.1f} samples/s batched)")


if __name__ == "__main__":
    main()
