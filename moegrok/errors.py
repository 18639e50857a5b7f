"""The error a user can fix: a bad config value, a missing or empty input file, a cluster that
does not answer. Jobs print its message as one line and exit with status 2; everything else
keeps its traceback."""

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake in the sweep's inputs; the message names the config key, file (and line) or
    address, and says what was expected."""


def exit_status(job: Callable[[], int]) -> int:
    """Run a job's body, which returns its exit status: a UserError prints one line (no
    traceback) and gives status 2."""
    try:
        return job()
    except UserError as e:
        print(f"moegrok: {e}", file=sys.stderr)
        return 2
