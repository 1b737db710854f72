"""Data loading, manifests and preprocessing."""
