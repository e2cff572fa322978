"""Sizing of inference actor pools (no Ray needed)."""

from __future__ import annotations

from dp4tl_ray.pool import cpu_pool


def test_cpu_pool_runs_a_thread_per_core_and_leaves_a_cpu_for_decode():
    for cpus in (1, 2, 3, 16):
        pool = cpu_pool(cpus)
        assert pool.size == cpus and pool.threads == 1 and pool.gpus == 0 and not pool.decodes
        assert pool.size * pool.cpus_per_actor <= cpus - 1 and pool.cpus_per_actor >= (cpus - 1) / cpus - 1e-4
    one = cpu_pool(8, num_actors=1)  # an explicit size still gets the CPUs beside the decode one as threads
    assert (one.size, one.threads, one.cpus_per_actor) == (1, 7, 7.0)


def test_a_pool_that_decodes_its_own_inputs_still_leaves_a_cpu_for_its_feeding_tasks_but_threads_every_core():
    for cpus in (1, 2, 3, 16):
        pool = cpu_pool(cpus, decodes=True)
        assert (pool.size, pool.threads, pool.decodes) == (cpus, 1, True) and pool.size * pool.cpus_per_actor <= cpus - 1
    one = cpu_pool(8, num_actors=1, decodes=True)
    assert (one.size, one.threads, one.cpus_per_actor) == (1, 8, 7.0)
    three = cpu_pool(8, num_actors=3, decodes=True)  # 7 reservable CPUs over 3 actors: 2.3333 each, 2 threads
    assert (three.threads, three.cpus_per_actor) == (2, 2.3333)
