"""Clustering primitives used by the training methods: K-means (``kmeans``), choosing K without
labels (``choose_k``) and merging over-clustered heads into K (``merge``)."""
