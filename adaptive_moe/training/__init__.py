"""Training: the small MoE language model, its data, checkpoints, plot and the
``adaptive-moe train`` command."""
