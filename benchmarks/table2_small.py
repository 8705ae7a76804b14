"""Table 2 of Dong et al. (ICLR 2022) at CPU size: the remedies of robust overfitting side by side.

    python benchmarks/table2_small.py --out runs/table2_small          # ~15 min on a 2-core CPU
    python benchmarks/table2_small.py --out runs/table2_small --reuse  # the table again, runs kept

Trains, under ONE schedule with a learning-rate decay (the Table 2 presets, ``atprobe.presets``,
shrunk: ``cnn-small``, the first 1,000 images of the CIFAR-10 subset at
../shared/data/cifar-10-subset, 24 epochs with the decays at 50% and 75% (the presets' 100 and 150
of 200, moved along with their other epoch fields), PGD-3 at eps 8/255, step 2/255, no augmentation
(the demo's cpu budget: with crop + flip 1,000 images underfit and nothing overfits)):

    PGD-AT, PGD-AT+LS, PGD-AT+SAT, PGD-AT+KD+SWA (teachers: the PGD-AT run's best.pt and a standard
    run's best.pt), PGD-AT+Co-teaching, PGD-AT+TE, and PGD-AT+AWP (the preset's gamma 0.01, and 0.002)

then ``atprobe table`` over them (natural, PGD-10 and CW-10 on 500 test images) into table2.csv,
and ``atprobe plot`` of it into table2.png. Every run is ``atprobe.train.train`` of
``atprobe.presets.preset_config(NAME, **SMALL)``; the commands are in the meta records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from atprobe.presets import preset_config
from atprobe.threat import ThreatModel
from atprobe.train import train

ROOT = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = ROOT.parent / "shared" / "data" / "cifar-10-subset"

#: The CPU-sized fields every run shares (on top of its preset).
SMALL = dict(arch="cnn-small", epochs=24, train_n=1000, batch_size=64, augment=False, eval_n=500,
             train_eval_n=200, eval_attack="pgd5", threat=ThreatModel(eps=8 / 255, alpha=2 / 255, steps=3))

#: run name -> preset, in Table 2's order (the teachers first: KD-SWA needs them).
RUNS = {
    "standard": "table2-standard",
    "pgd_at": "table2-pgd",
    "pgd_at_ls": "table2-pgd-ls",
    "sat": "table2-sat",
    "kd_swa": "table2-kd-swa",
    "coteach": "table2-coteach",
    "pgd_at_te": "table2-pgd-te",
    "awp": "awp-pgd",
    "awp_gamma0.002": ("awp-pgd", {"awp_gamma": 0.002}),  # the preset's 0.01 collapses cnn-small (docs/examples)
}
ATTACKS = "natural,pgd10,cw10"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs, re-make the table")
    parser.add_argument("--data-dir", type=Path, default=CIFAR_SUBSET)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"dataset": "cifar10", "data_dir": str(args.data_dir)} if args.data_dir.is_dir() else {}
    timings = {}
    for name, preset in RUNS.items():
        run = args.out / name
        if args.reuse and (run / "final.pt").is_file():
            continue
        preset, extra = preset if isinstance(preset, tuple) else (preset, {})
        extra = dict(extra)
        if preset == "table2-kd-swa":
            extra.update(teacher_robust=str(args.out / "pgd_at" / "best.pt"),
                         teacher_natural=str(args.out / "standard" / "best.pt"))
        config = preset_config(preset, **SMALL, **data, **extra)
        start = time.perf_counter()
        train(config, run, device="cpu", overwrite=run.exists())
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {timings[name]} s", file=sys.stderr)
    rows = [str(args.out / n) for n in RUNS if n != "standard"]
    table, figure = args.out / "table2.csv", args.out / "table2.png"
    for old in (table, table.with_suffix(".meta.json"), figure):  # outputs are never written over: re-made
        old.unlink(missing_ok=True)
    cli = [sys.executable, "-m", "atprobe.cli.main"]
    start = time.perf_counter()
    data_opts = ["--data-dir", str(args.data_dir)] if data else []
    subprocess.run([*cli, "table", *rows, "--attack", ATTACKS, "--n", "500", "--device", "cpu", "-q", *data_opts,
                    "-o", str(table)], check=True)
    timings["table"] = round(time.perf_counter() - start, 1)
    subprocess.run([*cli, "plot", str(table), "-o", str(figure)], check=True)
    df = pd.read_csv(table)
    df["remedy"] = [f"{r} ({Path(run).name})" for r, run in zip(df["remedy"], df["run"])]
    shown = df.pivot_table(index="remedy", columns="attack", values=["best", "final", "diff"], sort=False)
    print(shown.round(4).to_string(), file=sys.stderr)
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
