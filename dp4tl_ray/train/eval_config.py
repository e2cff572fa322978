"""The settings of one downstream evaluation and its torch-free helpers (task folders, the validation split).

Its own module, without torch, so that the ``dp4tl`` command builds its flags and checks a sweep's plan
without importing torch; :mod:`~dp4tl_ray.train.evaluate` runs the evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dp4tl_ray.data.decode import DecodeSpec
from dp4tl_ray.data.imagefolder import FolderIndex, scan_image_folder
from dp4tl_ray.errors import UserError

MODES = ("lp", "ff")
# The paper's downstream recipes: Adam, cosine schedule, batch 128; LP has no augmentation,
# FF uses RandomResizedCrop + horizontal flip (dp4tl_ray.data.transforms.finetune_augment).
LP_LR, LP_EPOCHS = 0.01, 50
FF_LR, FF_EPOCHS = 1e-4, 200
BATCH_SIZE = 128
# Ray Train's report queue holds one result until the controller polls (every 2 s by default): an LP
# epoch takes milliseconds, so reporting each of 50 would idle ~100 s. At most this many reports;
# every epoch is in the results JSON's history.
MAX_REPORTS = 10
SELECTION = "epoch with the best val_acc on a stratified hold-out of the train set; test_acc is test top-1 at that epoch"
TEST_MAX_NOTE = ("max test top-1 over epochs = model selection on the test set (what the paper's reference code "
                 "reports); for comparison only, not an unbiased estimate")


@dataclass
class EvalConfig:
    """One downstream evaluation: a backbone checkpoint (None = random init baseline), a task, a recipe."""

    task_dir: str  # holds train/<class>/* and test/<class>/*
    checkpoint: str | None = None  # a .pt backbone from any pretraining mode; None = seeded random init
    arch: str = "resnet18"
    small_input: bool = False
    image_size: int = 224
    resize_size: int | None = None  # default: image_size * 8/7 (224 -> 256), as feature extraction
    mode: str = "lp"  # lp | ff
    epochs: int | None = None  # None: the recipe's (LP 50, FF 200)
    batch_size: int = BATCH_SIZE  # per worker
    lr: float | None = None  # None: the recipe's (LP 0.01, FF 1e-4)
    val_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 1  # 0 = in this process, without Ray Train (small tasks, a sweep's trial, tests)
    use_gpu: bool = False
    out: str | None = None  # results JSON; default <checkpoint dir>/eval-<task>-<mode>.json
    storage_path: str | None = None  # Ray Train storage; None = Ray's default (~/ray_results)

    @property
    def task(self) -> str:
        return Path(self.task_dir).name

    @property
    def recipe(self) -> tuple[float, int]:
        """``(lr, epochs)`` with the recipe's defaults filled in."""
        lr, epochs = (LP_LR, LP_EPOCHS) if self.mode == "lp" else (FF_LR, FF_EPOCHS)
        return (lr if self.lr is None else self.lr), (epochs if self.epochs is None else self.epochs)

    def decode_spec(self) -> DecodeSpec:
        return DecodeSpec.for_size(self.image_size, self.resize_size)

    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path(self.checkpoint).parent / f"eval-{self.task}-{self.mode}.json"

    def validate(self) -> None:
        """Raise a one-line UserError for the first bad value; scans the task folders and loads the checkpoint."""
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        lr, epochs = self.recipe
        for name, value in (("epochs", epochs), ("batch_size", self.batch_size)):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0 (0 = in this process, without Ray Train), got {self.num_workers}")
        if not lr > 0:
            raise UserError(f"lr must be > 0, got {lr}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.checkpoint is None and self.out is None:
            raise UserError("a random-init baseline (checkpoint=None) needs out=<results.json>")
        from dp4tl_ray.models import ModelSpec, load_backbone  # torch: only when a config is checked

        self.decode_spec()
        ModelSpec(self.arch)
        train, _ = task_indexes(self.task_dir)
        stratified_split(train.labels, self.val_fraction, self.seed, train.classes)
        if self.checkpoint is not None:
            load_backbone(self.checkpoint, self.arch, self.small_input, len(train.classes))


def task_indexes(task_dir: str | Path) -> tuple[FolderIndex, FolderIndex]:
    """The train and test folder indexes of a task, test labels following the train class order."""
    task = Path(task_dir)
    if not task.is_dir():
        raise UserError(f"downstream task {task} does not exist; pass a folder holding train/ and test/")
    for split in ("train", "test"):
        if not (task / split).is_dir():
            raise UserError(f"downstream task {task} has no {split}/ folder; expected {task}/{split}/<class>/<image>")
    train = scan_image_folder(task / "train")
    test_folders = sorted(e.name for e in os.scandir(task / "test") if e.is_dir() and not e.name.startswith("."))
    unknown = sorted(set(test_folders) - set(train.classes))
    if unknown:
        raise UserError(f"test class(es) {unknown[:5]} of {task} have no train/ folder; every test class must be trained")
    return train, scan_image_folder(task / "test", list(train.classes))


def stratified_split(labels: np.ndarray, fraction: float, seed: int, classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_idx, val_idx)``: per class a seeded ``round(fraction * n)`` (at least 1) goes to val.

    Every class keeps at least one image on each side; a class with fewer than 2 images is an error.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(classes)) if classes is not None else np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            name = classes[c] if classes is not None else int(c)
            raise UserError(f"class {name!r} has {len(idx)} train image(s); the validation split needs at least 2 per class")
        idx = rng.permutation(idx)
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
