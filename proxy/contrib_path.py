"""Where the backends' integration modules (contrib/: Prosody, ejabberd) are on this machine.

They ship inside the package (pyproject.toml maps contrib/ to proxy/contrib), so a server's
`plugin_paths` can point at an installed proxy instead of a source tree.  In a source tree or
an editable install the package is the source directory and contrib/ sits beside it.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def contrib_dir() -> Path | None:
    """The contrib directory of this installation, or None if it is missing (a broken install)."""
    for candidate in (_PACKAGE / "contrib", _PACKAGE.parent / "contrib"):
        if candidate.is_dir():
            return candidate
    return None


def backends() -> list[str]:
    """The backends with a directory of their own (e.g. ["ejabberd", "prosody"])."""
    root = contrib_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))) if root else []
