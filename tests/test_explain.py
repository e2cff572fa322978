"""The keep-set explorer: the page re-derives the selection from the artifacts and shows it (no Ray).

A small real world: JPEG folder trees for a source (6 classes) and a task (3 classes), FeatureStores
written in the store schema with planted top-k source classes (as a surrogate would store them), and
an LM keep-set made by ``select_keepset``. The browser test renders the page in headless Chromium.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dp4tl_ray import atomic
from dp4tl_ray.cli import run
from dp4tl_ray.data.imagefolder import scan_image_folder
from dp4tl_ray.data.parquet import shard_image_folder
from dp4tl_ray.errors import UserError
from dp4tl_ray.explain import explain_keepset
from dp4tl_ray.explain.evidence import pick_round_robin
from dp4tl_ray.explain.explorer import PAGE, ranks_in_detail
from dp4tl_ray.explain.thumbnails import image_bytes, thumbnails
from dp4tl_ray.featurestore import MANIFEST, FeatureStore, feature_table
from dp4tl_ray.select.keepset import META_FILE
from dp4tl_ray.select.pipeline import SelectConfig, select_keepset

SOURCE_CLASSES = ["apple", "bird", "car", "dog", "eel", "fig"]
# Each downstream image's top-3 source classes (ids 0-1 pear, 2-3 wolf, 4-5 yak): 3 votes for car,
# 2 for eel, 1 for apple; among the unvoted classes runner-up votes (top-3) put dog (5 mentions)
# before bird (1) and fig (none).
TOPK = [[2, 3, 0], [2, 3, 1], [2, 0, 3], [4, 3, 2], [4, 2, 3], [0, 2, 4]]
EXPECTED_RANKING = [2, 4, 0, 3, 1, 5]


def _image_tree(root: Path, classes: list[str], per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(40 * c + 20, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def _store(out: Path, images: Path, topk: np.ndarray, seed: int) -> Path:
    """A FeatureStore of ``images`` (schema and manifest as `dp4tl extract` writes them)."""
    index = scan_image_folder(images)
    n = len(index)
    feats = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    out.mkdir(parents=True)
    table = feature_table(np.arange(n), index.labels, feats, topk, np.zeros(topk.shape, np.float32))
    pq.write_table(table, out / "part-0.parquet")
    atomic.write_json(out / MANIFEST, {
        "source": str(images), "source_format": "folder", "source_fingerprint": index.fingerprint,
        "classes": index.classes, "dim": 8, "topk": topk.shape[1], "num_rows": n,
        "surrogate": {"name": "resnet18", "arch": "resnet18", "checkpoint": None}})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    source = _image_tree(root / "source" / "train", SOURCE_CLASSES, 4, seed=0)
    task = _image_tree(root / "task_a" / "train", ["pear", "wolf", "yak"], 2, seed=1)
    src = _store(root / "f-src", source, np.tile([[0, 1, 2]], (24, 1)), seed=0)
    down = _store(root / "f-task", task, np.asarray(TOPK), seed=1)
    # the runner-up variant (LM's default is the paper's seeded tie-break): the page shows its tie-break votes
    ks = select_keepset(SelectConfig(method="lm", ratio=0.5, source_features=str(src), runner_up_topk=3,
                                     downstream_features=[str(down)], out=str(root / "lm")))
    return root, ks


class _Page(HTMLParser):
    """Rows of the units table in document order (unit rows and the cut), each with its <img> sources."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and ("unit" in a.get("class", "") or a.get("id") == "cut"):
            self.rows.append({"cut": a.get("id") == "cut", "unit": a.get("data-unit"), "imgs": []})
        if tag == "img":
            self.images.append(a["src"])
            if self.rows and a.get("class") != "summary":
                self.rows[-1]["imgs"].append(a["alt"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: Path) -> _Page:
    p = _Page()
    p.feed(page.read_text())
    return p


def test_page_shows_units_in_ranked_order_with_the_cut_and_thumbnails(world):
    root, ks = world
    out = explain_keepset(root / "lm", root / "page")
    page = _parse(out / "index.html")
    order = [r for r in page.rows if not r["cut"]]
    assert [int(r["unit"]) for r in order] == EXPECTED_RANKING
    cut_at = [r["cut"] for r in page.rows].index(True)
    assert cut_at == ks.meta.units_kept == 3  # ratio 0.5 of 6 units: the cut after rank 3
    kept_classes = {SOURCE_CLASSES[int(r["unit"])] for r in page.rows[:cut_at]}
    labels = scan_image_folder(root / "source" / "train").labels
    assert kept_classes == {SOURCE_CLASSES[c] for c in np.unique(labels[ks.ids])}
    car = order[0]["imgs"]  # 4 source images of car, then its 3 voters (task pear ids 0-2)
    assert sum("· car" in alt for alt in car) == 4 and sum(alt.startswith("task_a id") for alt in car) == 3
    assert not any(alt.startswith("task_a") for alt in order[4]["imgs"])  # bird/fig: no voter
    for uri in page.images:  # every thumbnail (and the summary) is an inline image that decodes
        kind, data = uri.split(",", 1)
        assert kind in ("data:image/jpeg;base64", "data:image/png;base64")
        assert min(Image.open(io.BytesIO(base64.b64decode(data))).size) >= 64
    assert len(page.images) == 1 + 6 * 4 + 3 + 2 + 1  # summary, members, voters of car, eel, apple
    text = " ".join(" ".join(page.text).split())
    diag = ks.meta.extra["diagnostics"]["task_a"]  # shown as the selection recorded it
    assert f"top unit's vote share {diag['top_unit_share']:.1%} car;" in text and diag["top_unit_share"] == 0.5
    assert f"vote entropy {diag['vote_entropy']:.3f}" in text
    assert "mean class agreement 66.7%" in text  # pear 2/2 on car, wolf 1/2 on car, yak 1/2 on apple
    assert "classes sharing one majority unit 2 of 3" in text and "votes on kept units 100.0%" in text
    assert "0.5 3 12 50.0%" in text and "0.2 5 20 83.3%" in text  # images kept as the ratio grows
    assert "No warning" in text and "pear 2 car 100% kept" in text and "yak 2 apple 50% kept" in text
    with Image.open(out / "summary.png") as png:
        assert png.format == "PNG" and png.size[0] > 600


def test_explain_defaults_to_keepset_explain_and_the_cli_prints_the_page(world, capsys):
    root, _ = world
    assert run(["explain", str(root / "lm")]) == 0
    assert f"{root / 'lm' / 'explain' / 'index.html'}" in capsys.readouterr().out
    assert (root / "lm" / "explain" / "summary.png").is_file()


def test_explain_starts_ray_through_init_ray_only_for_fm_classmean(world, tmp_path, monkeypatch, capsys):
    """fm-classmean's class means come from Ray actors: the command starts Ray as every entry point does
    (``cli.init_ray``, with the user's verbosity) instead of implicitly; an LM keep-set needs no Ray."""
    import dp4tl_ray.cli as cli

    root, _ = world
    started = []

    def init_ray(verbose: bool = False, worker_logs: bool = True) -> None:
        started.append(verbose)
        raise UserError("Ray would start here")

    monkeypatch.setattr(cli, "init_ray", init_ray)
    classmean = tmp_path / "classmean"
    shutil.copytree(root / "lm", classmean)
    meta = json.loads((classmean / META_FILE).read_text())
    (classmean / META_FILE).write_text(json.dumps({**meta, "method": "fm-classmean"}))
    assert run(["-v", "explain", str(classmean)]) == 2 and started == [True]
    assert "Ray would start here" in capsys.readouterr().err
    assert run(["explain", str(root / "lm"), "--out", str(tmp_path / "lm")]) == 0 and started == [True]


def _copy(world, tmp_path) -> tuple[Path, Path]:
    root, _ = world
    shutil.copytree(root, tmp_path / "w", symlinks=True)
    w = tmp_path / "w"
    for store in ("f-src", "f-task"):
        m = json.loads((w / store / MANIFEST).read_text())
        m["source"] = m["source"].replace(str(root), str(w))
        (w / store / MANIFEST).write_text(json.dumps(m))
    ks = select_keepset(SelectConfig(method="lm", ratio=0.5, source_features=str(w / "f-src"),
                                     downstream_features=[str(w / "f-task")], out=str(w / "lm")))
    return w, Path(ks.meta.downstream_features[0])


def test_a_missing_artifact_is_one_line_naming_it(world, tmp_path, capsys):
    w, down = _copy(world, tmp_path)
    shutil.rmtree(w / "task_a")
    with pytest.raises(UserError, match=r"images of FeatureStore .*f-task are not at .*task_a/train; restore"):
        explain_keepset(w / "lm")
    shutil.rmtree(down)
    assert run(["explain", str(w / "lm")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dp4tl: error: the downstream (task_a) FeatureStore") and "f-task" in err and "\n" not in err
    assert run(["explain", str(w / "nothing")]) == 2
    assert "no keep-set at" in capsys.readouterr().err


def test_a_changed_store_or_a_keepset_without_provenance_is_refused(world, tmp_path):
    w, _ = _copy(world, tmp_path)
    meta = json.loads((w / "lm" / META_FILE).read_text())
    del meta["source_features"], meta["downstream_features"]  # as keep-sets written before they were recorded
    (w / "lm" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not name the FeatureStores it was selected from"):
        explain_keepset(w / "lm")
    down = _store(w / "f-task2", w / "task_a" / "train", np.asarray(TOPK)[::-1].copy(), seed=1)
    select_keepset(SelectConfig(method="lm", ratio=0.5, source_features=str(w / "f-src"),
                                downstream_features=[str(down)], out=str(w / "lm2")))
    shutil.rmtree(down)
    _store(down, w / "task_a" / "train", np.roll(np.asarray(TOPK), 1, axis=1), seed=1)  # re-extracted: other votes
    with pytest.raises(UserError, match="votes recomputed from the FeatureStores differ"):
        explain_keepset(w / "lm2")


def test_a_multi_task_keepset_shows_each_tasks_votes_and_diagnostics(world, tmp_path):
    root, _ = world
    other = _store(tmp_path / "f-other", root / "task_a" / "train", np.tile([[5, 1, 0]], (6, 1)), seed=2)
    ks = select_keepset(SelectConfig(method="lm", ratio=0.5, source_features=str(root / "f-src"),
                                     downstream_features=[str(root / "f-task"), str(other)], out=str(tmp_path / "two")))
    first, second = ks.meta.downstream  # both stores are of task_a's images: the second is named by its path
    page = _parse(explain_keepset(tmp_path / "two") / "index.html")
    text = " ".join(" ".join(page.text).split())
    fig = next(r for r in page.rows if r["unit"] == "5")  # all of the second task's votes, none of the first's
    assert page.rows.index(fig) == 0 and f"{first}: 0 {second}: 6" in text
    assert f"task {first}" in text and f"task {second}" in text
    assert sum(alt.startswith(f"{second} id") for alt in fig["imgs"]) == 5 and not any(
        alt.startswith(f"{first} id") for alt in fig["imgs"])


def test_baseline_keepsets_have_no_votes_to_explain(world, tmp_path):
    root, _ = world
    select_keepset(SelectConfig(method="random-class", ratio=0.5, source_features=str(root / "f-src"),
                                out=str(tmp_path / "rc")))
    with pytest.raises(UserError, match="prunes without unit votes"):
        explain_keepset(tmp_path / "rc")


def test_sweep_report_links_a_page_per_keepset_and_notes_the_unexplainable(world, tmp_path):
    from dp4tl_ray.explain.report_pages import explain_keepsets

    root, _ = world
    keepsets = tmp_path / "work" / "keepsets" / "resnet18" / "task_a"
    shutil.copytree(root / "lm", keepsets / "lm-r0p5-s0")
    select_keepset(SelectConfig(method="random-class", ratio=0.5, source_features=str(root / "f-src"),
                                out=str(keepsets / "random-class-r0p5-s0")))
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# Sweep\n\ntables\n")
    pages = explain_keepsets(report, [str(keepsets / "lm-r0p5-s0"), str(keepsets / "random-class-r0p5-s0")])
    assert pages == {"explain/resnet18-task_a-lm-r0p5-s0": report / "explain" / "resnet18-task_a-lm-r0p5-s0" / PAGE}
    assert _parse(pages["explain/resnet18-task_a-lm-r0p5-s0"]).rows  # the units table is there
    md = (report / "report.md").read_text()
    assert md.startswith("# Sweep\n\ntables\n\n## Keep-sets")
    assert "- [resnet18-task_a-lm-r0p5-s0](explain/resnet18-task_a-lm-r0p5-s0/index.html)" in md
    note = next(line for line in md.splitlines() if line.startswith("- resnet18-task_a-random-class-r0p5-s0: no page ("))
    assert "prunes without unit votes" in note


def test_thumbnails_read_the_same_images_from_parquet_shards(world, tmp_path):
    root, _ = world
    folder = scan_image_folder(root / "source" / "train")
    shards = shard_image_folder(folder, tmp_path / "shards", rows_per_shard=7)
    store = FeatureStore(tmp_path / "f", {"source": str(shards.root), "source_format": "parquet",
                                          "source_fingerprint": shards.fingerprint, "classes": shards.classes})
    wanted = [0, 5, 8, 23]
    assert image_bytes(store, wanted) == {i: (folder.root / folder.paths[i]).read_bytes() for i in wanted}
    assert set(thumbnails(store, wanted)) == set(wanted)


def test_detail_rows_are_the_top_and_the_units_around_the_cut():
    assert ranks_in_detail(6, 3, top=12, around_cut=6) == list(range(6))
    assert ranks_in_detail(1000, 800, top=3, around_cut=2) == [0, 1, 2, 798, 799, 800, 801]
    assert ranks_in_detail(10, 10, top=2, around_cut=1) == [0, 1, 9]


def test_cluster_members_take_each_class_in_turn_nearest_first():
    groups = np.array([5, 5, 5, 7, 7, 9])
    key = np.array([0.3, 0.1, 0.2, 0.9, 0.4, 0.0])
    assert pick_round_robin(groups, key, 4).tolist() == [1, 4, 5, 2]  # class 5 (largest), 7, 9, then 5 again
    assert pick_round_robin(groups, key, 10).tolist() == [1, 4, 5, 2, 3, 0]


def test_page_shows_the_mapping_warnings(world, tmp_path):
    w, _ = _copy(world, tmp_path)
    sunk = _store(w / "f-sunk", w / "task_a" / "train", np.tile([[5, 0, 1]], (6, 1)), seed=1)  # every image: fig
    select_keepset(SelectConfig(method="lm", ratio=0.5, source_features=str(w / "f-src"),
                                downstream_features=[str(sunk)], out=str(w / "sunk")))
    page = (explain_keepset(w / "sunk") / "index.html").read_text()
    warnings = [line for line in page.splitlines() if line.startswith('<p class="warning">')]
    assert len(warnings) == 2 and "sink unit: unit 5 (fig) takes 100% of all votes" in warnings[0]
    assert "shared majority: 3 of 3 downstream classes" in warnings[1]


# ------------------------------------------------------------------ in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Runs after every image has loaded or failed: writes what the browser rendered into the DOM.
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, units: document.querySelectorAll("tr.unit").length,
    cut: document.getElementById("cut").getBoundingClientRect().height, summary: document.querySelector("img.summary").naturalWidth});
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp_path: Path, page: Path, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=15000", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def _rendered(tmp_path: Path, page_html: str, name: str) -> dict:
    probed = tmp_path / name
    probed.write_text(page_html.replace("</body>", _PROBE + "</body>"))
    dom = _chromium(tmp_path, probed, "--dump-dom")
    start = dom.index('<pre id="render-check">') + len('<pre id="render-check">')
    return json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_page_renders_units_and_images_in_headless_chromium(world, tmp_path):
    root, _ = world
    out = explain_keepset(root / "lm", tmp_path / "page")
    page = (out / "index.html").read_text()
    seen = _rendered(tmp_path, page, "probed.html")
    assert (seen["images"], seen["broken"], seen["units"], seen["summary"]) == (31, 0, 6, 1200) and seen["cut"] > 0
    first = page.index('<img src="data:image/jpeg')  # the probe does see a broken image
    damaged = page[:first] + '<img src="data:image/jpeg;base64,AAAA' + page[page.index('"', first + 10):]
    assert _rendered(tmp_path, damaged, "damaged.html")["broken"] == 1
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, out / "index.html", f"--screenshot={shot}", "--window-size=1280,1600")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (1600, 1280) and pixels.std() > 20  # not a blank page
    kept_bar = (np.abs(pixels - [0x2B, 0x7B, 0xBA]).sum(axis=2) < 30).sum()
    assert kept_bar > 500  # the summary's kept bars and the kept rows' border are drawn
