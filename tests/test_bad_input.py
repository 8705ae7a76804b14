"""The bad-input matrix (issue 16): every command, fed nonsense, fails the user-facing way.

Each row of ``CASES`` is ``(id, argv, fragment)``: ``atprobe ARGV`` run in-process (click's
``CliRunner``, through :func:`conftest.run_cli`) from the case's own empty working folder, with
``{name}`` in an argument replaced by a path of the shared inputs (:func:`inputs`) or of the case
(``{out}``: a CSV path in the case folder, ``{dir}``: a not yet existing folder in it; ``{own}``,
``{ownrun}``: the case's own copy of the cnn checkpoint and of the run, for cases that write over
their input until the outputs branch refuses them, so the shared inputs stay intact). Every
case asserts:

* exit status 2, nothing on stdout, no traceback, exactly one ``Error:`` line (the last on
  stderr), which contains ``fragment``;
* nothing written and nothing changed: the SHA-256 of every file under the shared inputs and
  under the case folder, and the set of files and folders there, are the same before and
  after (no output, no ``.*.tmp`` temp file, no run directory, not even an empty folder).

To add a case, add a row; add an input to :func:`inputs` when no existing one fits. The signal, disk-full and
concurrent-writer cases at the end run ``atprobe`` in subprocesses (docs/errors.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_seeded_checkpoint, write_npz

# The tiny trained run every run-directory case reads (tests/test_plot.py's settings, smaller).
TRAIN = ["train", "--arch", "mlp", "--train-n", "64", "--batch-size", "32", "--epochs", "2", "--steps", "1",
         "--eval-n", "16", "--eval-attack", "pgd1", "--save-every", "1", "--log-grad-ratio", "0", "--device", "cpu",
         "-q"]
# Put before a case's own arguments (the last of a repeated option wins): a case that is wrongly
# accepted then runs in seconds instead of training or probing for minutes.
CHEAP = {"train": TRAIN[1:], "table": ["--device", "cpu", "--steps", "1", "--n", "8"],
         **{c: ["--device", "cpu", "--steps", "1", "--n", "8"]
            for c in ("eval", "gradnorm", "gradcos", "curvature", "hessian", "flatness", "complexity", "hardness",
                      "stability")}}


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The shared inputs of every case, made once: checkpoints good and bad, a run, CSVs."""
    root = tmp_path_factory.mktemp("bad_input")
    p: dict[str, Path] = {"root": root}
    p["cnn"] = save_seeded_checkpoint(root / "cnn.pt", epoch=1)
    p["cnn2"] = save_seeded_checkpoint(root / "cnn2.pt", seed=1, epoch=2)
    p["mlp"] = save_seeded_checkpoint(root / "mlp.pt", arch="mlp", epoch=1)
    p["c100"] = save_seeded_checkpoint(root / "c100.pt", classes=100, epoch=1)
    torch.manual_seed(0)
    from atprobe.models import build_model

    p["bare"] = root / "bare.pt"  # a foreign state_dict of cnn-small
    torch.save(build_model("cnn-small").state_dict(), p["bare"])
    data = p["cnn"].read_bytes()
    p["trunc"] = root / "trunc.pt"
    p["trunc"].write_bytes(data[: len(data) // 2])
    p["text"] = root / "text.pt"
    p["text"].write_text("this is not a checkpoint\n")
    p["empty"] = root / "empty.pt"
    p["empty"].write_bytes(b"")
    p["list"] = root / "list.pt"  # loadable, but not a dict of weights
    torch.save([1, 2, 3], p["list"])
    p["nostate"] = root / "nostate.pt"
    torch.save({"epoch": 3, "note": torch.zeros(0)[:0].numel()}, p["nostate"])
    p["code"] = root / "code.pt"  # unpickling it would run code (a class from the standard library)
    torch.save({"model": build_model("mlp").state_dict(), "when": __import__("datetime").date(2020, 1, 1)}, p["code"])
    p["emptydir"] = root / "emptydir"
    p["emptydir"].mkdir()
    p["run"] = root / "run"
    run_cli(*TRAIN, "--out", p["run"])
    p["run2"] = root / "run2"  # another method: a table of run and run2 mixes settings
    run_cli(*TRAIN, "--method", "trades", "--eps", "4/255", "--out", p["run2"])
    p["curves"] = p["run"] / "curves.csv"
    p["csv"] = root / "junk.csv"
    p["csv"].write_text("a,b\n1,2\n")
    p["emptycsv"] = root / "empty.csv"
    p["emptycsv"].write_text("")
    p["file"] = root / "a_file"
    p["file"].write_text("x\n")
    p["npz100"] = write_npz(root / "c100.npz", n_train=128, n_test=64, classes=100)  # labels a 10-class model lacks
    p["npz_bad"] = root / "bad.npz"
    p["npz_bad"].write_bytes(b"PK\x03\x04 not really a zip")
    return p


def case(id_: str, argv: str | list[str], fragment: str, *marks) -> pytest.param:
    args = argv.split() if isinstance(argv, str) else list(argv)
    return pytest.param(args, fragment, id=id_, marks=marks)


CKPT_COMMANDS = ["eval", "gradnorm", "gradcos", "curvature", "hessian", "flatness", "complexity", "hardness"]

CASES = [
    # ------------------------------------------------------------------ every command: unknown options, no args
    *[case(f"{c}-unknown-option", f"{c} {{cnn}} --frobnicate", "No such option") for c in CKPT_COMMANDS],
    case("stability-unknown-option", "stability {cnn} --frobnicate", "No such option"),
    case("train-unknown-option", "train --out {dir} --frobnicate", "No such option"),
    case("table-unknown-option", "table {run} --frobnicate", "No such option"),
    case("plot-unknown-option", "plot {curves} --frobnicate", "No such option"),
    case("demo-unknown-option", "demo --out {dir} --frobnicate", "No such option"),
    case("unknown-command", "frobnicate", "No such command"),
    *[case(f"{c}-no-checkpoint", f"{c} -q", "Missing argument") for c in CKPT_COMMANDS],
    case("table-no-run", "table -q", "Missing argument"),
    case("plot-no-csv", "plot -q", "give one or more CSV files"),
    case("stability-no-model", "stability -q", "CHECKPOINT or --init"),
    case("stability-both", "stability {cnn} --init cnn-small -q", "one of them"),
    # ------------------------------------------------------------------ input files
    *[case(f"{c}-missing-file", f"{c} {{root}}/nope.pt -q", "not found") for c in CKPT_COMMANDS],
    case("eval-empty-dir", "eval {emptydir} -q", "no checkpoints in this directory"),
    case("gradnorm-text-ckpt", "gradnorm {text} -q", "not a readable PyTorch checkpoint"),
    case("eval-truncated-ckpt", "eval {trunc} -q", "truncated"),
    case("curvature-empty-ckpt", "curvature {empty} -q", "not a readable PyTorch checkpoint"),
    case("hessian-list-ckpt", "hessian {list} --arch cnn-small -q", "not a checkpoint"),
    case("flatness-nostate-ckpt", "flatness {nostate} --arch cnn-small -q", "no state_dict"),
    case("eval-foreign-no-arch", "eval {bare} -q", "pass --arch"),
    case("eval-foreign-wrong-arch", "eval {bare} --arch mlp -q", "do not fit"),
    case("eval-native-other-arch", "eval {cnn} --arch mlp -q", "not a mlp"),
    case("eval-native-other-classes", "eval {cnn} --num-classes 100 -q", "not 100"),
    case("gradcos-code-ckpt", "gradcos {code} {cnn} --arch mlp -q", "run"),
    case("complexity-unknown-arch", "complexity {bare} --arch resnet9000 -q", "resnet9000"),
    case("stability-unknown-init-arch", "stability --init resnet9000 -q", "resnet9000"),
    case("train-init-from-missing", "train --out {dir} --init-from {root}/nope.pt", "does not exist"),
    case("train-init-from-text", "train --out {dir} --init-from {text}", "not a readable PyTorch checkpoint"),
    case("train-init-from-other-arch", "train --out {dir} --init-from {mlp} --arch cnn-small", "mlp"),
    case("eval-cifar10-missing", "eval {cnn} --dataset cifar10 --data-dir {emptydir} -q", "CIFAR-10 not found"),
    case("eval-npz-bad", "eval {cnn} --dataset npz --data-dir {npz_bad} -q", "npz"),
    case("eval-normalize-no-dataset", "eval {bare} --arch cnn-small --normalize dataset -q", "--dataset"),
    # ------------------------------------------------------------------ choices
    case("eval-bad-split", "eval {cnn} --split dev -q", "Invalid value for '--split'"),
    case("gradnorm-bad-labels", "gradnorm {cnn} --labels noisy -q", "Invalid value for '--labels'"),
    case("gradnorm-bad-norm", "gradnorm {cnn} --norm l3 -q", "Invalid value for '--norm'"),
    case("gradcos-bad-loss", "gradcos {cnn} {cnn2} --loss mse -q", "Invalid value for '--loss'"),
    case("curvature-bad-at", "curvature {cnn} --at middle -q", "Invalid value for '--at'"),
    case("hessian-bad-scope", "hessian {cnn} --scope most -q", "Invalid value for '--scope'"),
    case("hessian-bad-blocks", "hessian {cnn} --blocks rows -q", "Invalid value for '--blocks'"),
    case("hessian-bad-engine", "hessian {cnn} --engine numpy -q", "Invalid value for '--engine'"),
    case("flatness-bad-ignore", "flatness {cnn} --ignore all -q", "Invalid value for '--ignore'"),
    case("stability-bad-direction-norm", "stability {cnn} --direction-norm unit -q", "--direction-norm"),
    case("eval-bad-start", "eval {cnn} --start gaussian -q", "Invalid value for '--start'"),
    case("eval-bad-dataset", "eval {cnn} --dataset mnist -q", "Invalid value for '--dataset'"),
    case("eval-bad-normalize", "eval {cnn} --normalize imagenet -q", "Invalid value for '--normalize'"),
    case("train-bad-method", "train --out {dir} --method mart2", "Invalid value for '--method'"),
    case("train-bad-optimizer", "train --out {dir} --optimizer lbfgs", "Invalid value for '--optimizer'"),
    case("train-bad-schedule", "train --out {dir} --schedule step", "Invalid value for '--schedule'"),
    case("train-unknown-arch", "train --out {dir} --arch resnet9000", "resnet9000"),
    case("train-unknown-preset", "train --out {dir} --preset table9", "table9"),
    case("complexity-bad-measure", "complexity {cnn} --measures spectral,vibes -q", "vibes"),
    case("complexity-no-measure", "complexity {cnn} --measures , -q", "at least one"),
    case("complexity-bad-margin-on", "complexity {cnn} --margin-on both -q", "--margin-on"),
    case("plot-bad-kind", "plot {curves} --kind pie -o {root}/x.png", "pie"),
    case("plot-wrong-kind", "plot {curves} --kind gradnorm -o {dir}/x.png", "gradnorm"),
    case("plot-bad-suffix", "plot {curves} -o {dir}/x.bmp", ".bmp"),
    case("plot-junk-csv", "plot {csv} -o {dir}/x.png", "junk.csv"),
    case("plot-empty-csv", "plot {emptycsv} -o {dir}/x.png", "empty.csv"),
    case("plot-missing-csv", "plot {root}/nope.csv -o {dir}/x.png", "nope.csv"),
    case("plot-bad-dpi", "plot {curves} --dpi 0 -o {dir}/x.png", "--dpi"),
    case("demo-bad-dataset", "demo --out {dir} --dataset mnist", "Invalid value for '--dataset'"),
    case("demo-bad-device", "demo --out {dir} --device tpu", "tpu"),
    # ------------------------------------------------------------------ attacks
    case("eval-bad-attack", "eval {cnn} --attack pgd20,deepfool -q", "deepfool"),
    case("eval-empty-attack", "eval {cnn} --attack , -q", "at least one"),
    case("eval-attack-zero-steps", "eval {cnn} --attack pgd0x -q", "pgd0x"),
    case("hardness-bad-attack", "hardness {cnn} {cnn2} --attack deepfool --out {dir} -q", "deepfool"),
    case("table-bad-attack", "table {run} --attack pgd-20 -q", "pgd-20"),
    case("train-bad-eval-attack", "train --out {dir} --eval-attack pgd-x", "pgd-x"),
    # ------------------------------------------------------------------ numbers
    case("eval-eps-nan", "eval {cnn} --eps nan -q", "not a finite number"),
    case("eval-eps-inf", "eval {cnn} --eps inf -q", "not a finite number"),
    case("eval-eps-overflow", "eval {cnn} --eps 1e400 -q", "not a finite number"),
    case("eval-eps-div0", "eval {cnn} --eps 8/0 -q", "not a number"),
    case("eval-eps-word", "eval {cnn} --eps eight -q", "not a number"),
    case("gradnorm-eps-negative", "gradnorm {cnn} --eps -1 -q", "eps"),
    case("gradnorm-alpha-negative", "gradnorm {cnn} --alpha -0.1 -q", "alpha"),
    case("eval-steps-fraction", "eval {cnn} --steps 8/255 -q", "'--steps'"),
    case("eval-steps-negative", "eval {cnn} --steps -1 -q", "'--steps'"),
    case("eval-restarts-zero", "eval {cnn} --restarts 0 -q", "'--restarts'"),
    case("eval-batch-size-zero", "eval {cnn} --batch-size 0 -q", "'--batch-size'"),
    case("eval-batch-size-float", "eval {cnn} --batch-size 1.5 -q", "'--batch-size'"),
    case("eval-n-zero", "eval {cnn} --n 0 -q", "--n must be >= 1"),
    case("eval-n-negative", "eval {cnn} --n -5 -q", "--n must be >= 1"),
    case("eval-n-fraction", "eval {cnn} --n 1/2 -q", "'--n'"),
    case("eval-n-too-large", "eval {cnn} --n 99999999 -q", "larger than the split"),
    case("gradnorm-n-too-large", "gradnorm {cnn} --split test --n 99999999 -q", "larger than the split"),
    case("eval-val-split-missing", "eval {cnn} --split val -q", "no val split"),
    case("eval-seed-word", "eval {cnn} --seed abc -q", "'--seed'"),
    case("eval-seed-negative", "eval {cnn} --seed -1 -q", "seed"),
    case("eval-seed-huge", "eval {cnn} --seed 99999999999999999999 -q", "seed"),
    case("gradnorm-chunk-zero", "gradnorm {cnn} --chunk-size 0 -q", "'--chunk-size'"),
    case("gradnorm-beta-nan", "gradnorm {cnn} --beta nan -q", "not a finite number"),
    case("gradnorm-bn-stats-bad", "gradnorm {cnn} --bn-stats median -q", "median"),
    case("gradnorm-bn-stats-recompute-zero", "gradnorm {cnn} --bn-stats recompute:0 -q", "recompute"),
    case("curvature-bn-stats-batch", "curvature {cnn} --bn-stats batch -q", "--bn-stats"),
    case("curvature-iterations-zero", "curvature {cnn} --iterations 0 -q", "'--iterations'"),
    case("curvature-tol-negative", "curvature {cnn} --tol -1 -q", "tol"),
    case("hessian-top-k-zero", "hessian {cnn} --top-k 0 -q", "'--top-k'"),
    case("hessian-trace-samples-zero", "hessian {cnn} --trace-samples 0 -q", "'--trace-samples'"),
    case("hessian-density-steps-zero", "hessian {cnn} --density --density-steps 0 -q", "'--density-steps'"),
    case("complexity-quantile-2", "complexity {cnn} --margin-quantile 2 -q", "quantile"),
    case("complexity-n-zero", "complexity {cnn} --n 0 -q", "--n"),
    case("hardness-top-k-zero", "hardness {cnn} {cnn2} --top-k 0 --out {dir} -q", "top-k"),
    case("hardness-gallery-size-bad", "hardness {cnn} {cnn2} --gallery-size 10by10 --out {dir} -q", "10by10"),
    case("hardness-n-and-all", "hardness {cnn} {cnn2} --n 5 --all --out {dir} -q", "not both"),
    case("eval-device-bad", "eval {cnn} --device tpu -q", "tpu"),
    case("eval-device-cuda-99", "eval {cnn} --device cuda:99 -q", "cuda"),
    case("train-epochs-zero", "train --out {dir} --epochs 0", "epochs"),
    case("train-epochs-fraction", "train --out {dir} --epochs 2.5", "'--epochs'"),
    case("train-batch-size-zero", "train --out {dir} --batch-size 0", "batch"),
    case("train-lr-negative", "train --out {dir} --lr -0.1", "lr"),
    case("train-label-noise-2", "train --out {dir} --label-noise 2", "label"),
    case("train-milestones-words", "train --out {dir} --milestones a,b", "--milestones"),
    case("train-save-every-negative", "train --out {dir} --save-every -1", "save-every must be >= 0"),
    case("train-train-n-negative", "train --out {dir} --train-n -3", "train"),
    case("train-te-on-standard", "train --out {dir} --method standard --te", "te"),
    case("train-no-out", "train --epochs 1", "--out"),
    case("train-out-and-resume", "train --out {dir} --resume {run}", "--out"),
    case("train-epochs-huge", "train --out {dir} --epochs 99999999999999999999", "epochs"),
    # ------------------------------------------------------------------ lambdas grids
    case("stability-lambdas-words", "stability {cnn} --lambdas a:b:c -q", "lambdas"),
    case("stability-lambdas-num-zero", "stability {cnn} --lambdas -1:1:0 -q", "lambdas"),
    case("stability-lambdas-empty", "stability {cnn} --lambdas , -q", "lambdas"),
    case("stability-lambdas-nan", "stability {cnn} --lambdas nan:1:3 -q", "lambdas"),
    case("stability-directions-zero", "stability {cnn} --directions 0 -q", "directions"),
    case("flatness-lambdas-no-zero", "flatness {cnn} --lambdas 0.1:0.5:3 -q", "0"),
    case("flatness-lambdas-bad", "flatness {cnn} --lambdas 1:2 -q", "lambdas"),
    case("flatness-radius-negative", "flatness {cnn} --radius -1 -q", "radius"),
    case("stability-bad-loss", "stability {cnn} --losses clean,mse -q", "mse"),
    # ------------------------------------------------------------------ data and labels
    case("eval-test-labels-trained-mix", "gradnorm {cnn} --split test --noisy-vs-clean -q", "noisy"),
    case("gradcos-second-missing", "gradcos {cnn} {root}/nope.pt -q", "not found"),
    case("gradcos-one", "gradcos {cnn} -q", "two"),
    case("eval-labels-outside-classes", "eval {cnn} --dataset npz --data-dir {npz100} -q", "classes"),
    # ------------------------------------------------------------------ table: mismatched runs
    case("table-not-a-run", "table {emptydir} -q", "emptydir"),
    case("table-file", "table {cnn} -q", "cnn.pt"),
    case("table-missing", "table {root}/nope -q", "nope"),
    case("table-same-run-twice", "table {run} {run} -q", "twice"),
    # ------------------------------------------------------------------ outputs (the outputs branch)
    case("eval-output-is-input", "eval {own} -o {own} -q", "input"),
    case("eval-output-empty", ["eval", "{cnn}", "-q", "-o", ""], "path is empty"),
    case("eval-output-parent-is-file", "eval {cnn} -q -o {file}/eval.csv", "a_file"),
    case("eval-output-is-dir", "eval {cnn} -q -o {emptydir}", "emptydir"),
    case("gradnorm-output-inside-run", "gradnorm {ownrun} -q -o {ownrun}/gradnorm.csv", "ownrun"),
    case("train-out-existing-run", "train --out {ownrun} --epochs 1 -q", "exists"),
    # ------------------------------------------------------------------ runs and resume
    case("train-resume-missing", "train --resume {root}/nope", "nope"),
    case("train-resume-not-a-run", "train --resume {emptydir}", "no config.json"),
    case("train-resume-file", "train --resume {file}", "a_file"),
]


def snapshot(*roots: Path) -> dict[str, str]:
    """Path -> SHA-256 (files) or "dir" of everything under ``roots``."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fill(arg: str, paths: dict[str, Path]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(paths[m.group(1)]), arg)


@pytest.mark.parametrize(("argv", "fragment"), CASES)
def test_bad_input(argv, fragment, inputs, tmp_path, monkeypatch):
    work = tmp_path / "work"  # the case's working folder: a default output (eval.csv) would land here
    work.mkdir()
    monkeypatch.chdir(work)
    paths = {**inputs, "out": work / "out.csv", "dir": work / "newdir"}
    # The case's own copies, for the cases that (wrongly, today) write over their input: never the shared ones.
    if any("{own}" in a for a in argv):
        paths["own"] = shutil.copy(inputs["cnn"], tmp_path / "own.pt")
    if any("{ownrun}" in a for a in argv):
        paths["ownrun"] = shutil.copytree(inputs["run"], tmp_path / "ownrun")
    args = [fill(a, paths) for a in argv]
    args[1:1] = CHEAP.get(args[0], [])
    if not any(a in ("-o", "--output", "--out") for a in args) and args and args[0] in (
            *CKPT_COMMANDS, "stability", "table"):  # an explicit output in the case folder, which must stay empty
        args += ["--out", str(paths["dir"])] if args[0] == "hardness" else ["-o", str(paths["out"])]
    before = snapshot(inputs["root"], tmp_path)
    line = run_cli(*args, expect=2).stderr.strip().splitlines()[-1]
    assert fragment in line, (args, line)
    assert snapshot(inputs["root"], tmp_path) == before, args  # nothing written, nothing changed


def test_matrix_size():
    """Issue 16 asks for at least 100 cases across every command."""
    assert len(CASES) >= 100
    commands = {p.values[0][0] for p in CASES}
    assert {*CKPT_COMMANDS, "train", "stability", "table", "plot", "demo"} <= commands


# ---------------------------------------------------------------------------- robustness (subprocesses)


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default disposition. A shell without job
    control starts background jobs (``pytest ... &``, a CI runner's) with SIGINT ignored, the
    child inherits that, and Python then leaves SIGINT ignored: the signal tests would see a
    training finish (exit 0) or a probe run on (timeout) instead of an interruption."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def atprobe(*args, **kwargs) -> subprocess.Popen:
    """``atprobe ARGS`` in a child process (its own Python, one torch thread, default SIGINT)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    setup = kwargs.pop("preexec_fn", None)

    def before_exec() -> None:
        _default_sigint()
        if setup is not None:
            setup()

    return subprocess.Popen([sys.executable, "-m", "atprobe.cli.main", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=before_exec, **kwargs)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


LONG_TRAIN = [*TRAIN[:-1], "--train-n", "512", "--batch-size", "16", "--steps", "3", "--epochs", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training_then_resume(sig, tmp_path):
    """A training stopped by a signal after its first epoch exits non-zero, leaves no temp
    file, and ``--resume`` finishes it with the same final weights as an uninterrupted run."""
    reference = tmp_path / "ref"
    run_cli(*LONG_TRAIN, "--out", reference)
    out = tmp_path / "run"
    child = atprobe(*LONG_TRAIN, "--out", out)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the training ended before it could be interrupted: give it more work"
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert not temp_files(out), temp_files(out)
    assert not (out / "final.pt").exists()
    run_cli("train", "--resume", out, "-q", "--device", "cpu")
    got, want = state_dict(out / "final.pt"), state_dict(reference / "final.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_probe_leaves_nothing(sig, inputs, tmp_path):
    """A long probe stopped by a signal writes no output, no meta file and no temp file."""
    child = atprobe("stability", inputs["cnn"], "--lambdas", "-1:1:401", "--n", "64", "--steps", "2",
                    "--device", "cpu", "-q", "-o", tmp_path / "stability.csv", cwd=tmp_path)
    # past the imports, inside the probe: by CPU time, not wall time (a loaded machine imports slowly)
    deadline = time.monotonic() + 90
    while _cpu_seconds(child.pid) < 6 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert child.poll() is None, child.communicate()
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_two_writers_one_output(inputs, tmp_path):
    """Two processes writing one CSV at once: it ends up as one of the two complete tables
    (never a mix), with its own meta file, and no temp file is left."""
    out = tmp_path / "eval.csv"
    common = ["eval", inputs["cnn"], "--attack", "natural", "--device", "cpu", "-q", "-o", out]
    children = [atprobe(*common, "--n", n) for n in ("16", "24")]
    for child in children:
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
    import pandas as pd

    table = pd.read_csv(out)
    assert int(table["n"].iloc[0]) in (16, 24) and len(table) == 1, table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.csv", "eval.meta.json"]


def _small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises OSError (EFBIG), no kill
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))


def test_full_disk_one_line_and_nothing_left(inputs, tmp_path):
    """A write that hits a full disk (simulated: a 256-byte file-size limit in the child) is one
    ``Error:`` line naming the file, exit status 2, and leaves no partial output or temp file."""
    child = atprobe("eval", inputs["cnn"], "--attack", "natural", "--n", "8", "--device", "cpu", "-q",
                    "-o", tmp_path / "eval.csv", preexec_fn=_small_files)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and stdout == "", stderr
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], stderr
    assert "eval.meta.json" in lines[-1] and "File too large" in lines[-1], lines[-1]
    assert list(tmp_path.iterdir()) == []


def _files_under_2500_bytes():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (2500, 2500))


def test_full_disk_part_way_leaves_none_of_the_tables(inputs, tmp_path):
    """``eval --per-sample`` writes four files; when the per-sample CSV (about 3 KB for 64
    samples) does not fit but its meta (about 1.3 KB) does, nothing is left, not even that meta:
    the tables are written as one."""
    child = atprobe("eval", inputs["cnn"], "--attack", "natural", "--n", "64", "--per-sample", "--device", "cpu",
                    "-q", "-o", tmp_path / "eval.csv", preexec_fn=_files_under_2500_bytes)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 2, stderr
    assert "eval.samples.csv" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (chmod 555) folder; no read-only mount "
                    "is at hand to simulate it (the outputs branch covers unwritable parents)")
def test_read_only_output_folder(inputs, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        line = run_cli("eval", inputs["cnn"], "--attack", "natural", "--n", "8", "--device", "cpu", "-q",
                       "-o", folder / "eval.csv", expect=2).stderr.strip().splitlines()[-1]
        assert "ro" in line and list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_errors_doc_lists_every_message():
    """docs/errors.md's index is the current list of error messages (regenerate it with
    ``python tests/errors_index.py --write`` after adding or changing one)."""
    from errors_index import DOC, current, index

    assert current(DOC.read_text()) == index(), "run: python tests/errors_index.py --write"
