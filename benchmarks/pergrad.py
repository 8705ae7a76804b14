"""Per-sample gradient norms: atprobe.pergrad (both methods: ``hooks``, the per-layer
identities on one batched backward, atprobe's default; and torch.func ``vmap``) against a
plain loop of single-sample backward passes, same model, same batch, same process.

    python benchmarks/pergrad.py                             # cnn-small and resnet18, batch 128, CPU
    python benchmarks/pergrad.py --arch resnet18 --device cuda

Prints one line per arch and method: median seconds and ratio = loop / atprobe (> 1 means
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
from _timing import add_machine_options, machine, timed

from atprobe import objectives
from atprobe.models import build_model
from atprobe.pergrad import objective, per_sample_grad_norms


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
    parser.add_argument("--arch", nargs="+", default=["cnn-small", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["hooks", "vmap"], choices=["hooks", "vmap"])
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the batch size")
    parser.add_argument("--repeats", type=int, default=5)
    add_machine_options(parser)
    args = parser.parse_args()
    device, name = machine(args)
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

        runs = {
            method: (lambda method=method: per_sample_grad_norms(model, loss, x, y, chunk_size=chunk, method=method))
            for method in args.methods
        }
        run_loop()  # warm-up (allocator, first-call dispatch)
        ref = loop_norms(model, x, y, accumulate=torch.float64)
        rel = {}
        for method, run in runs.items():
            rel[method] = ((run().double() - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
        times: dict[str, list[float]] = {"loop": [], **{m: [] for m in runs}}
        for _ in range(args.repeats):  # interleaved so load drift hits all equally
            times["loop"].append(timed(run_loop, device))
            for method, run in runs.items():
                times[method].append(timed(run, device))
        lt = statistics.median(times["loop"])
        params = sum(p.numel() for p in model.parameters())
        for method in runs:
            ot = statistics.median(times[method])
            print(
                f"per-sample grad norms arch={arch} params={params:,} batch={args.batch_size} chunk={chunk} "
                f"method={method} device={name}: loop {lt:.4f}s atprobe {ot:.4f}s ratio loop/atprobe {lt / ot:.2f} "
                f"(max rel diff from float64-reduced loop {rel[method]:.1e})"
            )


if __name__ == "__main__":
    main()
