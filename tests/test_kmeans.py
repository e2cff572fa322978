"""K-means: the pure Lloyd step and in-process shards (no Ray), then the Ray-distributed run on a small planted FeatureStore."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from dp4tl_ray import atomic
from dp4tl_ray.errors import UserError
from dp4tl_ray.features import FeatureStore, feature_table
from dp4tl_ray.kmeans import (
    FaissCpuBackend,
    FaissGpuBackend,
    KMeansConfig,
    LocalShards,
    Shard,
    ShardWorker,
    TorchBackend,
    assign,
    bounded_assign,
    cluster_sums,
    file_groups,
    init_centroids,
    kmeans_distributed,
    kmeans_on_shards,
    kmeans_plus_plus,
    kmeans_single,
    load_assignments,
    moved_sums,
    objective_from_sums,
    sample_keys,
    update_centroids,
)

N, D, K = 6000, 32, 8


def planted(n: int = N, d: int = D, k: int = K, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised rows around ``k`` random unit centres; returns ``features, true cluster``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, k, n)
    x = (centres[truth] + 0.05 * rng.standard_normal((n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), truth


def write_store(path, x: np.ndarray, files: int = 3, seed: int = 0) -> None:
    """A FeatureStore of ``files`` parquet shards; row ``i`` of ``x`` gets id ``i``, rows stored shuffled."""
    order = np.random.default_rng(seed).permutation(len(x))
    for f, rows in enumerate(np.array_split(order, files)):
        topk = np.zeros((len(rows), 1), np.int32)
        table = feature_table(rows, np.zeros(len(rows)), x[rows], topk, topk.astype(np.float32))
        pq.write_table(table, path / f"part-{f:05d}.parquet")
    atomic.write_json(path / "manifest.json", {"dim": x.shape[1], "num_rows": len(x), "topk": 1})


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1 = identical partitions up to renaming)."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = lambda v: (v * (v - 1) / 2).sum()  # noqa: E731
    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(a) * (len(a) - 1) / 2
    expected = rows * cols / total
    return float((both - expected) / ((rows + cols) / 2 - expected))


# --- pure step functions ---------------------------------------------------------------------------


def test_empty_clusters_are_reseeded_by_splitting_the_largest():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    labels = np.zeros(300, np.int64)  # everything in cluster 0: clusters 1..4 are empty
    sums, counts = cluster_sums(x, labels, 5), np.bincount(labels, minlength=5)
    cents = update_centroids(sums, counts, np.zeros((5, 4), np.float32), False, rng)
    assert np.isfinite(cents).all()
    assert len(np.unique(cents, axis=0)) == 5
    new_labels, _ = assign(x, cents)
    assert np.bincount(new_labels, minlength=5).min() > 0


def test_spherical_centroids_have_unit_norm():
    x, _ = planted(500)
    labels, sq = assign(x, x[:K])
    cents = update_centroids(cluster_sums(x, labels, K), np.bincount(labels, minlength=K), x[:K], True, np.random.default_rng(0))
    assert np.allclose(np.linalg.norm(cents, axis=1), 1, atol=1e-6)


def test_kmeans_plus_plus_is_deterministic_per_seed():
    x, _ = planted(2000)
    first = kmeans_plus_plus(x, K, np.random.default_rng(3))
    assert np.array_equal(first, kmeans_plus_plus(x, K, np.random.default_rng(3)))
    assert not np.array_equal(first, kmeans_plus_plus(x, K, np.random.default_rng(4)))


def test_kmeans_plus_plus_seeds_one_centroid_per_planted_cluster():
    x, truth = planted(3000)
    labels, _ = assign(x, kmeans_plus_plus(x, K, np.random.default_rng(0)))
    assert adjusted_rand(labels, truth) > 0.99


def test_shard_steps_over_a_split_add_up_to_the_whole():
    x, _ = planted(1000)
    ids = np.arange(len(x))

    def step(rows: slice) -> tuple:  # one Lloyd step's sums, counts, objective on a shard holding ``rows``
        return Shard(ids[rows], x[rows], FaissCpuBackend(), bounds=False).step(x[:K])

    whole = step(slice(None))
    parts = [step(s) for s in (slice(0, 400), slice(400, None))]
    assert np.allclose(parts[0][0] + parts[1][0], whole[0], rtol=1e-12, atol=1e-9)
    assert np.array_equal(parts[0][1] + parts[1][1], whole[1])
    assert parts[0][2] + parts[1][2] == pytest.approx(whole[2], rel=1e-12)
    assert whole[1].sum() == len(x)


def test_kmeans_prints_a_line_per_iteration_with_objective_and_rows_searched(capsys):
    x, _ = planted(1000)
    shards = LocalShards([Shard(np.arange(500), x[:500]), Shard(np.arange(500, 1000), x[500:])])
    run = kmeans_on_shards(shards, KMeansConfig(k=K, niter=4, seed=0), len(x))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[k-means]")]
    assert lines[0].startswith("[k-means] 1/4 iterations (25%)") and lines[-1].startswith("[k-means] 4/4 iterations (100%)")
    searched = [int(line.split("rows searched ")[1].replace(",", "")) for line in lines]
    assert searched[0] == len(x)  # the first step searches every row; the Hamerly bounds skip some later
    assert all(0 <= s <= len(x) for s in searched) and sum(searched) <= run.rows_searched
    assert f"objective {run.objective[-1]:.4g}" in lines[-1] and f"k {K}" in lines[-1]


def test_cluster_sums_add_each_cluster_in_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    labels = rng.integers(0, 7, 2000)
    labels[labels == 3] = 4  # cluster 3 empty
    sums = cluster_sums(x, labels, 7)
    for j in range(7):
        expected = np.zeros(16)
        for row in x[labels == j]:  # stored order, float64
            expected += row
        assert np.array_equal(sums[j], expected)


def test_moved_sums_match_a_recount():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    old = rng.integers(0, 5, 3000)
    new = old.copy()
    moved = rng.choice(3000, 200, replace=False)
    new[moved] = rng.integers(0, 5, 200)
    sums = moved_sums(cluster_sums(x, old, 5), x, old, new)
    assert np.allclose(sums, cluster_sums(x, new, 5), rtol=1e-12, atol=1e-10)
    assert np.array_equal(moved_sums(sums, x, new, new), sums)


@pytest.mark.parametrize("bounds", [False, True])
def test_shard_worker_steps_match_full_lloyd_steps(tmp_path, bounds):
    """The worker's running sums (recounted, then moved) give the same centroids as fresh sums each step;
    with Hamerly bounds it searches fewer rows and still lands every row where a full search does."""
    x, _ = planted(2000)
    write_store(tmp_path, x, files=1)
    worker = ShardWorker([str(tmp_path / "part-00000.parquet")], bounds=bounds)
    assert worker.bounded == bounds
    cents = cents_ref = init_centroids(worker.x[:K], KMeansConfig(k=K, init="random"))
    for _ in range(4):
        sums, counts, obj, _ = worker.step(cents)
        labels, sq = assign(worker.x, cents_ref)
        ref_sums, ref_counts, ref_obj = cluster_sums(worker.x, labels, K), np.bincount(labels, minlength=K), float(np.sum(sq, dtype=np.float64))
        assert np.array_equal(counts, ref_counts)
        if bounds:  # the objective comes from the sums (no per-row distances): equal up to rounding
            assert np.array_equal(worker.labels, labels) and obj == pytest.approx(ref_obj, rel=1e-5)
        else:
            assert obj == ref_obj
        assert np.allclose(sums, ref_sums, rtol=1e-12, atol=1e-10)
        cents = update_centroids(sums, counts, cents, False, np.random.default_rng(0))
        cents_ref = update_centroids(ref_sums, ref_counts, cents_ref, False, np.random.default_rng(0))


    if bounds:
        assert worker.rows_searched() < 4 * len(x)


@pytest.mark.parametrize("k", [1, 2, 8, 40])
def test_bounded_assign_gives_the_full_search_labels_at_every_lloyd_step(k):
    rng = np.random.default_rng(k)
    centres = rng.standard_normal((12, 16)).astype(np.float32)
    x = (centres[rng.integers(0, 12, 4000)] + 0.6 * rng.standard_normal((4000, 16))).astype(np.float32)
    cents, bounds, searched = x[:k].copy(), None, []
    for _ in range(12):
        bounds, n = bounded_assign(x, cents, bounds, FaissCpuBackend().search2)
        labels, sq = assign(x, cents)
        assert np.array_equal(bounds.labels, labels)
        dist = np.sqrt(sq.astype(np.float64))
        assert (bounds.upper >= dist * (1 - 1e-6)).all()  # bounds hold
        searched.append(n)
        sums, counts = cluster_sums(x, labels, k), np.bincount(labels, minlength=k)
        cents = update_centroids(sums, counts, cents, False, rng)
    assert searched[0] == len(x) and searched[-1] < len(x) // 2  # settled centroids: most rows skipped


def test_lloyd_steps_gather_rows_in_chunks_with_the_same_answer(monkeypatch):
    """Chunked gathering (open rows, rows sorted by cluster) changes no label and no sum beyond float64
    rounding, and a step's temporary copies stay near a chunk, not the shard (P6: actors held ~4x their shard)."""
    import tracemalloc

    from dp4tl_ray.kmeans import lloyd

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, 32)).astype(np.float32)
    x = (centres[rng.integers(0, 20, 30000)] + 0.7 * rng.standard_normal((30000, 32))).astype(np.float32)
    search2 = FaissCpuBackend().search2

    def steps():
        cents, bounds, out, split_rng = x[:20].copy(), None, [], np.random.default_rng(9)
        for _ in range(4):
            bounds, n = bounded_assign(x, cents, bounds, search2)
            sums = cluster_sums(x, bounds.labels, 20)
            out.append((bounds.labels.copy(), sums, n))
            cents = update_centroids(sums, np.bincount(bounds.labels, minlength=20), cents, False, split_rng)
        return out

    whole = steps()
    monkeypatch.setattr(lloyd, "CHUNK_ROWS", 1000)
    chunked = steps()
    for (la, sa, na), (lb, sb, nb) in zip(whole, chunked):
        assert np.array_equal(la, lb) and na == nb
        assert np.allclose(sa, sb, rtol=1e-12, atol=1e-9)
    # second step (bounds in hand, many rows open): temporaries well under one copy of x
    cents = update_centroids(whole[0][1], np.bincount(whole[0][0], minlength=20), x[:20].copy(), False, np.random.default_rng(0))
    first, _ = bounded_assign(x, x[:20].copy(), None, search2)
    tracemalloc.start()
    bounded_assign(x, cents, first, search2)
    cluster_sums(x, first.labels, 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    per_row_bookkeeping = 8 * 6 * len(x)  # labels, bounds and index arrays (int64/float64 per row)
    assert peak < per_row_bookkeeping + x.nbytes // 2, (peak, x.nbytes)


def test_objective_from_sums_is_the_sum_of_squared_distances():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5000, 24)).astype(np.float32)
    cents = x[:7].copy()
    labels, sq = assign(x, cents)
    sums, counts, obj = cluster_sums(x, labels, 7), np.bincount(labels, minlength=7), float(np.sum(sq, dtype=np.float64))
    x_sq = float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    assert objective_from_sums(x_sq, cents, sums, counts) == pytest.approx(obj, rel=1e-6)


