"""proxy.reload: all-or-nothing loading, atomic swap, the old state kept on any error."""
from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest
import trio
from cryptography import x509

from pki import DAY, NOW, TestCA
from proxy.metrics import Metrics
from proxy.reload import (DomainMaterial, StateHolder, StateLoadError, load_state, reload_on_sighup)
from proxy.sdnotify import Notifier


@pytest.fixture(scope="module")
def ca():
    return TestCA()


def write_setup(d: Path, ca: TestCA, *, domains=("example.org",), extra: str = "") -> Path:
    """A config dir as an operator has it: config.toml, certs, policy.d/, a CA file."""
    (d / "policy.d").mkdir(exist_ok=True)
    ca.write_root(d / "ca.pem")
    text = '[policy]\ndir = "policy.d"\nca_file = "ca.pem"\n' + extra
    for name in domains:
        if not (d / f"{name}.pem").exists():
            ca.issue(dns=[name]).write(d, name)
        text += f'\n[[domain]]\nname = "{name}"\ncert = "{name}.pem"\nkey = "{name}.key"\n'
    (d / "config.toml").write_text(text)
    return d / "config.toml"


def test_load_state_reads_everything(tmp_path, ca):
    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.d" / "example.net.toml").write_text('require = "dane"\n')
    cfg = write_setup(tmp_path, ca, domains=("example.org", "example.com"))
    state = load_state(cfg)
    assert state.config.path == str(cfg)
    assert state.policies.for_domain("example.net").require == "dane"
    assert state.policies.for_domain("other.example").require == "dane-or-pkix"
    assert [c.subject for c in state.trust.anchors] == [ca.cert.subject]
    assert set(state.domains) == {"example.org", "example.com"}
    m = state.domains["example.org"]
    assert isinstance(m, DomainMaterial)
    san = m.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.org"]
    assert m.chain_pem() == (tmp_path / "example.org.pem").read_bytes()
    assert m.key.public_key() == m.leaf.public_key()
    assert "key=" not in repr(m)                      # the key never shows in a repr
    assert state.generation == 0 and state.warnings == ()


def test_reload_with_changed_policy_changes_for_domain(tmp_path, ca):
    cfg = write_setup(tmp_path, ca)
    holder = StateHolder(cfg)
    before = holder.state
    assert before.policies.for_domain("example.net").require == "dane-or-pkix"
    (tmp_path / "policy.d" / "example.net.toml").write_text('require = "block"\n')
    (tmp_path / "policy.d" / "default.toml").write_text('require = "pkix"\n')
    result = holder.reload()
    assert result.ok and result.errors == ()
    assert holder.state.policies.for_domain("example.net").require == "block"
    assert holder.state.policies.for_domain("elsewhere.example").require == "pkix"
    assert holder.state.generation == 1
    # The old snapshot is untouched: connections holding it keep a consistent view.
    assert before.policies.for_domain("example.net").require == "dane-or-pkix"


def test_broken_policy_keeps_old_state_and_reports_file_line(tmp_path, ca, caplog):
    cfg = write_setup(tmp_path, ca)
    (tmp_path / "policy.d" / "example.net.toml").write_text('require = "dane"\n')
    holder = StateHolder(cfg)
    old = holder.state
    bad = tmp_path / "policy.d" / "example.net.toml"
    bad.write_text('# tightened\nrequire = "block"\ndane_uses = ["DANE-XX"]\n')
    result = holder.reload()
    assert not result.ok
    assert holder.state is old
    assert holder.state.policies.for_domain("example.net").require == "dane"
    assert len(result.errors) == 1
    assert result.errors[0].startswith(f"{bad}:3: dane_uses: unknown TLSA usage 'DANE-XX'")
    assert f"{bad}:3:" in caplog.text and "still running" in caplog.text
    assert "reload failed (1 errors" in result.summary()


def test_every_problem_is_listed_at_once(tmp_path, ca):
    cfg = write_setup(tmp_path, ca, domains=("example.org", "example.com"))
    (tmp_path / "policy.d" / "a.example.toml").write_text('require = "sometimes"\n')
    (tmp_path / "policy.d" / "b.example.toml").write_text('requier = "dane"\n')
    # example.com's key replaced by another key: it no longer belongs to the certificate.
    ca.issue(dns=["example.com"]).write(tmp_path / "other", "example.com")
    shutil.copy(tmp_path / "other" / "example.com.key", tmp_path / "example.com.key")
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(StateLoadError) as info:
        load_state(cfg)
    msgs = info.value.messages
    assert len(msgs) == 4, msgs
    assert any(m.startswith(f"{tmp_path}/policy.d/a.example.toml:1: require:") for m in msgs)
    assert any(m.startswith(f"{tmp_path}/policy.d/b.example.toml:1: unknown key 'requier'") for m in msgs)
    assert any(m.startswith(f"{cfg}:0: policy.ca_file:") for m in msgs)
    assert any("example.com.key does not belong to the first certificate" in m for m in msgs)
    assert str(info.value) == "\n".join(msgs)


