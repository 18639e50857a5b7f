"""The Ray programs of a sweep. This package is the only place that imports ray."""

__all__ = ["run_monitor", "watch"]


def __getattr__(name: str):
    # lazy, so Ray workers that only need one stage's functions do not import the whole sweep
    if name in __all__:
        from moegrok.pipeline import run

        return getattr(run, name)
    raise AttributeError(name)
