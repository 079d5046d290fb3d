"""The two ways a launch fails before it serves, each reported by the CLI as one line
(launch/report.py): a flag whose value cannot work, and a start-up that failed."""


class UsageError(Exception):
    """A flag's value cannot work: the message names the flag and what to do. Exit code 2."""

    exit_code = 2


class StartupError(Exception):
    """The flags are fine but start-up failed (the hub is unreachable, a worker died). Exit code 1."""

    exit_code = 1
