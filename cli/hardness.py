"""``atprobe hardness``: per-sample adversarial loss of several models and how consistently
they rank the samples (Dong et al., ICLR 2022, Sec. 4.1, Fig. 7(c), C.2, C.3;
docs/probes/hardness.md)."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli.common import (
    bars,
    common_options,
    count,
    data_options,
    foreign_options,
    main_process,
    sample_options,
    scale_options,
    threat_options,
)
from atprobe.errors import AtprobeError
from atprobe.outputs import check_outputs
from atprobe.plot import parse_size
from atprobe.probes import hardness
from atprobe.runtime import set_determinism
from atprobe.study import Study

EXAMPLES = """
\b
Examples:
  atprobe hardness seed0/final.pt seed1/final.pt --n 5000 --out hard        # two seeds
  atprobe hardness runs/*/best.pt --split train --all --out hard_all         # all pairs, whole split
  atprobe hardness runs/pgd_at --top-k 500 --gallery-k 12 --out hard_run     # every *.pt of a directory
  atprobe hardness a.pt wrn.pt --arch wrn-34-10 --dataset cifar10 --labels true --out hard_arch
  torchrun --standalone --nproc_per_node 4 -m atprobe.cli.main -- hardness a.pt b.pt --n 5000 --out hard
  atprobe hardness a.pt b.pt --n 5000 --shard 1/4 --out part1   # atprobe merge part*/per_sample.csv -o hard
"""


@click.command("hardness", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@sample_options(all_flag=True)
@click.option("--attack", default="pgd10", show_default=True,
              help="pgdK (K steps on CE), cwK, xR for R restarts, fgsm, fgsm_rs, or natural (clean loss).")
@threat_options(steps_help="PGD steps of --attack pgd / cw (named without a count).")
@click.option("--top-k", type=count(), default=100, show_default=True,
              help="k of the top-k overlap (capped at the number of samples).")
@click.option("--gallery-k", type=count(), default=10, show_default=True,
              help="Samples in hardest.png (the hardest by mean rank).")
@click.option("--gallery-size", default=None, metavar="WxH",
              help="Pixel size of hardest.png (default 110 px per sample x 320).")
@click.option("--amp", is_flag=True, help="bf16 autocast on CUDA (faster, inexact losses).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="hardness", show_default=True,
              help="Directory for per_sample.csv, consistency.csv (each with .meta.json), hardest.png, sorted.png.")
@data_options
@foreign_options
@scale_options
@common_options
def hardness_command(checkpoints, samples, attack, threat, top_k, gallery_k, gallery_size, amp, out_dir, data,
                     models, device, batch_size, seed, quiet, share) -> None:
    """Per-sample adversarial loss of CHECKPOINTS (two or more, or a directory) and how
    consistently they rank the samples.

    Every model is attacked by its own PGD on the same samples (same random start per
    sample). Writes to --out: per_sample.csv (index, label, true_label, model, adv_loss,
    adv_correct, rank; rank 1 = hardest), consistency.csv (one row per pair: model_a, model_b, n,
    kendall_tau, kendall_p, spearman_rho, spearman_p, top_k, top_k_overlap), hardest.png
    (Fig. C.3) and sorted.png (Fig. 7(c)). Model names are the paths relative to their
    common folder. With --shard I/N, --out gets part I's per_sample.csv alone (no ranks,
    no figures): atprobe merge joins the parts.
    """
    check_outputs(studies.hardness_files(out_dir), [*checkpoints, data.data_dir], option="--out", directories=[out_dir])
    set_determinism(seed)
    if top_k < 1:
        raise AtprobeError(f"--top-k must be >= 1, got {top_k}")
    size = parse_size(gallery_size) if gallery_size is not None else None
    config = hardness.HardnessConfig(attack=attack, threat=threat, batch_size=batch_size, seed=seed, top_k=top_k,
                                     amp=amp)
    study = Study(checkpoints, models, data, share=share)
    tables, figures, notes = studies.hardness(study, samples, config, device, gallery_k=gallery_k, gallery_size=size,
                                              progress=bars(quiet))
    studies.write_hardness(out_dir, tables, figures)
    if not quiet and main_process():
        for note in notes:
            click.echo(note, err=True)
        click.echo(tables.main.to_string(index=False), err=True)
        written = ("per_sample.csv (a part)" if figures is None
                   else "per_sample.csv, consistency.csv, hardest.png, sorted.png")
        click.echo(f"wrote {out_dir}/: {written}", err=True)
