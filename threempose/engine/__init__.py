"""Run directories, checkpoints and resume, metrics, DeepSpeed glue."""
