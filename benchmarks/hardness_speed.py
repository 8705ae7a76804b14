"""``hardness`` speed and memory: per-model time of the per-sample adversarial loss pass,
against ``atprobe.evaluate`` with the same attack (same model, same samples, same process),
and the peak memory growth for two sample counts.

    python benchmarks/hardness_speed.py                                   # cnn-small, 1000 samples, pgd10, CPU
    python benchmarks/hardness_speed.py --n 10000 --device cuda --mem-n 10000 50000
    python benchmarks/hardness_speed.py --models 3 --n 500 --mem-n 1000 4000 --mem-attack pgd1

Speed: for each of ``--models`` freshly initialized models (seeds 0, 1, ...), the median
over ``--repeats`` of ``hardness.per_sample_losses`` on one model (time per model, img/s)
and of ``evaluate`` with the same attack (the reference: the eval loop, which keeps no
per-sample values and draws its random starts per batch); ratio = eval / hardness (>= 1.0:
hardness is no slower). Then ``hardness.probe`` on all models (losses + consistency).

Memory: in a fresh child process per N (``--mem-n``), the growth of the peak resident set
(CPU: the kernel's VmHWM, reset through /proc/self/clear_refs just before) or of
``torch.cuda.max_memory_allocated`` (CUDA) over the whole ``probe`` of all models, measured
from after the data and models are loaded; and, as a control that the measurement sees
such growth, the same for ``adversarial_examples`` on the whole split (which keeps every
adversarial image: N x 3 x 32 x 32 x 4 bytes, 12 KiB a sample). The losses alone are 9
bytes a sample and model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch
from _timing import timed

from atprobe.attacks import parse_attack
from atprobe.data import Split, make_synthetic
from atprobe.evaluate import EvalConfig, evaluate
from atprobe.models import build_model
from atprobe.probes import hardness
from atprobe.runtime import prepare_model, resolve_device


def models_for(arch: str, count: int, device: torch.device) -> dict[str, torch.nn.Module]:
    out = {}
    for seed in range(count):
        torch.manual_seed(seed)
        out[f"{arch}-seed{seed}"] = prepare_model(build_model(arch, 10), device).eval()
    return out


def samples(n: int, device: torch.device) -> Split:
    """The first n synthetic training images (more than the 4000 built in are drawn from a
    larger synthetic set: speed and memory do not depend on the content)."""
    train, _ = make_synthetic(n_train=max(n, 4000), n_test=10)
    return train.subset(slice(0, n)).to(device)


def speed(args, device: torch.device) -> None:
    data = samples(args.n, device)
    models = models_for(args.arch, args.models, device)
    config = hardness.HardnessConfig(attack=args.attack, batch_size=args.batch_size, amp=args.amp)
    eval_config = EvalConfig(attacks=(parse_attack(args.attack),), batch_size=args.batch_size, amp=args.amp)
    first = next(iter(models.values()))
    hardness.per_sample_losses({"warm": first}, data.subset(slice(0, args.batch_size)), config)  # warm-up
    per_model, reference = [], []
    for name, model in models.items():
        for _ in range(args.repeats):
            per_model.append(timed(lambda: hardness.per_sample_losses({name: model}, data, config), device))
            reference.append(timed(lambda: evaluate(model, data, eval_config), device))
    t, r = statistics.median(per_model), statistics.median(reference)
    total = timed(lambda: hardness.probe(models, data, config), device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"{args.arch} n={args.n} {args.attack} batch={args.batch_size} amp={args.amp} device={where}")
    print(f"  per model: hardness {t:.2f} s ({args.n / t:.1f} img/s), eval {r:.2f} s ({args.n / r:.1f} img/s), "
          f"ratio eval/hardness {r / t:.2f}")
    print(f"  probe on {args.models} models (losses + consistency): {total:.2f} s")


def _reset_peak() -> int | None:
    """Reset the kernel's peak-RSS mark (Linux: ``5`` to /proc/self/clear_refs) and return
    the current RSS in bytes; None where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return None


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


def _growth(device: torch.device, run) -> int:
    """Peak memory growth of ``run()`` in bytes, from a baseline taken just before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
        run()
        return torch.cuda.max_memory_allocated(device) - before
    before = _reset_peak()
    if before is None:  # no resettable peak: the process high-water mark (can hide growth)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    run()
    return _status_kib("VmHWM") * 1024 - before


def memory_child(args) -> None:
    """Run in a fresh process: print JSON {n, probe_bytes, hold_bytes}. ``hold`` is the
    control: the same attack keeping every adversarial image (``adversarial_examples`` on
    the whole split), which is what the streaming pass avoids."""
    device = resolve_device(args.device)
    data = samples(args.child_n, device)
    models = models_for(args.arch, args.models, device)
    config = hardness.HardnessConfig(attack=args.mem_attack, batch_size=args.batch_size, amp=args.amp)
    hardness.per_sample_losses({"warm": next(iter(models.values()))}, data.subset(slice(0, args.batch_size)),
                               config)  # allocator and thread pools warmed up before the baseline
    probe_bytes = _growth(device, lambda: hardness.probe(models, data, config))
    first = next(iter(models.values()))
    hold_bytes = _growth(device, lambda: hardness.adversarial_examples(first, data, config))
    print(json.dumps({"n": args.child_n, "probe_bytes": probe_bytes, "hold_bytes": hold_bytes}))


def memory(args) -> None:
    cuda = resolve_device(args.device).type == "cuda"
    kind = "CUDA max_memory_allocated" if cuda else "peak RSS (VmHWM after a reset)"
    print(f"memory: growth of {kind}, {args.models} {args.arch} models, {args.mem_attack}, batch {args.batch_size}")
    for n in args.mem_n:
        cmd = [sys.executable, __file__, "--child-n", str(n), "--arch", args.arch, "--models", str(args.models),
               "--mem-attack", args.mem_attack, "--batch-size", str(args.batch_size), "--device", args.device]
        if args.amp:
            cmd.append("--amp")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result = json.loads(out)
        images = n * 3 * 32 * 32 * 4 / 2**20
        print(f"  N={n:>6}: hardness.probe {result['probe_bytes'] / 2**20:7.1f} MiB; control keeping the "
              f"adversarial images of one model {result['hold_bytes'] / 2**20:7.1f} MiB "
              f"(their size: {images:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn-small")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--attack", default="pgd10")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mem-n", type=int, nargs="*", default=[1000, 4000],
                        help="sample counts of the memory measurement (none: skip it)")
    parser.add_argument("--mem-attack", default="pgd1", help="attack of the memory runs (memory does not "
                        "depend on the step count)")
    parser.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_n is not None:
        memory_child(args)
        return
    speed(args, resolve_device(args.device))
    if args.mem_n:
        memory(args)


if __name__ == "__main__":
    main()
