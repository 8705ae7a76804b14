"""The paper's training settings by name: ``atprobe train --preset NAME``.

Each :class:`Preset` holds the ``TrainConfig`` field values of one training setting of Dong et
al. (ICLR 2022), with the paper's section, table or figure and the official script
(github.com/dongyp13/memorization-AT) it follows; where the two disagree, the official code
wins and ``note`` says so. ``docs/presets.md`` tables every preset and its sources.

Precedence: ``TrainConfig`` defaults < the preset's fields < explicit options
(:func:`preset_config`). The threat model merges field by field; giving ``norm`` drops the
preset's ``eps`` and ``alpha`` (they belong to its norm), giving ``eps`` drops its ``alpha``
(which then defaults to eps/4 again). Overriding ``epochs`` moves the preset's epoch-counted
fields (milestones, TE ramp, mix epochs) to the same fractions of the new length, unless those
are given too.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from atprobe.errors import AtprobeError
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig

THREAT_FIELDS = tuple(f.name for f in fields(ThreatModel))


@dataclass(frozen=True)
class Preset:
    """One named training setting: ``fields`` are ``TrainConfig`` values (``threat``: a dict of
    ``ThreatModel`` fields), ``source`` the paper's place and the official script, ``note`` what
    differs from the paper's text and why."""

    name: str
    description: str
    source: str
    fields: Mapping[str, Any]
    note: str = ""
    requires: tuple[str, ...] = ()  # options the user must give (KD's teachers: checkpoints of their own)

    def config(self, **overrides: Any) -> TrainConfig:
        """The (unresolved) config: defaults < this preset < ``overrides``."""
        return preset_config(self.name, **overrides)


