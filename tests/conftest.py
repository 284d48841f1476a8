"""Shared pytest setup: the test PKI and helpers for running the CLI in-process."""
from __future__ import annotations

import pytest

from proxy.cli import main

# Real peers started by the tests: `dns_env` (nsd + unbound with signed zones, session-wide)
# `prosody_factory` and `ejabberd_factory` (Prosody and ejabberd servers as backend or peer).
pytest_plugins = ["dnsenv", "prosodyenv", "ejabberdenv"]


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


@pytest.fixture(scope="session", autouse=True)
def no_internal_errors_in_real_processes():
    """Across the whole session, no proxy run as a real process (tests/processlog.py) ended
    a stream as internal-error: that outcome is reserved for an exception that escaped."""
    yield
    import processlog

    found = processlog.internal_errors()
    assert not found, "streams ended as internal-error:\n" + "\n".join(found)
