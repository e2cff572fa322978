"""EL2N and GraNd scores (Paul et al. 2021): GraNd at initialisation with estimated BatchNorm statistics,
EL2N from Ray Train runs, each the mean over seeds, cached per setting with their cost."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dp4tl_ray.data.decode import DecodeSpec, decode_image
from dp4tl_ray.data.imagefolder import scan_image_folder
from dp4tl_ray.errors import UserError
from dp4tl_ray.models import ModelSpec, build_model, load_checkpoint, load_model, save_checkpoint
from dp4tl_ray.select.scores import (
    RUNS_DIR,
    SCORES,
    ScoreConfig,
    ScoreEmbedder,
    compute_scores,
    estimate_bn_statistics,
    image_scores,
    training_seconds,
)
from dp4tl_ray.select.scores_io import META_KEY, SCORES_FILE, load_scores

SPEC = ModelSpec("resnet18", num_classes=3, small_input=True)
DECODE = DecodeSpec(8, 8)


def _models_with_bn_statistics(x: torch.Tensor, seeds=(0, 1)) -> list:
    """Seeded models whose BatchNorm running statistics come from ``x`` (not the init values)."""
    models = [build_model(SPEC, seed) for seed in seeds]
    estimate_bn_statistics(models, [x])
    return models


def _checkpoints(models, folder: Path) -> list[str]:
    return [str(save_checkpoint(m, folder / f"model{i}.pt")) for i, m in enumerate(models)]


def _naive_grad_norm(model, x: torch.Tensor, y: torch.Tensor, params) -> float:
    model.zero_grad()
    F.cross_entropy(model(x[None]), y[None]).backward()
    return float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params)))


def test_bn_statistics_are_estimated_with_the_weights_left_at_init():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 8, 8, generator=gen) for _ in range(3)] + [torch.rand(1, 3, 8, 8, generator=gen)]
    models = [build_model(SPEC, 0)]
    assert estimate_bn_statistics(models, batches) == 3  # a batch of one image has no variance: skipped
    (model,), init = models, build_model(SPEC, 0)
    for (name, p), q in zip(model.named_parameters(), init.parameters()):
        assert torch.equal(p, q), name
    assert not model.training and model.net.bn1.momentum == init.net.bn1.momentum
    with torch.no_grad():  # bn1's statistics: the mean over the batches of its inputs' per-batch channel means
        means = [model.net.conv1((x - model.mean) / model.std).mean(dim=(0, 2, 3)) for x in batches[:3]]
    torch.testing.assert_close(model.net.bn1.running_mean, torch.stack(means).mean(dim=0))
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):  # every layer's, not torch's initial mean 0 / variance 1
            assert int(bn.num_batches_tracked) == 3, name
            assert bn.running_mean.abs().max() > 1e-4, name
            assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)), name


def test_grand_by_torch_func_equals_naive_per_sample_backward_averaged_over_seeds(tmp_path):
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2])
    models = _models_with_bn_statistics(x)
    paths = _checkpoints(models, tmp_path)
    batch = {"id": np.array([4, 9]), "label": y.numpy().astype(np.int32),
             "image": (x[:2] * 255).round().byte().permute(0, 2, 3, 1).numpy()}
    grand = ScoreEmbedder(SPEC, paths, "grand", grand_params="all")(batch)
    el2n = ScoreEmbedder(SPEC, paths, "el2n")(batch)
    xs = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() / 255
    naive = [[_naive_grad_norm(m, xs[i], y[i], list(m.parameters())) for i in range(2)] for m in models]
    with torch.no_grad():
        naive_el2n = [(m(xs).softmax(1) - F.one_hot(y, 3)).norm(dim=1).numpy() for m in models]
    assert grand["id"].tolist() == el2n["id"].tolist() == [4, 9]
    assert set(grand) == {"id", "grand"} and set(el2n) == {"id", "el2n"}
    np.testing.assert_allclose(grand["grand"], np.mean(naive, axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(el2n["el2n"], np.mean(naive_el2n, axis=0), rtol=1e-5, atol=1e-6)


def test_grand_last_is_the_closed_form_classifier_gradient_norm():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    (model,) = _models_with_bn_statistics(x, seeds=(0,))
    el2n = image_scores(model, x, y, "el2n")
    grand = image_scores(model, x, y, "grand", grand_params="last")
    fc = [model.net.fc.weight, model.net.fc.bias]
    naive = [_naive_grad_norm(model, x[i], y[i], fc) for i in range(6)]
    np.testing.assert_allclose(grand.numpy(), naive, rtol=1e-4, atol=1e-5)
    assert (grand > el2n).all()


def test_training_cost_counts_the_epochs_of_killed_attempts():
    history = [{"epoch": 1, "epoch_s": 5.0, "start_epoch": 0}, {"epoch": 2, "epoch_s": 6.0, "start_epoch": 0},
               {"epoch": 3, "epoch_s": 7.0, "start_epoch": 2}]  # killed after epoch 2, resumed for epoch 3
    assert training_seconds(history, wall_s=10.0, trained_now=True) == 10.0 + 5.0 + 6.0
    assert training_seconds(history, wall_s=0.0, trained_now=False) == 18.0  # finished earlier, record lost


def test_cache_keys_distinguish_every_setting_a_score_depends_on():
    changes = {"el2n": {"seeds": (0, 1), "epochs": 3, "lr": 0.05, "batch_size": 64, "num_workers": 2},
               "grand": {"seeds": (0, 1), "batch_size": 64, "grand_params": "last", "bn_images": 512}}
    names = set()
    for score in SCORES:
        base = ScoreConfig(score)
        assert set(changes[score]) == set(base.settings()) - {"score"}  # every setting is tried below
        assert base.dir_name().startswith(f"scores-{score}-") and base.dir_name() not in names
        names.add(base.dir_name())
        for key, value in changes[score].items():
            name = replace(base, **{key: value}).dir_name()
            assert name not in names, key
            names.add(name)
        # where the work runs does not change the scores
        assert replace(base, use_gpu=True, num_actors=3, rows_per_block=64, cpus_per_worker=2).dir_name() == base.dir_name()
    # GraNd is scored at initialisation: EL2N's training settings do not reach it
    assert replace(ScoreConfig("grand"), epochs=9, lr=0.5, num_workers=4).dir_name() == ScoreConfig("grand").dir_name()


def _colour_folder(root, per_class: int = 30, mislabeled: int = 3) -> list[str]:
    """Three classes of noisy red / green / blue 8 px images; ``mislabeled`` images per class sit in
    the next class's folder, and one file is unreadable. Returns the misplaced files' paths."""
    rng = np.random.default_rng(0)
    wrong = []
    for c in range(3):
        for i in range(per_class):
            pixels = np.clip(np.eye(3)[c] * 0.6 + 0.2 + rng.normal(0, 0.15, (8, 8, 3)), 0, 1)
            folder = f"class{(c + 1) % 3 if i < mislabeled else c}"
            path = root / folder / f"c{c}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
            if i < mislabeled:
                wrong.append(f"{folder}/{path.name}")
    (root / "class0" / "broken.png").write_bytes(b"not an image")
    return wrong


def _decoded(root: Path, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``ids`` of the folder, decoded here as the pipeline does, and their labels."""
    index = scan_image_folder(root)
    x = np.stack([decode_image((root / index.paths[i]).read_bytes(), DECODE) for i in ids])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(index.labels[ids].astype(np.int64))