def test_random_init_is_k_seeded_rows():
    x, _ = planted(500)
    ids = np.arange(500)
    cents = init_centroids(x[np.argsort(sample_keys(ids, 2))[:K]], KMeansConfig(k=K, seed=2, init="random"))
    assert cents.shape == (K, D) and cents.dtype == np.float32
    assert np.array_equal(cents, x[np.argsort(sample_keys(ids, 2))[:K]])


def test_assign_objective_is_sum_of_squared_distances():
    x, _ = planted(500)
    labels, sq = assign(x, x[:K])
    exact = ((x - x[:K][labels]) ** 2).sum(1)
    assert np.allclose(sq, exact, atol=1e-5)
    assert np.array_equal(labels, ((x[:, None, :] - x[None, :K, :]) ** 2).sum(2).argmin(1))


def test_torch_chunked_assignment_matches_faiss():
    x, _ = planted(1000)
    torch_backend = TorchBackend("cpu", chunk_bytes=4 * K * 300)  # 4 chunks
    labels, sq = assign(torch_backend.put(x), x[:K], torch_backend)
    ref_labels, ref_sq = assign(x, x[:K], FaissCpuBackend())
    assert np.array_equal(labels, ref_labels)
    assert np.allclose(sq, ref_sq, atol=1e-5)


