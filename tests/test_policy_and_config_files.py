"""Policy files (DESIGN §2.4) and the config file (§4): strict, all-or-nothing, `file:line: message`."""
from __future__ import annotations

from pathlib import Path

import pytest

from pki import TestCA
from policy.policyfile import BUILTIN_DEFAULT, PolicyError, PolicySet, SrvRecord
from policy.tlsa import DANE_EE, DANE_TA, PKIX_EE
from proxy.config import ConfigError, load_config


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_most_specific_file_wins(tmp_path):
    write(tmp_path, "default.toml", 'require = "pkix"\n')
    write(tmp_path, "*.example.net.toml", 'require = "tls"\n')
    write(tmp_path, "*.chat.example.net.toml", 'require = "dane"\n')
    write(tmp_path, "jabber.example.net.toml", 'require = "block"\n')
    pols = PolicySet.load(tmp_path)
    assert pols.for_domain("jabber.example.net").require == "block"
    assert pols.for_domain("JABBER.Example.NET.").require == "block"
    assert pols.for_domain("muc.chat.example.net").require == "dane"
    assert pols.for_domain("a.b.example.net").require == "tls"
    assert pols.for_domain("example.net").require == "pkix"       # `*.parent` is for subdomains
    assert pols.for_domain("example.org").require == "pkix"
    assert pols.for_domain("jabber.example.net").source.endswith("jabber.example.net.toml")


def test_builtin_default_without_default_file(tmp_path):
    assert PolicySet.load(tmp_path).for_domain("x.example") == BUILTIN_DEFAULT
    assert BUILTIN_DEFAULT.require == "dane-or-pkix"
    assert BUILTIN_DEFAULT.dane_uses == frozenset({DANE_EE, DANE_TA})
    assert PolicySet.load(None).for_domain("x.example") is BUILTIN_DEFAULT


def test_full_policy_file_parses(tmp_path):
    leaf = TestCA().issue(["xmpp.example.net"]).cert
    from policy.tlsa import record_for
    record = record_for(leaf)
    write(tmp_path, "jabber.example.net.toml", f'''# a comment
require   = "dane"
dane_uses = ["DANE-EE", "pkix-ee"]
tls_min_version = "1.3"
tlsa = ["DANE-EE SPKI SHA2-256 {record.data.hex().upper()}"]
srv  = ["0 0 5269 xmpp.example.net."]
''')
    pol = PolicySet.load(tmp_path).for_domain("jabber.example.net")
    assert pol.require == "dane" and pol.dane_uses == frozenset({DANE_EE, PKIX_EE})
    assert pol.tls_min_version == "1.3" and pol.tlsa == (record,)
    assert pol.srv == (SrvRecord(0, 0, 5269, "xmpp.example.net"),)


def test_every_problem_reported_with_its_line(tmp_path):
    write(tmp_path, "a.example.toml", 'require = "dane"\n\nrequre = "pkix"\ndane_uses = ["DANE-XX"]\n')
    write(tmp_path, "b.example.toml", 'tlsa = ["3 1 1 abcd"]\nsrv = ["0 0 99999 x."]\n')
    write(tmp_path, "c.example.toml", 'require = "dane\n')
    write(tmp_path, "good.example.toml", 'require = "pkix"\n')
    with pytest.raises(PolicyError) as info:
        PolicySet.load(tmp_path)
    msgs = info.value.messages
    a, b, c = (str(tmp_path / f"{n}.example.toml") for n in "abc")
    assert f"{a}:3: unknown key 'requre'" in "\n".join(msgs)
    assert any(m.startswith(f"{a}:4: dane_uses: unknown TLSA usage 'DANE-XX'") for m in msgs)
    assert any(m.startswith(f"{b}:1: tlsa:") and "digest is 2 bytes" in m for m in msgs)
    assert any(m.startswith(f"{b}:2: srv:") for m in msgs)
    assert any(m.startswith(f"{c}:1: TOML syntax error") for m in msgs)
    assert len(msgs) == 5


def test_missing_policy_directory(tmp_path):
    with pytest.raises(PolicyError) as info:
        PolicySet.load(tmp_path / "nope")
    assert "policy directory does not exist" in str(info.value)


CONFIG = '''
[inbound]
listen  = ["[::]:5269", "127.0.0.1:5269"]
backend = "unix:/run/prosody/s2s.sock"

[outbound]
listen = []

[[domain]]
name = "Example.ORG"
cert = "example.org.pem"
key  = "/etc/x/example.org.key"

[dns]
nameservers = ["127.0.0.1", "[::1]:5353"]
timeout = 2

[policy]
dir = "policy.d"

[limits]
max_stanza_bytes = 65536
'''


