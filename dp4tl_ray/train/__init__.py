"""Pretraining on a pruned source (Ray Train) and downstream evaluation of the result."""
