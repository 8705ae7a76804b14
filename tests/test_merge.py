"""``--shard I/N`` parts merged by ``atprobe merge`` equal the single-process CSVs byte for
byte; parts that overlap, leave a gap or come from another run are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_error, run_cli
from test_scaling import EVAL, HARDNESS, single_outputs

from atprobe.shards import merge_parts


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two checkpoints, the single-process outputs and 3 parts of each command (uneven: 4, 2, 1 samples)."""
    parts = [[*cmd, "--shard", f"{i}/3", out, f"{name}{i}{ext}"] for i in range(3)
             for cmd, out, name, ext in ((EVAL, "-o", "part", ".csv"), (HARDNESS, "--out", "hard", ""))]
    return single_outputs(tmp_path_factory.mktemp("merge"), *parts,
                          [*EVAL, "--steps", "3", "--shard", "2/3", "-o", "other2.csv"])


def test_parts_hold_their_share_only(root):
    rows = [json.loads((root / f"part{i}.meta.json").read_text())["part"]["rows"] for i in range(3)]
    assert rows == [[0, 4], [4, 6], [6, 7]]
    part = (root / "part1.csv").read_text().splitlines()
    assert len(part) == 1 + 2 * 2 * 2  # header + 2 checkpoints x 2 attacks x 2 samples
    assert not (root / "hard1" / "consistency.csv").exists()


def test_merged_eval_equals_one_process(root, monkeypatch):
    monkeypatch.chdir(root)
    run_cli("merge", "part2.csv", "part0.csv", "part1.csv", "-o", "merged.csv")  # any order
    for name in ("", ".samples"):
        assert (root / f"merged{name}.csv").read_bytes() == (root / f"one{name}.csv").read_bytes()
    meta = json.loads((root / "merged.meta.json").read_text())
    assert meta["merged_from"] == ["part0.csv", "part1.csv", "part2.csv"] and meta["world_size"] == 1
    assert "part" not in meta


def test_merged_hardness_equals_one_process(root, monkeypatch):
    monkeypatch.chdir(root)
    run_cli("merge", *[f"hard{i}/per_sample.csv" for i in range(3)], "-o", "hard_merged")
    for name in ("per_sample.csv", "consistency.csv"):
        assert (root / "hard_merged" / name).read_bytes() == (root / "one" / name).read_bytes(), name


@pytest.mark.parametrize("parts,fragment", [
    (["part0.csv", "part1.csv"], "incomplete: part 2/3 missing"),
    (["part0.csv", "part1.csv", "part1.csv", "part2.csv"], "overlap: part 1/3 is given twice"),
    (["part0.csv", "part1.csv", "other2.csv"], "comes from another run"),
    (["part0.csv", "hard1/per_sample.csv", "part2.csv"], "is a part of hardness"),
    (["one.csv"], "not a --shard part"),
    (["nothing.csv"], "no such part"),
])
def test_bad_parts_are_one_line_errors(root, monkeypatch, parts, fragment):
    monkeypatch.chdir(root)
    line = cli_error("merge", *parts, "-o", "bad.csv")
    assert fragment in line, line
    assert not Path("bad.csv").exists()


def test_merge_checks_the_rows_a_part_claims(root, tmp_path):
    for i in range(3):
        for suffix in (".csv", ".meta.json"):
            (tmp_path / f"p{i}{suffix}").write_bytes((root / f"part{i}{suffix}").read_bytes())
    meta = json.loads((tmp_path / "p1.meta.json").read_text())
    meta["part"]["rows"] = [4, 7]
    (tmp_path / "p1.meta.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="are not part 1/3"):
        merge_parts([tmp_path / f"p{i}.csv" for i in range(3)])


def test_an_empty_part_merges(root, monkeypatch):
    """7 samples in batches of 4 are 2 batches: part 2 of 3 has none and is an empty table."""
    monkeypatch.chdir(root)
    big = [*EVAL, "--batch-size", "4"]
    run_cli(*big, "-o", "big.csv")
    for i in range(3):
        run_cli(*big, "--shard", f"{i}/3", "-o", f"big{i}.csv")
    assert (root / "big2.csv").read_text().count("\n") == 1  # the header alone
    run_cli("merge", "big0.csv", "big1.csv", "big2.csv", "-o", "big_merged.csv")
    for name in ("", ".samples"):
        assert (root / f"big_merged{name}.csv").read_bytes() == (root / f"big{name}.csv").read_bytes()
