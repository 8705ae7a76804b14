"""Per-sample gradient norms: atprobe.pergrad (vmap over grad) against a plain loop of
single-sample backward passes, same model, same batch, same process.

    python benchmarks/pergrad_speed.py                       # cnn-small and mlp, batch 64, CPU
    python benchmarks/pergrad_speed.py --arch resnet18 --device cuda

Prints one line per arch: median seconds of each and ratio = loop / atprobe (> 1 means
atprobe is faster), plus the largest relative difference of atprobe's norms from the
loop's norms reduced in float64. Both compute
||d CE(f(x_i), y_i) / d theta|| for every sample in eval mode, float32; the loop is what
research scripts write: ``model.zero_grad(); loss_i.backward()`` and the norm of the
``.grad`` fields.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _timing import timed

from atprobe import objectives
from atprobe.models import build_model
from atprobe.pergrad import objective, per_sample_grad_norms
from atprobe.runtime import resolve_device


def loop_norms(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, accumulate: torch.dtype | None = None
) -> torch.Tensor:
    """The textbook loop: one backward per sample, norm of the accumulated .grad
    (``accumulate=torch.float64``: reduce in float64, the untimed accuracy reference)."""
    norms = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(x.shape[0]):
        model.zero_grad()
        objectives.ce(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        per_param = [torch.linalg.vector_norm(p.grad, dtype=accumulate) for p in params]
        norms.append(torch.linalg.vector_norm(torch.stack(per_param)))
    return torch.stack(norms)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["cnn-small", "mlp"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 gives stable numbers on a shared, loaded machine")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    for arch in args.arch:
        torch.manual_seed(0)
        mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
        model = build_model(arch, 10, mean=mean, std=std).to(device).eval()
        x = torch.rand(args.batch_size, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        loss = objective("clean")
        chunk = args.chunk_size or args.batch_size

        def run_loop():
            return loop_norms(model, x, y)

        def run_ours():
            return per_sample_grad_norms(model, loss, x, y, chunk_size=chunk)

        run_loop(), run_ours()  # warm-up (allocator, first-call dispatch)
        ref = loop_norms(model, x, y, accumulate=torch.float64)
        rel = ((run_ours().double() - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
        loop_times, our_times = [], []
        for _ in range(args.repeats):  # interleaved so load drift hits both equally
            loop_times.append(timed(run_loop, device))
            our_times.append(timed(run_ours, device))
        lt, ot = statistics.median(loop_times), statistics.median(our_times)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"per-sample grad norms arch={arch} params={params:,} batch={args.batch_size} chunk={chunk} "
            f"device={name}: loop {lt:.4f}s atprobe {ot:.4f}s ratio loop/atprobe {lt / ot:.2f} "
            f"(max rel diff from float64-reduced loop {rel:.1e})"
        )


if __name__ == "__main__":
    main()
