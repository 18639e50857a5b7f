"""The sweep on Ray: `run_sweep` (sweep.py) checks every input first (preflight.py: nothing is
written before), then runs the stages in order into one run directory. Each stage (record.py,
reduce.py with reduce_analyses.py, tune.py, evaluate.py, analyze.py, report.py) says what its units
are, and the one executor (executor.py) runs them on actors or tasks, skipping what is done;
cluster.py starts or joins Ray, reaper.py kills what a killed driver leaves behind, watch.py
follows a checkpoint directory being written.

The only package that imports ray. Imports: every package below it (data, routing, metrics,
analysis, report, evaluation) and the top-level modules; never study or toy.
"""

__all__ = ["run_sweep", "run_watch"]


def __getattr__(name: str):
    # lazy, so Ray workers that only need one stage's functions do not import the whole sweep
    if name == "run_sweep":
        from moegrok.pipeline.sweep import run_sweep

        return run_sweep
    if name == "run_watch":
        from moegrok.pipeline.watch import run_watch

        return run_watch
    raise AttributeError(name)