_LINF8 = {"norm": "linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 10}

#: Sec. 3.1 (Fig. 2) as the official ``train.py`` runs it (its README's random-label commands):
#: WRN-28-10, 300 epochs, lr 0.1 x0.1 every 100 epochs (StepLR), no augmentation, no weight
#: decay, no dropout; 10-step L-inf PGD, eps 8/255, step 2/255; beta 6. Fig. 2 plots training
#: accuracies, which train.py evaluates on the whole (noisy) training set every epoch.
SEC31 = {"arch": "wrn-28-10", "dataset": "cifar10", "epochs": 300, "batch_size": 128, "optimizer": "sgd",
         "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "schedule": "piecewise", "milestones": (100, 200),
         "lr_decay": 0.1, "augment": False, "dropout": 0.0, "threat": _LINF8, "beta": 6.0, "train_eval_n": 0}
SEC31_SOURCE = "Sec. 3.1; official train.py defaults and README (--wd 0)"
SEC31_NOTE = ("300 epochs with decays at 100 and 200 are train.py's defaults (the paper's figures show the "
              "first 150-200 epochs)")

#: Sec. 5 / Table 1 as the official ``train_te.py`` runs it: ResNet-18, 200 epochs, lr 0.1 x0.1 at
#: 100 and 150, weight decay 5e-4, momentum 0.9, batch 128, crop + flip; TE eta 0.9, weight 300/C
#: (30 on CIFAR-10), ramp from epoch 90 to 150.
TABLE1 = {"arch": "resnet18", "dataset": "cifar10", "epochs": 200, "batch_size": 128, "optimizer": "sgd",
          "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "piecewise", "milestones": (100, 150),
          "lr_decay": 0.1, "augment": True, "dropout": 0.0, "threat": _LINF8, "beta": 6.0}
TE_FIELDS = {"te": True, "te_eta": 0.9, "te_start": 90, "te_end": 150}
#: SVHN (Sec. 5): lr 0.01, cosine over 80 epochs; the official script feeds SVHN's training set
#: through its test transform (no augmentation). Its ramp defaults (90 -> 150) lie past epoch 80,
#: so the TE ramp is the same fraction of the run (45% -> 75%: epochs 36 -> 60).
SVHN = {"dataset": "svhn", "epochs": 80, "lr": 0.01, "schedule": "cosine", "milestones": None, "augment": False}
SVHN_TE = {"te_start": 36, "te_end": 60}

METHODS = {"pgd": "pgd_at", "trades": "trades"}
LABELS = {"true": 0.0, "random": 1.0}


def _add(registry: dict[str, Preset], name: str, description: str, source: str, values: Mapping[str, Any],
         note: str = "", requires: tuple[str, ...] = ()) -> None:
    if name in registry:
        raise ValueError(f"duplicate preset {name}")
    frozen = {k: MappingProxyType(dict(v)) if isinstance(v, dict) else v for k, v in values.items()}
    registry[name] = Preset(name, description, source, MappingProxyType(frozen), note, requires)


def _merge(*parts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = {**out.get(k, {}), **v} if k == "threat" else v
    return out


def _sec3(registry: dict[str, Preset]) -> None:
    """Sec. 3.1, Fig. 2, Fig. 3, Fig. 5 and App. A.1 (Figs. A.1-A.7, Table A.1)."""
    for m, method in METHODS.items():
        name = "PGD-AT" if m == "pgd" else "TRADES"
        for labels, rate in LABELS.items():
            values = _merge(SEC31, {"method": method, "label_noise": rate})
            _add(registry, f"fig2-{m}-{labels}", f"{name} on {labels} labels, WRN-28-10, no explicit regularization",
                 f"Fig. 2(a,b); {SEC31_SOURCE}", values, SEC31_NOTE)
            for dataset, fig in (("cifar100", "A.1"), ("svhn", "A.2")):
                _add(registry, f"figA{fig[-1]}-{m}-{labels}", f"{name} on {labels} labels, {dataset}, as Fig. 2",
                     f"App. A.1.1, Fig. {fig}; {SEC31_SOURCE}", _merge(values, {"dataset": dataset}), SEC31_NOTE)
            for eps in (16, 32):
                _add(registry, f"figA5-{m}-{labels}-eps{eps}", f"{name} on {labels} labels, L-inf eps {eps}/255",
                     f"App. A.1.1, Fig. A.5; {SEC31_SOURCE}",
                     _merge(values, {"threat": {"eps": eps / 255, "alpha": None}}),
                     f"{SEC31_NOTE}; the step is not stated: eps/4")
            if labels == "true":  # PGD-AT fails on true labels there, TRADES reaches about 50%
                _add(registry, f"a2-{m}-{labels}-eps64", f"{name} on {labels} labels, L-inf eps 64/255",
                     f"App. A.2.3; {SEC31_SOURCE}", _merge(values, {"threat": {"eps": 64 / 255, "alpha": None}}),
                     f"{SEC31_NOTE}; the step is not stated: eps/4")
        random = _merge(SEC31, {"method": method, "label_noise": 1.0})
        _add(registry, f"fig3-{m}-random", f"{name} on random labels, gradient-norm ratios of the first 1000 "
             "iterations (gradratio.csv)", f"Sec. 3.2, Fig. 3; {SEC31_SOURCE}",
             _merge(random, {"log_grad_ratio": 1000}), SEC31_NOTE)
        _add(registry, f"figA3-{m}-random-densenet121", f"{name} on random labels, DenseNet-121",
             f"App. A.1.1, Fig. A.3(a); {SEC31_SOURCE}", _merge(random, {"arch": "dense121"}),
             f"{SEC31_NOTE}; Fig. A.3(b)'s DLA is not in atprobe's model registry")
        _add(registry, f"figA4-{m}-random-l2", f"{name} on random labels, L2 eps 1.0, step 0.25",
             f"App. A.1.1, Fig. A.4; {SEC31_SOURCE}",
             _merge(random, {"threat": {"norm": "l2", "eps": 1.0, "alpha": 0.25}}), SEC31_NOTE)
        for rate in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
            _add(registry, f"fig2c-{m}-noise{rate:.1f}",
                 f"{name} at label-noise rate {rate:.1f}, with weight decay 2e-4 and crop + flip",
                 "Fig. 2(c), App. A.1.2 (Figs. A.6, A.7: 'we adopt the weight decay and data augmentation'); "
                 "official train.py defaults (--wd 2e-4, --data-augmentation)",
                 _merge(SEC31, {"method": method, "label_noise": rate, "augment": True, "weight_decay": 2e-4}),
                 f"{SEC31_NOTE}; the weight decay is train.py's default, the value Table A.1 states")
    _table_a1(registry)
    _add(registry, "fig5-pgd-eq6-random", "PGD-AT with the clean loss mixed in (Eq. 6) on random labels",
         f"Sec. 3.2, Eq. 6, Fig. 5; {SEC31_SOURCE}", _merge(SEC31, {"method": "pgd_at", "label_noise": 1.0,
                                                                   "mix_clean": True, "mix_ramp": "linear"}),
         f"{SEC31_NOTE}; gamma's ramp is not stated (the official code has no Eq. 6): linear 0 -> 1 over "
         "the first half of the run (--mix-epochs, --mix-ramp)")


def _table_a1(registry: dict[str, Preset]) -> None:
    """Table A.1: TRADES with combinations of crop + flip, weight decay 2e-4 and dropout 0.2."""
    combos = {"none": {}, "aug": {"augment": True}, "wd": {"weight_decay": 2e-4}, "dropout": {"dropout": 0.2},
              "aug-wd": {"augment": True, "weight_decay": 2e-4}, "wd-dropout": {"weight_decay": 2e-4, "dropout": 0.2}}
    for labels, rate in LABELS.items():
        for combo, values in combos.items():
            names = {"aug": "crop + flip", "wd": "weight decay 2e-4", "dropout": "dropout 0.2"}
            what = ", ".join(names[k] for k in combo.split("-")) if combo != "none" else "no explicit regularizer"
            _add(registry, f"tableA1-{labels}-{combo}", f"TRADES on {labels} labels, {what}",
                 f"App. A.1.3, Table A.1; {SEC31_SOURCE}, --data-augmentation, --wd, --drop-rate",
                 _merge(SEC31, {"method": "trades", "label_noise": rate}, values), SEC31_NOTE)


def _a2(registry: dict[str, Preset]) -> None:
    """App. A.2.1: the training factors tried on PGD-AT with random labels, and Fig. A.10."""
    random = _merge(SEC31, {"method": "pgd_at", "label_noise": 1.0})
    source = f"App. A.2.1; {SEC31_SOURCE}"
    adam = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9}
    variants = {
        "wrn34-20": ({"arch": "wrn-34-20"}, "WRN-34-20 (model capacity)"),
        "wrn70-16": ({"arch": "wrn-70-16"}, "WRN-70-16 (model capacity)"),
        "fgsm-rs": ({"method": "fgsm_rs"}, "fast AT: FGSM from a random start, step 10/255 (attack steps)"),
        "sgd-lr0.01": ({"lr": 0.01}, "SGD momentum, lr 0.01 (optimizer)"),
        "sgd-cosine": ({"schedule": "cosine", "milestones": None}, "SGD momentum, cosine schedule (optimizer)"),
        "nesterov": ({"nesterov": True}, "Nesterov SGD (optimizer)"),
        "adam": (adam, "Adam, lr 1e-3, betas (0.9, 0.999) (optimizer)"),
        "adam-cosine": ({**adam, "schedule": "cosine", "milestones": None}, "Adam with the cosine schedule"),
        "eps1": ({"threat": {"eps": 1 / 255, "alpha": None}}, "L-inf eps 1/255 (perturbation budget)"),
        "eps2": ({"threat": {"eps": 2 / 255, "alpha": None}}, "L-inf eps 2/255 (perturbation budget)"),
    }
    for key, (values, what) in variants.items():
        note = SEC31_NOTE
        if key.startswith("adam"):
            note += ("; the official code has no Adam: PyTorch's defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8, "
                     "no weight decay, as the random-label runs have none)")
        if key.startswith("eps"):
            note += "; the step is not stated: eps/4"
        _add(registry, f"a2-pgd-random-{key}", f"PGD-AT on random labels, {what}", source, _merge(random, values), note)
    vanilla = {"method": "trades", "epochs": 200, "momentum": 0.0, "weight_decay": 0.0, "augment": False}
    sota = {"method": "trades", "epochs": 200, "momentum": 0.9, "weight_decay": 2e-4, "augment": True}
    a10 = "App. A.3, Fig. A.10 (after Liu et al., 2020b); official train.py defaults"
    a10_note = ("200 epochs as the figure's axis, the rest train.py's defaults (the paper states no values); "
                "adversarial initialization: add --init-from RUN/final.pt of figA10-pretrain-random")
    _add(registry, "figA10-pretrain-random", "TRADES on random labels: the adversarial initialization of Fig. A.10",
         a10, _merge(SEC31, vanilla, {"label_noise": 1.0}), a10_note)
    _add(registry, "figA10-vanilla", "TRADES on true labels, vanilla SGD (no momentum, weight decay, augmentation)",
         a10, _merge(SEC31, vanilla), a10_note)
    _add(registry, "figA10-sota", "TRADES on true labels, 'SOTA' SGD (momentum 0.9, weight decay 2e-4, crop + flip)",
         a10, _merge(SEC31, sota), a10_note)


def _sec5(registry: dict[str, Preset]) -> None:
    """Sec. 5: Table 1 (ResNet-18 on CIFAR-10, CIFAR-100, SVHN), Table C.1 and Fig. C.2."""
    source = "Sec. 5 'Training details', Table 1; official train_te.py defaults"
    for dataset in ("cifar10", "cifar100", "svhn"):
        base = _merge(TABLE1, {"dataset": dataset}, SVHN if dataset == "svhn" else {})
        note = ("lr 0.01, cosine, 80 epochs (Sec. 5); no augmentation as the official script; TE ramp at 45%-75% "
                "of the run (the script's 90 -> 150 would never start)") if dataset == "svhn" else ""
        for m, method in METHODS.items():
            name = "PGD-AT" if m == "pgd" else "TRADES"
            values = _merge(base, {"method": method})
            _add(registry, f"table1-{dataset}-{m}", f"{name}, ResNet-18, {dataset}", source, values, note)
            te = _merge(values, TE_FIELDS, SVHN_TE if dataset == "svhn" else {})
            ramp = "" if dataset == "svhn" else ", --start-es 90, --end-es 150"
            _add(registry, f"table1-{dataset}-{m}-te", f"{name}+TE (Eq. 7), ResNet-18, {dataset}",
                 f"{source} (--te-alpha 0.9, --reg-weight 300{ramp})", te, note)
    c1 = "App. C.2, Table C.1; official train_te.py (--model WideResNet / VGG16, --norm l2)"
    for arch, key in (("wrn-34-10", "wrn34-10"), ("vgg16", "vgg16")):
        values = _merge(TABLE1, {"arch": arch, "method": "pgd_at"})
        _add(registry, f"tableC1-{key}-pgd", f"PGD-AT, {arch}, CIFAR-10", c1, values)
        _add(registry, f"tableC1-{key}-pgd-te", f"PGD-AT+TE, {arch}, CIFAR-10", c1, _merge(values, TE_FIELDS))
    l2 = {"threat": {"norm": "l2", "eps": 128 / 255, "alpha": None, "start": "normal"}}
    l2_note = ("the L2 step is not stated: eps/4 = 32/255 (Fig. A.4's ratio); start 0.001 N(0, I) as the "
               "official L2 attack (PGD_TE, eval_test_pgd)")
    for m, method in METHODS.items():
        name = "PGD-AT" if m == "pgd" else "TRADES"
        values = _merge(TABLE1, {"method": method}, l2)
        _add(registry, f"tableC1-l2-{m}", f"{name}, ResNet-18, L2 eps 128/255", c1, values, l2_note)
        _add(registry, f"tableC1-l2-{m}-te", f"{name}+TE, ResNet-18, L2 eps 128/255", c1, _merge(values, TE_FIELDS),
             l2_note)
    _add(registry, "figC2-wrn28-10-pgd", "PGD-AT, WRN-28-10, CIFAR-10 (compared with table1-cifar10-pgd)",
         "App. C.1, Fig. C.2; the Table 1 setting", _merge(TABLE1, {"arch": "wrn-28-10", "method": "pgd_at"}),
         "the paper states no setting for Fig. C.2: Table 1's")


def _table2(registry: dict[str, Preset]) -> None:
    """Table 2 (Sec. 5, "Discussion and comparison with related works"): the other remedies of
    robust overfitting under the Table 1 setting (ResNet-18, CIFAR-10, PGD-AT), and AWP. The paper
    states none of their hyper-parameters and the official code has none of them: each follows
    its own paper's code, moved to Table 1's schedule where that code trains on another."""
    source = "Sec. 5, Table 2; Table 1's setting (official train_te.py)"
    pgd = _merge(TABLE1, {"method": "pgd_at"})
    _add(registry, "table2-pgd", "PGD-AT, ResNet-18, CIFAR-10 (Table 2's first row; = table1-cifar10-pgd)", source,
         pgd)
    _add(registry, "table2-pgd-te", "PGD-AT+TE (Table 2's last row; = table1-cifar10-pgd-te)", source,
         _merge(pgd, TE_FIELDS))
    _add(registry, "table2-pgd-ls", "PGD-AT with label smoothing 0.2 (Pang et al. 2021)",
         f"{source}; P2333/Bag-of-Tricks-for-AT train_cifar.py (LabelSmoothingLoss: 1 - s, s/(K-1))",
         _merge(pgd, {"label_smoothing": 0.2}),
         "s is not stated; 0.2 is the 'moderate label smoothing (~0.2)' Pang et al.'s README finds helpful")
    _add(registry, "table2-sat", "PGD-AT with self-adaptive training (Huang et al. 2020)",
         f"{source}; LayneH/self-adaptive-training losses/trades.py (TRADES_SAT), run_trades_sat.sh (alpha 0.9)",
         _merge(pgd, {"sat": True, "sat_momentum": 0.9, "sat_start": 90}),
         "the official SAT is TRADES-based (ES 70 of 100 epochs, 5 before its first decay); here on PGD-AT, the "
         "targets adapting from epoch 90 (before Table 1's first decay at 100, as TE's ensemble); the natural "
         "prediction of the targets in eval mode")
    _add(registry, "table2-standard", "Standard (non-adversarial) training, ResNet-18: KD-SWA's natural teacher",
         f"{source}; VITA-Group/Alleviate-Robust-Overfitting main_std.py", _merge(TABLE1, {"method": "standard"}),
         "Table 1's schedule; KD-SWA's teacher is this run's best.pt (Chen et al. keep the best clean accuracy; "
         "best.pt here is selected by robust accuracy: pass final.pt or the epoch you want)")
    _add(registry, "table2-kd-swa", "PGD-AT with knowledge distillation and SWA (Chen et al. 2021)",
         f"{source}; VITA-Group/Alleviate-Robust-Overfitting main_adv.py --swa --lwf (coef_ce 0.3, coef_kd1 0.1, "
         "coef_kd2 0.6, temperature 2, swa_start 55)",
         _merge(pgd, {"kd_temperature": 2.0, "kd_weights": (0.3, 0.1, 0.6), "swa_start": 106}),
         "the teachers are runs of their own: --teacher-robust table1-cifar10-pgd's best.pt, --teacher-natural "
         "table2-standard's; Chen et al. decay the lr at 50 and 150 and average from 5 epochs after the first "
         "decay: here Table 1's decays (100, 150) and the average from epoch 106",
         requires=("teacher_robust", "teacher_natural"))
    _add(registry, "table2-coteach", "Co-teaching adapted to PGD-AT (Han et al. 2018)",
         f"{source}; bhanML/Co-teaching loss.py, main.py (forget rate 0.2, num_gradual 10, exponent 1)",
         _merge(pgd, {"coteach": True, "forget_rate": 0.2, "forget_gradual": 10, "forget_exponent": 1.0}),
         "the forget rate is not stated: Co-teaching's default (its noise rate, 0.2); Table 1's SGD schedule, "
         "not Co-teaching's Adam; each network attacks itself and trains on the other's small-loss half")
    awp = "Wu et al. 2020, csdongxian/AWP"
    _add(registry, "awp-pgd", "PGD-AT with adversarial weight perturbation (AT-AWP), ResNet-18, CIFAR-10",
         f"{awp} AT_AWP/train_cifar10.py (awp_gamma 0.01, awp_warmup 0); Table 1's setting",
         _merge(pgd, {"awp_gamma": 0.01, "awp_warmup": 0}),
         "the official AT-AWP trains PreActResNet-18 on the same schedule (decays at 50% and 75% of 200 epochs)")
    _add(registry, "awp-trades", "TRADES with adversarial weight perturbation (TRADES-AWP), ResNet-18, CIFAR-10",
         f"{awp} trades_AWP/train_trades_cifar.py (awp_gamma 0.005, awp_warmup 10); Table 1's setting",
         _merge(TABLE1, {"method": "trades", "awp_gamma": 0.005, "awp_warmup": 9}),
         "the official script counts epochs from 1 and perturbs from epoch 10: from the 0-based epoch 9 here; it "
         "trains WRN-34-10")


def _registry() -> dict[str, Preset]:
    registry: dict[str, Preset] = {}
    _sec3(registry)
    _a2(registry)
    _sec5(registry)
    _table2(registry)
    return dict(sorted(registry.items(), key=lambda kv: _order(kv[0])))


def _order(name: str) -> tuple[int, str]:
    prefixes = ("fig2-", "fig2c-", "fig3-", "fig5-", "figA1-", "figA2-", "figA3-", "figA4-", "figA5-", "tableA1-",
                "a2-", "figA10-", "table1-", "table2-", "awp-", "tableC1-", "figC2-")
    return next(i for i, p in enumerate(prefixes) if name.startswith(p)), name


#: Every preset by name, in the paper's order (stable names: docs/presets.md and docs/reproduce.md cite them).
PRESETS: Mapping[str, Preset] = MappingProxyType(_registry())


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (AtprobeError naming the closest names otherwise)."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, list(PRESETS), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise AtprobeError(f"unknown preset {name!r}{hint} (atprobe train --list-presets lists them)")


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """``TrainConfig`` from preset ``name`` with ``overrides`` on top (``threat``: a dict of the
    ``ThreatModel`` fields given, or a ThreatModel, which replaces the preset's whole)."""
    preset = get_preset(name)
    values = dict(preset.fields)
    threat = dict(values.pop("threat", {}))
    given = overrides.pop("threat", {})
    if isinstance(given, ThreatModel):
        threat, given = {}, {k: getattr(given, k) for k in THREAT_FIELDS}
    if "norm" in given:
        threat.pop("eps", None), threat.pop("alpha", None)
    if "eps" in given:
        threat.pop("alpha", None)
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise AtprobeError(f"unknown training options: {', '.join(unknown)}")
    values.update(_rescaled(values, overrides))
    missing = [f"--{k.replace('_', '-')}" for k in preset.requires if overrides.get(k) is None]
    if missing:
        raise AtprobeError(f"preset {name} needs {' and '.join(missing)} ({preset.note.split(':')[0]})")
    return TrainConfig(**{**values, **overrides, "threat": ThreatModel(**{**threat, **given}), "preset": name})


#: The preset fields counted in epochs, which follow an overridden ``epochs`` at the same fractions.
EPOCH_FIELDS = ("milestones", "te_start", "te_end", "mix_epochs", "sat_start", "swa_start", "awp_warmup",
                "forget_gradual")


def _rescaled(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's epoch fields at the same fractions of an overridden ``epochs`` (rounded; those
    given explicitly are kept as given): milestones 100,200 of 300 become 10,20 of 30."""
    old, new = values.get("epochs"), overrides.get("epochs")
    if old is None or new is None or new == old:
        return {}
    out: dict[str, Any] = {}
    for name in EPOCH_FIELDS:
        v = values.get(name)
        if v is None or name in overrides:
            continue
        if name == "milestones":
            out[name] = tuple(round(m * new / old) for m in v)
        else:  # an epoch number stays one (>= 1), a 0-based epoch >= 0
            out[name] = max(round(v * new / old), 0 if name == "awp_warmup" else 1)
    return out


def options_config(preset: str | None, options: Mapping[str, Any], given: set[str]) -> TrainConfig:
    """The config of ``atprobe train``'s ``options`` (TrainConfig fields, ``threat`` a ThreatModel):
    without a preset all of them; with one, the preset and on top only the ``given`` options
    (names of the options the user gave; threat parts by their ThreatModel field names)."""
    if preset is None:
        return TrainConfig(**options)
    overrides = {k: v for k, v in options.items() if k in given and k != "threat"}
    overrides["threat"] = {k: getattr(options["threat"], k) for k in THREAT_FIELDS if k in given}
    return preset_config(preset, **overrides)


def _pixels(v: float) -> str:
    """A radius or step in 255ths where it is a whole number of them (8/255), else as is (0.25)."""
    k = v * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and v < 1 else f"{v:g}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v)
    return str(v)


#: The fields --list-presets shows of each preset (all of them are in docs/presets.md).
LISTED = ("arch", "dataset", "method", "epochs", "optimizer", "lr", "schedule", "milestones", "weight_decay",
          "augment", "dropout", "label_noise", "mix_clean", "te", "te_weight", "te_start", "te_end",
          "label_smoothing", "sat", "sat_start", "swa_start", "kd_weights", "coteach", "forget_rate", "awp_gamma",
          "awp_warmup")


def describe(preset: Preset) -> str:
    """One preset's block of ``--list-presets``: name and description, source, resolved key fields."""
    need = {k: f"<{k.upper()}>" for k in preset.requires}  # placeholders: the listing needs no teacher file
    c = preset.config(**need).resolved()
    kd = c.teacher_robust is not None
    shown = {"milestones": c.schedule == "piecewise", "mix_clean": c.mix_clean, "te_weight": c.te,
             "te_start": c.te, "te_end": c.te, "label_smoothing": c.label_smoothing > 0, "sat": c.sat,
             "sat_start": c.sat, "swa_start": c.swa_start is not None, "kd_weights": kd, "coteach": c.coteach,
             "forget_rate": c.coteach, "awp_gamma": c.awp_gamma > 0, "awp_warmup": c.awp_gamma > 0}
    parts = [f"{k}={_value(getattr(c, k))}" for k in LISTED if shown.get(k, True)]
    t = c.threat
    parts.append(f"threat={t.norm}:eps={_pixels(t.eps)},alpha={_pixels(t.alpha)},steps={t.steps}")
    if c.method == "trades":
        parts.append(f"beta={c.beta:g}")
    lines = [f"{preset.name}: {preset.description}", f"    source: {preset.source}", "    " + " ".join(parts)]
    if preset.note:
        lines.append(f"    note: {preset.note}")
    if preset.requires:
        lines.append(f"    needs: {', '.join('--' + k.replace('_', '-') for k in preset.requires)}")
    return "\n".join(lines)


def listing() -> str:
    """The text of ``atprobe train --list-presets``: every preset, in the paper's order."""
    return "\n".join(describe(p) for p in PRESETS.values()) + f"\n{len(PRESETS)} presets\n"
