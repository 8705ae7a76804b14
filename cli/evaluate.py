"""``atprobe eval``: natural and adversarial accuracy of checkpoints."""

from __future__ import annotations

import click
import pandas as pd

from atprobe.attacks import parse_attack
from atprobe.evaluate import EvalConfig, evaluate
from atprobe.inputs import (LABEL_MODES, SPLITS, first_n, load_checkpoints, load_for_checkpoints, pick_split,
                            with_checkpoint_labels)
from atprobe.io import run_meta, write_table
from atprobe.runtime import prepare_model, set_determinism

from atprobe.cli.common import common_options, data_options, foreign_options, progress, split_list, threat_options

EXAMPLES = """
\b
Examples:
  atprobe eval run/final.pt --attack natural,pgd10 -o eval.csv
  atprobe eval a.pt b.pt --attack natural,pgd20,cw100 --split test --n 1000
  atprobe eval trades_wrn.pt --arch wrn-34-10 --dataset cifar10 --attack pgd50x5 --eps 8/255
  atprobe eval model.pt --norm l2 --eps 128/255 --attack pgd20
"""


@click.command("eval", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--attack", "attacks", default="natural,pgd10", show_default=True,
              help="Comma-separated: natural, fgsm, fgsm_rs, pgdK (K steps on CE), cwK (K steps on the "
                   "CW margin), optional xR for R restarts (pgd50x5); pgd, cw: --steps/--restarts.")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--n", type=int, default=None, help="Evaluate the first N samples of the split (default: all).")
@click.option("--labels", type=click.Choice(LABEL_MODES), default="trained", show_default=True,
              help="On train/val: the labels the checkpoint was trained on, or the true ones.")
@threat_options(steps_help="PGD steps of the attacks named without a count (pgd, cw).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="eval.csv", show_default=True)
@data_options
@foreign_options
@common_options
def eval_command(checkpoints, attacks, split, n, labels, threat, output, dataset, data_dir,
                 download, arch, num_classes, normalize, device, batch_size, seed, quiet) -> None:
    """Accuracy of CHECKPOINTS under natural and adversarial inputs.

    Writes one row per (checkpoint, split, attack): checkpoint, split, attack, norm,
    eps, alpha, steps, restarts, n, accuracy, loss.
    """
    set_determinism(seed)
    specs = tuple(parse_attack(a, threat) for a in split_list(attacks, "--attack"))
    config = EvalConfig(attacks=specs, batch_size=batch_size, seed=seed)
    ckpts = load_checkpoints(checkpoints, arch=arch, num_classes=num_classes, dataset=dataset,
                             normalize=normalize, data_dir=data_dir)
    data = load_for_checkpoints(ckpts, dataset=dataset, data_dir=data_dir, download=download)
    base = first_n(pick_split(data, split), n)
    frames = []
    for ckpt in ckpts:
        model = prepare_model(ckpt.build_model(), device)
        samples = with_checkpoint_labels(base, ckpt, labels, split)
        with progress(len(samples) * len(specs), f"eval {ckpt.name}", quiet) as bar:
            df = evaluate(model, samples, config, progress=bar)
        df.insert(0, "split", split)
        df.insert(0, "checkpoint", str(ckpt.path))
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    write_table(table, output, run_meta(seed=seed, checkpoints=ckpts, config={
        "attacks": [s.name for s in specs], "split": split, "n": len(base), "labels": labels,
        "threat": threat.to_json(), "batch_size": batch_size, "device": str(device),
        "dataset": data.name,
    }))
    if not quiet:
        click.echo(table.to_string(index=False), err=True)
        click.echo(f"wrote {output}", err=True)
