"""Training: loop, frozen-feature cache, checkpoints, experiments and stages."""
