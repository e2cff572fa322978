"""The synthetic generator: determinism, layout, ground truth, dirty files, planted domain structure."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dp4tl_ray.atomic import sha256_file
from dp4tl_ray.data import synthetic
from dp4tl_ray.data.synthetic import SynthConfig, generate
from dp4tl_ray.errors import UserError

SMALL = dict(num_domains=3, classes_per_domain=3, images_per_class=4, image_size=16, tasks=2,
             domains_per_task=2, classes_per_task_domain=2, train_per_class=3, test_per_class=2)


def small(root: Path, **overrides) -> SynthConfig:
    return SynthConfig(root=str(root), **{**SMALL, **overrides})


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_original_regime_is_byte_identical_to_the_pinned_tree(tmp_path):
    """The harder regime's fields at their defaults change nothing: this small dirty tree hashes as it did
    before they existed (pinned stack: numpy, Pillow), synth.json included."""
    tree = digests(generate(small(tmp_path / "a", dirty=True)).root)
    assert hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest() == \
        "3cd8605b786c23e64e6dc0f9e65e57009c79ea3ee4a6b187e7ff254564d83ab4"


def test_same_seed_gives_byte_identical_trees(tmp_path):
    a = digests(generate(small(tmp_path / "a", dirty=True)).root)
    b = digests(generate(small(tmp_path / "b", dirty=True)).root)
    assert a == b
    assert len(a) > 50


def test_different_seed_gives_different_files(tmp_path):
    a = digests(generate(small(tmp_path / "a", seed=0)).root)
    b = digests(generate(small(tmp_path / "b", seed=1)).root)
    assert set(a.values()).isdisjoint(b.values())


def test_source_follows_imagenet_train_layout(tmp_path):
    summary = generate(small(tmp_path / "d"))
    assert summary.source_dir == tmp_path / "d" / "source" / "train"
    wnids = sorted(p.name for p in summary.source_dir.iterdir())
    assert len(wnids) == summary.num_classes == 9
    for wnid in wnids:
        assert re.fullmatch(r"n\d{8}", wnid)
        files = sorted(p.name for p in (summary.source_dir / wnid).iterdir())
        assert len(files) == 4 and all(re.fullmatch(rf"{wnid}_\d+\.JPEG", f) for f in files)
    assert summary.num_images == 36
    assert summary.task_dirs == [tmp_path / "d" / "downstream" / f"task_{t}" for t in range(2)]
    for task_dir in summary.task_dirs:
        for split, count in (("train", 3), ("test", 2)):
            classes = list((task_dir / split).iterdir())
            assert len(classes) == 4 and all(len(list(c.glob("*.JPEG"))) == count for c in classes)


def test_every_image_decodes_to_configured_size_rgb(tmp_path):
    summary = generate(small(tmp_path / "d", image_size=24))
    paths = sorted(summary.root.rglob("*.JPEG"))
    assert len(paths) == 36 + 2 * 4 * (3 + 2)
    for path in paths:
        with Image.open(path) as im:
            im.load()
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (24, 24))


def test_ground_truth_names_exactly_the_chosen_domains_classes(tmp_path):
    summary = generate(small(tmp_path / "d", num_domains=4))
    domains = {d["name"]: d for d in read_json(summary.root / "source" / "domains.json")["domains"]}
    sorted_wnids = sorted(p.name for p in summary.source_dir.iterdir())
    for task_dir in summary.task_dirs:
        truth = read_json(task_dir / "ground_truth.json")
        assert len(truth["domains"]) == 2
        expected = sorted(w for name in truth["domains"] for w in domains[name]["wnids"])
        assert truth["relevant_wnids"] == expected
        assert truth["relevant_class_indices"] == [sorted_wnids.index(w) for w in expected]
        assert {c["domain"] for c in truth["classes"]} == set(truth["domains"])
        for split in ("train", "test"):
            names = sorted(p.name for p in (task_dir / split).iterdir())
            assert names == sorted(c["name"] for c in truth["classes"])


def test_downstream_classes_are_new_variants_of_their_domains(tmp_path):
    summary = generate(small(tmp_path / "d"))
    source = read_json(summary.root / "source" / "domains.json")["classes"]
    source_params = {tuple(c["params"]) for c in source}
    source_names = {c["wnid"] for c in source}
    for task_dir in summary.task_dirs:
        for cls in read_json(task_dir / "ground_truth.json")["classes"]:
            assert cls["name"] not in source_names and cls["name"].startswith(cls["domain"])
            assert tuple(cls["params"]) not in source_params


def test_dirty_mode_plants_undecodable_files_named_like_images(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    summary = generate(small(tmp_path / "d", dirty=True))
    assert read_json(summary.root / "synth.json")["broken_files"] == summary.broken_files
    assert len(summary.broken_files) == 3
    sizes = []
    for rel in summary.broken_files:
        path = summary.root / rel
        assert path.parent.parent == summary.source_dir
        assert re.fullmatch(rf"{path.parent.name}_\d+\.JPEG", path.name)
        sizes.append(path.stat().st_size)
        with pytest.raises((OSError, SyntaxError)):
            with Image.open(path) as im:
                im.load()
    assert 0 in sizes
    assert (summary.root / summary.broken_files[0]).read_bytes()[:2] == b"\xff\xd8"  # a JPEG, cut short
    assert summary.num_images == 36


@pytest.mark.parametrize("field, value", [
    ("num_domains", 0), ("classes_per_domain", 0), ("images_per_class", 0), ("image_size", 7),
    ("image_size", 4096), ("tasks", -1), ("seed", -1), ("domains_per_task", 4),
    ("classes_per_task_domain", 4), ("train_per_class", 0), ("root", ""),
    ("task_class_counts", (2,)), ("task_class_counts", (2, 4)), ("class_size_spread", -0.5),
    ("distractor_domains", -1), ("shared_cue_weight", 1.0), ("cue_params", (0, 5)), ("cue_params", (1, 1)),
    ("cue_params", (0, 1)),  # fewer than class_cues (5 here)
])
def test_bad_config_raises_one_line_user_error(tmp_path, field, value):
    cfg = small(tmp_path / "d")
    setattr(cfg, field, value)
    with pytest.raises(UserError) as err:
        generate(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "d").exists()


def test_rerun_with_same_config_reuses_the_tree(tmp_path):
    first = generate(small(tmp_path / "d", dirty=True))
    before = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    again = generate(small(tmp_path / "d", dirty=True))
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*")} == before
    assert (again.num_classes, again.num_images, again.task_dirs, again.broken_files) == \
        (first.num_classes, first.num_images, first.task_dirs, first.broken_files)


def test_refuses_a_non_empty_root_it_did_not_write_with_this_config(tmp_path):
    generate(small(tmp_path / "d"))
    with pytest.raises(UserError):
        generate(small(tmp_path / "d", seed=1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        generate(small(tmp_path / "other"))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_failed_run_leaves_no_tree_behind(tmp_path, monkeypatch):
    calls = iter(range(10))

    def failing_jpeg(pixels):
        if next(calls) == 9:
            raise RuntimeError("killed")
        return b"jpeg"

    monkeypatch.setattr(synthetic, "_jpeg", failing_jpeg)
    with pytest.raises(RuntimeError, match="killed"):
        generate(small(tmp_path / "d"))
    assert list(tmp_path.iterdir()) == []


def colour_features(path: Path) -> np.ndarray:
    """Hue histogram of the saturated pixels of the image centre: a crude object-colour signature."""
    with Image.open(path) as im:
        hsv = np.asarray(im.convert("HSV"), dtype=np.float64)
    centre = hsv[8:24, 8:24].reshape(-1, 3)
    weights = centre[:, 1] * centre[:, 2] / 255.0**2
    hist = np.bincount((centre[:, 0] * 24 / 256).astype(int), weights=weights, minlength=24)
    return hist / hist.sum()


def test_domains_are_separable_by_colour_statistics(tmp_path):
    summary = generate(small(tmp_path / "d", num_domains=5, classes_per_domain=2, images_per_class=10,
                             image_size=32, tasks=0))
    domains = read_json(summary.root / "source" / "domains.json")["domains"]
    feats = {d: np.stack([colour_features(p) for w in dom["wnids"]
                          for p in sorted((summary.source_dir / w).glob("*.JPEG"))])
             for d, dom in enumerate(domains)}
    # Nearest centroid, fitted on half of each domain's images, tested on the other half.
    centroids = np.stack([f[::2].mean(0) for f in feats.values()])
    test_x = np.concatenate([f[1::2] for f in feats.values()])
    test_y = np.concatenate([np.full(len(f[1::2]), d) for d, f in feats.items()])
    pred = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == test_y) >= 0.9  # chance is 0.2
    within = np.mean([np.linalg.norm(f - f.mean(0), axis=1).mean() for f in feats.values()])
    between = np.mean([np.linalg.norm(a - b) for i, a in enumerate(centroids) for b in centroids[i + 1:]])
    assert between > 2 * within


# ----- the harder regime (P5 v2)

HARDER = dict(num_domains=4, classes_per_domain=4, images_per_class=6, image_size=16, tasks=1, domains_per_task=3,
              task_class_counts=(3, 2, 1), class_size_spread=1.0, distractor_domains=2, shared_cue_weight=0.3,
              class_cues=2, train_per_class=2, test_per_class=2)


def test_harder_regime_gives_unequal_class_sizes_and_counts_them(tmp_path):
    summary = generate(small(tmp_path / "d", **HARDER, dirty=True))
    classes = read_json(summary.root / "source" / "domains.json")["classes"]
    on_disk = {w.name: len(list(w.glob("*.JPEG"))) for w in summary.source_dir.iterdir()}
    broken = {Path(b).parent.name for b in summary.broken_files}
    assert {c["wnid"]: c["images"] for c in classes if c["wnid"] not in broken} == \
        {w: n for w, n in on_disk.items() if w not in broken}
    sizes = [c["images"] for c in classes]
    assert len(set(sizes)) >= 4 and min(sizes) >= 2 and max(sizes) >= 2 * min(sizes)
    assert summary.num_images == sum(sizes) and summary.num_classes == (4 + 2) * 4
    again = generate(small(tmp_path / "d", **HARDER, dirty=True))  # the list-valued field round-trips synth.json
    assert again.num_images == summary.num_images


def test_distractors_copy_a_task_domains_look_but_not_its_cues(tmp_path):
    cfg = small(tmp_path / "d", **HARDER)
    domains, source, tasks = synthetic._plan(cfg)
    task_domains = {d.name: d for d in tasks[0].domains}
    distractors = domains[cfg.num_domains:]
    assert len(distractors) == 2 and all(d.lookalike_of in task_domains for d in distractors)
    # The most relevant task domain (3 of the 6 task classes) is copied first.
    assert distractors[0].lookalike_of == max(task_domains, key=lambda n: sum(c.domain.name == n for c in tasks[0].classes))
    for d in distractors:
        model = task_domains[d.lookalike_of]
        assert (d.family, d.texture, d.freq, d.hue_spread) == (model.family, model.texture, model.freq, model.hue_spread)
        assert d.primary[1:] == model.primary[1:] and d.secondary[1:] == model.secondary[1:]
        hue_gap = min(abs(d.primary[0] - model.primary[0]), 1 - abs(d.primary[0] - model.primary[0]))
        assert 0 < hue_gap < 0.5 / cfg.num_domains  # nearer the model's hue than any other domain's
        assert not set(d.cues) & set(model.cues)  # it teaches other distinctions
    assert len({c.name for c in source}) == len(source) == 24  # distractor wnids collide with none


def test_ground_truth_grades_relevance_per_source_class(tmp_path):
    summary = generate(small(tmp_path / "d", **HARDER))
    truth = read_json(summary.task_dirs[0] / "ground_truth.json")
    domains = {d["name"]: d for d in read_json(summary.root / "source" / "domains.json")["domains"]}
    relevance = truth["relevance"]
    assert set(relevance) == {p.name for p in summary.source_dir.iterdir()}
    assert sorted(truth["domain_relevance"].values()) == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-6)
    for name, share in truth["domain_relevance"].items():
        assert all(relevance[w] == pytest.approx(share) for w in domains[name]["wnids"])
    assert truth["relevant_wnids"] == sorted(w for w, r in relevance.items() if r > 0)
    lookalikes = sorted(w for d in domains.values() if d["lookalike_of"] for w in d["wnids"])
    assert truth["distractor_wnids"] == lookalikes and all(relevance[w] == 0 for w in lookalikes)
    assert sum(relevance.values()) == pytest.approx(4, abs=1e-5)  # each task domain's share, once per its 4 classes
    assert sorted(len([c for c in truth["classes"] if c["domain"] == n]) for n in truth["domains"]) == [1, 2, 3]


def test_shared_cue_weight_pulls_non_cue_parameters_towards_the_class_value(monkeypatch):
    """Every image keeps the share w of its class's value of a non-cue parameter (here shape b, read where
    the shape family is drawn); w = 0 is the free draw."""
    draws = {}
    for w in (0.0, 0.75):
        monkeypatch.undo()
        dom = next(d for d in synthetic._domains(4, class_cues=2, shared_cue_weight=w) if 1 not in d.cues)
        cls = synthetic._Class("n00000001", dom, (0.5, 0.9, 0.5, 0.5, 0.5))
        seen = []
        monkeypatch.setitem(synthetic.FAMILIES, dom.family,
                            lambda x, y, a, b, f=synthetic.FAMILIES[dom.family]: seen.append(b) or f(x, y, a, b))
        for i in range(40):
            synthetic._render(cls, np.random.default_rng(i), 16)
        draws[w] = np.array(seen)
    assert draws[0.75].min() >= 0.75 * 0.9 and draws[0.75].max() <= 0.75 * 0.9 + 0.25
    assert draws[0.0].min() < 0.3 and draws[0.0].max() > 0.7  # free: spans the range
    assert np.allclose(draws[0.75], 0.75 * 0.9 + 0.25 * draws[0.0])  # same stream, same draws


def test_cue_params_limit_every_domains_cues_and_keep_them_varied(tmp_path):
    """cue_params [0, 1, 2] (the attributes MoCo's augmentations leave alone): every domain, distractors
    included, tells its classes apart by two of them; consecutive domains take different pairs; a rerun with
    the same config reuses the tree (synth.json holds the list)."""
    cfg = small(tmp_path / "d", **{**HARDER, "class_cues": 2, "cue_params": [0, 1, 2]})
    domains, _, _ = synthetic._plan(cfg)
    assert all(set(d.cues) <= {0, 1, 2} and len(d.cues) == 2 for d in domains)
    assert all(a.cues != b.cues for a, b in zip(domains[:cfg.num_domains], domains[1:cfg.num_domains]))
    assert {d.cues for d in domains[:cfg.num_domains]} == {(0, 1), (0, 2), (1, 2)}
    first = generate(cfg)
    assert read_json(first.root / "synth.json")["config"]["cue_params"] == [0, 1, 2]
    stamps = {p: p.stat().st_mtime_ns for p in first.root.rglob("*.JPEG")}
    generate(cfg)
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*.JPEG")} == stamps
    assert all(set(d["class_cues"]) <= {0, 1, 2} for d in read_json(first.root / "source" / "domains.json")["domains"])
