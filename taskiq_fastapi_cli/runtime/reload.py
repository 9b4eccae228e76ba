"""`--reload` that reacts to source changes only, as uvicorn's does.

Upstream behaviour replaced here: taskiq's file watcher restarts the workers
on any change under the watched directories that .gitignore does not list.
An SQLite database or a log file that the app writes in the project directory
restarted the worker over and over (rerunning the lifespan each time), and a
log file written by the supervisor itself made it restart forever: each
"Scheduled workers reload." line was a change, tens of thousands of actions
filled the manager's queue, and the command then hung at exit. Its .gitignore
lookup also never ends for a directory outside the working directory.

So the manager gets this watcher instead: uvicorn's patterns (`*.py` by
default, `--reload-include` / `--reload-exclude`), taskiq's .gitignore rule
kept, and changes coalesced into one reload until the manager has taken it.
uvicorn's own filter cannot be reused: its module needs watchfiles, which
uvicorn only installs with its `standard` extra.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gitignore_parser import parse_gitignore
from taskiq.cli.worker.process_manager import ReloadAllAction
from watchdog.events import FileSystemEvent, FileSystemEventHandler

logger = logging.getLogger("taskiq_fastapi")

DEFAULT_INCLUDES = ("*.py",)
# uvicorn's: hidden files, compiled Python, editor swap and backup files.
DEFAULT_EXCLUDES = (".*", ".py[cod]", ".sw.*", "~*")
IGNORED_EVENTS = frozenset({"opened", "closed", "closed_no_write"})


class ReloadFilter:
    """Whether a changed file should restart the workers (uvicorn's rules).

    Patterns match the end of the path (`pathlib.PurePath.match`); an
    exclude that names an existing directory excludes everything under it.
    A default is dropped when the user names it on the other side.
    """

    def __init__(self, includes: Sequence[str], excludes: Sequence[str]) -> None:
        self.includes = [p for p in DEFAULT_INCLUDES if p not in excludes]
        self.includes += [p for p in includes if p not in self.includes]
        self.excludes = [p for p in DEFAULT_EXCLUDES if p not in includes]
        self.exclude_dirs: list[Path] = []
        for pattern in excludes:
            if Path(pattern).is_dir():
                self.exclude_dirs.append(Path(pattern).resolve())
            elif pattern not in self.excludes:
                self.excludes.append(pattern)

    def __call__(self, path: Path) -> bool:
        if not any(path.match(pattern) for pattern in self.includes):
            return False
        if any(directory in path.parents for directory in self.exclude_dirs):
            return False
        return not any(path.match(pattern) for pattern in self.excludes)


def _gitignore(directory: Path) -> Callable[[str], bool] | None:
    """The nearest .gitignore at or above `directory`, as taskiq looks it up."""
    for folder in (directory, *directory.parents):
        candidate = folder / ".gitignore"
        if candidate.is_file():
            return parse_gitignore(candidate)  # type: ignore[no-any-return]
    return None


class PendingReload(ReloadAllAction):
    """taskiq's reload-all action that tells the watcher when it is taken."""

    def __init__(self, taken: threading.Event) -> None:
        self.taken = taken

    def handle(self, workers_num: int, action_queue: Any) -> None:
        self.taken.set()
        super().handle(workers_num=workers_num, action_queue=action_queue)


class ChangeWatcher(FileSystemEventHandler):
    """Puts one reload on the manager's queue per burst of source changes."""

    def __init__(
        self,
        directory: Path,
        accept: ReloadFilter,
        put: Callable[[Any], None],
        use_gitignore: bool,
        taken: threading.Event,
    ) -> None:
        self.accept = accept
        self.put = put
        self.ignored = _gitignore(directory.resolve()) if use_gitignore else None
        # Set while no reload is waiting for the manager: shared by all
        # watched directories, so one burst of changes is one reload.
        self.taken = taken

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in IGNORED_EVENTS:
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        changed = [Path(os.fsdecode(p)).resolve() for p in paths if p]
        relevant = [path for path in changed if self._relevant(path)]
        if not relevant or not self.taken.is_set():
            return
        self.taken.clear()
        logger.info("Change in '%s': restarting the workers.", relevant[0])
        self.put(PendingReload(self.taken))

    def _relevant(self, path: Path) -> bool:
        if ".git" in path.parts or not self.accept(path):
            return False
        if self.ignored is None:
            return True
        try:
            return not self.ignored(str(path))
        except ValueError:  # outside the .gitignore's directory
            return True


def watch(
    observer: Any,
    directories: Sequence[str],
    accept: ReloadFilter,
    put: Callable[[Any], None],
    use_gitignore: bool,
) -> None:
    """Schedule a ChangeWatcher on each directory (taskiq's default: '.')."""
    taken = threading.Event()
    taken.set()
    for directory in directories or ["."]:
        handler = ChangeWatcher(Path(directory), accept, put, use_gitignore, taken)
        # Absolute: watchdog 7.1 watches no subdirectory of a relative root
        # ("Path b'./pkg' is not under watched root b'.'").
        observer.schedule(handler, path=str(Path(directory).resolve()), recursive=True)