def _check_table_and_cost(scores, root: Path, out: Path, model_seconds: str) -> np.ndarray:
    """Readable images only, the files as returned, the cost as the sum of its stages; the ids."""
    index = scan_image_folder(root)
    ids = scores.table.column("id").to_numpy()
    assert ids.tolist() == [i for i, p in enumerate(index.paths) if p != "class0/broken.png"]
    assert pq.read_table(out / SCORES_FILE).equals(scores.table)
    seconds = scores.meta["seconds"]
    assert set(seconds) == {model_seconds, "score_s"} and min(seconds.values()) > 0
    assert scores.meta["scores_seconds"] == pytest.approx(sum(seconds.values()))
    assert json.loads(pq.read_schema(out / SCORES_FILE).metadata[META_KEY])["scores_seconds"] == scores.meta["scores_seconds"]
    return ids


@pytest.mark.ray
def test_grand_is_scored_at_initialisation_as_the_mean_over_seeds(ray_local, tmp_path):
    _colour_folder(tmp_path / "train")
    cfg = ScoreConfig("grand", seeds=(0, 1), epochs=1, batch_size=16, grand_params="last", bn_images=64, rows_per_block=32)
    out = tmp_path / cfg.dir_name()
    scores = compute_scores(tmp_path / "train", SPEC, DECODE, cfg, out)
    ids = _check_table_and_cost(scores, tmp_path / "train", out, "bn_estimate_s")
    assert not (out / RUNS_DIR).exists()  # nothing was trained
    models = [load_model(SPEC, path).eval() for path in scores.meta["models"]]
    for seed, model in zip(cfg.seeds, models):
        for (name, p), q in zip(model.named_parameters(), build_model(SPEC, seed).parameters()):
            assert torch.equal(p, q), name  # the initial weights
        assert model.net.bn1.running_mean.abs().max() > 1e-4  # statistics estimated, not torch's initial zeros
    x, y = _decoded(tmp_path / "train", ids)
    per_seed = torch.stack([image_scores(m, x, y, "grand", "last") for m in models])
    np.testing.assert_allclose(scores.table.column("grand").to_numpy(), per_seed.mean(dim=0).numpy(), rtol=1e-4, atol=1e-5)
    again = compute_scores(tmp_path / "train", SPEC, DECODE, cfg, out)  # cached: read back, cost as recorded
    assert again.table.equals(scores.table) and again.meta["scores_seconds"] == scores.meta["scores_seconds"]


