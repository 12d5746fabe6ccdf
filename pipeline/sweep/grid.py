"""The sweep's grid: arms, repetitions of the group-aware split, nested label subsets, trials.

    arms(sweep, model)                    -> ([Arm], [(arm key, why it is left out)])
    repetition_splits(records, ...)       -> [Repetition]: train / val / test records per redraw
    nested_subsets(records, fractions, seed) -> {fraction: Subset}: stratified, nested, >= 1 per class
    trials(arms, repetitions, fractions, seeds) -> [Trial]

An arm is what one row of the results table trains: an initialisation (scratch, an encoder the
sweep pretrains, or any encoder reference) x a head (a backbone family, full fine-tuning or a
linear probe), plus the baselines that are always there (a ResNet from scratch, and logistic
regression and a random forest on per-channel summary statistics). A new objective (BEiT) joins
as `pretrain:beit` and a new family as a head: nothing here names one.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from pipeline.data.manifest import Record
from pipeline.data.splits import assign_splits
from pipeline.models.backbones import FAMILIES, backbone_spec
from pipeline.models.objectives import OBJECTIVES
from pipeline.sweep.config import CLASSICAL, PRETRAIN_PREFIX, SweepConfig

LABELLED = ("train", "val", "test")
OBJECTIVE_NAMES = {"mae": "MAE", "simmim": "SimMIM", "beit": "BEiT"}
FAMILY_NAMES = {"vit": "ViT", "deit": "DeiT", "swin": "Swin", "resnet": "ResNet", "beit": "BEiT"}
CLASSICAL_NAMES = {"logistic_regression": "logistic regression (channel statistics)",
                   "random_forest": "random forest (channel statistics)"}


@dataclass(frozen=True)
class Init:
    """sweep.inits entry: kind scratch | pretrain (value: the objective) | reference (value: a
    folder, run id, runs:/ or models:/ URI, or a weights file)."""
    name: str
    kind: Literal["scratch", "pretrain", "reference"]
    value: str

    @classmethod
    def parse(cls, name: str, text: str) -> "Init":
        if text == "scratch":
            return cls(name, "scratch", "")
        if text.startswith(PRETRAIN_PREFIX):
            return cls(name, "pretrain", text[len(PRETRAIN_PREFIX):])
        return cls(name, "reference", text)

    def label(self) -> str:
        return OBJECTIVE_NAMES.get(self.value, self.value) if self.kind == "pretrain" else self.name


@dataclass(frozen=True)
class Arm:
    """One row of the results table. kind "network" trains `backbone` (from `init` unless it is
    None: scratch); kind "classical" fits `estimator` on channel statistics."""
    key: str  # folder-safe and unique: "mae-vit", "scratch-vit", "resnet18", "logistic_regression"
    label: str  # in plain words, for the report
    kind: Literal["network", "classical"]
    init: Init | None = None
    head: str | None = None
    backbone: str | None = None
    mode: Literal["full", "probe"] = "full"
    patch_size: int | None = None
    window_size: int | None = None
    estimator: str | None = None
    baseline: bool = False

    @property
    def pretrained(self) -> bool:
        return self.init is not None and self.init.kind != "scratch"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Arm":
        return cls(**{**d, "init": Init(**d["init"]) if d.get("init") else None})


def _head_label(head: str, backbone: str, mode: str) -> str:
    family = FAMILY_NAMES.get(backbone_spec(backbone).family, backbone_spec(backbone).family)
    return f"{family} ({backbone}{', linear probe' if mode == 'probe' else ''})"


def arms(sweep: SweepConfig, patch_size: int, window_size: int | None) -> tuple[list[Arm], list[tuple[str, str]]]:
    """Every (init x head) arm the grid can train, then the baselines -> (arms, skipped), where
    skipped holds (arm key, reason) for pairs that cannot be trained (e.g. MAE x Swin).
    patch_size / window_size: the recipe's `model:` geometry, the default of every head."""
    out, skipped = [], []
    for head_name, head in sweep.heads.items():
        spec = backbone_spec(head.backbone)
        for init_name, text in sweep.inits.items():
            init = Init.parse(init_name, text)
            key = f"{init_name}-{head_name}"
            if init.kind == "scratch" and head.mode == "probe":
                skipped.append((key, "a linear probe needs a pretrained encoder"))
                continue
            if init.kind == "pretrain":
                try:
                    OBJECTIVES[init.value].check_backbone(FAMILIES[spec.encoder_family], head.backbone)
                except ValueError as err:
                    skipped.append((key, str(err)))
                    continue
            what = _head_label(head_name, head.backbone, head.mode)
            label = f"{what} from scratch" if init.kind == "scratch" else f"{what} + {init.label()}"
            window = (head.window_size if head.window_size is not None else window_size) if spec.uses_window_size else None
            out.append(Arm(key, label, "network", None if init.kind == "scratch" else init, head_name,
                           head.backbone, head.mode, head.patch_size or patch_size, window))
    cnn = sweep.cnn_baseline
    if not any(a.backbone == cnn and a.init is None and a.mode == "full" for a in out):
        out.append(Arm(cnn, f"{FAMILY_NAMES['resnet']} ({cnn}) from scratch", "network", None, None, cnn,
                       "full", patch_size, None, baseline=True))
    out += [Arm(name, CLASSICAL_NAMES[name], "classical", estimator=name, baseline=True) for name in CLASSICAL]
    if len({a.key for a in out}) != len(out):
        raise ValueError(f"sweep: two arms share a name: {sorted(k for k, n in Counter(a.key for a in out).items() if n > 1)}; "
                         "rename an init or a head")
    return out, skipped


