"""``hardness``: per-sample adversarial loss of several models on the same samples, and how
consistently the models rank the samples by it (Dong et al., ICLR 2022, Sec. 4.1,
Fig. 7(c), Fig. C.2, Fig. C.3: are the "hard" training examples of robust overfitting the
same across seeds and architectures?).

For every model ``m`` and sample ``i`` (image ``x_i``, the label ``y_i^m`` model ``m``
uses):

    adv_loss_i^m = CE(f_m(x_i'^m), y_i^m),   x_i'^m = PGD against f_m on CE(f_m(.), y_i^m)
    rank_i^m     = position of sample i when the samples are sorted by adv_loss^m,
                   largest first (1 = hardest); ties keep the samples' order in the split

Each model is attacked by its own PGD through the attacked-data path of ``atprobe eval``
(``atprobe.attacked``), from random starts that depend only on ``(seed, sample index)``
(``atprobe.starts``): every model starts sample ``i`` from the same point. For every
unordered pair of models (in the order given) :func:`consistency` reports
Kendall's tau-b and Spearman's rho between the two models' ``adv_loss`` vectors (scipy),
and the overlap of their ``k`` hardest samples, ``|top_k(a) & top_k(b)| / k``.

Losses are streamed batch by batch: only ``N`` floats (and ``N`` flags) per model are kept,
never the adversarial images; models are visited one after the other, so a lazy
``Mapping`` (as the CLI passes) holds one model in memory at a time.

``probe(models, data, config)`` returns the consistency table; :func:`per_sample_losses`
the per-sample table it is computed from. :func:`hardest_samples` and
:func:`adversarial_examples` pick the hardest samples and re-craft their adversarial images
for the gallery. The figures are drawn by :mod:`atprobe.plot.hardness`
(``sorted_loss_figure``, ``hardest_gallery``, ``gallery_figure``): this module draws nothing.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from atprobe import objectives
from atprobe.attacked import attacked_batches, model_device_dtype
from atprobe.attacks import AttackSpec, parse_attack
from atprobe.data import Split
from atprobe.errors import AtprobeError
from atprobe.probes._gradutil import check_threat, is_int
from atprobe.threat import ThreatModel

__all__ = [
    "COLUMNS",
    "CONSISTENCY_COLUMNS",
    "HardnessConfig",
    "adversarial_examples",
    "consistency",
    "hardest",
    "hardest_samples",
    "per_sample_losses",
    "probe",
    "ranks",
]

#: Columns of :func:`per_sample_losses` (one row per model and sample).
COLUMNS = ["index", "label", "true_label", "model", "adv_loss", "adv_correct", "rank"]
#: Columns of :func:`consistency` (one row per unordered pair of models).
CONSISTENCY_COLUMNS = ["model_a", "model_b", "n", "kendall_tau", "kendall_p", "spearman_rho", "spearman_p",
                       "top_k", "top_k_overlap"]


@dataclass(frozen=True)
class HardnessConfig:
    """What ``hardness`` measures.

    attack: an attack name for ``atprobe.attacks.parse_attack`` (``pgd10``: 10 steps of PGD
        on CE; ``pgd`` the threat model's steps; ``pgd20x5``, ``cw50``, ``fgsm``, ``natural``
        = no attack, the clean loss).
    threat: its budget; the default is the L-inf training budget, 8/255 with step
        ``alpha = eps/4`` (2/255).
    batch_size: samples per attack batch.
    seed: keys each sample's random starts (with the sample's index).
    top_k: the ``k`` of the top-k overlap (capped at the number of samples).
    amp: bf16 autocast on CUDA for the attack and the loss (off: exact float32 losses).
    """

    attack: str = "pgd10"
    threat: ThreatModel = ThreatModel()
    batch_size: int = 256
    seed: int = 0
    top_k: int = 100
    amp: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.attack, str):
            raise AtprobeError(f"attack must be a name such as pgd10, got {self.attack!r}")
        check_threat(self.threat)
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise AtprobeError(f"batch size must be an integer >= 1, got {self.batch_size!r}")
        if not is_int(self.top_k) or self.top_k < 1:
            raise AtprobeError(f"top-k must be an integer >= 1, got {self.top_k!r}")
        if not is_int(self.seed):
            raise AtprobeError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.amp, bool):
            raise AtprobeError(f"amp must be True or False, got {self.amp!r}")
        self.spec  # noqa: B018 (read to validate: parse_attack's and PGDConfig's one-line errors)

    @property
    def spec(self) -> AttackSpec:
        """The parsed attack."""
        return parse_attack(self.attack, self.threat)


# ---------------------------------------------------------------------------- per-sample losses


def _splits_for(models: Mapping[str, nn.Module], data: Split | Mapping[str, Split]) -> dict[str, Split]:
    """Each model's split (its labels); all must hold the same samples in the same order."""
    names = list(models.keys())
    if not names:
        raise AtprobeError("no model given")
    for name in names:
        if not isinstance(name, str) or not name:
            raise AtprobeError(f"model names must be non-empty strings, got {name!r}")
    if isinstance(data, Split):
        return {name: data for name in names}
    missing = [n for n in names if n not in data]
    if missing:
        raise AtprobeError(f"no samples given for model {missing[0]!r}")
    splits = {name: data[name] for name in names}
    first = splits[names[0]]
    for name in names[1:]:
        s = splits[name]
        same = len(s) == len(first) and (
            s.index is first.index or torch.equal(s.index.cpu(), first.index.cpu())
        ) and (s.x is first.x or torch.equal(s.x.cpu(), first.x.cpu()))
        if not same:
            raise AtprobeError(f"model {name!r} was given other samples than {names[0]!r}: "
                               "every model must see the same samples in the same order")
    return splits


