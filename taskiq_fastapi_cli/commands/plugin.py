"""`taskiq fastapi ...`: the same CLI, found by taskiq through its entry points."""

from __future__ import annotations

from collections.abc import Sequence

from taskiq.abc.cmd import TaskiqCMD

from taskiq_fastapi_cli.commands.cli import main


class FastAPICMD(TaskiqCMD):
    """Registered in the `taskiq_cli` entry-point group as `fastapi`."""

    short_help = "Run workers with a FastAPI app's lifespan and dependencies"

    def exec(self, args: Sequence[str]) -> int | None:
        """Run the CLI with what follows `taskiq fastapi`."""
        return main(args, prog_name="taskiq fastapi")
