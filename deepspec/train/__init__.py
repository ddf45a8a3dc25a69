"""Training: samples and their order (data), micro-batches (batch), LR schedule, the loop
(trainer), DDP/FSDP (parallelize), checkpoints (checkpoint: format; checkpointer: save and
resume), metrics log, held-out scoring, worker launch (docs/DESIGN.md §6)."""
