"""proxy.logsetup: logfmt and JSON lines with the DESIGN §6 keys; private keys never logged."""
from __future__ import annotations

import io
import json
import logging
import os
import re

import pytest
from cryptography.hazmat.primitives import serialization

from pki import TestCA
from policy.decide import decide
from policy.evidence import DnsStatus, Evidence
from policy.pkix import TrustStore
from policy.policyfile import Policy
from policy.tlsa import record_for
from proxy.logsetup import configure_logging, log_decision, logfmt_value, redact_secrets
from proxy.reload import load_state   # the loader that runs at start-up and on reload


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader (the inverse of what we write), to check the escaping."""
    out, i = {}, 0
    pat = re.compile(r'([A-Za-z0-9_.-]+)=(?:"((?:[^"\\]|\\.)*)"|([^\s"=\\]+))(?: |$)')
    while i < len(line):
        m = pat.match(line, i)
        assert m, f"bad logfmt at {line[i:]!r}"
        raw = m.group(2)
        if raw is not None:
            raw = re.sub(r'\\(u[0-9a-f]{4}|.)', lambda e: {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}.get(
                e.group(1), chr(int(e.group(1)[1:], 16)) if e.group(1).startswith("u") else None), raw)
        out[m.group(1)] = raw if raw is not None else m.group(3)
        i = m.end()
    return out


@pytest.fixture(scope="module")
def verdicts():
    ca = TestCA()
    leaf = ca.issue(dns=["example.net"])
    trust = TrustStore((ca.root.cert,), "test")
    rec = record_for(leaf.cert)
    ok = decide(leaf.chain, Evidence("example.net", tlsa=(rec,), tlsa_status=DnsStatus.SECURE),
                Policy(source="test"), trust=trust)
    bad = decide(leaf.chain, Evidence("example.net", tlsa=(record_for(ca.issue(dns=["x.example"]).cert),),
                                      tlsa_status=DnsStatus.SECURE), Policy(source="test"), trust=trust)
    assert ok.accepted and not bad.accepted
    return ok, bad


def test_logfmt_values_round_trip():
    for value in ["plain", "with space", 'quote"d', "back\\slash", "new\nline", "a=b", "", "tab\there",
                  "bell\x07", "ünïcode", "3 1 1 abcd"]:
        line = f"k={logfmt_value(value)}"
        assert "\n" not in line
        assert parse_logfmt(line) == {"k": value}, line
    assert logfmt_value("dane-ee") == "dane-ee"
    assert logfmt_value(None) == "-"


def test_decision_line_text(restore_logging, verdicts):
    ok, bad = verdicts
    out = io.StringIO()
    configure_logging("info", "text", stream=out, timestamps=False)
    log_decision("inbound", ("127.0.0.1", 40000), "example.net", ok.log_fields())
    log_decision("outbound", ("::1", 5269, 0, 0), "example.net", bad.log_fields(), policy="default.toml")
    first, second = out.getvalue().splitlines()
    assert first == (f'level=info logger=xmpp_dane_proxy.decision event=decision direction=inbound '
                     f'peer=127.0.0.1:40000 domain=example.net verdict=accept prooftype=dane-ee '
                     f'record="{ok.matched}" reason={logfmt_value(ok.reason)}')
    fields = parse_logfmt(second)
    assert fields["peer"] == "[::1]:5269"
    assert fields["verdict"] == "reject" and fields["prooftype"] == "-" and fields["record"] == "-"
    assert fields["reason"] == bad.reason and fields["policy"] == "default.toml"
    assert list(fields)[:4] == ["level", "logger", "event", "direction"]


def test_decision_line_json_has_same_keys(restore_logging, verdicts):
    ok, _ = verdicts
    text, js = io.StringIO(), io.StringIO()
    configure_logging("info", "text", stream=text)
    log_decision("inbound", "127.0.0.1:1", "example.net", ok.log_fields())
    configure_logging("info", "json", stream=js)            # replaces the handler (as on reload)
    log_decision("inbound", "127.0.0.1:1", "example.net", ok.log_fields())
    assert len(text.getvalue().splitlines()) == 1           # the text handler is gone
    obj = json.loads(js.getvalue())
    fields = parse_logfmt(text.getvalue().strip())
    assert list(obj) == list(fields)
    assert {k: v for k, v in obj.items() if k != "ts"} == {k: v for k, v in fields.items() if k != "ts"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"])


def test_level_and_exceptions_stay_on_one_line(restore_logging):
    for fmt in ("text", "json"):
        out = io.StringIO()
        configure_logging("warning", fmt, stream=out, timestamps=False)
        log = logging.getLogger("xmpp_dane_proxy.test")
        log.info("not shown")
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            log.exception("handler failed for %s", "example.net")
        lines = out.getvalue().splitlines()
        assert len(lines) == 1, lines
        rec = json.loads(lines[0]) if fmt == "json" else parse_logfmt(lines[0])
        assert rec["level"] == "error" and rec["msg"] == "handler failed for example.net"
        assert rec["exc"].startswith("Traceback") and "RuntimeError: boom\nsecond line" in rec["exc"]


def test_journal_stream_drops_timestamps(restore_logging, tmp_path, monkeypatch):
    with open(tmp_path / "journal", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("info", "text", stream=f)
        logging.getLogger("xmpp_dane_proxy.test").info("hello")
    assert (tmp_path / "journal").read_text() == "level=info logger=xmpp_dane_proxy.test msg=hello\n"


# --- private keys ----------------------------------------------------------------------------

def _key_body_lines(pem: bytes) -> list[str]:
    return [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_private_key_text_in_exceptions_is_redacted(restore_logging, fmt):
    issued = TestCA().issue(dns=["example.org"], key_type="rsa")
    pem = issued.key_pem()
    legacy = issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())
    out = io.StringIO()
    configure_logging("debug", fmt, stream=out, timestamps=False)
    log = logging.getLogger("xmpp_dane_proxy.test")
    # The shapes in which key material could travel: an exception quoting the bytes (repr,
    # with "\n" escapes), a message with the text, a truncated file, a field value.
    try:
        raise ValueError(f"could not load key from {pem!r}")
    except ValueError:
        log.exception("loading domain example.org failed")
    log.error("key file content: %s", legacy.decode())
    log.error("truncated: %s", pem.decode()[:400])
    log.warning("field", extra={"fields": {"event": "x", "detail": pem.decode()}})
    text = out.getvalue()
    assert len(text.splitlines()) == 4
    for body_line in _key_body_lines(pem) + _key_body_lines(legacy):
        assert body_line[:40] not in text
    assert "BEGIN PRIVATE KEY" not in text and "BEGIN RSA PRIVATE KEY" not in text
    assert text.count("private key redacted]") == 4


def test_real_key_loading_error_carries_no_key_material(restore_logging, tmp_path):
    # A corrupted key file, loaded the way the proxy loads keys: whatever cryptography raises
    # and whatever our loader reports, logged with its traceback, must not show the key.
    issued = TestCA().issue(dns=["example.org"])
    cert, key = issued.write(tmp_path, "example.org")
    body = key.read_bytes().replace(b"\n", b"\n!", 2)       # damage the base64
    key.write_bytes(body)
    (tmp_path / "config.toml").write_text(
        '[[domain]]\nname = "example.org"\ncert = "example.org.pem"\nkey = "example.org.key"\n'
        '[policy]\ndir = ""\nca_file = "example.org.pem"\n')
    out = io.StringIO()
    configure_logging("debug", "text", stream=out, timestamps=False)
    with pytest.raises(Exception) as info:
        load_state(tmp_path / "config.toml")
    logging.getLogger("xmpp_dane_proxy.test").error("start-up failed", exc_info=info.value)
    text = out.getvalue() + str(info.value)
    assert "example.org.key" in text
    for body_line in _key_body_lines(issued.key_pem()):
        assert body_line[:20] not in text


def test_redact_leaves_certificates_alone():
    cert_pem = TestCA().cert.public_bytes(serialization.Encoding.PEM).decode()
    assert redact_secrets(cert_pem) == cert_pem
