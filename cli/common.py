"""Options and helpers every command shares (click conventions: typed options, help text)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import click
from tqdm import tqdm

from atprobe import bnstats
from atprobe.data import CORRUPTIONS, PROBE_DATASETS
from atprobe.errors import SEED_MAX, AtprobeError
from atprobe.outputs import check_outputs, table_files
from atprobe.runtime import resolve_device
from atprobe.study import DEFAULT_N, LABEL_MODES, SPLITS, DataSource, ModelSource, SampleSpec, check_labels_option
from atprobe.threat import NORMS, STARTS, ThreatModel


class Number(click.ParamType):
    """A float that may be written as a fraction: ``8/255``, ``0.5``, ``1e-3``."""

    name = "number"

    def convert(self, value: Any, param, ctx) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip()
        try:
            number = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a number (examples: 8/255, 0.031, 1e-3)", param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


NUMBER = Number()

#: ``--seed`` and every other seed option: an integer in [0, 2**63) (``atprobe.errors.SEED_MAX``), the
#: range torch, numpy and ``atprobe.starts`` all accept one to one.
SEED = click.IntRange(0, SEED_MAX)
#: The largest value of every count option (``--steps``, ``--restarts``, ``--epochs``, ``--directions``,
#: ``--iterations``, ``--top-k``, ``--batch-size``, ``--n``, ...): 2**31 - 1, so that a typo such as 10**30
#: is a usage error before any work, not an overflow deep inside torch or a loop that never ends.
COUNT_MAX = 2**31 - 1


def count(min: int | None = None) -> click.IntRange:
    """The type of a count option: an integer in ``[min, COUNT_MAX]`` (``min=None``: the library's
    own check says what is too small, as it does for the same field in a config)."""
    return click.IntRange(min, COUNT_MAX)


class Device(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, resolved and checked at parse time
    (``atprobe.runtime.resolve_device``): the command receives a ``torch.device``, or with
    ``keep_spec`` the checked spec as written (the demo shows it in its commands)."""

    name = "device"

    def __init__(self, keep_spec: bool = False) -> None:
        self.keep_spec = keep_spec

    def convert(self, value: Any, param, ctx):
        import torch

        if isinstance(value, torch.device):
            return value
        try:
            device = resolve_device(str(value))
        except AtprobeError as exc:
            self.fail(str(exc), param, ctx)
        return str(value).strip().lower() if self.keep_spec else device


class Labels(click.ParamType):
    """``trained``, ``true`` or ``FILE.npy`` (``atprobe.study.check_labels_option``), a usage error otherwise;
    the file itself is read and checked by ``atprobe.study.SampleSpec``."""

    name = "labels"

    def convert(self, value: Any, param, ctx) -> str:
        try:
            return str(check_labels_option(value))
        except AtprobeError as exc:
            self.fail(str(exc), param, ctx)


def device_option(func: Callable | None = None, *, keep_spec: bool = False,
                  help: str = "Where to compute; auto = first GPU if any, else CPU.") -> Callable:
    """``--device``: the one declaration of it (see :class:`Device`)."""

    def decorate(f: Callable) -> Callable:
        return click.option("--device", type=Device(keep_spec), default="auto", show_default=True,
                            metavar="auto|cpu|cuda[:N]", help=help)(f)

    return decorate(func) if func is not None else decorate


def threat_options(func: Callable | None = None, *, steps_help: str = "PGD steps.") -> Callable:
    """``--norm --eps --alpha --steps --restarts --start``, built into one
    ``atprobe.threat.ThreatModel`` passed as the ``threat`` argument. The same defaults in
    every command: L-inf, eps 8/255 (128/255 for L2), step eps/4, 10 steps, 1 restart,
    the loss's own start."""

    def decorate(f: Callable) -> Callable:
        @click.option("--norm", type=click.Choice(NORMS), default="linf", show_default=True,
                      help="Threat model: the L-inf or L2 ball.")
        @click.option("--eps", type=NUMBER, default=None,
                      help="Radius in [0,1] pixel units (default 8/255 for linf, 128/255 for l2).")
        @click.option("--alpha", type=NUMBER, default=None, help="PGD step size (default eps/4).")
        @click.option("--steps", type=count(0), default=10, show_default=True, help=steps_help)
        @click.option("--restarts", type=count(1), default=1, show_default=True,
                      help="Random starts per sample; the one of highest loss is kept.")
        @click.option("--start", type=click.Choice(STARTS), default="auto", show_default=True,
                      help="Random start: auto = uniform for CE/CW, 0.001 N(0, I) for TRADES' KL.")
        @functools.wraps(f)
        def wrapper(*args, norm, eps, alpha, steps, restarts, start, **kwargs):
            threat = ThreatModel(norm=norm, eps=eps, alpha=alpha, steps=steps, restarts=restarts, start=start)
            return f(*args, threat=threat, **kwargs)

        return wrapper

    return decorate(func) if func is not None else decorate


