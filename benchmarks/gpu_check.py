"""Every check only a GPU can do, in one run and one table (issue 19; run by ``benchmarks/gpu_check.sh``).

    bash benchmarks/gpu_check.sh                  # CUDA: every row, under 8 minutes on one GPU
    bash benchmarks/gpu_check.sh --device cpu     # the CPU rows for real, the GPU-only rows skipped (CI)

One row per check: ``check | status | value | threshold | note``, status ``pass``, ``fail`` or
``skip`` (the note says why). The exit status is 1 when any row that ran failed, else 0.

Checks (thresholds are the constants below; docs/benchmarks.md explains them):

* ``precision <path>``: a small model trained here (cnn-small, PGD-AT, synthetic data, through
  ``atprobe.train.train``) and loaded back through the study layer, evaluated on the same
  samples and keyed starts in float32 and in bf16: eval natural and PGD-10 (accuracy within
  ``MAX_ACC_DIFF_PP``, predictions flipped at most ``MAX_FLIPS``), and the two probes with a
  bf16 path, ``hardness`` (per-sample adversarial loss: Spearman rho >= ``MIN_RHO``, robust
  flags flipped <= ``MAX_FLIPS``) and ``complexity``'s margin (the same on the margins). bf16 on
  CUDA is atprobe's own ``amp=True``; on the CPU, where atprobe's autocast is a no-op, the
  whole call runs inside ``torch.autocast("cpu", torch.bfloat16)`` (``eval_precision.predictions``).
* ``channels_last <path>``: a forward hook on the model's first convolution sees a
  channels_last input and weight in every call of eval, a training epoch, ``stability`` and
  ``hessian``.
* ``bf16 in effect <path>`` (CUDA): the same hook sees bf16 outputs in every call of eval with
  ``amp=True`` and of a training epoch (``amp`` on by default); ``fp32 kept <probe>``: float32
  outputs in every call of the gradient probes (``stability``, ``hessian``), which never autocast.
* ``no host sync <loop>`` (CUDA): ``torch.cuda.set_sync_debug_mode("error")`` around a training
  epoch (``Trainer.epoch``), the attacked-batches loop of eval and hardness
  (``eval_precision.predictions``, which keeps predictions on the device), one chunk of
  ``stability``'s per-sample gradient distances and ``hessian``'s gradient graph with one product on it;
  each is run once before, so lazy initialization and cuDNN autotuning are not counted. A
  failure names the innermost atprobe frame that synchronized.
* ``peak memory <probe> wrn-28-10`` (CUDA): ``torch.cuda.max_memory_allocated`` of one
  ``stability`` chunk at the CLI's default chunk size (``auto_chunk_size(model, 256, copies=2)``:
  ``--batch-size`` 256 capped to a quarter of the GPU) and of ``hessian`` at its default batch
  (128 samples); at most ``MAX_MEMORY_FRACTION`` of the GPU's memory.
* ``img/s <path> resnet18`` (CUDA, bf16): PGD-10 eval (``evaluate``), PGD-AT training steps
  (``train_throughput.time_steps``), hardness (``hardness.per_sample_losses``); the achieved
  TFLOP/s (images/s x passes x forward FLOPs, ``preset_cost``) must reach ``--min-tflops``,
  a sanity floor (a broken fast path, e.g. a host sync per step, falls far below it).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _timing import add_machine_options, machine, sync, timed
from eval_precision import predictions
from hardness_speed import _growth, models_for, samples
from preset_cost import forward_flops, passes_per_training_image
from scipy import stats as scipy_stats
from torch import nn
from train_throughput import time_steps

from atprobe.attacks import parse_attack
from atprobe.data import iterate_batches, make_synthetic
from atprobe.directions import directions, model_parameters, perturbed_parameters
from atprobe.distributed import DistContext
from atprobe.errors import AtprobeError
from atprobe.evaluate import EvalConfig, evaluate
from atprobe.pergrad import per_sample_grad_distances
from atprobe.probes import complexity, hardness, hessian, stability
from atprobe.probes._gradutil import auto_chunk_size, make_objective, sample_batches
from atprobe.runtime import make_generator, prepare_model
from atprobe.study import SampleSpec, Study
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig, Trainer, train

#: bf16 against float32: accuracy within 1 percentage point, at most 2% of predictions (or
#: robust flags) flipped, per-sample losses and margins ranked alike (Spearman rho >= 0.98).
MAX_ACC_DIFF_PP = 1.0
MAX_FLIPS = 0.02
MIN_RHO = 0.98
#: Peak memory of a probe at its default chunk: at most 90% of the GPU (it must fit with room to spare).
MAX_MEMORY_FRACTION = 0.9
#: Default floor of the throughput rows, in achieved TFLOP/s (bf16); see the module docstring.
MIN_TFLOPS = 20.0
NEEDS_CUDA = "needs CUDA"

COLUMNS = ("check", "status", "value", "threshold", "note")


@dataclass
class Row:
    check: str
    status: str  # pass | fail | skip
    value: str = ""
    threshold: str = ""
    note: str = ""


@dataclass(frozen=True)
class Sizes:
    """How big each check is: tiny on the CPU (the CI run, < 60 s on 2 cores), real on CUDA."""

    train_n: int  # training images of the small trained model
    epochs: int
    train_steps: int  # PGD steps of its training attack
    eval_n: int  # test images of the eval precision checks
    probe_precision_n: int  # the first of them in the hardness and complexity precision checks
    probe_n: int  # samples of the stability/hessian layout checks
    speed_n: int  # images of the throughput rows
    speed_batch: int

    @classmethod
    def for_device(cls, device: torch.device) -> Sizes:
        if device.type == "cuda":
            return cls(train_n=4000, epochs=6, train_steps=5, eval_n=1000, probe_precision_n=1000, probe_n=64,
                       speed_n=4096, speed_batch=512)
        return cls(train_n=1024, epochs=5, train_steps=2, eval_n=400, probe_precision_n=200, probe_n=8,
                   speed_n=0, speed_batch=0)


def judged(check: str, ok: bool, value: str, threshold: str, note: str = "") -> Row:
    return Row(check, "pass" if ok else "fail", value, threshold, note)


def skipped(check: str, threshold: str, why: str = NEEDS_CUDA) -> Row:
    return Row(check, "skip", "", threshold, why)


# ---------------------------------------------------------------------------- the trained model


def trained_model(device: torch.device, sizes: Sizes, workdir: Path):
    """A cnn-small PGD-AT run on the synthetic data (``atprobe.train.train``), loaded back
    through the study layer as every command loads it: ``(study, checkpoint, model)``."""
    config = TrainConfig(arch="cnn-small", dataset="synthetic", method="pgd_at", epochs=sizes.epochs,
                         batch_size=128, schedule="cosine", threat=ThreatModel(steps=sizes.train_steps),
                         train_n=sizes.train_n, eval_n=100, train_eval_n=100, eval_attack="pgd3",
                         eval_every=sizes.epochs)  # curves only at the end: nothing here reads them
    run = train(config, workdir / "run", device=device)
    study = Study([str(run / "final.pt")])
    ckpt = study.checkpoints[0]
    return study, ckpt, study.model(ckpt, device).eval()


def held_out_samples(study: Study, ckpt, n: int, device: torch.device):
    spec = SampleSpec(split="test", n=n, default_n=None)
    return study.samples(ckpt, spec, study.base(spec)).to(device)


# ---------------------------------------------------------------------------- precision


@contextlib.contextmanager
def bf16_on(device: torch.device, bf16: bool) -> Iterator[bool]:
    """Yields the ``amp`` flag to pass to atprobe: on CUDA atprobe's own bf16 autocast; on the CPU
    (where atprobe's autocast is a no-op) an outer ``torch.autocast("cpu", bfloat16)``."""
    if bf16 and device.type == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield False
    else:
        yield bf16 and device.type == "cuda"


def precision_rows(model: nn.Module, split, probe_n: int, device: torch.device) -> list[Row]:
    rows = []
    y = split.y.to(device)
    for name in ("natural", "pgd10"):
        spec = parse_attack(name)
        pred = {bf16: predictions(model, split, spec, seed=0, batch_size=256, bf16=bf16, device=device)
                for bf16 in (False, True)}
        acc = {k: v.eq(y).double().mean().item() for k, v in pred.items()}
        diff = 100 * (acc[True] - acc[False])
        flips = pred[True].ne(pred[False]).double().mean().item()
        rows.append(judged(f"precision eval {name}", abs(diff) <= MAX_ACC_DIFF_PP and flips <= MAX_FLIPS,
                           f"{diff:+.2f} pp, {100 * flips:.1f}% flipped",
                           f"|diff| <= {MAX_ACC_DIFF_PP:g} pp, flips <= {100 * MAX_FLIPS:g}%",
                           f"n={len(split)}, fp32 acc {100 * acc[False]:.1f}%"))

    split = split.subset(slice(0, probe_n))

    def hardness_values(bf16: bool):
        with bf16_on(device, bf16) as amp:
            table = hardness.per_sample_losses({"m": model}, split, hardness.HardnessConfig(amp=amp))
        return table["adv_loss"].to_numpy(), table["adv_correct"].to_numpy()

    def margin_values(bf16: bool):
        with bf16_on(device, bf16) as amp:
            m = complexity.margins(model, split, complexity.ComplexityConfig(measures=("margin",), amp=amp))
        m = m.double().cpu().numpy()
        return m, m > 0

    for name, values in (("hardness adv_loss", hardness_values), ("complexity margin", margin_values)):
        (v32, f32), (v16, f16) = values(False), values(True)
        rho = float(scipy_stats.spearmanr(v32, v16)[0])
        flips = float(np.mean(f32 != f16))
        rows.append(judged(f"precision {name}", rho >= MIN_RHO and flips <= MAX_FLIPS,
                           f"rho {rho:.4f}, {100 * flips:.1f}% flipped",
                           f"rho >= {MIN_RHO:g}, flips <= {100 * MAX_FLIPS:g}%", f"n={len(split)}"))
    return rows


# ---------------------------------------------------------------------------- layout and dtype


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@contextlib.contextmanager
def conv_calls(model: nn.Module) -> Iterator[list[tuple[bool, torch.dtype]]]:
    """Every call of the first convolution while open, as ``(input and weight channels_last,
    output dtype)``."""
    conv, calls = first_conv(model), []

    def hook(module, args, output):
        x = args[0]
        layout = x.is_contiguous(memory_format=torch.channels_last) and \
            module.weight.is_contiguous(memory_format=torch.channels_last)
        calls.append((bool(layout), output.dtype))

    handle = conv.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def probe_runs(model: nn.Module, split, device: torch.device, sizes: Sizes, trainer: Trainer,
               amp: bool) -> dict[str, Callable[[], object]]:
    """The calls the layout, dtype and sync checks watch: eval, a training epoch, one stability
    chunk, the Hessian's gradient graph and one product on it (the inner loops of each)."""
    data = split.subset(slice(0, sizes.probe_n))
    x, y, ids = next(sample_batches(model, data, sizes.probe_n))
    stab = stability.StabilityConfig(losses=("pgd_at",), lambdas=(0.0, 0.01), threat=ThreatModel(steps=2))
    direction = directions(model, 1, 0, stab.ignore, norm=stab.direction_norm, device="cpu")[0]
    grid = [perturbed_parameters(model, direction, lam) for lam in stab.lambdas]
    objective, theta = make_objective("pgd_at", stab), model_parameters(model)
    v = torch.ones(1, sum(p.numel() for p in model.parameters()), device=device)
    return {
        "eval": lambda: predictions(model, split, parse_attack("pgd10"), seed=0, batch_size=256, bf16=amp,
                                    device=device),
        "train epoch": trainer.epoch,
        "stability chunk": lambda: per_sample_grad_distances(model, objective, x, y, theta, grid,
                                                             chunk_size=sizes.probe_n, sample_ids=ids),
        # the gradient graph (built once per batch set) and one product on it
        "hessian products": lambda: hessian.LossHessian(model, [(x, y)]).operator()(v),
    }


def small_trainer(device: torch.device, workdir: Path) -> Trainer:
    """A trainer (nothing written) of four batches, for the checks around ``Trainer.epoch``, which
    they call three times (the layout check, the sync check's run outside the debug mode and in it)."""
    config = TrainConfig(arch="cnn-small", epochs=4, train_n=4 * 64, batch_size=64, threat=ThreatModel(steps=2),
                         eval_n=10)
    return Trainer(config, workdir / "trainer", DistContext(), device)


def layout_rows(runs: dict[str, Callable[[], object]], models: dict[str, nn.Module],
                device: torch.device) -> list[Row]:
    rows = []
    cuda = device.type == "cuda"
    for name, run in runs.items():
        with conv_calls(models[name]) as calls:
            run()
        layouts = [c[0] for c in calls]
        rows.append(judged(f"channels_last {name}", bool(layouts) and all(layouts),
                           f"{sum(layouts)}/{len(layouts)} calls", "all first-conv calls NHWC"))
        dtypes = [c[1] for c in calls]
        want = torch.float32 if name in ("stability chunk", "hessian products") else torch.bfloat16
        label = "fp32 kept" if want == torch.float32 else "bf16 in effect"
        threshold = f"all first-conv outputs {str(want).removeprefix('torch.')}"
        if not cuda:
            rows.append(skipped(f"{label} {name}", threshold,
                                f"{NEEDS_CUDA}: atprobe's autocast is off on the CPU"))
            continue
        hits = sum(d == want for d in dtypes)
        rows.append(judged(f"{label} {name}", bool(dtypes) and hits == len(dtypes), f"{hits}/{len(dtypes)} calls",
                           threshold, "" if hits == len(dtypes) else f"saw {sorted({str(d) for d in dtypes})}"))
    return rows


# ---------------------------------------------------------------------------- host syncs


def sync_frame(exc: BaseException) -> str:
    """The innermost atprobe (else benchmark) frame of a traceback, as ``file:line (function)``."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/atprobe/" in f.filename] or frames
    f = ours[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})"


def no_sync_row(name: str, run: Callable[[], object], device: torch.device) -> Row:
    """``run()`` under ``set_sync_debug_mode("error")``, after one run outside it (lazy
    initialization and cuDNN autotuning may synchronize: not the loop's doing)."""
    threshold = 'no sync under set_sync_debug_mode("error")'
    run()
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return judged(f"no host sync {name}", True, "0 syncs", threshold)
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        return judged(f"no host sync {name}", False, "synchronized", threshold, f"at {sync_frame(exc)}")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def sync_rows(runs: dict[str, Callable[[], object]], device: torch.device) -> list[Row]:
    if device.type != "cuda":
        return [skipped(f"no host sync {name}", 'no sync under set_sync_debug_mode("error")') for name in runs]
    return [no_sync_row(name, run, device) for name, run in runs.items()]


# ---------------------------------------------------------------------------- peak memory


def peak_bytes(device: torch.device, run: Callable[[], object]) -> int:
    """``torch.cuda.max_memory_allocated`` during ``run()``, the memory already held included."""
    sync(device)
    held = torch.cuda.memory_allocated(device)
    return held + _growth(device, run)


def memory_runs(arch: str, device: torch.device) -> list[tuple[str, Callable[[], object], str]]:
    """``(probe, run, size)``: one ``stability`` chunk at the CLI's default chunk size
    (``--batch-size`` 256 capped to the device's budget, copies=2 as ``atprobe.studies``) and
    ``hessian`` at its default batch (128), on a freshly initialized ``arch``."""
    model = prepare_model(stability.init_model(arch, 10, seed=0), device).eval()
    chunk = auto_chunk_size(model, 256, copies=2)
    train_split, _ = make_synthetic(n_train=max(chunk, 128), n_test=10)
    stab = stability.StabilityConfig(losses=("pgd_at",), lambdas=(0.0, 0.01), threat=ThreatModel(steps=2),
                                     chunk_size=chunk)
    hess = hessian.HessianConfig(iterations=2, trace_samples=2, blocks="none")  # default batch_size: 128
    return [
        ("stability", lambda: stability.probe(model, train_split.subset(slice(0, chunk)), stab), f"chunk {chunk}"),
        ("hessian", lambda: hessian.probe(model, train_split.subset(slice(0, hess.batch_size)), hess),
         f"batch {hess.batch_size}"),
    ]


def memory_rows(device: torch.device) -> list[Row]:
    threshold = f"<= {100 * MAX_MEMORY_FRACTION:g}% of the GPU"
    if device.type != "cuda":
        return [skipped(f"peak memory {probe} wrn-28-10", threshold) for probe in ("stability", "hessian")]
    total = torch.cuda.get_device_properties(device).total_memory
    rows = []
    for probe, run, what in memory_runs("wrn-28-10", device):
        peak = peak_bytes(device, run)
        rows.append(judged(f"peak memory {probe} wrn-28-10", peak <= MAX_MEMORY_FRACTION * total,
                           f"{peak / 2**30:.1f} GiB", threshold,
                           f"{what}, {100 * peak / total:.0f}% of {total / 2**30:.0f} GiB"))
    return rows


# ---------------------------------------------------------------------------- throughput


SPEED_PATHS = ("PGD-10 eval", "PGD-AT train", "hardness")


def throughput(arch: str, device: torch.device, n: int, batch_size: int) -> dict[str, tuple[float, int]]:
    """``{path: (images/s, passes of one forward per image)}`` of :data:`SPEED_PATHS` on a fresh
    ``arch`` in bf16 (``amp=True``; a no-op on the CPU), ``n`` synthetic images, after a warm-up."""
    model = models_for(arch, 1, device)[f"{arch}-seed0"]
    data = samples(n, device)
    eval_config = EvalConfig(attacks=(parse_attack("pgd10"),), batch_size=batch_size, amp=True)
    hard_config = hardness.HardnessConfig(attack="pgd10", batch_size=batch_size, amp=True)
    measured = {}
    for path, run in (("PGD-10 eval", lambda: evaluate(model, data, eval_config)),
                      ("hardness", lambda: hardness.per_sample_losses({"m": model}, data, hard_config))):
        run()  # warm-up
        measured[path] = (n / timed(run, device), 2 * 10 + 1)  # 10 steps of forward + input gradient, the logits
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    config = TrainConfig(method="pgd_at", threat=ThreatModel(steps=10)).resolved()
    batches = list(iterate_batches(data, batch_size, shuffle=True, augment=True, drop_last=True,
                                   generator=make_generator(0, device), channels_last=True))
    seconds = time_steps(config, model, optimizer, batches, device)  # median step, after one warm-up step
    measured["PGD-AT train"] = (batch_size / seconds, passes_per_training_image("pgd_at", 10))
    return measured


def speed_rows(device: torch.device, sizes: Sizes, min_tflops: float) -> list[Row]:
    threshold = f">= {min_tflops:g} TFLOP/s achieved"
    if device.type != "cuda":
        return [skipped(f"img/s {path} resnet18", threshold) for path in SPEED_PATHS]
    flops = forward_flops("resnet18", 10)
    measured = throughput("resnet18", device, sizes.speed_n, sizes.speed_batch)
    rows = []
    for path in SPEED_PATHS:
        images, passes = measured[path]
        tflops = images * passes * flops / 1e12
        rows.append(judged(f"img/s {path} resnet18", tflops >= min_tflops, f"{images:.0f} img/s", threshold,
                           f"{tflops:.1f} TFLOP/s ({passes} passes of {flops / 1e9:.2f} GFLOP), "
                           f"batch {sizes.speed_batch}, bf16"))
    return rows


# ---------------------------------------------------------------------------- table


def print_table(rows: list[Row], name: str) -> None:
    cells = [COLUMNS] + [(r.check, r.status, r.value, r.threshold, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    print(f"gpu_check on {name}")
    for k, c in enumerate(cells):
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if k == 0:
            print("-|-".join("-" * w for w in widths))
    failed = [r.check for r in rows if r.status == "fail"]
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip"
          + (f": failed {', '.join(failed)}" if failed else ""))


def exit_status(rows: list[Row]) -> int:
    """1 when any row that ran failed, else 0 (skips do not count)."""
    return 1 if any(r.status == "fail" for r in rows) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-tflops", type=float, default=MIN_TFLOPS, help="floor of the throughput rows")
    add_machine_options(parser, device="auto")
    args = parser.parse_args()
    try:
        device, name = machine(args)
    except AtprobeError as exc:  # a bad --device: one line and status 2, as the CLI
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sizes = Sizes.for_device(device)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        study, ckpt, model = trained_model(device, sizes, workdir)
        split = held_out_samples(study, ckpt, sizes.eval_n, device)
        rows += precision_rows(model, split, sizes.probe_precision_n, device)
        trainer = small_trainer(device, workdir)
        probe_split = held_out_samples(study, ckpt, sizes.probe_n, device)
        runs = probe_runs(model, probe_split, device, sizes, trainer, amp=device.type == "cuda")
        models = {k: model for k in runs} | {"train epoch": trainer.model}
        rows += layout_rows(runs, models, device)
        rows += sync_rows(runs, device)
    rows += memory_rows(device)
    rows += speed_rows(device, sizes, args.min_tflops)
    print_table(rows, name)
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