def _model_losses(name: str, model: nn.Module, split: Split, config: HardnessConfig,
                  progress) -> tuple[np.ndarray, np.ndarray, int]:
    """``(adv_loss float64 (N,), adv_correct bool (N,), num_classes)`` of one model."""
    device, _ = model_device_dtype(model)
    n = len(split)
    max_label = int(split.y.max()) if n else -1
    losses = torch.empty(n, dtype=torch.float64, device=device)
    correct = torch.empty(n, dtype=torch.bool, device=device)
    classes = -1
    for b in attacked_batches(model, split, config.spec.config, seed=config.seed, batch_size=config.batch_size,
                              amp=config.amp, progress=progress):
        if b.rows.start == 0:
            classes = int(b.logits.shape[-1])
            if max_label >= classes:
                raise AtprobeError(f"model {name!r} has {classes} classes but the labels go up to {max_label}")
        losses[b.rows] = objectives.ce(b.logits, b.y).detach().to(torch.float64)
        correct[b.rows] = b.logits.argmax(dim=1) == b.y
    return losses.cpu().numpy(), correct.cpu().numpy(), classes


def ranks(adv_loss: np.ndarray | Sequence[float]) -> np.ndarray:
    """Rank of each entry when sorted by loss, largest first: 1 = hardest.

    Ties are broken by position (the earlier sample gets the smaller rank: a stable sort);
    NaN losses rank last, in their order. Returns int64 ranks 1..N.
    """
    loss = np.asarray(adv_loss, dtype=np.float64)
    order = np.argsort(-loss, kind="stable")  # stable: ties keep sample order; NaN sort last
    out = np.empty(loss.shape[0], dtype=np.int64)
    out[order] = np.arange(1, loss.shape[0] + 1)
    return out


