"""Nearest-centroid search for a shard's rows: FAISS on the CPU, FAISS on a GPU, or a torch matmul on CUDA.

Each backend says what it can do: ``bounded_search`` is true where it offers ``search2`` (the two
nearest centroids) and a full search costs enough that skipping rows by Hamerly's bounds pays.
"""

from __future__ import annotations

import functools
import logging
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

TORCH_CHUNK_BYTES = 256 << 20  # GPU memory for one chunk of the (rows x k) distance matrix


class AssignBackend(Protocol):
    """Exact nearest centroid of every row: ``search(put(x), centroids) -> labels int64[n], sq_dists float32[n]``."""

    name: str
    bounded_search: bool  # offers ``search2`` and is worth skipping rows for (see the module docstring)

    def put(self, x: np.ndarray): ...

    def search(self, x, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class FaissCpuBackend:
    """Exact nearest centroid with FAISS brute force on the CPU (BLAS, OpenMP threads)."""

    name = "faiss-cpu"
    bounded_search = True

    def put(self, x: np.ndarray):
        return x

    def search(self, x, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        sq, labels = faiss.knn(x, centroids, 1)
        return labels.ravel(), np.maximum(sq.ravel(), 0)

    def search2(self, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two nearest centroids of each row: ``labels int64[n, 2], sq_dists float32[n, 2]`` (k >= 2)."""
        import faiss

        sq, labels = faiss.knn(x, centroids, 2)
        return labels, np.maximum(sq, 0)


class FaissGpuBackend(FaissCpuBackend):
    """FAISS brute force on GPU 0 (needs a faiss-gpu build with kernels for this GPU)."""

    name = "faiss-gpu"
    bounded_search = False  # a full search is cheap on the GPU (the inherited search2 would run on the CPU)

    def __init__(self):
        import faiss

        self.res = faiss.StandardGpuResources()

    def search(self, x, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        sq, labels = faiss.knn_gpu(self.res, x, centroids, 1)
        return labels.ravel().astype(np.int64), np.maximum(sq.ravel(), 0)


class TorchBackend:
    """Chunked ``|x|^2 - 2 x.c + |c|^2`` matmul + argmin with torch (fp32, no TF32); ``torch-cuda`` on a GPU."""

    bounded_search = False  # no two-nearest search

    def __init__(self, device: str = "cuda", chunk_bytes: int = TORCH_CHUNK_BYTES):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"
        self.chunk_bytes = chunk_bytes

    def put(self, x: np.ndarray):
        """Keep the shard on the device when it fits; otherwise chunks are copied each search."""
        try:
            return self.torch.from_numpy(x).to(self.device)
        except self.torch.OutOfMemoryError:
            return x

    def search(self, x, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)
        c_sq = (c * c).sum(1)
        rows = max(1, self.chunk_bytes // (4 * len(c)))
        labels, sq = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for s in range(0, len(x), rows):
                xb = torch.as_tensor(x[s : s + rows], device=self.device)
                dist = (xb * xb).sum(1, keepdim=True) - 2 * (xb @ c.T) + c_sq
                best, idx = dist.min(1)
                labels[s : s + rows] = idx.cpu().numpy()
                sq[s : s + rows] = best.clamp_min_(0).cpu().numpy()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return labels, sq


def _search_works(backend: AssignBackend) -> bool:
    """Probe a backend on a tiny problem whose answer is known."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    x = c[::-1] + np.float32(1e-3)
    try:
        labels, _ = backend.search(backend.put(np.ascontiguousarray(x)), c)
    except Exception as e:  # e.g. CUDA "no kernel image is available for execution on the device"
        log.warning("k-means backend %s failed its probe: %s", backend.name, str(e).splitlines()[0] if str(e) else e)
        return False
    return np.array_equal(labels, np.arange(16)[::-1])


@functools.cache
def probe_backend(use_gpu: bool) -> AssignBackend:
    """The assignment backend for this process: FAISS GPU, else torch CUDA, else FAISS CPU (logged)."""
    backend: AssignBackend = FaissCpuBackend()
    if use_gpu:
        import faiss

        candidates = []
        if faiss.get_num_gpus() > 0:
            candidates.append(FaissGpuBackend)
        try:
            import torch

            if torch.cuda.is_available():
                candidates.append(TorchBackend)
        except ImportError:
            pass
        for make in candidates:
            try:
                cand = make()
            except Exception as e:
                log.warning("k-means backend %s unavailable: %s", make.__name__, e)
                continue
            if _search_works(cand):
                backend = cand
                break
    log.info("k-means assignment backend: %s", backend.name)
    return backend


def assign(x, centroids: np.ndarray, backend: AssignBackend | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid per row: ``labels int64[n], sq_dists float32[n]`` (squared L2).

    ``x`` is a float32 matrix, or what ``backend.put`` returned for it (a GPU tensor for torch).
    """
    backend = backend or FaissCpuBackend()
    return backend.search(x, np.ascontiguousarray(centroids, dtype=np.float32))
