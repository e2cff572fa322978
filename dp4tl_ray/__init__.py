"""dp4tl-ray: prune a source dataset for transfer learning (DP4TL label/feature mapping) on Ray."""

__version__ = "0.1.0"
