"""Atomic table writing: whole files or none, a meta file beside each, normal permissions."""

from __future__ import annotations

import json
import os
import stat

import pandas as pd
import pytest

from atprobe.io import atomic_write, meta_path, run_meta, write_table


def test_write_table_writes_csv_and_meta_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_table(pd.DataFrame({"a": [1, 2]}), tmp_path / "out" / "t.csv", run_meta(seed=3))
    finally:
        os.umask(old)
    path = tmp_path / "out" / "t.csv"
    assert pd.read_csv(path)["a"].tolist() == [1, 2]
    assert json.loads(meta_path(path).read_text())["seed"] == 3
    for p in (path, meta_path(path)):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]


def test_a_set_of_tables_is_written_all_or_nothing(tmp_path, monkeypatch):
    """A write that fails part-way (here: the third file of five hits a full disk) leaves every
    old file as it was and no new file, not even the ones before it; then a whole write works."""
    import errno

    import atprobe.io as io

    a, b = tmp_path / "a.csv", tmp_path / "a.samples.csv"
    old = {a: b"old a\n", meta_path(a): b"old meta\n"}
    for path, data in old.items():
        path.write_bytes(data)
    tables = [(pd.DataFrame({"x": [1, 2]}), b, {"t": "samples"}), (pd.DataFrame({"y": [3]}), a, {"t": "main"})]
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    with pytest.raises(io.AtprobeError, match=r"cannot write .*a.meta.json: No space left on device"):
        io.write_tables(tables, also={tmp_path / "fig.png": b"png"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.meta.json"]
    assert {p: p.read_bytes() for p in old} == old
    monkeypatch.setattr(io.os, "fsync", real_fsync)
    io.write_tables(tables, also={tmp_path / "fig.png": b"png"})
    assert pd.read_csv(b)["x"].tolist() == [1, 2] and pd.read_csv(a)["y"].tolist() == [3]
    assert json.loads(meta_path(b).read_text())["t"] == "samples" and (tmp_path / "fig.png").read_bytes() == b"png"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