def test_shards_keep_bounds_only_with_a_backend_that_declares_bounded_search():
    x, _ = planted(200)
    ids = np.arange(len(x))
    assert Shard(ids, x, FaissCpuBackend()).bounded and not Shard(ids, x, FaissCpuBackend(), bounds=False).bounded
    assert not Shard(ids, x, TorchBackend("cpu")).bounded
    assert not FaissGpuBackend.bounded_search  # a full search is cheap on a GPU


def test_sample_keys_are_distinct_and_seeded():
    ids = np.arange(10_000)
    keys = sample_keys(ids, 0)
    assert len(np.unique(keys)) == len(ids)
    assert np.array_equal(keys, sample_keys(ids, 0))
    assert not np.array_equal(keys, sample_keys(ids, 1))


def test_spherical_single_reports_squared_l2_objective():
    x, _ = planted(2000)
    res = kmeans_single(x, KMeansConfig(k=K, niter=10, spherical=True))
    assert np.allclose(np.linalg.norm(res.centroids, axis=1), 1, atol=1e-5)
    _, sq = assign(x, res.centroids)
    assert res.objective[-1] == pytest.approx(float(sq.sum()), rel=1e-4)  # converged: last step moved nothing


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=N + 1), dict(niter=0), dict(num_actors=0), dict(k=8, init_sample=4),
                                 dict(init="forgy")])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        KMeansConfig(**{"k": K, **bad}).validate(N)


