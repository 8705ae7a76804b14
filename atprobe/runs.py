"""``atprobe train`` run directories as units of a study: checked, named by their config, and
laid out as the paper's tables and figures over sets of runs.

* :func:`check_runs` refuses, before any work, what is not a run directory with the files
  a command needs (``config.json``, ``best.pt``, ``final.pt``; ``curves.csv`` for figures);
* :func:`run_fields` are the identifying fields of a run read from its ``config.json``
  (``method, te, dataset, arch, label_noise, train_norm, train_eps, eval_attack``): the x
  variables of Fig. 2(c) (``label_noise``) and Fig. 7(b)/C.1 (``train_eps``);
* :func:`run_curves` is a run's ``curves.csv`` with those fields as columns (what
  ``atprobe plot RUN_DIR`` reads);
* :func:`best_final` lays an evaluation of each run's ``best.pt`` and ``final.pt`` out as
  Table 1: one row per (run, attack) with ``best``, ``final`` and ``diff = best - final``.

The checkpoints themselves are read through :mod:`atprobe.study` (a file given by path is
itself, :func:`atprobe.study.expand_checkpoints`) and evaluated by
:func:`atprobe.evaluate.evaluate`; this module only names and arranges.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from atprobe.errors import AtprobeError

__all__ = ["RUN_FIELDS", "TABLE_COLUMNS", "best_final", "check_runs", "run_config", "run_curves",
           "run_fields", "table_checkpoints"]

#: The columns naming a run, read from its config.json (see :func:`run_fields`).
RUN_FIELDS = ("remedy", "method", "te", "dataset", "arch", "label_noise", "train_norm", "train_eps", "eval_attack")

#: The names of the training methods in :func:`remedy` (the paper's).
METHOD_NAMES = {"pgd_at": "PGD-AT", "trades": "TRADES", "fgsm_rs": "FGSM-RS", "standard": "standard"}


def remedy(config) -> str:
    """The run's method with what it adds against robust overfitting, as Table 2 names the rows:
    the method (``PGD-AT``, ``TRADES``...) then, in this order, ``+Eq6`` (--mix-clean), ``+LS``,
    ``+SAT``, ``+KD``, ``+SWA``, ``+Co-teaching``, ``+AWP``, ``+TE``. Table 2's rows: PGD-AT,
    PGD-AT+LS, PGD-AT+SAT (SAT), PGD-AT+KD+SWA (KD-SWA), PGD-AT+Co-teaching, PGD-AT+TE."""
    parts = [METHOD_NAMES.get(config.method, config.method)]
    for on, name in ((config.mix_clean, "Eq6"), (config.label_smoothing > 0, "LS"), (config.sat, "SAT"),
                     (config.teacher_robust is not None, "KD"), (config.swa_start is not None, "SWA"),
                     (config.coteach, "Co-teaching"), (config.awp_gamma > 0, "AWP"), (config.te, "TE")):
        if on:
            parts.append(name)
    return "+".join(parts)

#: The columns of ``atprobe table`` (Table 1's layout), in order.
TABLE_COLUMNS = ["run", *RUN_FIELDS, "attack", "norm", "eps", "alpha", "steps", "restarts", "n", "best", "final",
                 "diff", "best_epoch", "final_epoch"]

#: The checkpoints of a run that Table 1 compares, in the order they are evaluated.
TABLE_FILES = ("best.pt", "final.pt")


def check_runs(runs: Sequence[str | os.PathLike], need: Sequence[str] = ("config.json", *TABLE_FILES)) -> list[str]:
    """``runs`` as strings, each checked to be a directory holding the files ``need``; a
    one-line error for the first that is not, or for a run given twice."""
    if not runs:
        raise AtprobeError("no run directory given")
    seen: dict[str, str] = {}
    for run in runs:
        path = Path(run)
        if not path.is_dir():
            what = "no such directory" if not path.exists() else "not a directory"
            raise AtprobeError(f"{run}: {what} (give atprobe train run directories)")
        missing = [name for name in need if not (path / name).is_file()]
        if missing:
            raise AtprobeError(f"{run}: not an atprobe train run directory (no {', '.join(missing)})")
        key = os.path.realpath(path)
        if key in seen:
            raise AtprobeError(f"{run}: the same run is given twice (as {seen[key]})")
        seen[key] = str(run)
    return [str(r) for r in runs]


def at_root(path: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """``path`` read from ``root`` when it is relative and a root is given (as a command run
    inside ``root`` would read it)."""
    path = Path(path)
    return path if root is None or path.is_absolute() else Path(root) / path


def run_config(run: str | os.PathLike):
    """The run's :class:`~atprobe.train.TrainConfig`, read from its ``config.json``."""
    from atprobe.train import TrainConfig  # torch-heavy; `atprobe.plot` reads runs without it until needed

    path = Path(run) / "config.json"
    try:
        return TrainConfig.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise AtprobeError(f"{path}: not a run's config ({type(exc).__name__}: {exc})") from None


