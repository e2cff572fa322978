"""The keep-set explorer: one offline HTML page and a PNG summary of why a keep-set kept what it kept."""

from dp4tl_ray.explain.evidence import uses_ray
from dp4tl_ray.explain.explorer import explain_keepset

__all__ = ["explain_keepset", "uses_ray"]
