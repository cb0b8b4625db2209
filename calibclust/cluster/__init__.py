"""Clustering primitives used by the training methods (K-means)."""
