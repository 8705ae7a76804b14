"""bf16 autocast against float32 evaluation: how much does the precision of ``atprobe eval``
change a trained model's accuracy (issue 15: the paper's numbers are float32)?

    python benchmarks/eval_precision.py runs/pgd/final.pt --data-dir ../shared/data/cifar-10-subset
    python benchmarks/eval_precision.py runs/pgd/final.pt --device cuda --attack natural,pgd10,pgd20

For each attack, the same checkpoint, samples and keyed random starts are evaluated twice in
one process: in float32 (``EvalConfig(amp=False)``, the default) and under bf16 autocast. On
CUDA the bf16 run is ``EvalConfig(amp=True)``, atprobe's own speed path; on the CPU, where
atprobe's autocast is a no-op, the whole evaluation runs inside ``torch.autocast("cpu",
torch.bfloat16)``, which rounds the same operations (convolutions, matmuls) to bf16. Printed:
accuracy in each precision, their difference (bf16 - fp32, percentage points), the fraction of
samples whose prediction flips, and the wall time ratio fp32 / bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from _timing import add_machine_options, machine, timed

from atprobe.attacked import attacked_batches
from atprobe.attacks import parse_attack
from atprobe.study import DataSource, SampleSpec, Study
from atprobe.threat import ThreatModel


def predictions(model, split, spec, *, seed: int, batch_size: int, bf16: bool, device: torch.device) -> torch.Tensor:
    """Every sample's (attacked) predicted class, in one precision."""
    cpu_bf16 = bf16 and device.type == "cpu"
    outer = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else contextlib.nullcontext()
    pred = torch.empty(len(split), dtype=torch.long, device=device)
    with outer:
        for b in attacked_batches(model, split, spec.config, seed=seed, batch_size=batch_size,
                                  amp=bf16 and device.type == "cuda"):
            pred[b.rows] = b.logits.argmax(1)
    return pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--attack", default="natural,pgd10")
    parser.add_argument("--n", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    add_machine_options(parser)
    args = parser.parse_args()
    device, name = machine(args)
    study = Study([args.checkpoint], data=DataSource(data_dir=args.data_dir))
    ckpt = study.checkpoints[0]
    spec = SampleSpec(split="test", n=args.n, default_n=None)
    split = study.samples(ckpt, spec, study.base(spec)).to(device)
    model = study.model(ckpt, device).eval()
    threat = ThreatModel()
    rows = []
    for attack in args.attack.split(","):
        a = parse_attack(attack, threat)
        out = {}
        for bf16 in (False, True):
            def run(bf16=bf16):
                out[bf16] = predictions(model, split, a, seed=args.seed, batch_size=args.batch_size, bf16=bf16,
                                        device=device)
            out[f"t{bf16}"] = timed(run, device)
        y = split.y.to(device)
        acc32, acc16 = (out[k].eq(y).double().mean().item() for k in (False, True))
        rows.append({"attack": attack, "n": len(split), "acc_fp32": acc32, "acc_bf16": acc16,
                     "diff_pp": 100 * (acc16 - acc32), "flipped": out[False].ne(out[True]).double().mean().item(),
                     "time_ratio_fp32_over_bf16": out["tFalse"] / out["tTrue"]})
    print(json.dumps({"machine": name, "checkpoint": args.checkpoint, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
