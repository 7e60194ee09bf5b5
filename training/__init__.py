"""The training pipeline: models, data, engine, runs, evaluation, inference, and the CLI."""
