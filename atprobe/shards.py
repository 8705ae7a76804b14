"""Joining ``--shard I/N`` parts into the table one process writes (``atprobe merge``).

A part of eval, hardness, gradnorm or curvature is the per-sample rows of one share of the
samples (``atprobe.distributed.SampleShare``: whole batches, so each row is bit for bit the
single-process one); a part of stability, gradcos or flatness (:data:`POINT_KINDS`) is the
rows of whole units (directions, checkpoint pairs, grid points) on every sample, with a
``unit`` column that orders them. Each has a ``.meta.json`` whose ``part`` record says
which. :func:`merge_parts` checks that the parts come from one run (the same meta but for
when, how and which part) and cover every share (or unit) exactly once, joins their rows in
sample (or unit) order and finishes them as the command finishes its own gathered rows
(``atprobe.studies.eval_from_samples``, ``hardness_from_samples``, ``flatness_from_curve``...):
the merged CSVs equal the single-process ones.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from atprobe.distributed import batch_share, interleave_blocks
from atprobe.errors import AtprobeError
from atprobe.io import meta_path, write_tables
from atprobe.outputs import check_outputs, table_files

__all__ = ["KINDS", "Part", "merge_parts", "read_part", "write_merged"]

#: The commands whose parts merge, by the ``table`` their parts record.
KINDS = {"part eval": "eval", "part hardness": "hardness", "part gradnorm": "gradnorm",
         "part curvature": "curvature", "part stability": "stability", "part gradcos": "gradcos",
         "part flatness": "flatness", "part plane": "plane", "part path": "path"}
#: The kinds whose parts hold whole points (units: directions, pairs, grid points) of every
#: sample, not a share of the samples; their rows carry the ``unit`` that orders them.
POINT_KINDS = ("stability", "gradcos", "flatness", "plane", "path")
#: The table name one process gives the main table of each point kind.
POINT_MAIN = {"stability": "main", "gradcos": "main", "flatness": "main", "plane": "plane", "path": "path"}
#: Meta fields that legitimately differ between the parts of one run.
VOLATILE = ("command", "created", "part", "rows", "versions")


class Part:
    """One part: its path, meta record and ``part`` record (index, count, n, batch_size, rows)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta = meta_path(self.path)
        if not self.path.is_file():
            raise AtprobeError(f"{self.path}: no such part")
        if not meta.is_file():
            raise AtprobeError(f"{self.path}: no {meta.name} beside it: not a part written by atprobe --shard")
        self.meta: dict[str, Any] = json.loads(meta.read_text())
        self.record = self.meta.get("part")
        if not isinstance(self.record, dict) or self.meta.get("table") not in KINDS:
            raise AtprobeError(f"{self.path}: not a --shard part (its .meta.json has no part record)")
        self.kind = KINDS[self.meta["table"]]
        self.index, self.count = int(self.record["index"]), int(self.record["count"])

    @property
    def identity(self) -> dict[str, Any]:
        """What must agree between the parts of one run."""
        versions = self.meta.get("versions", {})
        return {**{k: v for k, v in self.meta.items() if k not in VOLATILE},
                "versions": {k: versions.get(k) for k in ("atprobe", "torch")},
                "part": {k: v for k, v in self.record.items() if k not in ("index", "rows")}}

    def rows(self) -> pd.DataFrame:
        """The part's rows, floats read back to the same bits they were written with."""
        return pd.read_csv(self.path)  # pandas >= 3 reads floats back to the bits written (tested)


def read_part(path: str | os.PathLike) -> Part:
    return Part(path)


def _check_cover(parts: Sequence[Part]) -> list[Part]:
    """``parts`` in share order, after checking they are one run's and each share is there once."""
    first = parts[0]
    for p in parts[1:]:
        if p.kind != first.kind:
            raise AtprobeError(f"{p.path} is a part of {p.kind}, {first.path} of {first.kind}: merge one command's")
        mine, theirs = p.identity, first.identity
        if mine != theirs:
            key = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
            raise AtprobeError(f"{p.path} comes from another run than {first.path} (its {key} differs)")
    seen: dict[int, Part] = {}
    for p in parts:
        if p.index in seen:
            raise AtprobeError(f"the parts overlap: part {p.index}/{p.count} is given twice ({seen[p.index].path}, "
                               f"{p.path})")
        seen[p.index] = p
    missing = [i for i in range(first.count) if i not in seen]
    if missing:
        raise AtprobeError(f"the parts are incomplete: part {', '.join(f'{i}/{first.count}' for i in missing)} "
                           "missing")
    if first.kind in POINT_KINDS:
        return [seen[i] for i in range(first.count)]  # their units are checked on their rows
    n, batch = int(first.record["n"]), int(first.record["batch_size"])
    for p in parts:
        share = batch_share(n, batch, p.index, p.count)
        if list(p.record["rows"]) != [share.start, share.stop]:
            raise AtprobeError(f"{p.path}: its rows {p.record['rows']} are not part {p.index}/{p.count} of {n} "
                               f"samples in batches of {batch}")
    return [seen[i] for i in range(first.count)]