def common_options(func: Callable) -> Callable:
    """``--device``, ``--batch-size``, ``--seed``, ``--quiet``."""

    @device_option
    @click.option("--batch-size", type=count(1), default=256, show_default=True,
                  help="Samples per batch.")
    @click.option("--seed", type=SEED, default=0, show_default=True,
                  help="Seeds every random choice; same seed on the CPU, same CSV.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def data_options(func: Callable) -> Callable:
    """``--dataset``, ``--data-dir``, ``--download``, ``--corruption``, ``--severity``: one
    ``atprobe.study.DataSource`` passed as ``data``."""

    @click.option("--dataset", type=click.Choice(PROBE_DATASETS), default=None,
                  help="Dataset to use (default: the one the checkpoints record); cifar10c/cifar100c: "
                       "CIFAR-10-C/CIFAR-100-C (--corruption, --severity).")
    @click.option("--data-dir", type=click.Path(), default=None,
                  help="Where datasets live (default $ATPROBE_DATA_DIR or ~/.cache/atprobe/data); "
                       "for npz, the .npz file, a folder with train.npz/test.npz, or an image .npy "
                       "with its labels beside it (cifar10_X.npy + cifar10_Y.npy).")
    @click.option("--download", is_flag=True, help="Fetch a missing dataset (MD5-verified).")
    @click.option("--corruption", default=None, metavar="NAME",
                  help=f"cifar10c/cifar100c: the corruption, one of {', '.join(CORRUPTIONS)}.")
    @click.option("--severity", type=int, default=None, metavar="1..5",
                  help="cifar10c/cifar100c: the severity, 1 (mild) to 5.")
    @functools.wraps(func)
    def wrapper(*args, dataset, data_dir, download, corruption, severity, **kwargs):
        return func(*args, data=DataSource(dataset, data_dir, download, corruption, severity), **kwargs)

    return wrapper


def foreign_options(func: Callable) -> Callable:
    """How to read checkpoints that atprobe did not write: one ``atprobe.study.ModelSource``
    passed as ``models``."""

    @click.option("--arch", default=None, metavar="NAME",
                  help="Architecture of foreign checkpoints (bare state_dicts), e.g. wrn-34-10; auto = "
                       "inferred from the keys and shapes (the choice is printed and recorded).")
    @click.option("--num-classes", type=click.IntRange(2, COUNT_MAX), default=None,
                  help="Classes of foreign checkpoints (default: read off the classifier weights).")
    @click.option("--normalize", type=click.Choice(["none", "dataset"]), default="none", show_default=True,
                  help="Input normalization for foreign checkpoints: none = the weights take [0,1] "
                       "images (TRADES, MART, AWP); dataset = subtract the dataset mean, divide by std. "
                       "A file that saved its own (mu/sigma, mean/std) uses that.")
    @functools.wraps(func)
    def wrapper(*args, arch, num_classes, normalize, **kwargs):
        return func(*args, models=ModelSource(arch, num_classes, normalize), **kwargs)

    return wrapper


def sample_options(func: Callable | None = None, *, split: str = "train", default_n: int | None = DEFAULT_N,
                   all_flag: bool = False) -> Callable:
    """``--split``, ``--n`` (and ``--all``), ``--labels``: one ``atprobe.study.SampleSpec``
    passed as ``samples``."""

    def decorate(f: Callable) -> Callable:
        what = "the whole split" if default_n is None else f"{default_n}, or the whole split if smaller"

        @click.option("--split", type=click.Choice(SPLITS), default=split, show_default=True,
                      help="Which split the samples come from.")
        @click.option("--n", type=count(), default=None, help=f"The first N samples of the split (default {what}).")
        @click.option("--labels", type=Labels(), default="trained", show_default=True,
                      metavar="|".join(LABEL_MODES) + "|FILE.npy",
                      help="On train/val: the labels the checkpoint was trained on, the true ones, or those of "
                           "a .npy file with one label per train image (e.g. memorization-AT's noisy_label.npy).")
        @functools.wraps(f)
        def wrapper(*args, split, n, labels, all_samples=False, **kwargs):
            if all_samples and n is not None:
                raise AtprobeError("give --n N or --all, not both")
            spec = SampleSpec(split=split, n=n, labels=labels, default_n=None if all_samples else default_n)
            return f(*args, samples=spec, **kwargs)

        if all_flag:
            wrapper = click.option("--all", "all_samples", is_flag=True, help="Probe the whole split.")(wrapper)
        return wrapper

    return decorate(func) if func is not None else decorate


#: The help of ``--attack`` in the commands that evaluate accuracy (names: ``atprobe.attacks.parse_attack``).
ATTACK_HELP = ("Comma-separated: natural, fgsm, fgsm_rs, pgdK (K steps on CE), cwK (K steps on the CW margin), "
               "optional xR for R restarts (pgd50x5); pgd, cw: --steps/--restarts; AutoAttack (pip install "
               "'atprobe[autoattack]'): aa, aa-plus, apgd-ce, apgd-t, fab-t, square.")


def eval_options(func: Callable | None = None, *, attacks: str = "natural,pgd10") -> Callable:
    """The options of a command that evaluates accuracy: ``--attack`` (default ``attacks``),
    the samples (``sample_options``: the test split, all of it), the threat model
    (``threat_options``) and ``--amp``. Passes ``samples``, ``threat`` and ``config``, an
    ``atprobe.evaluate.EvalConfig`` of the attacks parsed against the threat model with
    ``--batch-size`` and ``--seed`` (``common_options``, declared below this decorator)."""

    def decorate(f: Callable) -> Callable:
        @click.option("--attack", "attacks", default=attacks, show_default=True, help=ATTACK_HELP)
        @sample_options(split="test", default_n=None)
        @threat_options(steps_help="PGD steps of the attacks named without a count (pgd, cw).")
        @click.option("--amp/--no-amp", default=False, show_default=True,
                      help="bf16 autocast on CUDA (faster; the paper's numbers are float32, the default).")
        @functools.wraps(f)
        def wrapper(*args, attacks, threat, amp, batch_size, seed, **kwargs):
            from atprobe.attacks import parse_attack
            from atprobe.evaluate import EvalConfig

            specs = tuple(parse_attack(a, threat) for a in split_list(attacks, "--attack"))
            config = EvalConfig(attacks=specs, batch_size=batch_size, seed=seed, amp=amp)
            return f(*args, threat=threat, config=config, batch_size=batch_size, seed=seed, **kwargs)

        return wrapper

    return decorate(func) if func is not None else decorate


class BNStatsType(click.ParamType):
    """``running``, ``recompute[:N]``, ``batch`` or ``auto``, parsed into an
    ``atprobe.bnstats.BNStats`` at parse time (a usage error otherwise)."""

    name = "bn-stats"

    def convert(self, value: Any, param, ctx) -> bnstats.BNStats:
        try:
            return bnstats.BNStats.parse(value)
        except AtprobeError as exc:
            self.fail(str(exc), param, ctx)


def bn_stats_option(func: Callable | None = None, *, batch: bool = True) -> Callable:
    """``--bn-stats``: the BatchNorm statistics a per-sample probe normalizes with
    (``atprobe.bnstats``), passed as ``bn_stats``. ``batch=False``: the probe refuses
    ``batch`` (said in the help)."""

    def decorate(f: Callable) -> Callable:
        modes = "running|recompute[:N]|batch|auto" if batch else "running|recompute[:N]|auto"
        more = (" batch: each chunk's own batch statistics (per-sample gradients through them; depends on the "
                "chunk size)." if batch else "")
        return click.option(
            "--bn-stats", type=BNStatsType(), default="auto", show_default=True, metavar=modes,
            help=f"BatchNorm statistics: running = the model's buffers; recompute[:N] = re-estimated exactly on "
                 f"N training images (default {bnstats.DEFAULT_N}, drawn by --seed, no augmentation);{more} auto = "
                 "recompute when the buffers are fresh (a model at init), else running.")(f)

    return decorate(func) if func is not None else decorate


def attack_options(func: Callable) -> Callable:
    """The gradient probes' attack options: the threat model (``threat_options``), TRADES'
    ``--beta`` and the per-sample-gradient ``--chunk-size``."""

    @threat_options
    @click.option("--beta", type=NUMBER, default=6.0, show_default=True, help="TRADES' weight on the KL term.")
    @click.option("--chunk-size", type=count(1), default=None,
                  help="Samples per per-sample-gradient chunk (memory: chunk x parameters floats). Default: "
                       "--batch-size, capped to fit 4 GiB on the CPU or a quarter of the GPU's memory.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def command_inputs(kwargs: Mapping[str, Any], inputs: str) -> list:
    """What a command reads, from its parameters: the ``inputs`` argument (``CKPT | RUN_DIR``
    paths, one or several) and ``--data-dir``."""
    given = kwargs.get(inputs)
    found = [given] if isinstance(given, str) else list(given or ())
    data = kwargs.get("data")
    found.append(kwargs.get("data_dir", getattr(data, "data_dir", None)))
    return found


def output_option(default: str, *, inputs: str = "checkpoints", siblings: Mapping[str, str] | None = None) -> Callable:
    """``--output/-o FILE``, the main table, and before the command runs the output rule
    (``atprobe.outputs.check_outputs``) over every file it will write: OUTPUT, its
    .meta.json and each sibling table of ``siblings`` (flag parameter -> suffix, e.g.
    ``{"per_sample": ".samples"}``) whose flag is on, against what the command reads
    (:func:`command_inputs` of the ``inputs`` parameter)."""
    siblings = dict(siblings or {})

    def decorate(f: Callable) -> Callable:
        @click.option("--output", "-o", type=click.Path(dir_okay=False), default=default, show_default=True)
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            suffixes = [suffix for flag, suffix in siblings.items() if kwargs.get(flag)]
            check_outputs(table_files(kwargs["output"], suffixes), command_inputs(kwargs, inputs))
            return f(*args, **kwargs)

        return wrapper

    return decorate


def scale_options(func: Callable) -> Callable:
    """``--shard I/N``, and the ``torchrun`` job when there is one: one
    ``atprobe.distributed.SampleShare`` passed as ``share`` (the whole run in one process;
    this rank's share of a ``torchrun`` job, whose ``device`` becomes its local GPU; or part
    I of N independent parts), docs/scaling.md. Declared above ``common_options`` (it reads ``device``)."""

    @click.option("--shard", default=None, metavar="I/N",
                  help="Compute part I (0-based) of N and write it alone, for job arrays; join the parts with "
                       "atprobe merge. eval, hardness, gradnorm, curvature: a share of the samples (whole "
                       "batches); stability, gradcos, flatness: whole directions, pairs or grid points on every "
                       "sample. Under torchrun the ranks split the work themselves.")
    @functools.wraps(func)
    def wrapper(*args, shard, device, **kwargs):
        from atprobe.distributed import SampleShare, world_size

        if shard is not None:
            if world_size() > 1:
                raise AtprobeError("--shard splits the samples into independent runs: not under torchrun, whose "
                                   "ranks split them already")
            return func(*args, share=SampleShare.parse(shard), device=device, **kwargs)
        share, device = _rank_share(device)
        return func(*args, share=share, device=device, **kwargs)

    return wrapper


def rank_options(func: Callable) -> Callable:
    """The ``torchrun`` job when there is one, for the commands that split their samples (or
    grid points) across ranks but take no ``--shard`` part: ``share`` is this rank's
    ``atprobe.distributed.SampleShare`` (all of the work in one process) and ``device`` its
    local GPU. Declared above ``common_options`` (it reads ``device``)."""

    @functools.wraps(func)
    def wrapper(*args, device, **kwargs):
        share, device = _rank_share(device)
        return func(*args, share=share, device=device, **kwargs)

    return wrapper


def _rank_share(device: str):
    """This process's ``SampleShare`` of the ``torchrun`` job (joined here) and its device."""
    from atprobe.distributed import SampleShare, probe_context

    ctx, resolved = probe_context(device)
    return SampleShare.of(ctx), resolved


def main_process() -> bool:
    """Whether this process prints (rank 0 of a ``torchrun`` job, or the only one)."""
    from atprobe.distributed import is_main_process

    return is_main_process()


def bars(quiet: bool) -> Callable[[int, str], tqdm]:
    """The progress factory of ``atprobe.study``: a bar per call (silent when ``quiet``, and on
    every rank of a ``torchrun`` job but 0)."""
    quiet = quiet or not main_process()
    return lambda total, desc: progress(total, desc, quiet)


def finish(tables, output: str, quiet: bool) -> None:
    """Write ``tables`` (``atprobe.study.Tables``) to ``output`` and echo the shown part (rank 0)."""
    tables.write(output)
    if not quiet and main_process():
        shown = tables.main if tables.shown is None else tables.shown
        click.echo(shown.to_string(index=False), err=True)
        click.echo(f"wrote {output}", err=True)


def progress(total: int, desc: str, quiet: bool) -> tqdm:
    """A progress bar on stderr, silent when asked or when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def split_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise AtprobeError(f"{what}: give at least one, comma-separated")
    return items
