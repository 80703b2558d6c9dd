"""The training layer: fit(), its callbacks and the run directory. Imports models, data and shared."""
