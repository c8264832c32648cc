"""Core of the framework: registry, contracts, math, config, logging, checkpointing, envs.

`rlcore` never imports `components` or `runners`.
"""
