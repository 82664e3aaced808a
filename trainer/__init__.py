"""Distributed training: sharding, DMP, the train pipeline, evaluation, checkpoints, logs."""
