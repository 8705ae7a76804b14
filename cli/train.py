"""``atprobe train``: adversarial training that writes a run directory."""

from __future__ import annotations

import click
from click.core import ParameterSource

from atprobe.cli.common import NUMBER, SEED, count, device_option, threat_options
from atprobe.data import DATASETS
from atprobe.presets import listing, options_config
from atprobe.train import ATTACK_MODES, METHODS, OPTIMIZERS, RAMPS, SCHEDULES, TE_TRADES_INPUTS, TrainConfig, train

EXAMPLES = """
\b
Examples:
  atprobe train --method pgd_at --epochs 10 --out runs/pgd           # cnn-small on synthetic data
  atprobe train --method trades --label-noise 1.0 --out runs/trades_random
  atprobe train --arch resnet18 --dataset cifar10 --download --method pgd_at \\
      --epochs 200 --te --out runs/pgd_te                                 # the paper's setting
  atprobe train --method pgd_at --mix-clean --mix-epochs 50 --out runs/mix
  atprobe train --preset table1-cifar10-pgd-te --download --out runs/t1   # a paper setting by name
  atprobe train --preset fig2-trades-random --epochs 50 --out runs/f2      # explicit options win
  atprobe train --list-presets
  atprobe train --resume runs/pgd                                          # continue after a stop
  atprobe train --arch resnet18 --dataset cifar10 --extra-data 1m.npz --extra-fraction 0.7 --out runs/gen
"""

D = TrainConfig()


def _list_presets(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(listing(), nl=False)
        ctx.exit(0)


def _given(ctx: click.Context) -> set[str]:
    """The TrainConfig fields the user gave (command line or environment), not left at their defaults."""
    return {"compile" if p.name == "compile_" else p.name for p in ctx.command.params
            if ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


@click.command("train", epilog=EXAMPLES)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (config.json, curves.csv, final.pt, best.pt, last.pt, epoch_*.pt).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Continue an interrupted run (its config.json wins over other options).")
@click.option("--overwrite", is_flag=True,
              help="--out may hold a run: replace it, once the new run is complete (written to OUT.overwrite "
                   "until then; the old run stays intact if training stops).")
@click.option("--preset", default=None, metavar="NAME",
              help="A training setting of the paper by name (docs/presets.md); options given explicitly override it.")
@click.option("--list-presets", is_flag=True, is_eager=True, expose_value=False, callback=_list_presets,
              help="Print every preset (name, source, key fields) and exit.")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), default=None, metavar="CKPT",
              help="Start from this checkpoint's weights (same architecture; fresh optimizer, epoch 0).")
@click.option("--arch", default=D.arch, show_default=True, help="Architecture (see docs/models.md).")
@click.option("--dataset", type=click.Choice(DATASETS), default=D.dataset, show_default=True)
@click.option("--data-dir", type=click.Path(), default=None, help="Dataset folder (default $ATPROBE_DATA_DIR).")
@click.option("--download", is_flag=True, help="Fetch a missing dataset (MD5-verified).")
@click.option("--method", type=click.Choice(METHODS), default=D.method, show_default=True)
@click.option("--epochs", type=count(), default=D.epochs, show_default=True)
@click.option("--batch-size", type=count(), default=D.batch_size, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=D.optimizer, show_default=True,
              help="SGD (momentum, Nesterov) or Adam (betas 0.9, 0.999; PyTorch's defaults).")
@click.option("--lr", type=NUMBER, default=None, help="Initial learning rate (default 0.1 SGD, 1e-3 Adam).")
@click.option("--momentum", type=NUMBER, default=D.momentum, show_default=True, help="SGD momentum.")
@click.option("--nesterov/--no-nesterov", default=D.nesterov, show_default=True)
@click.option("--weight-decay", type=NUMBER, default=None, help="L2 weight decay (default 5e-4 SGD, 0 Adam).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=D.schedule, show_default=True,
              help="piecewise: lr x lr-decay at each milestone; cosine: to 0 at the last epoch.")
