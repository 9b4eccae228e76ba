"""`python -m taskiq_fastapi_cli`, the same as the `taskiq-fastapi` command."""

import sys

from taskiq_fastapi_cli.commands.cli import main

# Guarded: the spawn start method imports this module again in every worker.
if __name__ == "__main__":
    sys.exit(main())
