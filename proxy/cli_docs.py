"""The manual page and shell completion scripts, generated from the argparse parser itself, so
they can never disagree with the options (`xmpp-dane-proxy manpage`, `... completion SHELL`).

argparse-manpage writes the roff and shtab the completion scripts: both are small, pure-Python
and dependency-free, and do the job better than a generator of our own would.
"""
from __future__ import annotations

import argparse

from proxy import __version__

_DESCRIPTION = "DANE and PKIX enforcement for XMPP server-to-server traffic"
_FILES = (".TP\n.B /etc/xmpp-dane-proxy/config.toml\nthe configuration (DESIGN \\(sc4 keys, with defaults)\n"
          ".TP\n.B /etc/xmpp-dane-proxy/policy.d/\none policy file per peer domain (<domain>.toml, "
          "*.<parent>.toml, default.toml)")
_SEE_ALSO = (".BR unbound (8),\n.BR prosody (1),\n.BR systemd.socket (5).\n"
             "The README of the source tree explains deployment, policy files and every configuration key.")


def manpage(parser: argparse.ArgumentParser) -> str:
    """The roff source of xmpp-dane-proxy(1)."""
    from argparse_manpage.manpage import Manpage

    page = Manpage(parser)
    page.source = f"xmpp-dane-proxy {__version__}"
    page.manual = "xmpp-dane-proxy manual"
    page.description = _DESCRIPTION
    if not page.get_extra_section("files"):     # the parser object is fresh; be safe anyway
        page.add_section("files", "=", _FILES)
        page.add_section("see also", "=", _SEE_ALSO)
    return str(page)


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    """A completion script for `shell` (bash, zsh or tcsh)."""
    import shtab

    return shtab.complete(parser, shell=shell)
