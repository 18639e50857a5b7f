"""The Ray programs of a sweep. This package is the only place that imports ray."""

from moegrok.pipeline.run import run_monitor

__all__ = ["run_monitor"]
