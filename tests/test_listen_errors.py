"""A listen address that cannot be bound is named in the error (issue 14): `xmpp-dane-proxy run`
exits 1 with `cannot listen on ADDRESS: Address already in use`, whichever listener it is."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from pki import self_signed
from proxyenv import REPO, write_config


def occupied(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("which", ["inbound", "outbound", "metrics", "inbound-v6"])
def test_bind_error_names_the_address(tmp_path, which):
    family, host = (socket.AF_INET6, "::1") if which == "inbound-v6" else (socket.AF_INET, "127.0.0.1")
    try:
        busy = occupied(family, host)
    except OSError:
        pytest.skip("no ::1 on this machine")
    with busy:
        port = busy.getsockname()[1]
        address = f"[::1]:{port}" if family == socket.AF_INET6 else f"127.0.0.1:{port}"
        cert, key = self_signed(["local.example"]).write(tmp_path, "local.example")
        config = write_config(
            tmp_path / "config.toml", backend="127.0.0.1:9",
            listen=[address] if which.startswith("inbound") else ["127.0.0.1:0"],
            outbound_listen=[address] if which == "outbound" else [],
            metrics_listen=address if which == "metrics" else "",
            domains=[("local.example", cert, key)])
        out = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(config)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"xmpp-dane-proxy run: cannot listen on {address}: Address already in use\n" in out.stderr, out.stderr