@pytest.mark.ray
def test_el2n_comes_from_models_trained_by_ray_train(ray_local, tmp_path):
    wrong = _colour_folder(tmp_path / "train")
    cfg = ScoreConfig("el2n", seeds=(0,), epochs=1, batch_size=16, lr=0.005, num_workers=1, rows_per_block=32)
    out = tmp_path / cfg.dir_name()
    scores = compute_scores(tmp_path / "train", SPEC, DECODE, cfg, out)
    ids = _check_table_and_cost(scores, tmp_path / "train", out, "train_s")
    (path,) = scores.meta["models"]
    assert Path(path).is_relative_to(out / RUNS_DIR / "el2n-seed0")  # the seed's Train run, resumable by name
    assert load_checkpoint(path)["epoch"] == cfg.epochs
    model = load_model(SPEC, path).eval()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), build_model(SPEC, 0).parameters()))
    x, y = _decoded(tmp_path / "train", ids)
    score = scores.table.column("el2n").to_numpy()
    np.testing.assert_allclose(score, image_scores(model, x, y, "el2n").numpy(), rtol=1e-4, atol=1e-5)
    index = scan_image_folder(tmp_path / "train")
    is_wrong = np.isin(ids, [index.paths.index(p) for p in wrong])
    assert np.isfinite(score).all() and score[is_wrong].mean() > score[~is_wrong].mean()

    # Scoring again once the scores are gone reuses the finished run (not trained again) and still counts its cost.
    (out / SCORES_FILE).unlink()
    again = compute_scores(tmp_path / "train", SPEC, DECODE, cfg, out)
    assert again.meta["models"] == [path]
    assert again.meta["seconds"]["train_s"] == scores.meta["seconds"]["train_s"]
    np.testing.assert_allclose(again.table.column("el2n").to_numpy(), score, rtol=1e-6)


def test_bad_score_settings_are_one_line_errors(tmp_path):
    _colour_folder(tmp_path / "train", per_class=1, mislabeled=0)
    cases = [(ModelSpec("resnet18", 2, True), ScoreConfig("el2n"), "raise num_classes"),
             (SPEC, ScoreConfig("grand", grand_params="first"), "grand_params"),
             (SPEC, ScoreConfig("el2n", seeds=()), "at least one seed"),
             (SPEC, ScoreConfig("grand", seeds=(0, 0)), "each once"),
             (SPEC, ScoreConfig("forgetting"), "score must be one of"),
             (SPEC, ScoreConfig("el2n", epochs=0), "epochs >= 1")]
    for spec, cfg, match in cases:
        with pytest.raises(UserError, match=match) as e:
            compute_scores(tmp_path / "train", spec, DECODE, cfg, tmp_path / "scores")
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_scores(tmp_path / "nowhere", "el2n")
    pq.write_table(pa.table({"id": [0], "grand": [1.0]}), tmp_path / "grand.parquet")
    with pytest.raises(UserError, match="no `id` and `el2n` columns"):
        load_scores(tmp_path / "grand.parquet", "el2n")
