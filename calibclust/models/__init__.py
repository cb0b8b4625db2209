"""Backbones, heads, the clustering model and MoCo-v2's modules (imports torch)."""
