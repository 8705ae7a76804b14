"""Fig. 6 of Dong et al. (ICLR 2022) at small scale: do complexity measures explain the
robust generalization gap of adversarially trained models?

    python benchmarks/fig6_small.py --out runs/fig6_small            # ~10 min on a 2-core CPU
    python benchmarks/fig6_small.py --out runs/fig6_small --reuse    # recompute the table only

Trains several ``cnn-small`` models with PGD-AT (``atprobe.train.train``), with and without
augmentation and weight decay, on true and on random labels, a few epochs each, on the real
CIFAR-10 subset at ../shared/data/cifar-10-subset when present (else the synthetic dataset);
then computes every complexity measure of each final model with
``atprobe.probes.complexity.probe`` into ONE ``complexity.csv`` (the table
``atprobe complexity`` writes), and summarizes it: per model, each measure next to the robust
generalization gap, and per measure the rank correlation (Kendall tau, Spearman rho) with
the robust gap over the models.

Writes under --out: one run directory per model (``atprobe train``'s files), complexity.csv
(+ .meta.json), fig6_table.csv (model x measure, wide), fig6_correlations.csv, fig6.png
(each measure against the robust gap) and timings.json. The measures of
``atprobe.probes.curvature/hessian/flatness`` are included when those modules exist, with
lighter settings than their defaults (documented in docs/examples/fig6_small.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from scipy import stats

from atprobe.checkpoint import load_checkpoint
from atprobe.io import config_record, run_meta, write_json, write_table
from atprobe.probes import complexity as cx
from atprobe.runtime import prepare_model, resolve_device
from atprobe.study import DataSource, SampleSpec, Study
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = ROOT.parent / "shared" / "data" / "cifar-10-subset"

#: name -> (augment, weight decay, label noise): the settings of Fig. 6, at small scale.
SETTINGS = {
    "true_aug_wd": (True, 5e-4, 0.0),
    "true_aug": (True, 0.0, 0.0),
    "true_wd": (False, 5e-4, 0.0),
    "true_plain": (False, 0.0, 0.0),
    "random_aug_wd": (True, 5e-4, 1.0),
    "random_plain": (False, 0.0, 1.0),
}

#: Extra margins (where, q) whose divided norms are added to the table besides the paper's
#: default (PGD examples, q = 0.1): small models trained a few epochs misclassify more than
#: 10% of their training samples, where the default margin is <= 0 and the divided measures NaN.
EXTRA_MARGINS = (("clean", 0.1), ("clean", 0.5))


def label(measure: str, variant: str) -> str | None:
    """A short column name for a row of complexity.csv in the summary, None to leave it out
    (products: their log10 is shown; the curvature median; the gap rows: the y axis)."""
    keys = dict(part.split("=", 1) for part in variant.split(";")[1:] if "=" in part)
    head = variant.split(";")[0]
    where = f"({keys.get('on')},q{keys.get('q')})"
    if measure == "spectral":
        return {"log10": "log10 spectral", "log10_over_margin": f"log10 spectral/margin{where}"}.get(head)
    if measure == "l1":
        return {"sum": "l1", "sum_over_margin": f"l1/margin{where}"}.get(head)
    if measure == "margin":
        return f"margin{where}"
    if measure == "curvature":
        return "curvature mean" if head == "mean" else None
    if measure == "hessian":
        return f"hessian {head}" if head in ("top1", "trace") else None
    if measure == "flatness":
        return "flatness"
    return None


def _available(name: str) -> bool:
    return importlib.util.find_spec(f"atprobe.probes.{name}") is not None


def external_configs(args) -> dict:
    """Lighter settings than the modules' defaults, so the whole script stays ~10 CPU minutes."""
    out = {}
    if _available("curvature"):
        from atprobe.probes.curvature import CurvatureConfig
        out["curvature"] = CurvatureConfig(iterations=10, seed=args.seed)
    if _available("hessian"):
        from atprobe.probes.hessian import HessianConfig
        out["hessian"] = HessianConfig(batch_size=args.landscape_n, iterations=20, trace_samples=20, seed=args.seed)
    if _available("flatness"):
        from atprobe.probes.flatness import FlatnessConfig
        out["flatness"] = FlatnessConfig(directions=2, lambdas=(-0.5, 0.0, 0.5), seed=args.seed)
    return out


