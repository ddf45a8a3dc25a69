"""Training: data order and batches, LR schedule, checkpoints, the loop, worker launch."""
