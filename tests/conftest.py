"""Shared pytest setup: the test PKI and helpers for running the CLI in-process."""
from __future__ import annotations

import pytest

from proxy.cli import main

# The signed-zone DNS environment (nsd + unbound on loopback): session fixture `dns_env`.
pytest_plugins = ["dnsenv"]


@pytest.fixture
def cli(capsys):
    """Run `xmpp-dane-proxy ARGS…` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
