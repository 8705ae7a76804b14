"""Weight-Hessian top eigenvalue + Hutchinson trace: atprobe (``atprobe.linalg`` on
``LossHessian``) against pyhessian, same model, same batch, same number of Hessian-vector
products, same process.

    python benchmarks/hessian_speed.py --threads 1                        # cnn-small, batch 128, CPU
    python benchmarks/hessian_speed.py --device cuda --arch resnet18

Each side computes the top eigenvalue by power iteration with exactly ``--iterations``
products (tol 0: no early stop) and a ``--probes``-probe Rademacher trace, on the mean CE
of one fixed batch in eval mode. pyhessian: ``hessian(model, criterion, data=...)``,
``eigenvalues(maxIter, tol=0)`` and ``trace(maxIter=probes, tol=0)``. atprobe: the same on
:class:`atprobe.probes.hessian.LossHessian` in each product mode (``reverse``: double
backward on a cached gradient graph; ``forward``: ``torch.func`` forward-over-reverse,
probes batched by ``vmap`` in chunks of ``--chunk``). Prints the median seconds of each over
interleaved repeats, the ratio pyhessian / atprobe (> 1: atprobe is faster) and the two
eigenvalue estimates.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from _timing import add_machine_options, machine, timed

from atprobe import objectives
from atprobe.models import build_model
from atprobe.probes import hessian


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn-small")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20, help="power-iteration products (no early stop)")
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=10, help="probes per vmap call (forward mode)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="reverse,forward")
    add_machine_options(parser)
    args = parser.parse_args()
    device, name = machine(args)
    from pyhessian import hessian as PyHessian  # noqa: N812 (the library's class name)

    torch.manual_seed(0)
    model = build_model(args.arch, 10).to(device).eval()
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    out: dict[str, float] = {}

    import sys

    pyhessian_module = sys.modules["pyhessian.hessian"]  # the module (the package exports a class of that name)

    counted = {"pyhessian": 0}
    product = pyhessian_module.hessian_vector_product

    def counting_product(*a, **k):  # pyhessian's trace loop stops early on a negative running mean:
        counted["pyhessian"] += 1   # count its products instead of assuming maxIter of them
        return product(*a, **k)

    pyhessian_module.hessian_vector_product = counting_product

    def reference():
        counted["pyhessian"] = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
            hess = PyHessian(model, lambda z, t: objectives.ce(z, t).mean(), data=(x, y), cuda=device.type == "cuda")
            top, _ = hess.eigenvalues(maxIter=args.iterations, tol=0.0, top_n=1)
            for _ in range(args.probes):  # one probe per call: no early stop, exactly --probes products
                hess.trace(maxIter=1, tol=0.0)
        for p in model.parameters():
            p.grad = None
        out["pyhessian"] = float(top[0])
        out["pyhessian_products"] = counted["pyhessian"]

    def ours(mode: str):
        def run():
            op = hessian.LossHessian(model, [(x, y)], mode=mode)
            g = torch.Generator(device=device).manual_seed(0)
            [(top, _, _)] = hessian.top_eigenvalues(op.operator(), op.like(), iterations=args.iterations, tol=0.0,
                                                    generator=g)
            hessian.hutchinson(op.operator(), op.like(), samples=args.probes, tol=0.0, generator=g,
                               chunk=args.chunk if mode == "forward" else 1)
            out[mode] = top
            out[f"{mode}_products"] = op.products
        return run

    modes = args.modes.split(",")
    fns = {"pyhessian": reference, **{m: ours(m) for m in modes}}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):  # interleaved so drift hits every side equally
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    ref = statistics.median(times["pyhessian"])
    ref_per = ref / out["pyhessian_products"]
    print(f"hessian arch={args.arch} batch={args.batch_size} (top eigenvalue {args.iterations} + trace "
          f"{args.probes} products) device={name}: pyhessian {ref:.3f}s for {out['pyhessian_products']} products, "
          f"{1e3 * ref_per:.1f} ms each (top {out['pyhessian']:.5g})")
    for m in modes:
        t = statistics.median(times[m])
        per = t / out[f"{m}_products"]
        print(f"  atprobe {m}: {t:.3f}s for {out[f'{m}_products']} products, {1e3 * per:.1f} ms each: "
              f"ratio per product {ref_per / per:.2f} (top {out[m]:.5g})")


if __name__ == "__main__":
    main()
