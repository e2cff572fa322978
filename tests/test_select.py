"""Keep-sets end to end on generated data: LM and FM recover the planted relevant classes.

A resnet18 surrogate is pretrained (Ray Train) on the whole generated source, both the source and
the downstream task are extracted with it (Ray Data), then every selection method runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from dp4tl_ray.data.imagefolder import scan_image_folder
from dp4tl_ray.data.synthetic import SynthConfig, generate
from dp4tl_ray.errors import UserError
from dp4tl_ray.features import ExtractConfig, extract_features
from dp4tl_ray.select.keepset import KeepSet
from dp4tl_ray.select.pipeline import SelectConfig, format_keepset_summary, select_keepset
from dp4tl_ray.train.trainer import PretrainConfig, pretrain

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    """Generated source (6 domains x 4 classes), one task on 2 domains, a trained surrogate, both stores."""
    root = tmp_path_factory.mktemp("sel")
    synth = generate(SynthConfig(root=str(root / "data"), num_domains=6, classes_per_domain=4, images_per_class=24,
                                 image_size=32, domains_per_task=2, classes_per_task_domain=4, train_per_class=12,
                                 test_per_class=4, seed=1))
    run = pretrain(PretrainConfig(source=str(synth.source_dir), out=str(root / "runs"), name="surrogate", arch="resnet18",
                                  image_size=32, resize_size=32, crop_scale_min=0.6, epochs=8, batch_size=32, lr=0.05,
                                  weight_decay=5e-4, shuffle_buffer=256, num_workers=0))
    common = dict(arch="resnet18", checkpoint=run.model_path, image_size=32, resize_size=32, batch_size=64, topk=3)
    source = extract_features(ExtractConfig(source=str(synth.source_dir), out=str(root / "f-src"), **common), progress=False)
    task = synth.task_dirs[0]
    down = extract_features(ExtractConfig(source=str(task / "train"), out=str(root / "f-task"),
                                          num_classes=len(source.manifest["classes"]), **common), progress=False)
    truth = json.loads((task / "ground_truth.json").read_text())
    return root, synth, source, down, set(truth["relevant_class_indices"])


def _kept_classes(ks: KeepSet, labels: np.ndarray) -> set[int]:
    return set(np.unique(labels[ks.ids]).tolist())


def _select(world, method, ratio=0.5, name=None, **kw) -> KeepSet:
    root, _, source, down, _ = world
    return select_keepset(SelectConfig(method=method, ratio=ratio, source_features=str(source.path),
                                       downstream_features=[str(down.path)], out=str(root / (name or method)), **kw))


@pytest.mark.parametrize("method", ["lm", "fm", "fm-classmean"])
def test_lm_and_fm_keep_the_planted_relevant_classes(world, method):
    _, synth, _, _, relevant = world
    labels = scan_image_folder(synth.source_dir).labels
    ks = _select(world, method)
    if method == "fm":  # clusters need not align with classes: count relevant *images* kept
        relevant_images = np.isin(labels, sorted(relevant))
        kept = np.zeros(len(labels), bool)
        kept[ks.ids] = True
        assert kept[relevant_images].mean() >= 0.9
        assert ks.meta.extra["diagnostics"][ks.meta.downstream[0]]["num_units"] == ks.meta.units_total
    else:
        assert len(_kept_classes(ks, labels) & relevant) >= 0.9 * len(relevant)
        assert ks.meta.units_kept == 12 and ks.meta.units_total == 24
    assert 0.3 < ks.meta.images_kept / ks.meta.images_total < 0.7
    assert KeepSet.load(world[0] / method).ids.tolist() == ks.ids.tolist()


@pytest.mark.parametrize("method", ["lm-reverse", "fm-reverse"])
def test_reverse_keeps_the_least_voted_units_and_drops_the_planted_relevant_ones(world, method):
    _, synth, _, _, relevant = world
    labels = scan_image_folder(synth.source_dir).labels
    ks = _select(world, method)
    forward = _select(world, method.removesuffix("-reverse"), name=f"{method}-forward")
    relevant_images = np.isin(labels, sorted(relevant))
    kept = np.zeros(len(labels), bool)
    kept[ks.ids] = True
    assert kept[relevant_images].mean() <= 0.1  # the planted relevant images are dropped ...
    assert kept[~relevant_images].mean() >= 0.5  # ... and the irrelevant ones are what is kept
    assert ks.meta.units_kept == forward.meta.units_kept == 12
    # at ratio 0.5 the two ends of one seeded ranking split the units: the keep-sets are complements
    assert not set(ks.ids.tolist()) & set(forward.ids.tolist())
    assert len(ks) + len(forward) == len(labels)
    votes = np.asarray(ks.meta.votes_per_unit)
    assert ks.meta.extra["zero_vote_units_kept"] == min(12, int((votes == 0).sum()))


def test_lm_default_is_the_papers_top1_rule_and_records_its_ties(world):
    assert SelectConfig(method="lm", ratio=0.5, source_features="-").runner_up_topk == 0
    paper = _select(world, "lm", ratio=0.25, name="lm-paper")
    variant = _select(world, "lm", ratio=0.25, name="lm-runner-up", runner_up_topk=3)
    for ks in (paper, variant):
        votes = np.asarray(ks.meta.votes_per_unit)
        kept_units = np.unique(scan_image_folder(world[1].source_dir).labels[ks.ids])
        assert ks.meta.extra["zero_vote_units_kept"] == int((votes[kept_units] == 0).sum())
    assert paper.meta.extra["zero_vote_units_kept"] > 0  # 18 of 24 kept: some had no top-1 vote
    assert paper.meta.extra["tie_break"] == "seeded"
    assert variant.meta.extra["tie_break"] == "runner-up top-3 votes, then seeded"
    with pytest.raises(UserError, match="runner_up_topk must be 0"):
        _select(world, "lm", name="lm-bad", runner_up_topk=1)


@pytest.mark.parametrize("method", ["fm", "fm-classmean"])
def test_explorer_explains_fm_keepsets_from_their_artifacts(world, method):
    """The explorer re-derives an FM keep-set (k-means result it recorded, or class means) and shows it."""
    from dp4tl_ray.explain import explain_keepset
    from dp4tl_ray.explain.evidence import load_evidence

    ks = _select(world, method, name=f"{method}-explain")
    ev = load_evidence(world[0] / f"{method}-explain")
    assert ev.units_kept == ks.meta.units_kept and ev.votes.tolist() == ks.meta.votes_per_unit
    page = (explain_keepset(world[0] / f"{method}-explain") / "index.html").read_text()
    assert page.count('<tr class="unit ') == ks.meta.units_total and page.count('id="cut"') == 1
    assert page.count("<img") > 2 * ks.meta.units_total
    assert ("source classes it mixes" in page) == (method == "fm")


def test_one_to_one_vote_rule_keeps_the_planted_relevant_classes(world):
    _, synth, _, _, relevant = world
    ks = _select(world, "lm", name="lm-1to1", vote_rule="one-to-one")
    assert len(_kept_classes(ks, scan_image_folder(synth.source_dir).labels) & relevant) >= 0.9 * len(relevant)
    assert ks.meta.extra["vote_rule"] == "one-to-one" and ks.meta.units_kept == 12


def test_random_class_baseline_keeps_about_half_of_the_relevant_classes(world):
    _, synth, _, _, relevant = world
    labels = scan_image_folder(synth.source_dir).labels
    shares = [len(_kept_classes(_select(world, "random-class", seed=s, name=f"rc{s}"), labels) & relevant) / len(relevant)
              for s in range(8)]
    assert 0.3 <= float(np.mean(shares)) <= 0.7


def test_keepsets_are_reproducible_and_summarised(world):
    a, b = _select(world, "lm", name="lm-a"), _select(world, "lm", name="lm-b")
    assert a.ids.tolist() == b.ids.tolist() and a.meta.sha256 == b.meta.sha256
    text = format_keepset_summary(a, "lm-a")
    assert "units kept 12/24" in text and "most voted" in text
    diag = a.meta.extra["diagnostics"]
    assert list(diag) == a.meta.downstream and diag["task_0"]["classes"] == 8 and diag["task_0"]["images"] == 96
    assert "class agreement" in text and ("WARNING task_0: " in text) == diag["task_0"]["flagged"]
    soft = _select(world, "lm", name="lm-soft", vote_topk=3)
    assert soft.meta.extra["vote_topk"] == 3 and abs(sum(soft.meta.votes_per_unit) - world[3].num_rows) < 1e-6


def test_image_baselines_match_the_budget_of_the_method(world):
    root = world[0]
    lm = _select(world, "lm", ratio=0.8, name="lm80")
    for method in ("random-image", "moderate"):
        ks = _select(world, method, ratio=0.8, name=f"{method}80", match=str(root / "lm80"))
        assert len(ks) == len(lm) and ks.meta.extra["matched"] == str(root / "lm80")


def test_score_baselines_use_cached_scores(world, tmp_path):
    import pyarrow as pa

    _, _, source, _, _ = world
    ids = source.read(["id"]).column("id").to_numpy()
    el2n = np.zeros(len(ids), np.float32)
    el2n[:10] = 1.0  # the ten highest
    pq.write_table(pa.table({"id": ids, "el2n": el2n, "grand": -el2n}), tmp_path / "scores.parquet")
    ks = _select(world, "el2n", keep_fraction=10 / len(ids), scores=str(tmp_path / "scores.parquet"), name="el2n")
    assert ks.ids.tolist() == ids[:10].tolist()
    assert ks.meta.extra["scores"]["path"] == str(tmp_path / "scores.parquet")  # the keep-set names its scores


def test_every_keepset_that_uses_scores_counts_their_recorded_cost(world, tmp_path):
    """scores.json beside scores.parquet records what the scores cost (models + scoring): each keep-set
    read from them counts those seconds, not the moment it took to read them."""
    import pyarrow as pa

    _, _, source, _, _ = world
    ids = source.read(["id"]).column("id").to_numpy()
    score = np.arange(len(ids), dtype=np.float32)
    pq.write_table(pa.table({"id": ids, "el2n": score, "grand": score}), tmp_path / "scores.parquet")
    (tmp_path / "scores.json").write_text(json.dumps({"scores_seconds": 1234.5}))
    for method, ratio in (("el2n", 0.5), ("el2n", 0.8), ("grand", 0.8)):
        ks = _select(world, method, ratio=ratio, scores=str(tmp_path), name=f"{method}-{ratio}-costed")
        costs = ks.meta.extra["costs"]
        assert costs["scores_s"] == 1234.5 and costs["scores_reused"] is True and costs["reused"] is False


def test_a_selection_is_reused_until_one_of_its_inputs_changes(world, tmp_path):
    """The same inputs again: the keep-set already at ``out`` comes back with its recorded costs, without
    k-means and without writing; another ratio or another downstream store selects again."""
    _, synth, source, down, _ = world
    kmeans_dir = source.path / "kmeans"
    out = tmp_path / "fm"
    cfg = SelectConfig(method="fm", ratio=0.5, source_features=str(source.path), downstream_features=[str(down.path)],
                       out=str(out))
    first = select_keepset(cfg)
    costs = first.meta.extra["costs"]
    assert costs["reused"] is False and costs["kmeans_s"] > 0 and costs["select_s"] >= 0 and costs["scores_s"] == 0
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    shutil.rmtree(kmeans_dir)  # k-means would have to write it again
    again = select_keepset(replace(cfg))
    assert again.meta.extra["costs"] == {**costs, "reused": True} and again.ids.tolist() == first.ids.tolist()
    assert not kmeans_dir.exists() and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written

    other_ratio = select_keepset(replace(cfg, ratio=0.75))
    assert other_ratio.meta.extra["costs"]["reused"] is False and kmeans_dir.is_dir() and len(other_ratio) < len(first)
    other_store = extract_features(ExtractConfig(source=str(synth.task_dirs[0] / "train"), out=str(tmp_path / "top2"),
                                                 arch="resnet18", checkpoint=down.manifest["surrogate"]["checkpoint"],
                                                 image_size=32, resize_size=32, batch_size=64, topk=2,
                                                 num_classes=len(source.manifest["classes"])), progress=False)
    assert other_store.manifest["store_key"] != down.manifest["store_key"]
    changed = select_keepset(replace(cfg, ratio=0.75, downstream_features=[str(other_store.path)]))
    assert changed.meta.extra["costs"]["reused"] is False


def test_selection_errors_are_one_line(world, tmp_path):
    with pytest.raises(UserError, match="unknown vote_rule"):
        _select(world, "lm", name="bad-rule", vote_rule="top1")
    root, _, source, down, _ = world
    with pytest.raises(UserError, match=r"ratio must be in \[0, 1\)"):
        _select(world, "lm", ratio=1.0)
    with pytest.raises(UserError, match="unknown method"):
        _select(world, "craig")
    with pytest.raises(UserError, match="no downstream FeatureStore"):
        select_keepset(SelectConfig(method="lm", ratio=0.5, source_features=str(source.path), out=str(tmp_path / "x")))
    other = extract_features(ExtractConfig(source=str(world[1].task_dirs[0] / "train"), out=str(tmp_path / "other"),
                                           arch="resnet18", image_size=32, resize_size=32, num_classes=24, seed=7), progress=False)
    with pytest.raises(UserError, match="another surrogate"):
        select_keepset(SelectConfig(method="lm", ratio=0.5, source_features=str(source.path),
                                    downstream_features=[str(other.path)], out=str(tmp_path / "y")))
