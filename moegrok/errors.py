"""Every error moegrok raises on purpose, in one place.

`UserError` and its subclasses are mistakes a user can fix (a bad config value, a missing or
empty input file, a cluster that does not answer): jobs print the message as one line and exit
with status 2, before any work. The model errors below them are about one checkpoint's model or
outputs: they fail that unit (a row of failures.parquet) and the sweep goes on.

Imports: the standard library only.
"""

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake in the sweep's inputs; the message names the config key, file (and line) or
    address, and says what was expected."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the key."""


class SampleError(UserError):
    """A malformed sample source; the message names the file (and line)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names it."""


class BenchmarkError(UserError):
    """A malformed benchmark; the message names the file (and line)."""


class InstructionError(UserError):
    """A malformed instruction file; the message names file:line."""


class SandboxError(UserError):
    """Code would run without isolation: this machine has no working bubblewrap and
    eval.sandbox=unisolated was not asked for; the message says how to install it."""


# Errors of a model or its outputs (a failure row of the unit, not a start-up error)


class UnsupportedModelError(ValueError):
    """A model moegrok cannot record; the message names its class and what to do."""


class RoutingError(ValueError):
    """A hooked call that does not read as top-k routing; the message names the model class and layer."""


def exit_status(job: Callable[[], int]) -> int:
    """Run a job's body, which returns its exit status: a UserError prints one line (no
    traceback) and gives status 2."""
    try:
        return job()
    except UserError as e:
        print(f"moegrok: {e}", file=sys.stderr)
        return 2
