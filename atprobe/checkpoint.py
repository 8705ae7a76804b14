"""The one checkpoint format, and loading of foreign ones.

A checkpoint is a plain ``dict`` that ``torch.load(weights_only=True)`` reads: only
tensors, numbers, strings, lists, tuples, dicts and None. Keys:

    format          "atprobe-checkpoint"
    format_version  1
    arch            registered architecture name, e.g. "resnet18"
    arch_kwargs     {"num_classes", "dropout", "mean", "std"} as build_model takes them
    num_classes     int
    dataset         dataset name the model was trained on ("cifar10", "synthetic", ...)
    labels          int64 tensor over the original train split: the exact labels trained on
                    (None for a model that was never trained here)
    label_spec      {"label_noise": r, "label_seed": s} that rebuilds ``labels`` bit for bit
    train_config    dict of the training options (JSON-like values)
    epoch           completed epochs
    model           the model's state_dict
    optimizer, scheduler, rng, extra   resume state (None when absent)

Writes are atomic: a temp file in the same directory, fsync, then ``os.replace``, so a
crash or Ctrl-C never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atprobe.arch_inference import AUTO, identified, infer_arch
from atprobe.errors import AtprobeError
from atprobe.io import atomic_write
from atprobe.models import IN_CHANNELS, build_model, canonical_arch, weight_layers

FORMAT = "atprobe-checkpoint"
FORMAT_VERSION = 1

# Where public training scripts keep the weights inside a saved dict, in the order tried
# (docs/checkpoints.md names the release behind each): "last"/"best" is the fast-AT layout.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "model_state", "last", "best")
# Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A wrapper module that holds the network as ``.model`` (RobustBench's Chen2020Efficient and
# ImageNet wrappers): stripped only when every weight sits under it.
_MODEL_PREFIX = "model."
# Input normalization saved with the weights, as (mean key, std key): RobustBench's model
# classes register mu/sigma, DeepMind's classes mean/std, a wrapper's Normalize module
# normalize.mean/normalize.std.
_NORMALIZATION_KEYS = (("mu", "sigma"), ("mean", "std"), ("normalize.mean", "normalize.std"))
_NORMALIZATION_NAMES = frozenset(k for pair in _NORMALIZATION_KEYS for k in pair)
_SEQUENTIAL_KEY = re.compile(r"(\d+)\.(.+)")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint, native or foreign, with what is needed to rebuild its model."""

    path: Path
    sha256: str
    arch: str
    arch_kwargs: dict
    num_classes: int
    dataset: str | None
    state_dict: Mapping[str, torch.Tensor]
    labels: torch.Tensor | None = None
    label_spec: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    epoch: int | None = None
    native: bool = True
    raw: dict = field(default_factory=dict, repr=False)  # the whole native dict (resume state)
    # What loading a foreign file decided by itself ("arch", "layout", "normalization"): one
    # line on stderr when a study opens it, and recorded in the .meta.json.
    notes: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The model with these weights, in eval mode, on ``device``."""
        model = build_model(self.arch, **self.arch_kwargs)
        _load_state_strict(model, self.state_dict, self.path)
        return model.to(device).eval()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through ``atprobe.io.atomic_write`` (temp file, fsync, rename)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def make_checkpoint(
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    dataset: str | None,
    labels: torch.Tensor | None = None,
    label_spec: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
    epoch: int = 0,
    optimizer: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    rng: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """The checkpoint dict of the format above (tensors moved to the CPU)."""
    kwargs = dict(arch_kwargs)
    for key in ("mean", "std"):
        if kwargs.get(key) is not None:
            kwargs[key] = [float(v) for v in kwargs[key]]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": canonical_arch(arch),
        "arch_kwargs": kwargs,
        "num_classes": int(kwargs.get("num_classes", 10)),
        "dataset": dataset,
        "labels": None if labels is None else labels.detach().cpu().to(torch.int64),
        "label_spec": dict(label_spec or {}),
        "train_config": dict(train_config or {}),
        "epoch": int(epoch),
        "model": state,
        "optimizer": None if optimizer is None else dict(optimizer),
        "scheduler": None if scheduler is None else dict(scheduler),
        "rng": None if rng is None else dict(rng),
        "extra": dict(extra or {}),
    }


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write a checkpoint dict made by ``make_checkpoint``."""
    if checkpoint.get("format") != FORMAT:
        raise ValueError("save_checkpoint takes a dict made by make_checkpoint")
    return atomic_torch_save(dict(checkpoint), path)


# ---------------------------------------------------------------------------- loading


