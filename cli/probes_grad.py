"""``atprobe gradnorm``, ``atprobe stability``, ``atprobe gradcos``: the gradient probes of
Dong et al. (ICLR 2022), Sec. 3.2. Thin: parse options, call ``atprobe.probes``, write
the table (see docs/probes/)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import click
import pandas as pd
import torch

from atprobe.checkpoint import Checkpoint
from atprobe.data import Dataset, Split, load_dataset
from atprobe.directions import IGNORES
from atprobe.directions import NORMS as DIRECTION_NORMS
from atprobe.errors import AtprobeError
from atprobe.inputs import (LABEL_MODES, SPLITS, first_n, checkpoint_loader, load_checkpoints, load_for_checkpoints, pick_split,
                            with_checkpoint_labels)
from atprobe.io import run_meta, write_table
from atprobe.models import canonical_arch
from atprobe.pergrad import OBJECTIVES
from atprobe.probes import gradcos, gradnorm, stability
from atprobe.probes._gradutil import auto_chunk_size
from atprobe.runtime import prepare_model, set_determinism

from atprobe.cli.common import NUMBER, common_options, data_options, foreign_options, progress, split_list, threat_options

#: Samples probed when --n is not given (or the whole split, if it is smaller).
DEFAULT_N = 1000


def sample_options(func: Callable) -> Callable:
    """``--split``, ``--n``, ``--labels``."""

    @click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True,
                  help="Which split the samples come from.")
    @click.option("--n", type=int, default=None,
                  help=f"Probe the first N samples of the split (default {DEFAULT_N}, or the whole split if smaller).")
    @click.option("--labels", type=click.Choice(LABEL_MODES), default="trained", show_default=True,
                  help="On train/val: the labels the checkpoint was trained on, or the true ones.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def attack_options(func: Callable) -> Callable:
    """The threat model (``threat_options``), TRADES' beta and the per-sample-gradient chunk size."""

    @threat_options
    @click.option("--beta", type=NUMBER, default=6.0, show_default=True, help="TRADES' weight on the KL term.")
    @click.option("--chunk-size", type=click.IntRange(min=1), default=None,
                  help="Samples per per-sample-gradient chunk (memory: chunk x parameters floats). Default: "
                       "--batch-size, capped to fit 4 GiB on the CPU or a quarter of the GPU's memory.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _samples(data: Dataset, split: str, n: int | None) -> Split:
    chosen = pick_split(data, split)
    return first_n(chosen, n if n is not None else min(DEFAULT_N, len(chosen)))


def _chunk(model: torch.nn.Module, chunk_size: int | None, batch_size: int, copies: int) -> int:
    return chunk_size if chunk_size is not None else auto_chunk_size(model, batch_size, copies)


def _config_meta(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _echo(table: pd.DataFrame, output: str, quiet: bool) -> None:
    if not quiet:
        click.echo(table.to_string(index=False), err=True)
        click.echo(f"wrote {output}", err=True)


# ---------------------------------------------------------------------------- gradnorm

GRADNORM_EXAMPLES = """
\b
Examples:
  atprobe gradnorm run/final.pt --n 1000 -o gradnorm.csv
  atprobe gradnorm run/epoch_0010.pt run/epoch_0100.pt --per-sample -o gn.csv   # also gn.samples.csv
  atprobe gradnorm noisy_run/final.pt --noisy-vs-clean -o gn_noisy.csv             # Fig. A.9
"""


@click.command("gradnorm", epilog=GRADNORM_EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@sample_options
@click.option("--noisy-vs-clean", is_flag=True,
              help="Also summarize the samples whose trained label differs from the true one (noisy) and the "
                   "others (clean) apart (Fig. A.9).")
@click.option("--per-sample", is_flag=True,
              help="Also write one row per sample to OUTPUT's stem + .samples.csv.")
@attack_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="gradnorm.csv", show_default=True)
@data_options
@foreign_options
@common_options
def gradnorm_command(checkpoints, split, n, labels, noisy_vs_clean, per_sample, threat, beta,
                     chunk_size, output, dataset, data_dir, download, arch, num_classes, normalize, device,
                     batch_size, seed, quiet) -> None:
    """Per-sample gradient norms of the parts of the AT objectives in CHECKPOINTS.

    ||grad CE||, ||grad CE(x')||, ||grad R|| (R = CE(x') - CE(x)), ||grad KL||, ||grad beta KL|| and the
    ratios ||grad R|| / ||grad CE||, ||grad beta KL|| / ||grad CE|| (Dong et al. 2022, Fig. 3).
    Writes one row per (checkpoint, group, quantity, statistic): checkpoint, epoch, split, labels,
    group, quantity, statistic, n, value (docs/probes/gradnorm.md).
    """

    set_determinism(seed)
    if noisy_vs_clean and (labels != "trained" or split == "test"):
        raise AtprobeError("--noisy-vs-clean compares trained with true labels: use --labels trained on the "
                           "train or val split")
    config = gradnorm.GradNormConfig(threat=threat, beta=beta, seed=seed,
                                     noisy_vs_clean=noisy_vs_clean)
    ckpts = load_checkpoints(checkpoints, arch=arch, num_classes=num_classes, dataset=dataset,
                             normalize=normalize, data_dir=data_dir)
    data = load_for_checkpoints(ckpts, dataset=dataset, data_dir=data_dir, download=download)
    base = _samples(data, split, n)
    summaries, rows = [], []
    chunks = []
    for ckpt in ckpts:
        model = prepare_model(ckpt.build_model(), device)
        cfg = dataclasses.replace(config, chunk_size=_chunk(model, chunk_size, batch_size, copies=1))
        chunks.append(cfg.chunk_size)
        samples = with_checkpoint_labels(base, ckpt, labels, split)
        with progress(4 * len(samples), f"gradnorm {ckpt.name}", quiet) as bar:
            table = gradnorm.per_sample(model, samples, cfg, progress=bar)
        summary = gradnorm.summarize(table, cfg)
        for df in (summary, table):
            df.insert(0, "labels", labels)
            df.insert(0, "split", split)
            df.insert(0, "epoch", pd.array([ckpt.epoch] * len(df), dtype="Int64"))
            df.insert(0, "checkpoint", str(ckpt.path))
        summaries.append(summary)
        rows.append(table)
        del model
    meta_config = {**_config_meta(config), "chunk_size": chunks, "split": split, "n": len(base), "labels": labels,
                   "batch_size": batch_size, "device": str(device), "dataset": data.name}
    summary = pd.concat(summaries, ignore_index=True)
    if per_sample:
        path = Path(output)
        samples_path = path.with_name(path.stem + ".samples.csv")
        write_table(pd.concat(rows, ignore_index=True), samples_path,
                    run_meta(seed=seed, checkpoints=ckpts, config=meta_config, extra={"table": "per-sample"}))
    write_table(summary, output, run_meta(seed=seed, checkpoints=ckpts, config=meta_config,
                                          extra={"table": "summary"}))
    _echo(summary[(summary["group"] == "all") & (summary["statistic"].isin(["mean", "ratio_of_means"]))],
          output, quiet)


# ---------------------------------------------------------------------------- stability

STABILITY_EXAMPLES = """
\b
Examples:
  atprobe stability --init cnn-small --seed 0 -o stability_init.csv      # Fig. 4(a), fresh init
  atprobe stability --init resnet18 --dataset cifar10 --n 256 --directions 3
  atprobe stability run/final.pt --losses pgd_at,clean --lambdas -0.1:0.1:11 -o stab.csv
  atprobe stability run/final.pt --lambdas=-0.02,-0.01,0,0.01,0.02
"""


@click.command("stability", epilog=STABILITY_EXAMPLES)
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--init", "init_arch", metavar="ARCH", default=None,
              help="Probe a freshly initialized ARCH (seeded by --seed) instead of a checkpoint.")
@click.option("--losses", default="pgd_at,trades,clean", show_default=True,
              help=f"Comma-separated objectives: {', '.join(OBJECTIVES)}.")
@click.option("--lambdas", default="-0.05:0.05:21", show_default=True,
              help="Steps along each direction: START:STOP:NUM or a comma list; must contain 0.")
@click.option("--directions", "num_directions", type=int, default=1, show_default=True,
              help="Random filter-normalized directions (drawn from --seed).")
@click.option("--ignore", type=click.Choice(IGNORES), default="biasbn", show_default=True,
              help="biasbn: zero the direction on biases and BatchNorm parameters (Li et al.).")
@click.option("--direction-norm", type=click.Choice(DIRECTION_NORMS), default="filter", show_default=True)
@sample_options
@attack_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="stability.csv", show_default=True)
@data_options
@foreign_options
@common_options
def stability_command(checkpoint, init_arch, losses, lambdas, num_directions, ignore, direction_norm, split, n,
                      labels, threat, beta, chunk_size, output, dataset, data_dir, download, arch,
                      num_classes, normalize, device, batch_size, seed, quiet) -> None:
    """How per-sample gradients change along random directions (CHECKPOINT or --init ARCH).

    For each loss, direction k and lam: mean and std over the samples of
    ||grad J_i(theta + lam d_k) - grad J_i(theta)|| and of the cosine between the two gradients
    (Dong et al. 2022, Fig. 4(a), A.8). Writes one row per (loss, direction, lam): checkpoint,
    split, labels, loss, direction, lam, n, dist_mean, dist_std, cos_mean, cos_std.
    """

    set_determinism(seed)
    config = stability.StabilityConfig(
        losses=tuple(split_list(losses, "--losses")), lambdas=stability.parse_lambdas(lambdas),
        directions=num_directions, ignore=ignore, direction_norm=direction_norm,
        threat=threat, beta=beta, seed=seed,
    )
    if (checkpoint is None) == (init_arch is None):
        raise AtprobeError("give either a CHECKPOINT or --init ARCH (one of them)")
    ckpts: list[Checkpoint] = []
    extra: dict[str, Any] = {}
    if checkpoint is not None:
        ckpts = load_checkpoints([checkpoint], arch=arch, num_classes=num_classes, dataset=dataset,
                                 normalize=normalize, data_dir=data_dir)
        data = load_for_checkpoints(ckpts, dataset=dataset, data_dir=data_dir, download=download)
        samples = with_checkpoint_labels(_samples(data, split, n), ckpts[0], labels, split)
        model = prepare_model(ckpts[0].build_model(), device)
        name = str(ckpts[0].path)
    else:
        if arch is not None:
            raise AtprobeError("--arch names the architecture of foreign checkpoints; with --init give it as --init ARCH")
        arch_name = canonical_arch(init_arch)
        data = load_dataset(dataset or "synthetic", data_dir, download=download)
        if num_classes is not None and num_classes != data.num_classes:
            raise AtprobeError(f"--num-classes {num_classes} does not match dataset {data.name} "
                               f"({data.num_classes} classes)")
        norm_kwargs = {"mean": data.mean, "std": data.std} if normalize == "dataset" else {}
        base = _samples(data, split, n)
        samples = base.with_labels(base.true_y)  # a fresh model was trained on nothing
        model = prepare_model(stability.init_model(arch_name, data.num_classes, seed, **norm_kwargs), device)
        name = f"init:{arch_name}"
        extra = {"init": {"arch": arch_name, "seed": seed, "num_classes": data.num_classes, "normalize": normalize}}
    config = dataclasses.replace(config, chunk_size=_chunk(model, chunk_size, batch_size, copies=2))
    total = len(samples) * len(config.losses) * config.directions * len(config.lambdas)
    with progress(total, f"stability {name}", quiet) as bar:
        table = stability.probe(model, samples, config, progress=bar)
    table.insert(0, "labels", labels if checkpoint is not None else "true")
    table.insert(0, "split", split)
    table.insert(0, "checkpoint", name)
    write_table(table, output, run_meta(seed=seed, checkpoints=ckpts, extra=extra, config={
        **_config_meta(config), "split": split, "n": len(samples), "labels": labels, "batch_size": batch_size,
        "device": str(device), "dataset": data.name,
    }))
    _echo(table, output, quiet)


