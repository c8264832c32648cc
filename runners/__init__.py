"""Pipelines and their `python -m runners.X` entry points."""
