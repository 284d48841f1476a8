"""Strict TOML loading that can say *where* a problem is: `file:line: message`.

tomllib reports positions for syntax errors only.  For a bad value or an unknown key we find
the line ourselves by scanning for the key inside its table; operators fix files by line
number at three in the morning, so an approximate line beats none.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
_KEY = re.compile(r"""^\s*("([^"]*)"|'([^']*)'|[A-Za-z0-9_.-]+)\s*=""")


class TomlFileError(Exception):
    """One or more `file:line: message` problems; `.messages` lists them all."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


@dataclass
class TomlDocument:
    """A parsed TOML file plus the raw lines, for locating keys in error messages."""

    path: str
    data: dict
    lines: list[str]

    @classmethod
    def read(cls, path: str | Path) -> "TomlDocument":
        path = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TomlFileError([f"{path}:0: file not found"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TomlFileError([f"{path}:0: cannot read: {exc}"]) from None
        return cls.parse(path, text)

    @classmethod
    def parse(cls, path: str, text: str) -> "TomlDocument":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = str(exc)
            m = _POSITION.search(msg)
            line = m.group(1) if m else "0"
            raise TomlFileError([f"{path}:{line}: TOML syntax error: {_POSITION.sub('', msg).strip()}"]) from None
        return cls(path, data, text.splitlines())

    def line_of(self, key: str | None, table: str = "", index: int = 0) -> int:
        """Line number (1-based) of `key` inside `[table]` (the index-th `[[table]]`), or of
        the table header when key is None; 0 when not found."""
        current, seen = "", -1
        header_line = 0
        for n, line in enumerate(self.lines, 1):
            h = _HEADER.match(line)
            if h:
                current = h.group(2).strip()
                if current == table:
                    seen += 1
                    if seen == index:
                        header_line = n
                continue
            if current != table or (table and seen != index):
                continue
            if key is None:
                continue
            k = _KEY.match(line)
            if k and (k.group(2) or k.group(3) or k.group(1)) == key:
                return n
        return header_line

    def where(self, key: str | None, table: str = "", index: int = 0) -> str:
        return f"{self.path}:{self.line_of(key, table, index)}"
