"""Data selection: downstream votes over source units, and the KeepSet of source rows they keep."""
