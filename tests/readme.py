"""The README's example projects, as a user copies them into files."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def section_files(heading: str) -> dict[str, str]:
    """The Python and TOML blocks of a README section, each named by the
    path in its first line's comment (`# shop/app.py`)."""
    text = README.read_text()
    section = text[text.index(heading) :]
    section = section[: section.index("\n## ", 1)]
    files = {}
    for block in re.findall(r"```(?:python|toml)\n(.*?)```", section, re.DOTALL):
        first = block.partition("\n")[0]
        assert first.startswith("# "), first
        files[first[2:]] = block
    return files


def write_project(root: Path, heading: str, package: str) -> Path:
    """The section's files under `root`, `package` made a package."""
    for name, source in section_files(heading).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    (root / package / "__init__.py").touch()
    return root