def run_fields(run: str | os.PathLike) -> dict[str, Any]:
    """The run's identifying fields (:data:`RUN_FIELDS`) from its config: its
    :func:`remedy` (the method and its additions, Table 2's row name), the training
    ``method``, ``te`` (temporal ensembling on), ``dataset``, ``arch``, ``label_noise``
    (fraction of training labels replaced by random ones, 0-1), ``train_norm`` and
    ``train_eps`` (the training threat model, eps in [0, 1] pixel units) and
    ``eval_attack`` (the robust metric of its curves and of best.pt's selection)."""
    c = run_config(run)
    return {"remedy": remedy(c), "method": c.method, "te": bool(c.te), "dataset": c.dataset, "arch": c.arch,
            "label_noise": float(c.label_noise), "train_norm": c.threat.norm, "train_eps": float(c.threat.eps),
            "eval_attack": c.eval_attack}


def best_selection(run: str | os.PathLike) -> dict[str, Any]:
    """How the run chose its ``best.pt``: the ``eval_attack`` and the ``split`` and number of
    samples ``n`` it scored every epoch on, as the run recorded them in ``curves.meta.json``
    (``best_split``, ``best_n``); a run that did not record ``n`` gives its ``eval_n`` (0 = the
    whole split)."""
    c = run_config(run)
    meta_path = Path(run) / "curves.meta.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    return {"eval_attack": c.eval_attack, "split": meta.get("best_split", "val" if c.val_size else "test"),
            "n": meta.get("best_n", c.eval_n)}


def run_curves(run: str | os.PathLike) -> pd.DataFrame:
    """The run's ``curves.csv`` (``epoch, split, metric, value``) with ``run`` (the
    directory as given) and :data:`RUN_FIELDS` as its first columns."""
    (name,) = check_runs([run], need=("config.json", "curves.csv"))
    path = Path(run) / "curves.csv"
    try:
        curves = pd.read_csv(path, dtype={"split": str, "metric": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise AtprobeError(f"{path}: cannot read it as a CSV table ({type(exc).__name__})") from None
    fields = {"run": name, **run_fields(run)}
    for column, value in reversed(list(fields.items())):
        curves.insert(0, column, value)
    return curves


def table_checkpoints(runs: Sequence[str]) -> list[str]:
    """The checkpoint files Table 1 evaluates, run by run: ``RUN/best.pt``, ``RUN/final.pt``."""
    return [str(Path(run) / name) for run in runs for name in TABLE_FILES]


def best_final(evaluated: pd.DataFrame, runs: Sequence[str], checkpoints: Sequence,
               root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Table 1 from the evaluation of :func:`table_checkpoints`: ``evaluated`` has a
    ``checkpoint`` column (the paths of ``checkpoints``, the stubs of those files in that
    order) and ``atprobe.evaluate.EVAL_COLUMNS``; one row per (run, attack) with the run's
    fields, the attack's budget, ``best`` and ``final`` (accuracy of best.pt and final.pt,
    fractions in [0, 1]), ``diff = best - final`` and the two checkpoints' epochs. ``root``:
    where relative run directories are read from (their names stay as given)."""
    if len(checkpoints) != len(TABLE_FILES) * len(runs):
        raise AtprobeError(f"expected {len(TABLE_FILES)} checkpoints per run, got {len(checkpoints)} for "
                           f"{len(runs)} runs")
    budget = ["attack", "norm", "eps", "alpha", "steps", "restarts", "n"]
    rows = []
    for i, run in enumerate(runs):
        best_ckpt, final_ckpt = checkpoints[2 * i], checkpoints[2 * i + 1]
        best = evaluated[evaluated["checkpoint"] == str(best_ckpt.path)].reset_index(drop=True)
        final = evaluated[evaluated["checkpoint"] == str(final_ckpt.path)].reset_index(drop=True)
        if len(best) != len(final) or not best[budget].equals(final[budget]):
            raise AtprobeError(f"{run}: best.pt and final.pt were not evaluated under the same attacks")
        fields = {"run": run, **run_fields(at_root(run, root))}
        for b, f in zip(best.to_dict("records"), final.to_dict("records")):
            rows.append({**fields, **{k: b[k] for k in budget}, "best": b["accuracy"], "final": f["accuracy"],
                         "diff": b["accuracy"] - f["accuracy"], "best_epoch": best_ckpt.epoch,
                         "final_epoch": final_ckpt.epoch})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    for column in ("best_epoch", "final_epoch"):
        table[column] = table[column].astype("Int64")
    return table
