"""`taskiq-fastapi worker`: taskiq's worker with a FastAPI app's lifespan and Request.

Importing this package stays cheap (no taskiq, FastAPI or user code) so that
`--help` and `--version` answer at once.
"""

from taskiq_fastapi_cli.commands.cli import app, main

__all__ = ["app", "main"]
