"""Pretraining checkpoints: what a checkpoint directory holds, writing and reading it, resume checks.

A checkpoint directory holds ``state.pt`` (a :class:`TrainState`: everything a resumed run needs)
and ``model.pt`` (the backbone in the project's checkpoint format, :func:`dp4tl_ray.models.save_checkpoint`,
with the epoch, mode, label map and config: what evaluation loads). Ray Train keeps them under
``<out>/<name>/checkpoint_*``; local mode (``num_workers=0``), where nothing copies a staged
directory to storage, writes them under ``<out>/<name>/local/checkpoint_epoch*`` itself.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import reading
from dp4tl_ray.config import record_from
from dp4tl_ray.errors import UserError
from dp4tl_ray.models import Surrogate, save_checkpoint
from dp4tl_ray.train.pretrain_config import PretrainConfig

if TYPE_CHECKING:
    import ray.train

STATE_FILE = "state.pt"  # TrainState, for resume
MODEL_FILE = "model.pt"  # the backbone in the project's checkpoint format, for evaluation
LOCAL_DIR = "local"  # local mode's checkpoints, under the run directory

# Settings a resumed run must share with the run that wrote its checkpoint (epochs may grow).
RESUME_KEYS = ("mode", "arch", "small_input", "image_size", "keepset", "source", "batch_size", "num_workers",
               "moco_dim", "moco_k", "seed")


@dataclass
class TrainState:
    """``state.pt``: saved as a plain dict of tensors and Python values (loads with ``weights_only=True``)."""

    model: dict[str, torch.Tensor]  # the trained module's state dict (MoCo: both encoders and the queue)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int  # epochs completed
    history: list[dict[str, Any]]  # every epoch's metrics, earlier attempts included
    resume_keys: dict[str, Any] = field(default_factory=dict)  # the RESUME_KEYS settings of the run that wrote it

    @classmethod
    def read(cls, directory: str | Path) -> TrainState:
        """The state in ``directory``; a damaged ``state.pt`` is one line naming it (nothing is deleted)."""
        path = Path(directory) / STATE_FILE
        fix = f"delete {directory} and re-run: training resumes from the checkpoint before it (or pick another --name)"
        with reading(path, fix):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return record_from(cls, obj, path, fix)

    def write(self, directory: str | Path) -> None:
        with atomic.file_path(Path(directory) / STATE_FILE) as tmp:
            torch.save({f.name: getattr(self, f.name) for f in fields(self)}, tmp)


def resume_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """The settings of ``cfg`` that a resumed run must share (saved as ``TrainState.resume_keys``)."""
    return {k: getattr(cfg, k) for k in RESUME_KEYS}


def check_resume(state: TrainState, cfg: PretrainConfig) -> None:
    """Refuse to resume a checkpoint written under other settings (one-line error naming them)."""
    changed = [k for k, v in resume_settings(cfg).items() if state.resume_keys.get(k) != v]
    if changed:
        raise UserError(f"run {cfg.name} was started with other settings ({', '.join(changed)} differ); "
                        "resume it with the same settings or pick another --name")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a local run (Ray Train's, or local mode's), if any."""
    dirs = [p for pattern in ("checkpoint_*", f"{LOCAL_DIR}/checkpoint_*") for p in Path(run_dir).glob(pattern)
            if (p / STATE_FILE).is_file() and (p / MODEL_FILE).is_file()]
    if not dirs:
        return None
    epochs = {p: TrainState.read(p).epoch for p in dirs}
    return max(dirs, key=lambda p: (epochs[p], p.name))


def restored_state(checkpoint: ray.train.Checkpoint | None) -> TrainState | None:
    """The state of the checkpoint Ray Train hands a (re)started worker, if any."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return TrainState.read(d)


@contextlib.contextmanager
def staged_checkpoint(run_dir: str, epoch: int, local_mode: bool) -> Iterator[str]:
    """Where a checkpoint is written before ``ray.train.report``: a temp dir that Ray Train copies to
    storage, except in local mode (no workers), where nothing copies it and the staged dir is the checkpoint."""
    if local_mode:
        path = Path(run_dir) / LOCAL_DIR / f"checkpoint_epoch{epoch:05d}"
        path.mkdir(parents=True, exist_ok=True)
        yield str(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp


def write_checkpoint(directory: str | Path, state: TrainState, backbone: Surrogate, cfg: PretrainConfig,
                     kept_classes: list[int]) -> None:
    """Both files of one checkpoint: ``state.pt``, then ``model.pt`` with the label map (the source
    class of each output) and the run's config."""
    state.write(directory)
    save_checkpoint(backbone, Path(directory) / MODEL_FILE,
                    {"epoch": state.epoch, "mode": cfg.mode, "kept_classes": kept_classes, "config": asdict(cfg)})


__all__ = ["LOCAL_DIR", "MODEL_FILE", "RESUME_KEYS", "STATE_FILE", "TrainState", "check_resume", "latest_checkpoint",
           "restored_state", "resume_settings", "staged_checkpoint", "write_checkpoint"]