def train_all(args, dataset: str, data_dir: str | None, device) -> dict[str, dict]:
    runs = {}
    for name, (augment, wd, noise) in SETTINGS.items():
        config = TrainConfig(
            arch="cnn-small", dataset=dataset, data_dir=data_dir, method="pgd_at", epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, weight_decay=wd, schedule="cosine", augment=augment,
            label_noise=noise, train_n=args.train_n, eval_n=100, eval_every=args.epochs, seed=args.seed,
            threat=ThreatModel(steps=args.train_steps),
        )
        out = Path(args.out) / name
        start = time.perf_counter()
        final = out / "final.pt"
        reused = args.reuse and final.is_file()
        if not reused:
            train(config, out, device=device)
        runs[name] = {"path": final, "augment": augment, "weight_decay": wd, "label_noise": noise,
                      "train_s": None if reused else round(time.perf_counter() - start, 1)}
        print(f"{name}: {'reused' if reused else 'trained'} in {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)
    return runs


def measure_all(args, runs: dict, dataset: str, data_dir: str | None, device) -> tuple[pd.DataFrame, dict]:
    study = Study([run["path"] for run in runs.values()], data=DataSource(dataset, data_dir))
    spec = SampleSpec(split="train", n=args.n)
    train_base, test = study.base(spec), study.base(SampleSpec(split="test", n=args.n))
    main = cx.ComplexityConfig(measures=("spectral", "l1", "margin", "gap"), margin=True, seed=args.seed)
    externals = external_configs(args)
    landscape = cx.ComplexityConfig(measures=tuple(externals), seed=args.seed, **externals) if externals else None
    frames, timings, stubs = [], {}, []
    for name, run in runs.items():
        ckpt = load_checkpoint(run["path"])
        stubs.append(dataclasses.replace(ckpt, state_dict={}, raw={}))
        model = prepare_model(ckpt.build_model(), device)
        samples = study.samples(ckpt, spec, train_base)
        start = time.perf_counter()
        parts = [cx.probe(model, samples, main, test=test)]
        for on, q in EXTRA_MARGINS:  # only the margin and the divided rows (the undivided are above)
            extra = cx.probe(model, samples, dataclasses.replace(main, measures=("spectral", "l1", "margin"),
                                                                 margin_on=on, margin_quantile=q))
            parts.append(extra[(extra["measure"] == "margin") | extra["variant"].str.contains("_over_margin")])
        timings[name] = {"norms_margin_gap_s": round(time.perf_counter() - start, 1)}
        if landscape is not None:
            start = time.perf_counter()
            parts.append(cx.probe(model, samples.subset(slice(0, args.landscape_n)), landscape))
            timings[name]["curvature_hessian_flatness_s"] = round(time.perf_counter() - start, 1)
        df = pd.concat(parts, ignore_index=True)
        df.insert(0, "epoch", pd.array([ckpt.epoch] * len(df), dtype="Int64"))
        df.insert(0, "checkpoint", str(run["path"]))
        frames.append(df)
        print(f"{name}: measured {timings[name]}", file=sys.stderr, flush=True)
    table = pd.concat(frames, ignore_index=True)
    meta_config = {"main": config_record(main), "landscape": None if landscape is None else
                   config_record(landscape), "n": args.n, "landscape_n": args.landscape_n, "dataset": dataset,
                   "device": str(device)}
    return table, {"config": meta_config, "timings": timings, "checkpoints": stubs}


def summarize(table: pd.DataFrame, runs: dict) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The wide table (one row per model: its setting, robust accuracies and gaps, each
    measure) and the rank correlations of every measure with the robust gap."""
    by_path = {str(r["path"]): name for name, r in runs.items()}
    rows, columns = [], []
    for path, df in table.groupby("checkpoint", sort=False):
        name = by_path[path]
        run = runs[name]
        row = {"model": name, "augment": run["augment"], "weight_decay": run["weight_decay"],
               "label_noise": run["label_noise"]}
        gap = df[df["measure"] == "gap"].set_index("variant")["value"]
        for v in ("natural_train", "robust_train", "robust_test", "natural_gap", "robust_gap"):
            row[v] = gap.get(v)
        for rec in df.itertuples(index=False):
            column = label(rec.measure, rec.variant)
            if column is not None:
                row[column] = rec.value
                if column not in columns:
                    columns.append(column)
        rows.append(row)
    wide = pd.DataFrame(rows)
    corr = []
    for column in columns:
        ok = wide[[column, "robust_gap"]].dropna()
        tau = rho = None
        if len(ok) >= 3 and ok[column].nunique() > 1 and ok["robust_gap"].nunique() > 1:
            tau = round(float(stats.kendalltau(ok[column], ok["robust_gap"]).statistic), 3)
            rho = round(float(stats.spearmanr(ok[column], ok["robust_gap"]).statistic), 3)
        corr.append({"measure": column, "models": len(ok), "kendall_tau": tau, "spearman_rho": rho})
    return wide, pd.DataFrame(corr), columns


def plot(wide: pd.DataFrame, columns: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    columns = [c for c in columns if wide[c].notna().any()]
    cols = 3
    rows = (len(columns) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    labels = wide["label_noise"].map({0.0: "true labels", 1.0: "random labels"})
    for ax, column in zip(axes.flat, columns):
        sns.scatterplot(x=wide[column], y=wide["robust_gap"], hue=labels, style=wide["augment"], ax=ax, s=60,
                        legend=ax is axes.flat[0])
        ax.set_xlabel(column)
        ax.set_ylabel("robust gap (train - test)")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fig6_small")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-steps", type=int, default=3, help="PGD steps of the training attack")
    parser.add_argument("--n", type=int, default=256, help="train (of the trained ones) and test samples measured")
    parser.add_argument("--landscape-n", type=int, default=32, help="samples of curvature/hessian/flatness")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse trained models found under --out")
    args = parser.parse_args()
    if args.n > args.train_n:
        parser.error("--n must be <= --train-n: the train accuracies are measured on samples the models saw")
    device = resolve_device(args.device)
    real = (CIFAR_SUBSET / "cifar-10-batches-py").is_dir()
    dataset, data_dir = ("cifar10", str(CIFAR_SUBSET)) if real else ("synthetic", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"dataset {dataset}, device {device}, {torch.get_num_threads()} threads", file=sys.stderr)

    start = time.perf_counter()
    runs = train_all(args, dataset, data_dir, device)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    table, record = measure_all(args, runs, dataset, data_dir, device)
    measure_s = time.perf_counter() - start
    table = table[["checkpoint", "epoch", "measure", "variant", "value", "reason", "n"]]
    write_table(table, out / "complexity.csv", run_meta(seed=args.seed, checkpoints=record["checkpoints"],
                                                        config=record["config"], extra={"args": vars(args)}))
    wide, corr, columns = summarize(table, runs)
    wide.to_csv(out / "fig6_table.csv", index=False)
    corr.to_csv(out / "fig6_correlations.csv", index=False)
    plot(wide, columns, out / "fig6.png")
    timings = {"dataset": dataset, "device": str(device), "threads": torch.get_num_threads(),
               "train_s": round(train_s, 1), "measure_s": round(measure_s, 1),
               "per_model_train_s": {k: v["train_s"] for k, v in runs.items()}, "per_model": record["timings"]}
    write_json(timings, out / "timings.json")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(wide.round(4).to_string(index=False))
        print(corr.to_string(index=False))
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
