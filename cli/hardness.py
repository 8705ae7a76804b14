"""``atprobe hardness``: per-sample adversarial loss of several models on the same samples and
the consistency of their hardness ranks (Dong et al. 2022, Sec. 4.1, Figs. 7(c), C.2, C.3).
Thin: parse options, call ``atprobe.probes.hardness``, write the tables and figures (see
docs/probes/hardness.md)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import click
import torch
from torch import nn

from atprobe.checkpoint import Checkpoint, load_checkpoint
from atprobe.errors import AtprobeError
from atprobe.inputs import (LABEL_MODES, SPLITS, checkpoint_loader, first_n, load_for_checkpoints, pick_split,
                            with_checkpoint_labels)
from atprobe.io import atomic_write_bytes, run_meta, write_table
from atprobe.plot import default_gallery_size, hardest_gallery, parse_size, png_bytes, sorted_loss_figure
from atprobe.probes import hardness
from atprobe.runtime import prepare_model, set_determinism

from atprobe.cli.common import common_options, data_options, foreign_options, progress, threat_options

#: Samples probed when neither --n nor --all is given (or the whole split, if it is smaller).
DEFAULT_N = 1000

EXAMPLES = """
\b
Examples:
  atprobe hardness seed0/final.pt seed1/final.pt --n 5000 --out hard        # two seeds
  atprobe hardness runs/*/best.pt --split train --all --out hard_all         # all pairs, whole split
  atprobe hardness runs/pgd_at --top-k 500 --gallery-k 12 --out hard_run     # every *.pt of a directory
  atprobe hardness a.pt wrn.pt --arch wrn-34-10 --dataset cifar10 --labels true --out hard_arch
"""


def _copies_of_epochs(found: Sequence[Path]) -> set[Path]:
    """``best.pt``/``final.pt`` of an ``atprobe train`` run directory that hold the weights of
    an ``epoch_NNNN.pt`` beside them (same recorded epoch): comparing a model with its own
    copy would add a pair with tau 1 to the table."""
    epochs = {int(q.stem[len("epoch_"):]) for q in found if q.stem.startswith("epoch_") and q.stem[6:].isdigit()}
    copies = set()
    for q in found:
        if q.name in ("best.pt", "final.pt") and epochs:
            try:
                epoch = load_checkpoint(q).epoch
            except AtprobeError:
                continue  # not one of ours: keep it, the loader will say what is wrong
            if epoch in epochs:
                copies.add(q)
    return copies


def checkpoint_paths(args: Sequence[str]) -> list[Path]:
    """The checkpoint files: each argument as given, a directory replaced by its ``*.pt``
    files (sorted by name; ``last.pt`` left out: the resume copy of the newest epoch; in a
    training run directory also ``best.pt``/``final.pt`` when an ``epoch_*.pt`` holds the
    same epoch)."""
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.pt") if q.name != "last.pt" and q.is_file())
            if not found:
                raise AtprobeError(f"{p}: no *.pt checkpoints in this directory (last.pt is left out)")
            copies = _copies_of_epochs(found) if (p / "config.json").is_file() else set()
            paths.extend(q for q in found if q not in copies)
        else:
            paths.append(p)
    return paths


def model_names(paths: Sequence[Path]) -> list[str]:
    """A short unique name per checkpoint: its path relative to the deepest folder that
    holds them all (``runs/a/best.pt``, ``runs/b/best.pt`` -> ``a/best.pt``, ``b/best.pt``;
    files of one folder -> their file names), with ``/`` separators."""
    absolute = [os.path.abspath(p) for p in paths]
    seen: dict[str, Path] = {}
    for a, p in zip(absolute, paths):
        if a in seen:
            raise AtprobeError(f"{p}: the same checkpoint is given twice")
        seen[a] = p
    if not absolute:
        return []
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    return [Path(os.path.relpath(a, common)).as_posix() for a in absolute]


class LazyModels(Mapping[str, nn.Module]):
    """name -> model, loaded, built and moved to the device on each access (never cached):
    ``hardness.per_sample_losses`` visits each once, so one model is in memory at a time."""

    def __init__(self, stubs: Mapping[str, Checkpoint], load: Callable[[Path], Checkpoint],
                 device: torch.device) -> None:
        self._stubs = dict(stubs)
        self._load = load
        self._device = device

    def __getitem__(self, name: str) -> nn.Module:
        stub = self._stubs[name]
        ckpt = self._load(stub.path)
        if ckpt.sha256 != stub.sha256:
            raise AtprobeError(f"{stub.path} changed while hardness was running")
        return prepare_model(ckpt.build_model(), self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stubs)

    def __len__(self) -> int:
        return len(self._stubs)


def _stub(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint without its weights (metadata, labels, hash)."""
    return dataclasses.replace(ckpt, state_dict={}, raw={})


def _check_same_data(stubs: Sequence[Checkpoint], dataset: str, split: str) -> list[str]:
    """One-line error if the checkpoints were trained on different synthetic data; notes
    (returned) if they carved different validation splits off the training set."""
    notes = []
    cfgs = [(s, s.train_config or {}) for s in stubs]
    if dataset == "synthetic":
        seeds = {int(c.get("synthetic_seed", 0) or 0) for _, c in cfgs}
        if len(seeds) > 1:
            raise AtprobeError(f"the checkpoints were trained on different synthetic data (synthetic seeds "
                               f"{', '.join(map(str, sorted(seeds)))}): they share no samples")
    carve = {(int(c.get("val_size", 0) or 0), int(c.get("val_seed", 0) or 0)) for _, c in cfgs}
    if len(carve) > 1 and split != "test":
        notes.append(f"note: the checkpoints carved different validation splits; the {split} split is "
                     f"{stubs[0].path}'s")
    return notes


def _labels_used(stub: Checkpoint, mode: str, split: str) -> str:
    """Which labels ``with_checkpoint_labels`` gives this checkpoint: ``trained`` or ``true``."""
    return "trained" if mode == "trained" and split != "test" and stub.labels is not None else "true"


@click.command("hardness", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True,
              help="Which split the samples come from.")
@click.option("--n", type=int, default=None,
              help=f"Probe the first N samples of the split (default {DEFAULT_N}, or the whole split if smaller).")
@click.option("--all", "all_samples", is_flag=True, help="Probe the whole split.")
@click.option("--labels", type=click.Choice(LABEL_MODES), default="trained", show_default=True,
              help="On train/val: each model's own trained labels (for its attack and its loss), or the true ones.")
@click.option("--attack", default="pgd10", show_default=True,
              help="pgdK (K steps on CE), cwK, xR for R restarts, fgsm, fgsm_rs, or natural (clean loss).")
@threat_options(steps_help="PGD steps of --attack pgd / cw (named without a count).")
@click.option("--top-k", type=int, default=100, show_default=True,
              help="k of the top-k overlap (capped at the number of samples).")
@click.option("--gallery-k", type=int, default=10, show_default=True,
              help="Samples in hardest.png (the hardest by mean rank).")
@click.option("--gallery-size", default=None, metavar="WxH",
              help="Pixel size of hardest.png (default 110 px per sample x 320).")
@click.option("--amp", is_flag=True, help="bf16 autocast on CUDA (faster, inexact losses).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="hardness", show_default=True,
              help="Directory for per_sample.csv, consistency.csv (each with .meta.json), hardest.png, sorted.png.")
@data_options
@foreign_options
@common_options
def hardness_command(checkpoints, split, n, all_samples, labels, attack, threat, top_k, gallery_k,
                     gallery_size, amp, out_dir, dataset, data_dir, download, arch, num_classes, normalize, device,
                     batch_size, seed, quiet) -> None:
    """Per-sample adversarial loss of CHECKPOINTS (two or more, or a directory) and how
    consistently they rank the samples.

    Every model is attacked by its own PGD on the same samples (same random start per
    sample). Writes to --out: per_sample.csv (index, label, true_label, model, adv_loss,
    adv_correct, rank; rank 1 = hardest), consistency.csv (one row per pair: model_a, model_b, n,
    kendall_tau, kendall_p, spearman_rho, spearman_p, top_k, top_k_overlap), hardest.png
    (Fig. C.3) and sorted.png (Fig. 7(c)). Model names are the paths relative to their
    common folder.
    """
    set_determinism(seed)
    if top_k < 1:
        raise AtprobeError(f"--top-k must be >= 1, got {top_k}")
    if gallery_k < 1:
        raise AtprobeError(f"--gallery-k must be >= 1, got {gallery_k}")
    if all_samples and n is not None:
        raise AtprobeError("give --n N or --all, not both")
    size = parse_size(gallery_size) if gallery_size is not None else None
    config = hardness.HardnessConfig(attack=attack, threat=threat, batch_size=batch_size,
                                     seed=seed, top_k=top_k, amp=amp)
    spec = config.spec

    paths = checkpoint_paths(checkpoints)
    if len(paths) < 2:
        raise AtprobeError(f"hardness compares at least two checkpoints (or a directory of them), got {len(paths)}")
    names = model_names(paths)
    load = checkpoint_loader(arch=arch, num_classes=num_classes, dataset=dataset, normalize=normalize,
                             data_dir=data_dir)
    stubs = {name: _stub(load(p)) for name, p in zip(names, paths)}
    classes = {name: s.num_classes for name, s in stubs.items()}
    if len(set(classes.values())) > 1:
        listed = ", ".join(f"{name}: {c}" for name, c in classes.items())
        raise AtprobeError(f"the checkpoints have different numbers of classes ({listed})")
    data = load_for_checkpoints(list(stubs.values()), dataset=dataset, data_dir=data_dir, download=download)
    notes = _check_same_data(list(stubs.values()), data.name, split)
    chosen = pick_split(data, split)
    if all_samples:
        base = chosen
    else:
        base = first_n(chosen, n if n is not None else min(DEFAULT_N, len(chosen)))
    samples = {name: with_checkpoint_labels(base, s, labels, split) for name, s in stubs.items()}
    used = {name: _labels_used(s, labels, split) for name, s in stubs.items()}
    differ = {name: int((samples[name].y != samples[name].true_y).sum()) for name in stubs}
    def why(name: str) -> str:
        if used[name] == "trained":
            return f" ({differ[name]} of {len(base)} differ from the true labels)"
        if labels == "true":
            return ""
        return " (test split)" if split == "test" else " (no stored training labels)"

    label_line = "labels: " + "; ".join(f"{name} {used[name]}{why(name)}" for name in stubs)
    if not quiet:
        for note in notes:
            click.echo(note, err=True)
        click.echo(f"hardness: {len(stubs)} models, {len(base)} {split} samples of {data.name}, {spec.name} "
                   f"({threat.describe()}); {label_line}", err=True)

    models = LazyModels(stubs, load, device)
    with progress(len(base) * len(stubs), "hardness", quiet) as bar:
        per_sample = hardness.per_sample_losses(models, samples, config, progress=bar)
    table = hardness.consistency(per_sample, top_k)
    first = names[0]
    top, top_samples = hardness.hardest_samples(samples[first], per_sample, gallery_k)
    adversarial = hardness.adversarial_examples(models[first], top_samples, config)
    gallery = hardest_gallery(top, top_samples, adversarial, attack=config.attack, class_names=data.class_names,
                              size=size, model_name=first)
    gallery_png = png_bytes(gallery)
    sorted_png = png_bytes(sorted_loss_figure(per_sample))

    out = Path(out_dir)
    meta_config = {
        **dataclasses.asdict(config), "attack_name": spec.name,
        "attack_config": None if spec.config is None else dataclasses.asdict(spec.config),
        "split": split, "n": len(base), "labels": labels, "gallery_k": gallery_k,
        "gallery_size": list(size or default_gallery_size(min(gallery_k, len(base)))),
        "device": str(device), "dataset": data.name,
    }
    extra = {"models": {name: str(s.path) for name, s in stubs.items()}, "labels_used": used,
             "labels_differing_from_true": differ}
    ckpts = list(stubs.values())
    write_table(per_sample, out / "per_sample.csv",
                run_meta(seed=seed, checkpoints=ckpts, config=meta_config, extra={**extra, "table": "per-sample"}))
    write_table(table, out / "consistency.csv",
                run_meta(seed=seed, checkpoints=ckpts, config=meta_config, extra={**extra, "table": "consistency"}))
    atomic_write_bytes(out / "hardest.png", gallery_png)
    atomic_write_bytes(out / "sorted.png", sorted_png)
    if not quiet:
        click.echo(table.to_string(index=False), err=True)
        click.echo(f"wrote {out}/: per_sample.csv, consistency.csv, hardest.png (against {first}), sorted.png",
                   err=True)
