"""What of Ray's own output reaches a user's console: the one home of the notices we keep off it.

Each notice here is one Ray prints on every healthy run of ours, says nothing the user can act on,
and is dropped only where we know why it is harmless (``-v``/``--verbose`` keeps them all; Ray's
log files keep everything either way):

- Ray Data's per-dataset execution logs and its "Progress bars disabled." notice: every stage of
  ours prints its own progress line (:func:`quiet_ray_data`).
- "Token authentication is enabled for this Ray cluster.": the default of a new local cluster,
  which is what we want (:func:`drop_default_auth_notice`).
- The raylet's "N PYTHON worker processes have been started on node ..., which is 4x the maximum
  expected startup concurrency (2)", on an embedded local Ray only (:func:`drop_worker_pool_notice`).
  Ray's bar is four workers per CPU, and a sweep on a 2-CPU machine holds about that many by
  design: the Tune trial, Train's controller and workers, Ray Data's coordinator, stats and
  location actors (zero-CPU actors, each a process) and the decode tasks. On a cluster's larger
  nodes the bar is higher and the notice can mean a real leak, so it stays.
- core_worker's "Actor with class name: 'MapWorker(...)' ... has constructor arguments in the
  object store and max_restarts > 0" (:data:`NATIVE_RULES`, through :mod:`dp4tl_ray.stderr_filter`).
  Ray Data 2.60 passes every actor pool's UDF and context to its actors as object-store references
  and restarts actors by default (``max_restarts=-1``), which the extraction keeps so that a lost
  spot node's actor is replaced. The references belong to the driver's executor and live as long as
  the dataset runs, so the restart this warns about (ray-project/ray#53727) cannot fail for them.
  The C++ core writes it once per process straight to file descriptor 2; only this pool's line
  (class name ``MapWorker(``) is dropped: the same warning for any other actor still shows.

Ray Data's stale "no available CPUs" warning is filtered where its cause is documented,
:mod:`dp4tl_ray.data.cpu_view`.
"""

from __future__ import annotations

import logging

BARS_OFF_NOTICE = "Progress bars disabled."
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_DEFAULT_NOTICE = "Token authentication is enabled for this Ray cluster."
WORKER_POOL_NOTICE = "worker processes have been started on node"
# core_worker.cc's once-per-process warning for Ray Data's actor pools (see the module docstring)
NATIVE_RULES: tuple[tuple[bytes, ...], ...] = (
    (b"core_worker.cc", b"class name: 'MapWorker(", b"has constructor arguments in the object store"),
)


def quiet_ray_data(verbose: bool) -> None:
    """Unless ``verbose``, Ray Data's per-dataset execution logs and progress bars go to its log file only
    (every stage prints its own progress lines); its warnings still reach the console."""
    if verbose:
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:  # Ray Data's console handler; its file handlers keep all
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and handler.level < logging.WARNING:  # not yet quietened (a second command in this process)
            handler.setLevel(logging.WARNING)
            # Ray Data warns that the bars are off, which is what we asked for: not news on the console.
            handler.addFilter(lambda record: not record.getMessage().startswith(BARS_OFF_NOTICE))


def _not_default_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(AUTH_DEFAULT_NOTICE)


def drop_default_auth_notice() -> None:
    """Keep Ray's notice that a new local cluster uses its default, token auth, off the console."""
    logger = logging.getLogger(AUTH_NOTICE_LOGGER)
    if _not_default_auth_notice not in logger.filters:
        logger.addFilter(_not_default_auth_notice)


def drop_worker_pool_notice() -> None:
    """Keep the raylet's worker-pool-size notice off this driver's console (an embedded local Ray's).

    The raylet publishes it as a job error; the driver's error thread prints each through
    ``ray._private.worker.print_to_stdstream`` (looked up at each call), which this wraps once."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "drops_worker_pool_notice", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        lines = data.get("lines", [])
        if data.get("pid") == "raylet":
            lines = [line for line in lines if WORKER_POOL_NOTICE not in line]
        if lines:
            original({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    print_to_stdstream.drops_worker_pool_notice = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def filter_native_notices() -> bool:
    """For an entry point (it owns the console): keep :data:`NATIVE_RULES`' lines off descriptor 2."""
    from dp4tl_ray import stderr_filter

    return stderr_filter.install(NATIVE_RULES)


__all__ = ["AUTH_DEFAULT_NOTICE", "AUTH_NOTICE_LOGGER", "BARS_OFF_NOTICE", "NATIVE_RULES", "WORKER_POOL_NOTICE",
           "drop_default_auth_notice", "drop_worker_pool_notice", "filter_native_notices", "quiet_ray_data"]
