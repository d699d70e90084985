"""Cluster-side helpers (run on cluster nodes, not by the jobs)."""