def test_config_loads_with_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, "config.toml", CONFIG))
    assert cfg.inbound.listen == ["[::]:5269", "127.0.0.1:5269"]
    assert cfg.inbound.backend == "unix:/run/prosody/s2s.sock" and cfg.inbound.proxy_protocol is False
    assert cfg.outbound.listen == []
    assert cfg.domain("example.org").cert == str(tmp_path / "example.org.pem")
    assert cfg.domain("example.org").key == "/etc/x/example.org.key"
    assert cfg.dns.timeout == 2.0 and cfg.dns.trust_ad_from == []
    assert cfg.policy.dir == str(tmp_path / "policy.d") and cfg.policy.ca_file == ""
    assert cfg.limits.max_stanza_bytes == 65536 and cfg.limits.handshake_timeout == 30.0
    assert cfg.metrics.listen == "127.0.0.1:9269" and cfg.log.format == "text"


def test_config_errors_name_file_and_line(tmp_path):
    bad = CONFIG.replace('timeout = 2', 'timeout = -1\nnameserver = "x"').replace(
        'max_stanza_bytes = 65536', 'max_stanza_bytes = "big"') + '\n[logging]\nlevel = "info"\n'
    path = write(tmp_path, "config.toml", bad)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.messages)
    lines = bad.splitlines()
    line_of = lambda needle: next(i for i, line in enumerate(lines, 1) if needle in line)
    assert f"{path}:{line_of('timeout = -1')}: dns.timeout must be a positive number" in text
    assert f"{path}:{line_of('nameserver =')}: unknown key dns.nameserver" in text
    assert f"{path}:{line_of('max_stanza_bytes')}: limits.max_stanza_bytes must be a positive integer" in text
    assert f"{path}:{line_of('[logging]')}: unknown section [logging]" in text
    assert len(info.value.messages) == 4


def test_sasl_external_follows_outbound_and_needs_it(tmp_path):
    """Unset, `inbound.sasl_external` is on exactly when `outbound.listen` is set (the backend's
    checks of the proxy's keys come back through it); set true without it, the file is wrong."""
    from proxy.config import InboundConfig

    assert load_config(write(tmp_path, "a.toml", CONFIG)).inbound.offers_external(
        load_config(write(tmp_path, "a.toml", CONFIG)).outbound) is False
    with_outbound = CONFIG.replace("[outbound]\nlisten = []", '[outbound]\nlisten = ["127.0.0.1:15269"]')
    cfg = load_config(write(tmp_path, "b.toml", with_outbound))
    assert cfg.inbound.sasl_external is None and cfg.inbound.offers_external(cfg.outbound) is True
    off = with_outbound.replace('backend = "unix:/run/prosody/s2s.sock"',
                                'backend = "unix:/run/prosody/s2s.sock"\nsasl_external = false')
    cfg = load_config(write(tmp_path, "c.toml", off))
    assert cfg.inbound.offers_external(cfg.outbound) is False
    bad = CONFIG.replace('backend = "unix:/run/prosody/s2s.sock"',
                         'backend = "unix:/run/prosody/s2s.sock"\nsasl_external = true')
    path = write(tmp_path, "d.toml", bad)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "sasl_external" in text)
    (message,) = info.value.messages
    assert message.startswith(f"{path}:{line}: inbound.sasl_external = true needs outbound.listen"), message
    assert InboundConfig().sasl_external is None


def test_check_config_command(cli, tmp_path):
    issued = TestCA().issue(["example.org"])
    issued.write(tmp_path, "example.org")
    (tmp_path / "policy.d").mkdir()
    write(tmp_path / "policy.d", "default.toml", 'require = "dane"\n')
    cfg = write(tmp_path, "config.toml", CONFIG.replace("/etc/x/example.org.key", "example.org.key"))
    code, out, err = cli("check-config", "-c", cfg)
    assert code == 0 and "ok (1 domains, 1 policy files)" in out, err
    write(tmp_path / "policy.d", "default.toml", 'require = "dane"\nfoo = 1\n')
    code, out, err = cli("check-config", "-c", cfg)
    assert code == 1 and f"{tmp_path / 'policy.d' / 'default.toml'}:2: unknown key 'foo'" in err
    write(tmp_path / "policy.d", "default.toml", 'require = "dane"\n')
    other = TestCA().issue(["example.org"])
    (tmp_path / "example.org.key").write_bytes(other.key_pem())
    code, _, err = cli("check-config", "-c", cfg)
    assert code == 1 and "does not belong to the first certificate" in err
    assert "PRIVATE KEY" not in err
    code, _, err = cli("check-config", "-c", tmp_path / "missing.toml")
    assert code == 1 and "missing.toml:0: file not found" in err