def _read(path: Path) -> Any:
    if not path.exists():
        raise AtprobeError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise AtprobeError(f"{path} is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of non-torch pickles; the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on bad bytes; all mean "not loadable"
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        code = found.group(1) if found else _pickle_global(path)
        if code and _pickled(path):
            raise AtprobeError(
                f"refused to load {path}: unpickling it would run code ({code}), and atprobe loads only weights "
                f"(torch.load(weights_only=True)); re-save only the weights: torch.save(model.state_dict(), '{path}')"
            ) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith("Unsupported")), lines[-1] if lines else "")
        raise AtprobeError(
            f"{path} is not a readable PyTorch checkpoint: corrupt, truncated or another format "
            f"({type(exc).__name__}{': ' + detail[:120] if detail else ''})"
        ) from None


def _pickled(path: Path) -> bool:
    """A zip checkpoint or a binary pickle (it starts with PROTO): text or random bytes that happen
    to parse as pickle opcodes are not taken for a file that would run code."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80" or zipfile.is_zipfile(path)


def _pickle_global(path: Path) -> str | None:
    """The first class or function a plain (non-zip) pickle file would import to unpickle, read
    off its opcodes without running any (None if it imports none or is not a pickle). torch's
    weights-only unpickler names such a global in a zip checkpoint itself; a plain ``pickle.dump``
    file of protocol 4 or 5 stops it at the first frame, before it sees one."""
    if zipfile.is_zipfile(path) or not _pickled(path):
        return None
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return f"{strings[-2]}.{strings[-1]}"
                if isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
    except Exception:  # not a pickle after all: the caller says so
        return None
    return None


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def _is_state(d: Any) -> bool:
    return isinstance(d, Mapping) and len(d) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()
    )


def _find_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The weights in a saved object and the key of the dict they were under (None: the
    object is the state_dict itself)."""
    if _is_state(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if key in obj and _is_state(obj[key]):
                return dict(obj[key]), key
        keys = ", ".join(sorted(map(str, obj.keys()))[:8])
        raise AtprobeError(f"{path}: no state_dict found in the saved dict (keys: {keys})")
    raise AtprobeError(f"{path}: not a checkpoint (it holds a {type(obj).__name__}, not a dict of weights)")


@dataclass(frozen=True)
class _Unwrapped:
    """The weights out of their wrappers: ``state`` (with any saved normalization kept as
    top-level keys), ``behind`` (the model's index in a Sequential whose earlier modules
    saved nothing: a normalization layer without persistent values) and what was done."""

    state: dict[str, torch.Tensor]
    behind: int | None
    notes: tuple[str, ...]


def _is_normalization(key: str) -> bool:
    return key in _NORMALIZATION_NAMES


def _unwrap(state: Mapping[str, torch.Tensor]) -> _Unwrapped:
    """Strip the wrappers releases save their weights in: DataParallel/compile prefixes, a
    ``Sequential(normalization, model)`` (or ``Sequential(model)``), a ``model.`` wrapper."""
    state = _strip_prefixes(state)
    notes: list[str] = []
    behind = None
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _SEQUENTIAL_KEY.fullmatch(key)
        if m is None:
            groups = {}
            break
        groups.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if groups:
        models = [i for i, sub in groups.items() if not all(map(_is_normalization, sub))]
        if len(models) == 1:
            index = models[0]
            merged = {k: v for i, sub in groups.items() if i != index for k, v in sub.items()}
            merged.update(groups[index])
            state = merged
            saved = sorted(i for i in groups if i != index)
            notes.append(f"a Sequential: the model is its module {index}"
                         + (f", normalization values in module {saved[0]}" if saved else ""))
            if index > 0 and not saved:
                behind = index
    weights = [k for k in state if not _is_normalization(k)]
    if weights and all(k.startswith(_MODEL_PREFIX) for k in weights):
        state = {(k[len(_MODEL_PREFIX):] if k.startswith(_MODEL_PREFIX) else k): v for k, v in state.items()}
        notes.append("weights under a 'model.' wrapper")
    return _Unwrapped(state, behind, tuple(notes))


def _values(t: torch.Tensor) -> list[float] | None:
    """A per-channel constant as floats: 3 values in any shape ((3,), (3,1,1), (1,3,1,1)),
    or one for all channels; None for anything else."""
    flat = t.detach().reshape(-1).to(torch.float64)
    if t.is_floating_point() and flat.numel() in (1, IN_CHANNELS):
        return [float(v) for v in flat.expand(IN_CHANNELS)]
    return None


def _carried_normalization(state: Mapping[str, torch.Tensor], own: set[str]
                           ) -> tuple[tuple[str, str], list[float], list[float]] | None:
    """The (mean, std) the file saved with the weights, as the first pair of
    ``_NORMALIZATION_KEYS`` it holds that the architecture does not own as weights."""
    for mean_key, std_key in _NORMALIZATION_KEYS:
        if mean_key in state and std_key in state and mean_key not in own and std_key not in own:
            mean, std = _values(state[mean_key]), _values(state[std_key])
            if mean is not None and std is not None:
                return (mean_key, std_key), mean, std
    return None


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _probe(arch: str, dropout: float = 0.0) -> nn.Module:
    """``arch`` with shapes but no storage (the meta device): its key names and layers, free of
    the memory and time of a real build (a WRN-70-16 has 267M parameters)."""
    with torch.device("meta"):
        return build_model(arch, num_classes=10, dropout=dropout)


def _infer_num_classes(arch: str, state: Mapping[str, torch.Tensor], dropout: float) -> int | None:
    """The classifier's output size, read off the last weight layer of the architecture."""
    probe = _probe(arch, dropout)
    layers = weight_layers(probe)
    if not layers:
        return None
    last = layers[-1][0] + ".weight"
    weight = state.get(last)
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load weights; every missing/unexpected key or shape mismatch is one error line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) e.g. {', '.join(unexpected[:3])}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) e.g. {'; '.join(shapes[:2])}")
    if problems:
        raise AtprobeError(
            f"{path}: weights do not fit architecture {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    name = type(v).__name__
    return "None" if v is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _native_problem(obj: Mapping[str, Any]) -> str | None:
    """What is wrong with the fields of a native checkpoint dict (None: nothing): each field
    has the type of the format's table (docs/checkpoints.md)."""
    def mapping(key: str, optional: bool = True) -> str | None:
        v = obj.get(key)
        if (v is None and optional) or isinstance(v, Mapping):
            return None
        return f"{key} is {_kind(v)}, not a dict"

    if not isinstance(obj["arch"], str):
        return f"arch is {_kind(obj['arch'])}, not an architecture name"
    model = obj["model"]
    if not isinstance(model, Mapping):
        return f"model is {_kind(model)}, not a state_dict (a dict of parameter name -> tensor)"
    for key, value in model.items():
        if not isinstance(key, str):
            return f"model has a key {key!r} ({type(key).__name__}), not a parameter name (str)"
        if not isinstance(value, torch.Tensor):
            return f"model[{key!r}] is {_kind(value)}, not a tensor"
    problem = mapping("arch_kwargs", optional=False)
    if problem:
        return problem
    kwargs = obj["arch_kwargs"]
    for key in ("num_classes",):
        if key in kwargs and not (_is_int(kwargs[key]) and kwargs[key] >= 1):
            return f"arch_kwargs[{key!r}] is {kwargs[key]!r}, not a class count"
    for key in ("mean", "std"):
        v = kwargs.get(key)
        if v is not None and not (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v)):
            return f"arch_kwargs[{key!r}] is {_kind(v)}, not a list of numbers"
    if "num_classes" in obj and not (_is_int(obj["num_classes"]) and obj["num_classes"] >= 1):
        return f"num_classes is {obj['num_classes']!r}, not a class count"
    if obj.get("dataset") is not None and not isinstance(obj["dataset"], str):
        return f"dataset is {_kind(obj['dataset'])}, not a dataset name"
    if obj.get("epoch") is not None and not (_is_int(obj["epoch"]) and obj["epoch"] >= 0):
        return f"epoch is {obj['epoch']!r}, not a count of epochs"
    labels = obj.get("labels")
    if labels is not None and not (isinstance(labels, torch.Tensor) and labels.dim() == 1
                                   and not labels.is_floating_point() and not labels.is_complex()):
        return f"labels is {_kind(labels)}, not a 1-D integer tensor"
    for key in ("label_spec", "train_config", "optimizer", "scheduler", "rng", "extra"):
        problem = mapping(key)
        if problem:
            return problem
    return None


