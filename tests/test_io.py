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
