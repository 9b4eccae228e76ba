"""Errors the CLI reports as one line on stderr, with uvicorn's exit codes."""

# uvicorn's conventions: 1 for an app that cannot be loaded, 3 for an app
# whose startup failed; Click's: 2 for a usage error.
EXIT_LOAD_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_STARTUP_FAILURE = 3
# Ours: stopped, but not cleanly (a second signal cancelled in-flight tasks,
# a lifespan did not shut down in time, a process had to be killed).
EXIT_STOPPED_UNCLEAN = 4


class CLIError(Exception):
    """A user-facing failure: `message` is printed as is, then exit `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_LOAD_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
