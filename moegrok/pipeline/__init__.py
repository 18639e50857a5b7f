"""The Ray programs of a sweep. This package is the only place that imports ray."""

__all__ = ["run_monitor"]


def __getattr__(name: str):
    # lazy, so Ray workers that only need one stage's functions do not import the whole sweep
    if name == "run_monitor":
        from moegrok.pipeline.run import run_monitor

        return run_monitor
    raise AttributeError(name)
