"""OpenSSL's own DANE code as an independent oracle (`openssl s_client -dane_tlsa_rrdata`).

An `openssl s_server` presents a chain on loopback; `s_client` connects with the TLSA records
and `-verify_return_error`, and its verdict is whether the handshake verified.  Only cases
OpenSSL can judge are asked: DNS-ID names, well-formed DANE-EE/DANE-TA records.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenSSLServer:
    """`openssl s_server` presenting `chain` (leaf first) with `key`, until closed."""

    def __init__(self, workdir: Path, name: str, chain, key) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        leaf, rest = workdir / f"{name}-leaf.pem", workdir / f"{name}-rest.pem"
        keyfile = workdir / f"{name}.key"
        leaf.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
        rest.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:]))
        keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        self.port = free_port()
        cmd = ["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", "-cert", str(leaf),
               "-key", str(keyfile), "-www", "-quiet"]
        if len(chain) > 1:
            cmd += ["-cert_chain", str(rest)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # ready when it accepts a TCP connection
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("openssl s_server did not start")
                time.sleep(0.02)

    def dane_verifies(self, domain: str, records: list[str], *, at: int | None = None) -> bool:
        """True if OpenSSL's DANE verification accepts this server for `domain` and `records`."""
        # -dane_ee_no_namechecks: RFC 7671 §5.1 — a DANE-EE(3) match binds the key to the
        # service without a name check; Postfix sets the same flag.  s_client does not by default.
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}", "-brief",
               "-verify_return_error", "-dane_ee_no_namechecks", "-dane_tlsa_domain", domain]
        for r in records:
            cmd += ["-dane_tlsa_rrdata", r]
        if at is not None:
            cmd += ["-attime", str(at)]
        out = subprocess.run(cmd, input=b"", capture_output=True, timeout=20)
        text = (out.stdout + out.stderr).decode(errors="replace")
        if "Failed to import any TLSA records" in text:
            raise AssertionError(f"OpenSSL could not use the records: {text}")
        return out.returncode == 0 and "Verification: OK" in text

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