# ---------------------------------------------------------------------------- gradcos

GRADCOS_EXAMPLES = """
\b
Examples:
  atprobe gradcos runs/pgd -o gradcos.csv                 # epoch_*.pt (+ final.pt) of a run, Fig. 4(b)
  atprobe gradcos e10.pt e20.pt e30.pt --loss trades --n 500
"""


def _stub(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint without its weights (metadata, labels, hash): many can be held at once."""
    return dataclasses.replace(ckpt, state_dict={}, raw={})


def _ordered_stubs(paths: tuple[str, ...], load: Callable[[Path], Checkpoint]) -> list[Checkpoint]:
    """RUN_DIR (its epoch_*.pt, and final.pt if its epoch is new) or explicit CKPTs, by epoch."""
    dirs = [p for p in paths if Path(p).is_dir()]
    if dirs:
        if len(paths) != 1:
            raise AtprobeError("give one RUN_DIR or two or more checkpoint files, not a mix")
        files, final = gradcos.run_checkpoints(dirs[0])
        stubs = [_stub(load(p)) for p in files]
        if final is not None:
            last = _stub(load(final))
            if last.epoch not in {s.epoch for s in stubs}:
                stubs.append(last)
        if len(stubs) < 2:
            raise AtprobeError(f"{dirs[0]}: gradcos needs at least two checkpoints (epoch_*.pt, final.pt), "
                               f"found {len(stubs)}")
    else:
        if len(paths) < 2:
            raise AtprobeError(f"gradcos needs at least two checkpoints (or a run directory), got {len(paths)}")
        stubs = [_stub(load(Path(p))) for p in paths]
    stubs = gradcos.order_by_epoch(stubs)
    archs = {s.arch for s in stubs}
    if len(archs) > 1:
        raise AtprobeError(f"the checkpoints have different architectures ({', '.join(sorted(archs))})")
    classes = {s.num_classes for s in stubs}
    if len(classes) > 1:
        raise AtprobeError(f"the checkpoints have different numbers of classes ({', '.join(map(str, sorted(classes)))})")
    return stubs


@click.command("gradcos", epilog=GRADCOS_EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--loss", type=click.Choice(OBJECTIVES), default="pgd_at", show_default=True,
              help="The objective whose per-sample gradients are compared.")
@sample_options
@attack_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="gradcos.csv", show_default=True)
@data_options
@foreign_options
@common_options
def gradcos_command(checkpoints, loss, split, n, labels, threat, beta, chunk_size, output,
                    dataset, data_dir, download, arch, num_classes, normalize, device, batch_size, seed,
                    quiet) -> None:
    """Cosine of per-sample gradients between successive checkpoints (RUN_DIR or CKPT CKPT ...).

    Checkpoints are ordered by epoch. For each successive pair: mean and std over a fixed sample
    set of cos(grad J_i(theta_t), grad J_i(theta_t+1)), each checkpoint with its own buffers and
    adversarial examples (Dong et al. 2022, Fig. 4(b)). Writes one row per pair: checkpoint_a,
    checkpoint_b, epoch_a, epoch_b, split, labels, pair, loss, n, cos_mean, cos_std, dist_mean, dist_std.
    """

    set_determinism(seed)
    config = gradcos.GradCosConfig(loss=loss, threat=threat, beta=beta, seed=seed)
    load = checkpoint_loader(arch=arch, num_classes=num_classes, dataset=dataset, normalize=normalize,
                             data_dir=data_dir)
    stubs = _ordered_stubs(checkpoints, load)
    data = load_for_checkpoints(stubs, dataset=dataset, data_dir=data_dir, download=download)
    base = _samples(data, split, n)
    samples = with_checkpoint_labels(base, stubs[0], labels, split)
    for s in stubs[1:]:
        if not torch.equal(with_checkpoint_labels(base, s, labels, split).y, samples.y):
            raise AtprobeError(f"{s.path} was trained on other labels than {stubs[0].path}: use --labels true")
    chunk: list[int] = []

    def models():
        for s in stubs:
            ckpt = load(s.path)
            if ckpt.sha256 != s.sha256:
                raise AtprobeError(f"{s.path} changed while gradcos was running")
            model = prepare_model(ckpt.build_model(), device)
            del ckpt
            if not chunk:
                chunk.append(_chunk(model, chunk_size, batch_size, copies=2))
            yield model

    gen = models()
    head = next(gen)  # the first model fixes the chunk size before the config is made
    config = dataclasses.replace(config, chunk_size=chunk[0])

    def chained():
        yield head
        yield from gen

    with progress(len(samples) * (len(stubs) - 1), "gradcos", quiet) as bar:
        table = gradcos.probe(chained(), samples, config, names=[str(s.path) for s in stubs],
                              epochs=[s.epoch for s in stubs], progress=bar)
    table.insert(5, "labels", labels)
    table.insert(5, "split", split)
    write_table(table, output, run_meta(seed=seed, checkpoints=stubs, config={
        **_config_meta(config), "split": split, "n": len(samples), "labels": labels, "batch_size": batch_size,
        "device": str(device), "dataset": data.name,
    }))
    _echo(table, output, quiet)
