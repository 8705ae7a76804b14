"""Wall-clock timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`,
so this folder is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes on ``device``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def add_machine_options(parser, device: str = "cpu") -> None:
    """``--device`` and ``--threads``, the options every benchmark has."""
    parser.add_argument("--device", default=device)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 gives stable numbers on a shared, loaded machine")


def machine(args) -> tuple[torch.device, str]:
    """Apply ``--threads``; the device and a line naming it (GPU model or CPU threads)."""
    from atprobe.runtime import resolve_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    return device, name