# --- distributed over Ray --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_run(ray_local, tmp_path_factory):
    """One distributed run (and one on an identical copy of the store), shared by the Ray tests."""
    x, truth = planted()
    store = tmp_path_factory.mktemp("store")
    write_store(store, x)
    copy = tmp_path_factory.mktemp("copy") / "store"
    shutil.copytree(store, copy)
    cfg = KMeansConfig(k=K, niter=10, seed=1, num_actors=2)
    return x, truth, store, cfg, kmeans_distributed(store, cfg), kmeans_distributed(copy, cfg)


@pytest.mark.ray
def test_distributed_matches_single_process_faiss(planted_run):
    x, _, _, cfg, res, _ = planted_run
    ref = kmeans_single(x, cfg)
    assert res.objective[-1] == pytest.approx(ref.objective[-1], rel=0.01)
    assert res.backend == "faiss-cpu"
    assert len(res.objective) == cfg.niter


@pytest.mark.ray
def test_driver_over_in_process_shards_matches_the_ray_actors(planted_run):
    """The one Lloyd driver over the same file groups held in this process (no Ray) and by the shard actors."""
    x, _, store, cfg, res, _ = planted_run
    shards = LocalShards([ShardWorker(g) for g in file_groups(FeatureStore.open(store).files, cfg.num_actors)])
    run = kmeans_on_shards(shards, cfg, len(x))
    table = load_assignments(res.out_dir)
    assert np.array_equal(run.centroids, res.centroids) and run.objective == res.objective
    assert np.array_equal(run.ids, table.column("id").to_numpy())
    assert np.array_equal(run.labels, table.column("cluster").to_numpy())


@pytest.mark.ray
def test_random_init_starts_both_sides_from_the_same_centroids(planted_run):
    x, _, store, _, res, _ = planted_run
    cfg = KMeansConfig(k=K, niter=2, seed=1, num_actors=2, init="random")
    dist = kmeans_distributed(store, cfg)
    ref = kmeans_single(x, cfg)
    assert dist.out_dir.name == "k8-seed1-random" and dist.out_dir != res.out_dir
    assert dist.objective[0] == pytest.approx(ref.objective[0], rel=1e-5)  # same start -> same first assignment
    assert set(dist.phase_seconds) >= {"load", "init", "iterations", "iteration_compute", "final_assign", "write"}


@pytest.mark.ray
def test_distributed_recovers_planted_clusters(planted_run):
    x, truth, store, _, res, _ = planted_run
    table = load_assignments(res.out_dir)
    assert np.isfinite(res.centroids).all() and res.sizes.min() > 0
    assert adjusted_rand(table.column("cluster").to_numpy(), truth) > 0.99


@pytest.mark.ray
def test_same_seed_gives_identical_centroids(planted_run):
    *_, res, again = planted_run
    assert np.array_equal(res.centroids, again.centroids)
    assert res.objective == again.objective


@pytest.mark.ray
def test_assignments_cover_every_id_once(planted_run):
    x, _, _, cfg, res, _ = planted_run
    table = load_assignments(res.out_dir)
    assert table.column("id").to_numpy().tolist() == list(range(len(x)))
    assert table.schema.field("cluster").type == "int32" and table.schema.field("sq_dist").type == "float"
    meta = json.loads((res.out_dir / "kmeans.json").read_text())
    assert meta["sizes"] == np.bincount(table.column("cluster").to_numpy(), minlength=cfg.k).tolist()
    assert res.out_dir == FeatureStore.open(res.out_dir.parents[1]).path / "kmeans" / "k8-seed1"


@pytest.mark.ray
def test_rerun_reuses_existing_result(planted_run):
    _, _, store, cfg, res, _ = planted_run
    stamp = (res.out_dir / "kmeans.json").stat().st_mtime_ns
    again = kmeans_distributed(store, cfg)
    assert (res.out_dir / "kmeans.json").stat().st_mtime_ns == stamp
    assert np.array_equal(again.centroids, res.centroids) and again.objective == res.objective


def test_k_larger_than_store_is_a_user_error(tmp_path):
    write_store(tmp_path, planted(100)[0], files=1)
    with pytest.raises(UserError, match="k=101"):
        kmeans_distributed(tmp_path, KMeansConfig(k=101))


@pytest.mark.ray
def test_more_actors_than_cpus_is_a_user_error(planted_run):
    store = planted_run[2]
    with pytest.raises(UserError, match="lower num_actors"):
        kmeans_distributed(store, KMeansConfig(k=K, seed=7, num_actors=3, num_cpus_per_actor=1))