def test_config_syntax_error_keeps_old(tmp_path, ca):
    cfg = write_setup(tmp_path, ca)
    holder = StateHolder(cfg)
    old = holder.state
    cfg.write_text(cfg.read_text() + "\n[limits\n")
    result = holder.reload()
    assert not result.ok and holder.state is old
    assert result.errors[0].startswith(f"{cfg}:") and "TOML syntax error" in result.errors[0]


def test_certificate_renewal_is_picked_up(tmp_path, ca):
    cfg = write_setup(tmp_path, ca)
    holder = StateHolder(cfg)
    old_serial = holder.state.domains["example.org"].leaf.serial_number
    renewed = ca.issue(dns=["example.org"])
    renewed.write(tmp_path, "example.org")
    assert holder.reload().ok
    assert holder.state.domains["example.org"].leaf.serial_number == renewed.cert.serial_number != old_serial


def test_warnings_for_expiry_and_listen_changes(tmp_path, ca):
    cfg = write_setup(tmp_path, ca)
    holder = StateHolder(cfg)
    ca.issue(dns=["example.org"], not_after=NOW + 3 * DAY).write(tmp_path, "example.org")
    cfg.write_text(cfg.read_text() + '\n[inbound]\nlisten = ["[::]:5270"]\n')
    result = holder.reload()
    assert result.ok
    assert any("expires on" in w for w in result.warnings)
    assert any("inbound.listen changed" in w and "next restart" in w for w in result.warnings)


def test_build_tls_hook_and_its_failure(tmp_path, ca):
    cfg = write_setup(tmp_path, ca)
    calls = []

    def build(state):
        calls.append(state)
        if (tmp_path / "fail").exists():
            raise ValueError("no shared cipher configuration")
        return {name: f"ctx-for-{name}" for name in state.domains}

    holder = StateHolder(cfg, build_tls=build)
    assert holder.state.tls == {"example.org": "ctx-for-example.org"}
    (tmp_path / "fail").touch()
    result = holder.reload()
    assert not result.ok and holder.state.tls == {"example.org": "ctx-for-example.org"}
    assert "TLS set-up failed: ValueError: no shared cipher configuration" in result.errors[0]


def test_subscribers_and_metrics(tmp_path, ca):
    cfg = write_setup(tmp_path, ca)
    m = Metrics(process_metrics=False)
    holder = StateHolder(cfg, metrics=m)
    seen = []
    holder.subscribe(lambda old, new: seen.append((old.generation, new.generation)))
    holder.subscribe(lambda old, new: 1 / 0)          # a broken subscriber does not undo it
    assert holder.reload().ok
    (tmp_path / "policy.d" / "x.toml").write_text("require = 1\n")
    assert not holder.reload().ok
    assert seen == [(0, 1)]
    text = m.exposition()[0].decode()
    assert 'xmpp_dane_proxy_config_reloads_total{result="success"} 2.0' in text
    assert 'xmpp_dane_proxy_config_reloads_total{result="failure"} 1.0' in text
    assert "xmpp_dane_proxy_config_last_reload_successful 0.0" in text
    expiry = holder.state.domains["example.org"].not_after.timestamp()
    line = next(ln for ln in text.splitlines()
                if ln.startswith('xmpp_dane_proxy_certificate_expiry_timestamp_seconds{domain="example.org"} '))
    assert float(line.split()[-1]) == expiry


def test_initial_load_failure_raises(tmp_path):
    with pytest.raises(StateLoadError, match=r"config.toml:0: file not found"):
        StateHolder(tmp_path / "config.toml")


def test_sighup_reloads_and_tells_systemd(tmp_path, ca):
    cfg = write_setup(tmp_path, ca)
    holder = StateHolder(cfg)
    sockdir = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    fake_systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fake_systemd.bind(os.path.join(sockdir, "notify"))
    notifier = Notifier({"NOTIFY_SOCKET": os.path.join(sockdir, "notify")})
    messages: list[list[str]] = []

    async def main():
        tsock = trio.socket.from_stdlib_socket(fake_systemd)
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(reload_on_sighup, holder, notifier=notifier))
            (tmp_path / "policy.d" / "example.net.toml").write_text('require = "dane"\n')
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(10):
                while len(messages) < 2:
                    messages.append((await tsock.recv(4096)).decode().split("\n"))
            (tmp_path / "policy.d" / "example.net.toml").write_text('require = "nope"\n')
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(10):
                while len(messages) < 4:
                    messages.append((await tsock.recv(4096)).decode().split("\n"))
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        notifier.close()
        fake_systemd.close()
        shutil.rmtree(sockdir)
    assert messages[0][0] == "RELOADING=1" and messages[0][1].startswith("MONOTONIC_USEC=")
    assert messages[1] == ["READY=1", "STATUS=serving 1 domains, 1 policy files (generation 1)"]
    assert messages[2][0] == "RELOADING=1"
    assert messages[3][0] == "READY=1" and messages[3][1].startswith("STATUS=reload failed (1 errors")
    assert holder.state.policies.for_domain("example.net").require == "dane"
    assert holder.state.generation == 1
