"""Backbones, heads and the clustering model (imports torch)."""
