"""Example workloads that run from an installed teemesh (``python -m teemesh.examples.X``)."""
