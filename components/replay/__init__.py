"""Replay storage: whole-episode buffers with episode-aware slice sampling."""