def _check_native_fields(obj: Mapping[str, Any], path: Path) -> None:
    problem = _native_problem(obj)
    if problem:
        raise AtprobeError(f"{path}: damaged atprobe checkpoint: {problem}; write it again with "
                           "atprobe.checkpoint.save_checkpoint(make_checkpoint(model, ...)), or save only the "
                           "weights (torch.save(model.state_dict(), PATH)) and load them with --arch")


def _is_auto(arch: str | None) -> bool:
    return isinstance(arch, str) and arch.strip().lower() == AUTO


def load_checkpoint(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    dataset: str | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Checkpoint:
    """Read a native checkpoint, or a foreign one given ``arch`` (``"auto"``: inferred from
    the keys and shapes, :func:`atprobe.arch_inference.infer_arch`).

    Foreign files: a bare state_dict, or a dict holding one under one of ``_STATE_DICT_KEYS``
    (``state_dict``, ``model_state_dict``, ..., ``last``); ``module.`` and ``_orig_mod.``
    prefixes, a ``Sequential(normalization, model)`` and a ``model.`` wrapper are removed
    (docs/checkpoints.md has each layout with its release). ``num_classes`` defaults to the
    classifier's output size found in the weights; ``mean``/``std`` set the model's input
    normalization (None: the weights expect [0,1] inputs as they are), unless the file saved
    its own (``mu``/``sigma``, ``mean``/``std``), which is used instead. What was decided
    without being asked is in ``Checkpoint.notes``. For a native checkpoint,
    ``arch``/``num_classes`` must agree with the file if given (``auto`` always does), and
    ``dataset`` overrides the recorded dataset.
    """
    path = Path(path)
    obj = _read(path)
    digest = file_sha256(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise AtprobeError(
                f"{path}: checkpoint format version {version} is not supported (expected {FORMAT_VERSION})"
            )
        needed = ("arch", "arch_kwargs", "model")
        lacking = [k for k in needed if k not in obj]
        if lacking:
            raise AtprobeError(f"{path}: damaged atprobe checkpoint, missing {', '.join(lacking)}")
        _check_native_fields(obj, path)
        file_arch = canonical_arch(obj["arch"])
        if arch is not None and not _is_auto(arch) and canonical_arch(arch) != file_arch:
            raise AtprobeError(f"{path}: checkpoint holds a {file_arch}, not a {canonical_arch(arch)}")
        kwargs = dict(obj["arch_kwargs"])
        if num_classes is not None and int(num_classes) != int(kwargs.get("num_classes", 10)):
            raise AtprobeError(
                f"{path}: checkpoint has {kwargs.get('num_classes')} classes, not {num_classes}"
            )
        ckpt = Checkpoint(
            path=path,
            sha256=digest,
            arch=file_arch,
            arch_kwargs=kwargs,
            num_classes=int(obj.get("num_classes", kwargs.get("num_classes", 10))),
            dataset=dataset or obj.get("dataset"),
            state_dict=obj["model"],
            labels=obj.get("labels"),
            label_spec=dict(obj.get("label_spec") or {}),
            train_config=dict(obj.get("train_config") or {}),
            epoch=obj.get("epoch"),
            native=True,
            raw=dict(obj),
        )
    else:
        if arch is None:
            raise AtprobeError(
                f"{path} is not an atprobe checkpoint: pass --arch NAME or --arch auto (and --num-classes, "
                "--dataset) to load it as foreign weights"
            )
        found, under = _find_state_dict(obj, path)
        unwrapped = _unwrap(found)
        state = unwrapped.state
        notes: dict[str, str] = {}
        layout = ([f"weights under '{under}'" + (" (of 'last', 'best': the 'last' ones)"
                                                 if under == "last" and "best" in obj else "")]
                  if under else []) + list(unwrapped.notes)
        if layout:
            notes["layout"] = "; ".join(layout)
        if _is_auto(arch):
            inferred = infer_arch(state, str(path))
            arch = inferred.arch
            notes["arch"] = inferred.line
        arch = canonical_arch(arch)
        if arch.startswith("wrn-"):
            # The TRADES/MART WideResNet registers a stage (sub_block1) that forward never
            # runs; its weights are dead, so they are dropped rather than reported.
            state = {k: v for k, v in state.items() if not k.startswith("sub_block1.")}
        probe = _probe(arch)
        carried = _carried_normalization(state, set(probe.state_dict()))
        inside = [sig.family for sig in identified(state) if sig.normalizes_inside]
        if carried is not None:
            given = mean is not None
            keys, mean, std = carried
            state = {k: v for k, v in state.items() if k not in keys}
            notes["normalization"] = (f"normalization from the file ({keys[0]}, {keys[1]}): mean {_numbers(mean)}, "
                                      f"std {_numbers(std)}" + (" (used instead of --normalize)" if given else ""))
        elif unwrapped.behind is not None and mean is None:
            raise AtprobeError(
                f"{path}: the weights are module {unwrapped.behind} of a Sequential whose normalization layer "
                "saved no values (the layout of adversarial_robustness_pytorch trained with --normalize): "
                "pass --normalize dataset"
            )
        elif inside and mean is None and getattr(getattr(probe, "normalize", None), "mean", None) is None:
            raise AtprobeError(
                f"{path}: {inside[0]} weights expect normalized inputs (the classes of that family normalize "
                "inside forward, with the dataset mean/std) and this file saved no values: pass --normalize dataset"
            )
        if num_classes is None:
            num_classes = _infer_num_classes(arch, state, 0.0) or 10
        kwargs = {
            "num_classes": int(num_classes),
            "dropout": 0.0,
            "mean": None if mean is None else [float(v) for v in mean],
            "std": None if std is None else [float(v) for v in std],
        }
        ckpt = Checkpoint(
            path=path,
            sha256=digest,
            arch=arch,
            arch_kwargs=kwargs,
            num_classes=int(num_classes),
            dataset=dataset,
            state_dict=state,
            native=False,
            notes=notes,
        )
    # Build once now so an architecture mismatch is reported at load time, not mid-probe.
    ckpt.build_model("cpu")
    return ckpt
