"""``atprobe complexity``: norm-based, margin, curvature and flatness measures of many
checkpoints side by side with their generalization gaps (Dong et al. 2022, Fig. 6;
docs/probes/complexity.md)."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli import common
from atprobe.cli.common import (
    NUMBER,
    bars,
    common_options,
    data_options,
    finish,
    foreign_options,
    output_option,
    rank_options,
    threat_options,
)
from atprobe.probes import complexity
from atprobe.runtime import set_determinism
from atprobe.study import DEFAULT_N, Study

EXAMPLES = """
\b
Examples:
  atprobe complexity runs/*/final.pt --margin -o complexity.csv          # Fig. 6: every measure
  atprobe complexity runs/pgd --measures spectral,l1,gap --margin --n 500 # a run dir: its epoch_*.pt, final.pt
  atprobe complexity a.pt --measures spectral --spectral-method reshape --no-fold-bn
  atprobe complexity a.pt --measures margin --margin-on clean --margin-quantile 0.05
"""


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
@click.option("--n", type=common.count(), default=None,
              help=f"Samples of train and of test for the data-dependent measures (default {DEFAULT_N}, or the "
                   "whole split if smaller).")
@threat_options(steps_help="PGD steps of the margin's, the robust accuracies' and the landscape measures' attack.")
@output_option("complexity.csv")
@data_options
@foreign_options
@rank_options
@common_options
def complexity_command(checkpoints, measures, divide, margin_quantile, margin_on, spectral_method, fold_bn, n,
                       threat, output, data, models, device, batch_size, seed, quiet, share) -> None:
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
        margin=divide, margin_quantile=margin_quantile, margin_on=margin_on, threat=threat, batch_size=batch_size,
        seed=seed)
    for measure in config.measures:  # a missing optional module fails before any work
        if measure in complexity.EXTERNAL:
            complexity.external_module(measure)
    finish(studies.complexity(Study(checkpoints, models, data, share=share), config, device, n=n, progress=bars(quiet)),
           output, quiet)
