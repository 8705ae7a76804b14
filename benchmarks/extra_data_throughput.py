"""Training throughput with memory-mapped extra data against in-memory data.

    python benchmarks/extra_data_throughput.py --threads 1
    python benchmarks/extra_data_throughput.py --device cuda --arch resnet18 --batch-size 512 --extra-n 1000000

Writes ``--extra-n`` random uint8 32x32x3 images and labels to an uncompressed ``.npz`` in
``--dir`` (kept between runs), then times, in the same process and on the same model, the
library's training step (``atprobe.train.training_loss`` + backward + SGD) fed by

* ``in-memory``: ``iterate_batches`` over a device-resident split (no extra data);
* ``extra resident``: ``iterate_mixed_batches`` with the extra images copied to the device;
* ``extra mapped``: the same batches with the extra images read from the memory map
  (``MappedRows``: pinned buffers and a side stream on CUDA, plain host arrays on the CPU).

Each figure is images/s over ``--iters`` steps (after one warm-up step), the median of
``--repeats``; the ratio is mapped / in-memory. ``--method standard`` (the default) is the
cheapest step, where the data path's cost shows most. The file sits in the page cache after
the first pass unless it is larger than the host's memory, so this measures the mapped path's
copies, not the disk. A second table times the batches alone (no model): the data path's own rate.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import numpy as np
import torch
from _timing import add_machine_options, machine, sync

from atprobe.data import iterate_batches, make_synthetic
from atprobe.data.batches import iterate_mixed_batches
from atprobe.data.memmap import MappedRows, ResidentRows, load_extra_data
from atprobe.models import build_model
from atprobe.runtime import make_generator, prepare_model
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig, training_loss, training_starts


def extra_file(directory: pathlib.Path, n: int) -> pathlib.Path:
    path = directory / f"extra_{n}.npz"
    if not path.is_file():
        rng = np.random.default_rng(0)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(path, image=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                 label=rng.integers(0, 10, size=n))
    return path


def images_per_second(batches, config, model, optimizer, device) -> float:
    """Images/s of the steps over ``batches``, the first one a warm-up, batch production included;
    ``model=None``: of the batches alone (the data path's own rate)."""
    seen, start = 0, None
    for i, batch in enumerate(batches):
        if model is None:
            batch.x.sum()  # consume the batch, as a step would
        else:
            step = training_loss(model, batch.x, batch.y, config, epoch=0, amp=config.amp,
                                 starts=training_starts(config, 0, batch.index))
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            optimizer.step()
        if i == 0:
            sync(device)
            start = time.perf_counter()
        else:
            seen += len(batch)
    sync(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn-small")
    parser.add_argument("--method", default="standard")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fraction", type=float, default=0.7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra-n", type=int, default=50_000)
    parser.add_argument("--dir", default="/tmp/atprobe_extra_bench")
    add_machine_options(parser, device="auto")
    args = parser.parse_args()
    device, name = machine(args)
    extra = load_extra_data(extra_file(pathlib.Path(args.dir), args.extra_n), (3, 32, 32), 10)
    train_split, _ = make_synthetic(n_train=4000, n_test=10)
    split = train_split.to(device)
    torch.manual_seed(0)
    model = prepare_model(build_model(args.arch, 10), device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    config = TrainConfig(method=args.method, threat=ThreatModel(steps=3)).resolved()
    labels = extra.labels.to(device)
    sources = {"extra resident": ResidentRows(extra.images, device), "extra mapped": MappedRows(extra.images, device)}
    n = args.iters + 1

    def feed(kind: str, repeat: int):
        if kind == "in-memory":
            return iterate_batches(split, args.batch_size, shuffle=True, augment=True, drop_last=True,
                                   generator=make_generator(repeat, device), channels_last=True)
        return iterate_mixed_batches(split, sources[kind], labels, args.batch_size, args.fraction, seed=repeat,
                                     first_batch=0, n_batches=n, index_base=len(split), augment=True,
                                     generator=make_generator(repeat, device), channels_last=True)

    kinds = ("in-memory", "extra resident", "extra mapped")
    for what, step_model in (("training", model), ("batches only", None)):
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for repeat in range(args.repeats):
            for kind in kinds:  # interleaved, so a load change on the machine hits all three alike
                batches = (b for _, b in zip(range(n), feed(kind, repeat)))
                rates[kind].append(images_per_second(batches, config, step_model, optimizer, device))
        median = {k: statistics.median(v) for k, v in rates.items()}
        print(f"{what}: {args.arch} {args.method} batch={args.batch_size} fraction={args.fraction} "
              f"extra_n={args.extra_n} ({extra.images.nbytes / 2**20:.0f} MB) device={name}, median of {args.repeats}:")
        for kind in kinds:
            print(f"  {kind:15s} {median[kind]:10.1f} img/s  (range {min(rates[kind]):.1f}-{max(rates[kind]):.1f})")
        print(f"  ratio mapped / in-memory {median['extra mapped'] / median['in-memory']:.3f}, "
              f"mapped / resident {median['extra mapped'] / median['extra resident']:.3f}")


if __name__ == "__main__":
    main()
