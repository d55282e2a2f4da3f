"""Ways to restart or requeue a training job through the scheduler or launcher that owns it."""
