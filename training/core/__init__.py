"""The bottom layer: a run's configuration, the environment it runs in, its data, models and
evaluation, the run store. Nothing here imports from the layers above."""
