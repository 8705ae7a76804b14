"""The output rule (atprobe.outputs): no command writes over its inputs or an existing run,
and a bad output path is one line before any work (docs/checkpoints.md#outputs)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import cli_error, run_cli, save_seeded_checkpoint

from atprobe import outputs
from atprobe.errors import AtprobeError

PROBES = ("eval", "gradnorm", "stability", "gradcos", "curvature", "hessian", "flatness", "complexity")
TRAIN = ("--arch", "mlp", "--epochs", "1", "--train-n", "32", "--batch-size", "32", "--eval-n", "16", "--steps", "1",
         "--eval-attack", "pgd1", "--device", "cpu", "-q")


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the SHA-256 of each file ("dir" for folders, the target of a link)."""
    def what(p: Path) -> str:
        if p.is_symlink():
            return f"-> {os.readlink(p)}"
        return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): what(p) for p in sorted(root.rglob("*"))}


def refused(root: Path, fragment: str, *args) -> str:
    """``atprobe ARGS`` exits 2 with one ``Error:`` line naming ``fragment`` and changes nothing under ``root``."""
    before = tree(root)
    line = cli_error(*args)
    assert fragment in line, line
    assert tree(root) == before, line
    return line


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path as the working directory, with a checkpoint ``a.pt`` and a run directory ``run``
    (config.json, best.pt, final.pt, curves.csv)."""
    monkeypatch.chdir(tmp_path)
    save_seeded_checkpoint(tmp_path / "a.pt", epoch=1)
    run = tmp_path / "run"
    for name in ("best.pt", "final.pt"):
        save_seeded_checkpoint(run / name, epoch=1)
    (run / "config.json").write_text("{}\n")
    (run / "curves.csv").write_text("epoch,split,metric,value\n")
    return tmp_path


@pytest.mark.parametrize("command", PROBES)
def test_a_probe_never_writes_over_its_checkpoint(work, command):
    line = refused(work, "would replace an input", command, "a.pt", "-o", "a.pt")
    assert line.startswith("Error: a.pt:") and "choose another -o" in line


def test_an_output_inside_a_run_directory_being_read_is_refused(work):
    refused(work, "would land inside run, a run directory this command reads", "eval", "run", "-o", "run/x.csv")
    refused(work, "would land inside run, a run directory", "eval", "run/best.pt", "-o", "run/curves.csv")
    refused(work, "would land inside run", "hardness", "a.pt", "run", "--out", "run")
    refused(work, "would land inside run", "hardness", "a.pt", "run/final.pt", "--out", "run/hard")
    refused(work, "would land inside run", "table", "run", "-o", "run/best.pt")
    refused(work, "would land inside run", "plot", "run", "-o", "run/curves.png")
    refused(work, "would land inside", "eval", "a.pt", "--dataset", "npz", "--data-dir", "run", "-o", "run/e.csv")


def test_plot_never_writes_over_its_csv(work):
    (work / "t.csv").write_text("a,b\n1,2\n")
    refused(work, "would replace an input", "plot", "t.csv", "-o", "t.csv")


def test_an_input_reached_through_a_symlink_or_a_hard_link_is_still_an_input(work):
    os.symlink(work / "a.pt", work / "link.csv")
    refused(work, "would replace an input", "eval", "a.pt", "-o", "link.csv")
    os.link(work / "a.pt", work / "hard.csv")
    refused(work, "would replace an input", "eval", "a.pt", "-o", "hard.csv")


def test_every_file_a_command_writes_is_checked_siblings_and_meta_included(work):
    (work / "e.samples.csv").mkdir()
    refused(work, "e.samples.csv: is a directory", "eval", "a.pt", "--per-sample", "-o", "e.csv")
    (work / "e.meta.json").mkdir()
    refused(work, "e.meta.json: is a directory", "eval", "a.pt", "-o", "e.csv")
    (work / "h").mkdir()
    (work / "h" / "sorted.png").mkdir()
    refused(work, "sorted.png: is a directory", "hardness", "a.pt", "run/best.pt", "--out", "h")
    # a sibling that is the main table under another name: two outputs of one command collide
    os.symlink(work / "f.csv", work / "f.samples.csv")
    refused(work, "two outputs of this command are the same file", "eval", "a.pt", "--per-sample", "-o", "f.csv")


def test_bad_output_paths_are_one_line_before_any_work(work):
    (work / "file.txt").write_text("x")
    refused(work, "-o: the path is empty: give a file name", "eval", "a.pt", "-o", "")
    refused(work, "--out: the path is empty: give a folder name", "hardness", "a.pt", "run/best.pt", "--out", "")
    refused(work, "file.txt is a file, not a folder", "eval", "a.pt", "-o", "file.txt/x.csv")
    refused(work, "file.txt is a file, not a folder", "gradnorm", "a.pt", "-o", "file.txt/deeper/x.csv")
    refused(work, "file.txt is a file, not a folder", "hardness", "a.pt", "run/best.pt", "--out", "file.txt/h")
    refused(work, "file.txt is a file, not a folder", "plot", "run", "-o", "file.txt/f.png")
    refused(work, "is a directory", "eval", "a.pt", "-o", "run")  # click's own check of -o
    # root writes anywhere os.access says, but not in /proc: the temporary-file test catches it
    refused(work, "cannot write in /proc", "eval", "a.pt", "-o", "/proc/atprobe-x.csv")


def test_an_unwritable_folder_is_refused(work, monkeypatch):
    (work / "locked").mkdir()
    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p).name == "locked" else real(p, mode))
    refused(work, "cannot write in locked (no permission", "eval", "a.pt", "-o", "locked/new/x.csv")
    refused(work, "cannot write in locked", "train", "--out", "locked/run", *TRAIN)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder")
def test_a_read_only_folder_is_refused(work):
    (work / "ro").mkdir(mode=0o555)
    refused(work, "cannot write in ro", "eval", "a.pt", "-o", "ro/x.csv")


def test_the_planned_files_are_the_files_written(work):
    run_cli("eval", "a.pt", "--attack", "natural", "--n", "4", "--per-sample", "--device", "cpu", "-q",
            "-o", "out/e.csv")
    assert sorted((work / "out").iterdir()) == sorted(work / p for p in outputs.table_files("out/e.csv", [".samples"]))


def test_the_rule_refuses_colliding_outputs_and_names_no_file():
    with pytest.raises(AtprobeError, match="two outputs of this command are the same file"):
        outputs.check_outputs(["x/a.csv", "x/../x/a.csv"])
    with pytest.raises(AtprobeError, match="names a folder, not a file"):
        outputs.table_files("missing/..")
    assert [p.name for p in outputs.table_files("e.csv", [".samples"])] == [
        "e.csv", "e.meta.json", "e.samples.csv", "e.samples.meta.json"]


# ---------------------------------------------------------------------------- train --out


def fake_run(path: Path) -> dict[str, str]:
    path.mkdir(parents=True)
    for name, text in (("config.json", '{"old": true}\n'), ("final.pt", "old final"), ("last.pt", "old last"),
                       ("notes.txt", "mine")):
        (path / name).write_text(text)
    return tree(path)


def test_train_refuses_an_existing_run_and_any_non_empty_folder(tmp_path):
    old = fake_run(tmp_path / "run")
    line = refused(tmp_path, "run already exists and is not an empty folder", "train", "--out", tmp_path / "run",
                   *TRAIN)
    assert "--resume" in line and "--overwrite" in line
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "x.txt").write_text("x")
    refused(tmp_path, "not an atprobe train run directory", "train", "--out", tmp_path / "stuff", "--overwrite", *TRAIN)
    refused(tmp_path, "holds this input", "train", "--out", tmp_path / "run", "--overwrite", "--init-from",
            tmp_path / "run" / "final.pt", *TRAIN)
    refused(tmp_path, "--overwrite replaces the run in --out", "train", "--resume", tmp_path / "run", "--overwrite")
    refused(tmp_path, "--out: the path is empty", "train", "--out", "", *TRAIN)
    assert tree(tmp_path / "run") == old


def test_an_interrupted_train_overwrite_leaves_the_old_run_intact(tmp_path, monkeypatch):
    from atprobe.train import TrainConfig, Trainer, train

    run = tmp_path / "run"
    old = fake_run(run)
    staging = tmp_path / "run.overwrite"

    def stop(self):
        raise KeyboardInterrupt  # the run is stopped during its first save

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save", stop)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(arch="mlp", epochs=1, train_n=32, batch_size=32, eval_n=16, eval_attack="pgd1"), run,
                  device="cpu", overwrite=True)
    assert tree(run) == old  # byte-identical: nothing of the old run was touched
    assert (staging / "config.json").is_file()
    refused(tmp_path, "run.overwrite exists (an interrupted --overwrite", "train", "--out", run, "--overwrite", *TRAIN)
    shutil.rmtree(staging)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_train_overwrite_puts_the_complete_new_run_in_place(tmp_path):
    run = tmp_path / "run"
    fake_run(run)
    run_cli("train", "--out", run, "--overwrite", *TRAIN)
    assert json.loads((run / "config.json").read_text())["arch"] == "mlp"
    assert {"final.pt", "best.pt", "last.pt", "curves.csv"} <= {p.name for p in run.iterdir()}
    assert not (run / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or old copy left


def test_demo_out_checks_its_folder_before_any_work(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    refused(tmp_path, "is a file", "demo", "--out", tmp_path / "file.txt", "--budget", "quick")
    refused(tmp_path, "file.txt is a file, not a folder", "demo", "--out", tmp_path / "file.txt" / "d",
            "--budget", "quick")
