"""``atprobe eval`` with PGD-10 on a DeepMind WideResNet against the TRADES one of the same size.

    OMP_NUM_THREADS=1 python benchmarks/zoo_eval_speed.py --data-dir ../shared/data/cifar-10-subset --n 8 --threads 1
    python benchmarks/zoo_eval_speed.py --data-dir DATA --device cuda --n 1024

``dm-wrn-28-10`` (Swish, SAME padding: an extra pad copy before each stride-2 conv) and
``wrn-28-10`` (ReLU) have the same 36.5M parameters and convolution shapes. Each gets a
random-weight plain state_dict (the foreign-checkpoint path: ``--arch``, ``--normalize
dataset``), and the very ``atprobe eval`` command line runs on it in this process, the two
models in turn (``--repeats`` rounds, alternating), on the first ``--n`` test images at
``--batch-size``. Printed: images/s of each (median over rounds, images / wall seconds of the
whole command, model loading included) and ratio = dm / trades images/s, the median over
rounds of each round's back-to-back pair (robust to a machine load that drifts between
rounds; 1.0 means the DeepMind layout costs nothing extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from _timing import add_machine_options, machine, timed

from atprobe.cli.main import cli
from atprobe.models import build_model

ARCHS = ("dm-wrn-28-10", "wrn-28-10")


def eval_args(ckpt: Path, arch: str, args, out: Path) -> list[str]:
    """The ``atprobe eval`` command line benchmarked (also printed)."""
    return [
        "eval", str(ckpt), "--arch", arch, "--normalize", "dataset", "--dataset", "cifar10",
        "--data-dir", args.data_dir, "--split", "test", "--n", str(args.n), "--attack", "pgd10",
        "--batch-size", str(args.batch_size), "--device", args.device, "-o", str(out), "--quiet",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="holds cifar-10-batches-py")
    parser.add_argument("--n", type=int, default=8, help="test images per run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    add_machine_options(parser)
    args = parser.parse_args()
    device, name = machine(args)
    seconds: dict[str, list[float]] = {a: [] for a in ARCHS}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for arch in ARCHS:
            torch.manual_seed(0)
            paths[arch] = Path(tmp) / f"{arch}.pt"
            torch.save(build_model(arch).state_dict(), paths[arch])  # a bare state_dict, as released
        for _ in range(args.repeats):
            for arch in ARCHS:
                argv = eval_args(paths[arch], arch, args, Path(tmp) / f"{arch}.csv")
                seconds[arch].append(timed(lambda argv=argv: cli.main(argv, standalone_mode=False), device))
    rate = {a: args.n / statistics.median(s) for a, s in seconds.items()}
    pair_ratios = [t_trades / t_dm for t_dm, t_trades in zip(seconds[ARCHS[0]], seconds[ARCHS[1]])]
    print(json.dumps({
        "machine": name, "n": args.n, "batch_size": args.batch_size, "attack": "pgd10",
        "command": "atprobe " + " ".join(eval_args(Path("CKPT"), "ARCH", args, Path("eval.csv"))),
        "seconds": seconds, "images_per_s": rate,
        "ratio_dm_over_trades": statistics.median(pair_ratios), "round_ratios": pair_ratios,
    }, indent=1))


if __name__ == "__main__":
    main()