def merge_parts(paths: Sequence[str | os.PathLike]) -> tuple[str, Any, dict[str, Any]]:
    """``(kind, tables, meta)`` of the parts at ``paths`` joined: ``kind`` is the command;
    ``tables`` its ``atprobe.study.Tables`` (eval, gradnorm, curvature) or ``(per_sample,
    consistency)`` (hardness); ``meta`` the single-process record with ``merged_from``."""
    from atprobe import studies

    if not paths:
        raise AtprobeError("no part given")
    parts = _check_cover([Part(p) for p in paths])
    frames = [p.rows() for p in parts]
    if parts[0].kind in POINT_KINDS:
        return _merge_points(parts, frames)
    for p, frame in zip(parts, frames):
        size = p.record["rows"][1] - p.record["rows"][0]
        if (size == 0) != (len(frame) == 0) or (size and len(frame) % size):
            raise AtprobeError(f"{p.path}: {len(frame)} rows, not whole blocks of its {size} samples")
    samples = interleave_blocks(frames, [p.record["rows"][1] - p.record["rows"][0] for p in parts])
    first = parts[0].meta
    meta = _single_meta(parts)
    kind = parts[0].kind
    if kind == "eval":
        return kind, studies.eval_from_samples(samples, first["attack_fields"], meta, bool(first["per_sample"])), meta
    if kind in ("gradnorm", "curvature"):
        finish = studies.gradnorm_from_samples if kind == "gradnorm" else studies.curvature_from_samples
        return kind, finish(samples, meta, bool(first["per_sample"])), meta
    return "hardness", studies.hardness_from_samples(samples, int(first["config"]["top_k"])), meta


def _single_meta(parts: Sequence[Part]) -> dict[str, Any]:
    """The single-process meta record of a run from its first part's, with ``merged_from``."""
    meta = {k: v for k, v in parts[0].meta.items() if k not in ("part", "rows", "columns", "table", "attack_fields",
                                                                 "per_sample")}
    meta.update(command=list(sys.argv), world_size=1, merged_from=[str(p.path) for p in parts])
    return meta


def _merge_points(parts: Sequence[Part], frames: Sequence[pd.DataFrame]) -> tuple[str, Any, dict[str, Any]]:
    """Parts that hold whole units: every unit of ``0..units-1`` in exactly one part, the rows
    ordered by unit (each unit's rows in the order its part wrote them), ``unit`` dropped."""
    from atprobe import studies
    from atprobe.study import Tables

    units = int(parts[0].record["units"])
    owner: dict[int, Part] = {}
    for p, frame in zip(parts, frames):
        if "unit" not in frame.columns:
            raise AtprobeError(f"{p.path}: no unit column: not a part written by atprobe --shard")
        for u in dict.fromkeys(int(u) for u in frame["unit"]):
            if u in owner:
                raise AtprobeError(f"the parts overlap: unit {u} is in {owner[u].path} and {p.path}")
            if not 0 <= u < units:
                raise AtprobeError(f"{p.path}: unit {u} is not one of the run's {units}")
            owner[u] = p
    missing = [u for u in range(units) if u not in owner]
    if missing:
        raise AtprobeError(f"the parts are incomplete: unit {', '.join(map(str, missing[:5]))}"
                           f"{' ...' if len(missing) > 5 else ''} of {units} missing")
    kept = [f for f in frames if len(f)]
    rows = pd.concat(kept, ignore_index=True) if kept else frames[0]
    rows = rows.sort_values("unit", kind="stable", ignore_index=True).drop(columns="unit")
    meta = _single_meta(parts)
    kind = parts[0].kind
    if kind == "flatness":
        return kind, studies.flatness_from_curve(rows, meta, bool(parts[0].record.get("curve"))), meta
    return kind, Tables(rows, meta, main_name=POINT_MAIN[kind]), meta


def output_files(kind: str, output: str | os.PathLike, per_sample: bool = False) -> list[Path]:
    """Every file :func:`write_merged` writes for ``kind`` at ``output``."""
    if kind == "flatness":
        return table_files(output, [".curve"] if per_sample else [])
    if kind != "hardness":
        return table_files(output, [".samples"] if per_sample else [])
    out = Path(output)
    return [*table_files(out / "per_sample.csv"), *table_files(out / "consistency.csv")]


def write_merged(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> tuple[str, Path]:
    """Merge the parts at ``paths`` (:func:`merge_parts`) and write the result where the
    command would have: eval: ``output`` (and its ``.samples`` sibling if the run asked for
    it); hardness: ``per_sample.csv`` and ``consistency.csv`` in the directory ``output``
    (the figures need the models: run hardness in one process or under torchrun for them);
    gradnorm and curvature: as eval."""
    kind, tables, meta = merge_parts(paths)
    if kind != "hardness":
        check_outputs(output_files(kind, output, bool(tables.extra)), paths)
        return kind, tables.write(output)
    check_outputs(output_files(kind, output), paths, directories=[output])
    per_sample, consistency = tables
    out = Path(output)
    write_tables([(per_sample, out / "per_sample.csv", {**meta, "table": "per-sample"}),
                  (consistency, out / "consistency.csv", {**meta, "table": "consistency"})])
    return kind, out
