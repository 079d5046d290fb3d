"""The two ways a launch fails before it serves, each reported by the CLI as one line
(launch/report.py): a flag whose value cannot work, and a start-up that failed; and the parser
whose own mistakes (a flag argparse cannot read) are one line too."""

import argparse


class UsageError(Exception):
    """A flag's value cannot work: the message names the flag and what to do. Exit code 2."""

    exit_code = 2


class StartupError(Exception):
    """The flags are fine but start-up failed (the hub is unreachable, a worker died). Exit code 1."""

    exit_code = 1


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes (an unknown flag, a value its type refuses) are one line on
    stderr naming the flag, with where the usage is, and exit code 2, like every other start-up
    mistake (argparse's own print the whole usage first). Its subcommands' parsers are one too
    (add_subparsers makes them of the parser's own class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
