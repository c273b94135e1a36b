"""Training glue: tiny Llama configs for pretraining, schedules and checkpoints."""