# -- splits ------------------------------------------------------------------------------------

@dataclass
class Repetition:
    """One redraw of the split: records of each part, and the groups the test part may use."""
    index: int
    train: list[Record]
    val: list[Record]
    test: list[Record]
    eligible_groups: int = 0  # groups that may be drawn for test (never seen by pretraining)


def pretraining_groups(records: list[Record]) -> set[str]:
    """Groups whose images the pretraining stage reads: the unlabelled pool, or the train split
    when there is none (as stages/pretrain.py chooses)."""
    pool = [r for r in records if r.split == "unlabelled"] or [r for r in records if r.split == "train"]
    return {r.group for r in pool}


def _stratum(label) -> int:
    """One class per record to stratify on (a multi-label record: its first class)."""
    return label[0] if isinstance(label, tuple) and label else (-1 if isinstance(label, tuple) else int(label))


def _draw(records: list[Record], share: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Group-aware, class-stratified cut of `records` -> (rest, about `share` of the images)."""
    if share >= 1.0:
        return [], list(records)
    split_of = assign_splits([r.group for r in records], [_stratum(r.label) for r in records],
                             (1.0 - share, 0.0, share), seed)
    return ([r for r in records if split_of[r.group] == "train"],
            [r for r in records if split_of[r.group] == "test"])


def repetition_splits(records: list[Record], repetitions: int, test_fraction: float, val_fraction: float,
                      seed: int, num_classes: int) -> list[Repetition]:
    """`repetitions` redraws of train / val / test over the labelled records (whatever split the
    manifest gave them), per group (block, patient, volume) and stratified by class
    (pipeline.data.splits.assign_splits, i.e. scikit-learn's StratifiedGroupKFold).

    Test groups are drawn only among groups without a pretraining-pool image (pretraining_groups),
    so that no arm was pretrained on a test pixel; val and train come from all the others.
    test_fraction / val_fraction: shares of all labelled images.
    ValueError naming the numbers when the unseen groups cannot give the test share, or naming the
    class and repetition when a class is missing from a part.
    """
    labelled = [r for r in records if r.split in LABELLED]
    if not labelled:
        raise ValueError("the prepared data have no labelled image: nothing to sweep")
    seen = pretraining_groups(records)
    unseen = [r for r in labelled if r.group not in seen]
    test_share = test_fraction * len(labelled) / max(len(unseen), 1)
    if not unseen or test_share > 1.0 + 1e-9:
        raise ValueError(f"sweep.test_fraction={test_fraction} asks for ~{round(test_fraction * len(labelled))} test "
                         f"images, but only {len(unseen)} labelled images lie in groups no pretraining image "
                         "comes from; lower sweep.test_fraction")
    out = []
    for r in range(repetitions):
        rep_seed = int(np.random.SeedSequence([seed, r]).generate_state(1)[0] % (2**31))
        kept, test = _draw(unseen, test_share, rep_seed)
        test_groups = {x.group for x in test}
        rest = [x for x in labelled if x.group not in test_groups]
        val_share = val_fraction * len(labelled) / max(len(rest), 1)
        if val_share >= 1.0:
            raise ValueError(f"sweep.val_fraction={val_fraction} + test_fraction={test_fraction} leave no training images")
        train, val = _draw(rest, val_share, rep_seed + 1)
        rep = Repetition(r, train, val, test, len({x.group for x in unseen}))
        _check_classes(rep, num_classes)
        out.append(rep)
    return out


def _check_classes(rep: Repetition, num_classes: int) -> None:
    for part in ("train", "val", "test"):
        have = {_stratum(x.label) for x in getattr(rep, part)}
        lacking = sorted(set(range(num_classes)) - have)
        if lacking:
            raise ValueError(f"repetition {rep.index}: class(es) {lacking} have no {part} image (too few groups "
                             "hold them); use fewer sweep.repetitions or other test/val fractions")


# -- nested label subsets ------------------------------------------------------------------------

@dataclass
class Subset:
    records: list[Record]
    per_class: dict[int, int]  # class -> labels kept
    raised: dict[int, int] = field(default_factory=dict)  # class -> labels the fraction asked for (0), raised to 1


def nested_subsets(records: list[Record], fractions: list[float], seed: int) -> dict[float, Subset]:
    """Per fraction f, round(f x n_c) records of every class c (at least 1: a class the fraction
    would leave without a label is raised to one, and listed in `raised`).

    Nested: each class's records are put in one seeded random order, and every fraction takes a
    prefix of it, so a smaller subset always lies inside a larger one. Records keep their order.
    """
    by_class: dict = defaultdict(list)
    for i, r in enumerate(records):
        by_class[r.label].append(i)
    rng = np.random.default_rng(seed)
    order = {c: [idx[j] for j in rng.permutation(len(idx))] for c, idx in sorted(by_class.items(), key=lambda kv: str(kv[0]))}
    out = {}
    for f in sorted(fractions):
        keep, per_class, raised = [], {}, {}
        for c, idx in order.items():
            asked = round(f * len(idx))
            n = max(1, asked)
            if asked == 0:
                raised[c] = asked
            keep += idx[:n]
            per_class[c] = n
        out[f] = Subset([records[i] for i in sorted(keep)], per_class, raised)
    return out


# -- trials ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    arm: Arm
    repetition: int
    fraction: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.arm.key}/rep{self.repetition}-frac{self.fraction:g}-seed{self.seed}"

    def to_dict(self) -> dict:
        return {"arm": self.arm.to_dict(), "repetition": self.repetition, "fraction": self.fraction, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        return cls(Arm.from_dict(d["arm"]), d["repetition"], d["fraction"], d["seed"])


def trials(arm_list: list[Arm], repetitions: int, fractions: list[float], seeds: list[int]) -> list[Trial]:
    """The grid, ordered so that an interrupted sweep has whole cells: repetition, seed, fraction, arm."""
    return [Trial(a, r, f, s) for r in range(repetitions) for s in seeds for f in fractions for a in arm_list]

