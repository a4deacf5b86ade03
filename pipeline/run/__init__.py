"""Orchestrating a run: the stage graph and each stage's identity, where a stage starts, launching stage
processes, the preflight checks, and the run directory's files (atomic writes, checkpoints, manifests)."""
