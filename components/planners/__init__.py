"""Latent-space planners (kind `planners`)."""