def per_sample_losses(
    models: Mapping[str, nn.Module],
    data: Split | Mapping[str, Split],
    config: HardnessConfig = HardnessConfig(),
    *,
    progress=None,
) -> pd.DataFrame:
    """One row per (model, sample), columns :data:`COLUMNS`, models in the mapping's order
    and samples in the split's order.

    models: name -> model (on its device, any dtype; images are cast to it). Visited once
        each, in order: a lazy mapping that builds a model on access keeps one in memory.
    data: the samples, one ``Split`` for every model, or a mapping name -> ``Split`` when
        models use different labels (e.g. each its own trained labels); then every split
        must hold the same images in the same order (same ``index``), only ``y`` may differ.
    progress: anything with ``update(n)`` (a tqdm bar), advanced by the samples of every
        batch of every model.

    ``index`` is the sample's row in its original split (``Split.index``), ``label`` the
    label this model was attacked and scored with, ``adv_correct`` whether the model
    classifies the adversarial example as ``label``; ``adv_loss`` is in nats.
    Models are evaluated in eval mode (each submodule's mode restored afterwards).
    """
    splits = _splits_for(models, data)
    frames = []
    classes: dict[str, int] = {}
    for name, model in models.items():
        split = splits[name]
        if len(split) == 0:
            raise AtprobeError("no samples to probe")
        loss, correct, classes[name] = _model_losses(name, model, split, config, progress)
        del model
        first = next(iter(classes))
        if classes[name] != classes[first]:
            raise AtprobeError(f"the models have different numbers of classes ({first!r}: {classes[first]}, "
                               f"{name!r}: {classes[name]})")
        frames.append(pd.DataFrame({
            "index": split.index.cpu().numpy(),
            "label": split.y.cpu().numpy(),
            "true_label": split.true_y.cpu().numpy(),
            "model": name,
            "adv_loss": loss,
            "adv_correct": correct,
            "rank": ranks(loss),
        }, columns=COLUMNS))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------- consistency


