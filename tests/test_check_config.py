"""`check-config` reports every problem in one run, at the line of the key it is about (issue 14)."""
from __future__ import annotations

from pathlib import Path

from pki import DAY, NOW, TestCA, self_signed


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config(tmp: Path, domains: str, *, extra: str = "", policy_dir: str = "policy.d") -> Path:
    (tmp / "policy.d").mkdir(exist_ok=True)
    return write(tmp / "config.toml",
                 f'[inbound]\nlisten = ["127.0.0.1:5269"]\n\n[policy]\ndir = "{policy_dir}"\n{extra}\n{domains}')


def domain(name: str, cert: str | None = None, key: str | None = None) -> str:
    return f'[[domain]]\nname = "{name}"\ncert = "{cert or name + ".pem"}"\nkey = "{key or name + ".key"}"\n'


def line_of(path: Path, needle: str, nth: int = 0) -> int:
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    return hits[nth]


def test_valid_configuration_is_ok(cli, tmp_path):
    TestCA().issue(["example.org"]).write(tmp_path, "example.org")
    cfg = config(tmp_path, domain("example.org"))
    code, out, err = cli("check-config", "-c", cfg)
    assert code == 0 and out == f"{cfg}: ok (1 domains, 0 policy files)\n"
    # No resolver listens on 127.0.0.1:53 here: the DNSSEC probe's warning is all stderr says.
    assert all(line.startswith("warning: dns: resolver 127.0.0.1:53 does not validate DNSSEC")
               for line in err.splitlines()), err


def test_every_problem_in_one_run_at_its_line(cli, tmp_path):
    ca = TestCA()
    ca.issue(["a.example"]).write(tmp_path, "a.example")
    (tmp_path / "a.example.key").write_bytes(ca.issue(["a.example"]).key_pem())    # another key
    ca.issue(["b.example"]).write(tmp_path, "b.example")
    write(tmp_path / "policy.d" / "peer.example.toml", 'require = "dane"\ntls_min_version = 1.2\n')
    cfg = config(tmp_path, domain("a.example") + domain("b.example", cert="missing.pem"),
                 extra='\n[log]\nlevel = 1\n')
    code, out, err = cli("check-config", "-c", cfg)
    assert code == 1 and out == ""
    lines = err.splitlines()
    policy = tmp_path / "policy.d" / "peer.example.toml"
    expected = [
        f"{cfg}:{line_of(cfg, 'level = 1')}: log.level must be a string: 1 is a number",
        f"{policy}:2: tls_min_version: 1.2 is a number, but a string is expected: write it in quotes (\"1.2\")",
        f"{cfg}:{line_of(cfg, 'key = ', 0)}: domain a.example: {tmp_path / 'a.example.key'} does not belong "
        f"to the first certificate of {tmp_path / 'a.example.pem'}",
        f"{cfg}:{line_of(cfg, 'cert = ', 1)}: domain b.example: {tmp_path / 'missing.pem'}: no such file",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, err)
    assert len(lines) == 4, err
    assert ":0:" not in err


def test_expired_and_not_yet_valid_certificates(cli, tmp_path):
    ca = TestCA()
    ca.issue(["old.example"], not_before=NOW - 400 * DAY, not_after=NOW - DAY).write(tmp_path, "old.example")
    ca.issue(["new.example"], not_before=NOW + 2 * DAY).write(tmp_path, "new.example")
    cfg = config(tmp_path, domain("old.example") + domain("new.example"))
    code, _, err = cli("check-config", "-c", cfg)
    assert code == 1
    assert f"{cfg}:{line_of(cfg, 'cert = ', 0)}: domain old.example: certificate expired on " in err, err
    assert f"{cfg}:{line_of(cfg, 'cert = ', 1)}: domain new.example: certificate is not valid before " in err, err
    assert len(err.splitlines()) == 2, err


def test_expired_intermediate_is_named(cli, tmp_path):
    sub = TestCA().intermediate("Old Sub CA", not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    sub.issue(["example.org"], not_before=NOW - 10 * DAY).write(tmp_path, "example.org")
    cfg = config(tmp_path, domain("example.org"))
    code, _, err = cli("check-config", "-c", cfg)
    assert code == 1 and "chain certificate [1] (CN=Old Sub CA) expired on" in err, err


def test_certificate_that_does_not_name_its_domain(cli, tmp_path):
    self_signed(["xmpp.example.net"]).write(tmp_path, "example.org")
    cfg = config(tmp_path, domain("example.org"))
    code, _, err = cli("check-config", "-c", cfg)
    assert code == 1
    assert (f"{cfg}:{line_of(cfg, 'cert = ')}: domain example.org: the certificate does not name example.org "
            f"(it names xmpp.example.net)") in err, err


def test_certificate_naming_the_domain_as_xmppaddr_or_wildcard_is_fine(cli, tmp_path):
    ca = TestCA()
    ca.issue([], xmpp=["example.org"]).write(tmp_path, "example.org")
    ca.issue(["*.example.net"]).write(tmp_path, "chat.example.net")
    cfg = config(tmp_path, domain("example.org") + domain("chat.example.net"))
    code, out, err = cli("check-config", "-c", cfg)
    assert code == 0, err


def test_no_domain(cli, tmp_path):
    cfg = config(tmp_path, "")
    code, _, err = cli("check-config", "-c", cfg)
    assert code == 1 and f"{cfg}:1: no [[domain]]" in err, err


def test_static_tlsa_of_a_disabled_usage(cli, tmp_path):
    TestCA().issue(["example.org"]).write(tmp_path, "example.org")
    record = "1 1 1 " + "ab" * 32
    policy = write(tmp_path / "policy.d" / "peer.example.toml", f'require = "dane"\ntlsa = ["{record}"]\n')
    cfg = config(tmp_path, domain("example.org"))
    code, _, err = cli("check-config", "-c", cfg)
    assert code == 1
    assert f"{policy}:2: tlsa: record '{record}' has usage PKIX-EE (1), which dane_uses disables" in err, err
    # Enabling the usage makes the same record fine.
    write(policy, f'require = "dane"\ndane_uses = ["PKIX-EE"]\ntlsa = ["{record}"]\n')
    assert cli("check-config", "-c", cfg)[0] == 0


def test_missing_policy_dir_points_at_dir_line_and_domains_still_checked(cli, tmp_path):
    self_signed(["other.example"]).write(tmp_path, "example.org")
    cfg = config(tmp_path, domain("example.org"), policy_dir="nope.d")
    code, _, err = cli("check-config", "-c", cfg)
    assert code == 1
    assert f"{cfg}:{line_of(cfg, 'dir = ')}: policy.dir: {tmp_path / 'nope.d'} does not exist" in err, err
    assert "does not name example.org" in err, err


def test_duplicate_domain_at_its_second_name_line(cli, tmp_path):
    TestCA().issue(["example.org"]).write(tmp_path, "example.org")
    cfg = config(tmp_path, domain("example.org") + domain("example.org"))
    code, _, err = cli("check-config", "-c", cfg)
    assert code == 1 and f"{cfg}:{line_of(cfg, 'name = ', 1)}: domain 'example.org' is configured twice" in err, err
