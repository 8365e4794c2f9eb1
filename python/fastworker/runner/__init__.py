"""The Python runner, one file per role; `fastworker.worker.Worker` is built from them
(see that module's docstring for the map)."""