def _by_model(per_sample: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The table's rows per model (models in order of first appearance), each model
    checked to hold the same samples in the same order as the first."""
    lacking = [c for c in ("index", "model", "adv_loss", "rank") if c not in per_sample.columns]
    if lacking:
        raise AtprobeError(f"the per-sample table lacks column(s) {', '.join(lacking)}")
    names = list(dict.fromkeys(per_sample["model"].tolist()))
    groups = {name: part for name, part in per_sample.groupby("model", sort=False)}
    parts = {name: groups[name] for name in names}
    if names:
        first = parts[names[0]]["index"].to_numpy()
        for name in names[1:]:
            if not np.array_equal(parts[name]["index"].to_numpy(), first):
                raise AtprobeError(f"model {name!r} has other samples than {names[0]!r} in the per-sample table")
    return parts


def consistency(per_sample: pd.DataFrame, top_k: int = 100) -> pd.DataFrame:
    """One row per unordered pair of models (``model_a`` before ``model_b`` in the table's
    order), columns :data:`CONSISTENCY_COLUMNS`:

    n: samples compared (every model has the same ones).
    kendall_tau, kendall_p: Kendall's tau-b of the two ``adv_loss`` vectors and its
        two-sided p-value (``scipy.stats.kendalltau``; tau-b corrects for ties).
    spearman_rho, spearman_p: Spearman's rank correlation (ties get their average rank)
        and its two-sided p-value (``scipy.stats.spearmanr``).
    top_k: ``k = min(top_k, n)``.
    top_k_overlap: ``|H_a & H_b| / k`` with ``H_m`` the samples of rank <= k under model m
        (the table's ``rank`` column): 1 = the same k hardest samples, about ``k / n`` by chance.

    NaN losses make tau and rho NaN; a model with constant losses gives NaN tau and rho.
    """
    from scipy import stats  # local: scipy.stats import is slow

    if not is_int(top_k) or top_k < 1:
        raise AtprobeError(f"top-k must be an integer >= 1, got {top_k!r}")
    parts = _by_model(per_sample)
    names = list(parts)
    if len(names) < 2:
        raise AtprobeError(f"consistency needs at least two models, got {len(names)}")
    n = len(parts[names[0]])
    k = min(int(top_k), n)
    loss = {m: parts[m]["adv_loss"].to_numpy(dtype=np.float64) for m in names}
    top = {m: set(parts[m]["index"].to_numpy()[parts[m]["rank"].to_numpy() <= k].tolist()) for m in names}
    rows = []
    for a, b in itertools.combinations(names, 2):
        with warnings.catch_warnings():  # constant input: NaN, documented
            warnings.simplefilter("ignore")
            tau, tau_p = stats.kendalltau(loss[a], loss[b])
            rho, rho_p = stats.spearmanr(loss[a], loss[b])
        rows.append({
            "model_a": a, "model_b": b, "n": n,
            "kendall_tau": float(tau), "kendall_p": float(tau_p),
            "spearman_rho": float(rho), "spearman_p": float(rho_p),
            "top_k": k, "top_k_overlap": len(top[a] & top[b]) / k if k else float("nan"),
        })
    return pd.DataFrame(rows, columns=CONSISTENCY_COLUMNS)


def probe(
    models: Mapping[str, nn.Module],
    data: Split | Mapping[str, Split],
    config: HardnessConfig = HardnessConfig(),
    *,
    progress=None,
) -> pd.DataFrame:
    """The consistency table of ``models`` on ``data``:
    ``consistency(per_sample_losses(models, data, config), config.top_k)``."""
    if len(models) < 2:
        raise AtprobeError(f"hardness needs at least two models, got {len(models)}")
    return consistency(per_sample_losses(models, data, config, progress=progress), config.top_k)


def hardest(per_sample: pd.DataFrame, k: int) -> pd.DataFrame:
    """The ``k`` hardest samples by mean rank over the models (smallest mean first; ties in
    sample order), columns ``index, label, true_label, mean_rank`` (labels of the first model)."""
    if not is_int(k) or k < 1:
        raise AtprobeError(f"k must be an integer >= 1, got {k!r}")
    parts = _by_model(per_sample)
    names = list(parts)
    if not names:
        raise AtprobeError("the per-sample table is empty")
    first = parts[names[0]]
    mean_rank = np.mean([parts[m]["rank"].to_numpy(dtype=np.float64) for m in names], axis=0)
    order = np.argsort(mean_rank, kind="stable")[: min(int(k), len(first))]
    return pd.DataFrame({
        "index": first["index"].to_numpy()[order],
        "label": first["label"].to_numpy()[order] if "label" in first else -1,
        "true_label": first["true_label"].to_numpy()[order] if "true_label" in first else -1,
        "mean_rank": mean_rank[order],
    })


# ---------------------------------------------------------------------------- adversarial images


def adversarial_examples(model: nn.Module, data: Split, config: HardnessConfig = HardnessConfig()) -> Tensor:
    """The adversarial images of ``data`` against ``model`` (float32, CPU, NCHW), crafted as
    :func:`per_sample_losses` crafts them (the same attacked-data path and keyed starts).
    Meant for a handful of samples (the gallery)."""
    out = [b.x_adv.detach().to("cpu", torch.float32)
           for b in attacked_batches(model, data, config.spec.config, seed=config.seed, batch_size=config.batch_size,
                                     amp=config.amp)]
    return torch.cat(out).contiguous()


def hardest_samples(data: Split, per_sample: pd.DataFrame, k: int = 10) -> tuple[pd.DataFrame, Split]:
    """``(top, samples)``: the ``k`` hardest samples by mean rank (:func:`hardest`) and those
    samples of ``data`` (in the order of ``top``), e.g. for :func:`adversarial_examples` and
    ``atprobe.plot.hardest_gallery``. Every sample of ``top`` must be in ``data``."""
    top = hardest(per_sample, k)
    position = {int(v): i for i, v in enumerate(data.index.cpu().tolist())}
    missing = [int(i) for i in top["index"] if int(i) not in position]
    if missing:
        raise AtprobeError(f"sample {missing[0]} of the per-sample table is not in the given split")
    rows = [position[int(i)] for i in top["index"]]
    return top, data.subset(rows)
