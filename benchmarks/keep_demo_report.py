"""Keep a demo's report in docs/: its report.md, index.html, findings.csv (+ meta) and
demo.json, and every figure (the report's own, the hardness gallery included) re-drawn from the
demo's CSVs by the same ``atprobe plot`` calls at a lower dpi and stored as 256-colour PNGs,
so the folder stays small. The CSVs and checkpoints are not kept.

    python benchmarks/keep_demo_report.py runs/demo docs/demo-cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from atprobe import plot
from atprobe.demo import BUDGETS, Budget, DemoConfig, PlotCall, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--dpi", type=float, default=75)
    args = parser.parse_args()
    record = json.loads((args.demo / "demo.json").read_text())
    name = record["budget"]["name"]
    budget = BUDGETS[name] if name in BUDGETS else Budget(**record["budget"])
    if args.dest.exists():
        raise SystemExit(f"{args.dest} exists: remove it first")
    (args.dest / "figures").mkdir(parents=True)
    for name in ("report.md", "index.html", "findings.csv", "findings.meta.json", "demo.json"):
        shutil.copy2(args.demo / name, args.dest / name)
    config = DemoConfig(out=args.demo, budget=budget)
    with tempfile.TemporaryDirectory() as tmp:
        for step in steps(config, budget, "cpu"):
            if isinstance(step.call, PlotCall):  # the step's own plot call, at --dpi
                drawn = Path(tmp) / Path(step.call.output).name
                plot.save_figure(plot.plot([args.demo / c for c in step.call.csvs], kind=step.call.kind), drawn,
                                 dpi=args.dpi)
                Image.open(drawn).convert("RGB").quantize(256).save(args.dest / step.call.output, optimize=True)
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"kept {args.dest}: {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