@click.option("--milestones", default=None, help="Comma-separated epochs (default 50%,75% of epochs).")
@click.option("--lr-decay", type=NUMBER, default=D.lr_decay, show_default=True)
@click.option("--augment/--no-augment", default=D.augment, show_default=True, help="Random crop (pad 4) + flip.")
@click.option("--dropout", type=NUMBER, default=D.dropout, show_default=True)
@click.option("--label-noise", type=NUMBER, default=D.label_noise, show_default=True,
              help="Symmetric label noise rate; 1.0 = completely random labels.")
@click.option("--label-seed", type=SEED, default=D.label_seed, show_default=True)
@threat_options(steps_help="PGD steps of the training attack.")
@click.option("--attack-mode", type=click.Choice(ATTACK_MODES), default=D.attack_mode, show_default=True,
              help="Model mode while crafting training examples.")
@click.option("--beta", type=NUMBER, default=D.beta, show_default=True, help="TRADES weight of the KL term.")
@click.option("--mix-clean", is_flag=True, help="Eq. 6: (1-g) CE(x) + g CE(x'), g ramping 0 -> 1.")
@click.option("--mix-epochs", type=count(), default=None, help="Epoch at which g reaches 1 (default epochs/2).")
@click.option("--mix-ramp", type=click.Choice(RAMPS), default=D.mix_ramp, show_default=True)
@click.option("--te", is_flag=True, help="Temporal ensembling (Eq. 7) on pgd_at or trades.")
@click.option("--te-eta", type=NUMBER, default=D.te_eta, show_default=True, help="Ensemble momentum.")
@click.option("--te-weight", type=NUMBER, default=None,
              help="Weight of the per-sample squared L2 distance at full ramp (default 300/classes, the "
                   "official code's 300 * mean over classes: 30 on CIFAR-10, 3 on CIFAR-100).")
@click.option("--te-start", type=count(), default=None,
              help="Epoch number (counting from 1) where the ramp and the ensemble start (default 45% of epochs).")
@click.option("--te-end", type=count(), default=None, help="Ramp end epoch (default 75% of epochs).")
@click.option("--te-trades-input", type=click.Choice(TE_TRADES_INPUTS), default=D.te_trades_input,
              show_default=True, help="TRADES+TE: outer TE term on the natural or adversarial prediction.")
@click.option("--label-smoothing", type=NUMBER, default=D.label_smoothing, show_default=True,
              help="Label smoothing s of the objective's CE terms (Pang et al. 2021): 1 - s on the label, s/(K-1) "
                   "on each other class; the attack keeps the hard labels.")
@click.option("--sat", is_flag=True, help="Self-adaptive training (Huang et al. 2020) on pgd_at or trades.")
@click.option("--sat-momentum", type=NUMBER, default=D.sat_momentum, show_default=True,
              help="SAT: t <- m t + (1 - m) softmax(f(x)).")
@click.option("--sat-start", type=count(), default=None,
              help="SAT: epoch number (from 1) where the targets start adapting (default 45% of epochs).")
@click.option("--swa-start", type=count(), default=None,
              help="Stochastic weight averaging after every epoch from this epoch number on; best.pt, final.pt "
                   "and the curves are then the averaged model (BatchNorm recomputed).")
@click.option("--teacher-robust", type=click.Path(exists=True, dir_okay=False), default=None, metavar="CKPT",
              help="Knowledge distillation (Chen et al. 2021): the adversarially trained teacher.")
@click.option("--teacher-natural", type=click.Path(exists=True, dir_okay=False), default=None, metavar="CKPT",
              help="Knowledge distillation: the standard-trained teacher.")
@click.option("--kd-temperature", type=NUMBER, default=D.kd_temperature, show_default=True)
@click.option("--kd-weights", default=",".join(f"{w:g}" for w in D.kd_weights), show_default=True,
              help="KD weights of the CE, the natural teacher's and the robust teacher's terms.")
@click.option("--awp-gamma", type=NUMBER, default=D.awp_gamma, show_default=True,
              help="Adversarial weight perturbation (Wu et al. 2020): layer-wise relative size (0: off).")
@click.option("--awp-warmup", type=count(), default=D.awp_warmup, show_default=True,
              help="AWP from this epoch (counting from 0) on.")
