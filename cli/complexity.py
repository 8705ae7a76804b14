"""``atprobe complexity``: norm-based, margin, curvature and flatness measures of many
checkpoints side by side with their generalization gaps (Dong et al. 2022, Fig. 6). Thin:
parse options, call ``atprobe.probes.complexity``, write the table (docs/probes/complexity.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import click
import pandas as pd

from atprobe.checkpoint import Checkpoint
from atprobe.errors import AtprobeError
from atprobe.inputs import checkpoint_loader, first_n, load_for_checkpoints, pick_split, with_checkpoint_labels
from atprobe.io import run_meta, write_table
from atprobe.probes import complexity
from atprobe.probes.gradcos import run_checkpoints
from atprobe.runtime import prepare_model, set_determinism

from atprobe.cli.common import NUMBER, common_options, data_options, foreign_options, progress, threat_options

#: Samples per split for the data-dependent measures when --n is not given (or the whole split).
DEFAULT_N = 1000
#: Columns of the written table.
CSV_COLUMNS = ["checkpoint", "epoch", "label_noise", "measure", "variant", "value", "reason", "n"]


def label_noise(ckpt: Checkpoint) -> float | None:
    """The fraction of training labels the checkpoint's run replaced by random ones (0 = true
    labels, 1 = random labels; Fig. 6 marks the two kinds apart); None when unrecorded."""
    value = (ckpt.label_spec or {}).get("label_noise")
    return None if value is None else float(value)

EXAMPLES = """
\b
Examples:
  atprobe complexity runs/*/final.pt --margin -o complexity.csv          # Fig. 6: every measure
  atprobe complexity runs/pgd --measures spectral,l1,gap --margin --n 500 # a run dir: its epoch_*.pt, final.pt
  atprobe complexity a.pt --measures spectral --spectral-method reshape --no-fold-bn
  atprobe complexity a.pt --measures margin --margin-on clean --margin-quantile 0.05
"""


def _stub(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint without its weights: metadata, labels and hash (many held at once)."""
    return dataclasses.replace(ckpt, state_dict={}, raw={})


def expand_checkpoints(paths: tuple[str, ...], load: Callable[[Path], Checkpoint]) -> list[Checkpoint]:
    """Stubs of the checkpoints named by ``paths``, in order. A file is itself; a run
    directory stands for its ``epoch_*.pt`` by epoch, then ``final.pt`` unless an
    ``epoch_*.pt`` of the same epoch was already listed (``best.pt``/``last.pt`` are copies
    and are not read). A file named twice is measured once."""
    stubs: list[Checkpoint] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            stubs.append(_stub(load(path)))

    for text in paths:
        path = Path(text)
        if not path.is_dir():
            add(path)
            continue
        files, final = run_checkpoints(path)
        if not files and final is None:
            raise AtprobeError(f"{path}: a directory without epoch_*.pt or final.pt (not a run directory)")
        first = len(stubs)
        for f in files:
            add(f)
        if final is not None:
            last = _stub(load(final))
            if last.epoch is None or last.epoch not in {s.epoch for s in stubs[first:]}:
                if final.resolve() not in seen:
                    seen.add(final.resolve())
                    stubs.append(last)
    return stubs


@click.command("complexity", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--measures", default=",".join(complexity.MEASURES), show_default=True,
              help="Comma-separated measures to compute.")
@click.option("--margin", "divide", is_flag=True,
              help="Also report spectral and l1 divided by the margin quantile.")
@click.option("--margin-quantile", type=NUMBER, default=0.1, show_default=True,
              help="q of the margin's q-quantile over the training samples, in (0, 1).")
@click.option("--margin-on", type=click.Choice(complexity.MARGIN_ON), default="adv", show_default=True,
              help="Margin on PGD examples (adv) or on the clean images.")
@click.option("--spectral-method", type=click.Choice(complexity.SPECTRAL_METHODS), default="operator",
              show_default=True,
              help="Conv layers: norm of the true convolution operator at the model's input size (power "
                   "iteration) or of the c_out x (c_in k k) reshaped kernel.")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="Fold eval-mode BatchNorm into the preceding conv/linear layer (standalone BatchNorms count "
                   "as diagonal layers); --no-fold-bn: raw weights, BatchNorm ignored.")
@click.option("--n", type=int, default=None,
              help=f"Samples of train and of test for the data-dependent measures (default {DEFAULT_N}, or the "
                   "whole split if smaller).")
@threat_options(steps_help="PGD steps of the margin's, the robust accuracies' and the landscape measures' attack.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="complexity.csv", show_default=True)
@data_options
@foreign_options
@common_options
def complexity_command(checkpoints, measures, divide, margin_quantile, margin_on, spectral_method, fold_bn, n,
                       threat, output, dataset, data_dir, download, arch, num_classes, normalize,
                       device, batch_size, seed, quiet) -> None:
    """Complexity measures and generalization gaps of CHECKPOINTS (files or run directories).

    Measures: spectral (product of layer spectral norms, and its log10), l1 (sum of entrywise l1
    norms), margin (q-quantile of f(x)_y - max_j!=y f(x)_j on training samples), curvature,
    hessian, flatness, gap (natural/robust train and test accuracy and their gaps). Writes one
    row per (checkpoint, measure, variant): checkpoint, epoch, label_noise, measure, variant, value, reason, n
    (docs/probes/complexity.md).
    """
    set_determinism(seed)
    config = complexity.ComplexityConfig(
        measures=complexity.parse_measures(measures), spectral_method=spectral_method, fold_bn=fold_bn,
        margin=divide, margin_quantile=margin_quantile, margin_on=margin_on, threat=threat,
        batch_size=batch_size, seed=seed,
    )
    if n is not None and n < 1:
        raise AtprobeError(f"--n must be >= 1, got {n}")
    for measure in config.measures:
        if measure in complexity.EXTERNAL:
            complexity.external_module(measure)
    load = checkpoint_loader(arch=arch, num_classes=num_classes, dataset=dataset, normalize=normalize,
                             data_dir=data_dir)
    stubs = expand_checkpoints(checkpoints, load)
    train = test = None
    data_name = None
    if config.needs_data:
        data = load_for_checkpoints(stubs, dataset=dataset, data_dir=data_dir, download=download)
        data_name = data.name
        train_split, test_split = pick_split(data, "train"), pick_split(data, "test")
        train = first_n(train_split, n if n is not None else min(DEFAULT_N, len(train_split)))
        if "gap" in config.measures:
            test = first_n(test_split, n if n is not None else min(DEFAULT_N, len(test_split)))
    frames = []
    with progress(len(stubs), "complexity", quiet) as bar:
        bar.unit = "ckpt"
        for stub in stubs:
            ckpt = load(stub.path)
            if ckpt.sha256 != stub.sha256:
                raise AtprobeError(f"{stub.path} changed while complexity was running")
            model = prepare_model(ckpt.build_model(), device)
            del ckpt
            samples = None if train is None else with_checkpoint_labels(train, stub, "trained", "train")
            df = complexity.probe(model, samples, config, test=test)
            df.insert(0, "label_noise", pd.array([label_noise(stub)] * len(df), dtype="Float64"))
            df.insert(0, "epoch", pd.array([stub.epoch] * len(df), dtype="Int64"))
            df.insert(0, "checkpoint", str(stub.path))
            frames.append(df)
            del model
            bar.update(1)
    table = pd.concat(frames, ignore_index=True)[CSV_COLUMNS]
    write_table(table, output, run_meta(seed=seed, checkpoints=stubs, config={
        **complexity.config_record(config), "n_train": None if train is None else len(train),
        "n_test": None if test is None else len(test), "labels": "trained (train), true (test)",
        "batch_size": batch_size, "device": str(device), "dataset": data_name,
    }))
    if not quiet:
        click.echo(table.to_string(index=False), err=True)
        click.echo(f"wrote {output}", err=True)
