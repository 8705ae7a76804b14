"""Training compute of ``atprobe demo``'s budgets: every training step's FLOPs by
``benchmarks/preset_cost.py``'s count (forward FLOPs of the architecture times the passes of
training and of the curves), summed, and the GPU hours at an assumed sustained throughput.
The probes are not counted (minutes on a GPU at these sizes).

    python benchmarks/demo_cost.py                     # the gpu and paper budgets, 50 TFLOP/s
    python benchmarks/demo_cost.py --budget cpu --tflops 120
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preset_cost import config_flops  # noqa: E402

from atprobe.demo import BUDGETS, DemoConfig, TrainCall, steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", nargs="*", default=["gpu", "paper"], choices=list(BUDGETS))
    parser.add_argument("--tflops", type=float, default=50.0, help="assumed sustained TFLOP/s (default 50)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.budget:
        budget = BUDGETS[name]
        config = DemoConfig(data_dir="data", budget=name)
        total = 0.0
        print(f"budget {name} (training only, {args.tflops:g} TFLOP/s sustained)")
        for step in steps(config, budget, "cuda"):
            if not isinstance(step.call, TrainCall):
                continue
            flops, _ = config_flops(step.call.config)
            total += flops
            print(f"  {step.name:34} {flops / 1e15:9.1f} PFLOP {flops / args.tflops / 1e12 / 3600:7.2f} GPU h")
        print(f"  {'total':34} {total / 1e15:9.1f} PFLOP {total / args.tflops / 1e12 / 3600:7.2f} GPU h")


if __name__ == "__main__":
    main()
