"""The sweeps layer: papermill runs of the training notebook in parallel, Optuna searches, executors
(local slots, Dask clusters), the marathon. Imports every layer below it."""
