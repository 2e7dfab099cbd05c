"""Training utilities: batch plans, optimizer and schedule, loss, checkpoints, logging."""