@click.option("--coteach", is_flag=True,
              help="Co-teaching adapted to PGD-AT (Han et al. 2018): two networks, each updated on the small-loss "
                   "samples the other picks; writes final_peer.pt and best_peer.pt too.")
@click.option("--forget-rate", type=NUMBER, default=D.forget_rate, show_default=True,
              help="Co-teaching: fraction of each batch dropped after the ramp.")
@click.option("--forget-gradual", type=count(), default=D.forget_gradual, show_default=True,
              help="Co-teaching: epochs of the ramp of the forget rate from 0.")
@click.option("--forget-exponent", type=NUMBER, default=D.forget_exponent, show_default=True)
@click.option("--val-size", type=count(), default=D.val_size, show_default=True, help="Hold out N train images.")
@click.option("--val-seed", type=SEED, default=D.val_seed, show_default=True)
@click.option("--train-n", type=count(), default=D.train_n, show_default=True,
              help="Train on the first N training samples only (0 = all).")
@click.option("--extra-data", type=click.Path(exists=True), default=None, metavar="FILE",
              help="Generated images and labels (.npz with image/label, uncompressed; or a folder with image.npy, "
                   "label.npy), memory-mapped and mixed into every batch (docs/training.md).")
@click.option("--extra-fraction", type=NUMBER, default=None,
              help="Share of each batch from --extra-data, in [0, 1): floor(batch x fraction) images (default 0.7).")
@click.option("--extra-budget-mb", type=NUMBER, default=None,
              help="Extra images up to this size are kept on the device, larger ones streamed from the file "
                   "(default: half the free GPU memory; a quarter of RAM on the CPU).")
@click.option("--eval-n", type=count(), default=D.eval_n, show_default=True,
              help="Test (and val) samples of the curves and of best.pt's selection (0 = the whole split).")
@click.option("--train-eval-n", type=count(), default=None,
              help="Training samples of the curves (0 = all; default --eval-n if given, else 1000).")
@click.option("--eval-attack", default=D.eval_attack, show_default=True,
              help="Robust metric of the curves and of best.pt (an eval attack name, e.g. pgd20).")
@click.option("--eval-every", type=count(), default=D.eval_every, show_default=True)
@click.option("--save-every", type=count(), default=D.save_every, show_default=True,
              help="Keep epoch_K.pt every K epochs.")
@click.option("--log-grad-ratio", type=count(), default=D.log_grad_ratio, show_default=True,
              help="Log gradient-norm ratios for the first N iterations (gradratio.csv).")
@click.option("--synthetic-seed", type=SEED, default=D.synthetic_seed, show_default=True)
@click.option("--amp/--no-amp", default=D.amp, show_default=True, help="bf16 autocast on CUDA.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@device_option
@click.option("--seed", type=SEED, default=D.seed, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No per-epoch lines.")
def train_command(out_dir, resume_dir, overwrite, milestones, kd_weights, device, quiet, compile_, preset,
                  **options) -> None:
    """Adversarially train a model and write a run directory."""
    if (out_dir is None) == (resume_dir is None):
        raise click.UsageError("give --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    if overwrite and resume_dir is not None:
        raise click.UsageError("--overwrite replaces the run in --out: give it with --out, not --resume")
    if milestones is not None:
        try:
            options["milestones"] = tuple(int(m) for m in milestones.split(",") if m.strip())
        except ValueError:
            raise click.BadParameter(f"{milestones!r} is not a comma-separated list of epochs",
                                     param_hint="--milestones") from None
    try:
        options["kd_weights"] = tuple(float(w) for w in kd_weights.split(","))
    except ValueError:
        raise click.BadParameter(f"{kd_weights!r} is not three comma-separated numbers",
                                 param_hint="--kd-weights") from None
    config = options_config(preset, {**options, "compile": compile_}, _given(click.get_current_context()))

    def report(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        if not quiet:
            text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            click.echo(f"epoch {epoch}/{epochs} {text}", err=True)

    resume = resume_dir is not None
    out = train(config, resume_dir if resume else out_dir, device=device, resume=resume, overwrite=overwrite,
                progress=report)
    if not quiet:
        click.echo(f"wrote {out}", err=True)
