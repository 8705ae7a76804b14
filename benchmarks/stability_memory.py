"""Peak host memory of the ``stability`` probe on a large model, per chunk size.

    python benchmarks/stability_memory.py --arch wrn-28-10 --chunks 1 2 4

Each chunk size runs in a fresh subprocess (peak RSS is monotone within a process) on a
freshly initialized model, ``n`` = the chunk size, one loss, lambdas ``0, 0.01``, PGD-2. Prints
the peak resident memory, the model's parameter bytes P*4 and the excess over the model
in units of P*4 per sample, to compare with the estimate of docs/pergrad.md (two chunks of
per-sample gradients alive: about 2 x chunk x P x 4 bytes, plus activations).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one(arch: str, chunk: int, loss: str) -> dict:
    import torch

    from atprobe.data import load_dataset
    from atprobe.probes import stability
    from atprobe.threat import ThreatModel

    torch.set_num_threads(2)
    data = load_dataset("synthetic").train.subset(slice(0, chunk))
    model = stability.init_model(arch, 10, seed=0).eval()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = stability.StabilityConfig(losses=(loss,), lambdas=(0.0, 0.01), threat=ThreatModel(steps=2),
                                       chunk_size=chunk)
    stability.probe(model, data, config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in model.parameters())
    return {"arch": arch, "chunk": chunk, "params": params, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="wrn-28-10")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--loss", default="pgd_at")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.arch, args.one, args.loss)))
        return
    for chunk in args.chunks:
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--loss", args.loss, "--one", str(chunk)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        pbytes = r["params"] * 4 / 2**20
        excess = (r["peak_mib"] - r["baseline_mib"]) / pbytes / chunk
        print(f"stability arch={r['arch']} chunk={chunk} params={r['params']:,} (P*4 = {pbytes:.0f} MiB): "
              f"peak RSS {r['peak_mib']:.0f} MiB, {r['peak_mib'] - r['baseline_mib']:.0f} MiB over the loaded model "
              f"= {excess:.2f} x P*4 per sample")


if __name__ == "__main__":
    main()
