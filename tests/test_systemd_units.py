"""systemd/: the unit files pass `systemd-analyze verify`, and the shipped examples load.

`systemd-analyze` comes with Debian's `systemd` package; it checks unit files offline, no
running systemd needed.  It exits 0 even when it ignores a bad line, so the tests require
its output to be empty.  ExecStart's binary must exist for verify to pass, so the units are
checked in a copy whose /usr/local/bin/xmpp-dane-proxy points at a stand-in script.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from policy.policyfile import BUILTIN_DEFAULT, PolicySet
from proxy.config import Config, load_config
from proxy.socket_activation import ROLES

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("xmpp-dane-proxy.service", "xmpp-dane-proxy.socket", "xmpp-dane-proxy-outbound.socket")
BINARY = "/usr/local/bin/xmpp-dane-proxy"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not found: .ci/run must `apt-get install -y systemd`")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; systemd allows a key more than once."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert section is not None and _, f"{path.name}: stray line {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def unit_copy(tmp_path):
    stub = tmp_path / "xmpp-dane-proxy"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace(BINARY, str(stub))
        (tmp_path / name).write_text(text)
    return tmp_path


@needs_analyze
def test_systemd_analyze_verify_is_clean(unit_copy):
    proc = subprocess.run([ANALYZE, "verify", "--man=no", *(str(unit_copy / u) for u in UNITS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@needs_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(unit_copy):
    # The clean result above means something: the same check flags a bad value.
    svc = unit_copy / "xmpp-dane-proxy.service"
    svc.write_text(svc.read_text().replace("WatchdogSec=30s", "WatchdogSec=thirty"))
    proc = subprocess.run([ANALYZE, "verify", "--man=no", str(svc)], capture_output=True, text=True, timeout=60)
    assert "WatchdogSec" in proc.stderr or "sec value" in proc.stderr


@needs_analyze
def test_exposure_level_stays_low(unit_copy):
    help_text = subprocess.run([ANALYZE, "security", "--help"], capture_output=True, text=True).stdout
    if "--offline" not in help_text:
        pytest.skip("this systemd-analyze cannot analyse unit files offline (needs systemd >= 250)")
    # --threshold is in tenths: 25 means an overall exposure of 2.5 ("OK" ends at 4.9).
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--threshold=25",
                           str(unit_copy / "xmpp-dane-proxy.service")], capture_output=True, text=True, timeout=60)
    level = [ln for ln in proc.stdout.splitlines() if "Overall exposure level" in ln]
    assert proc.returncode == 0, level or proc.stdout[-2000:]
    assert level and float(level[0].split(":")[1].split()[0]) <= 2.5


def test_service_unit_contract():
    svc = parse_unit(SYSTEMD / "xmpp-dane-proxy.service")["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["ExecStart"] == [f"{BINARY} run -c /etc/xmpp-dane-proxy/config.toml"]
    assert svc["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert svc["ExecReload"][0] == f"{BINARY} check-config -c /etc/xmpp-dane-proxy/config.toml"
    assert svc["WatchdogSec"] == ["30s"]
    assert svc["KillMode"] == ["mixed"]      # SIGTERM to the supervisor, which drains the workers
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                       "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                       "User": "xmpp-dane-proxy", "ConfigurationDirectory": "xmpp-dane-proxy"}.items():
        assert svc[key] == [value], key
    assert "@system-service" in svc["SystemCallFilter"]
    assert svc["Sockets"] == ["xmpp-dane-proxy.socket xmpp-dane-proxy-outbound.socket"]


def test_socket_units_match_the_config_defaults_and_the_fd_names():
    defaults = load_config(SYSTEMD / "config.example.toml")
    inbound = parse_unit(SYSTEMD / "xmpp-dane-proxy.socket")["Socket"]
    outbound = parse_unit(SYSTEMD / "xmpp-dane-proxy-outbound.socket")["Socket"]
    assert inbound["ListenStream"] == defaults.inbound.listen
    assert outbound["ListenStream"] == defaults.outbound.listen
    assert inbound["FileDescriptorName"] == ["inbound"] and outbound["FileDescriptorName"] == ["outbound"]
    assert {"inbound", "outbound"} <= set(ROLES)
    assert inbound["Service"] == outbound["Service"] == ["xmpp-dane-proxy.service"]


def test_example_config_shows_exactly_the_defaults():
    cfg = load_config(SYSTEMD / "config.example.toml")
    builtin = Config()
    for section in ("server", "inbound", "outbound", "dns", "limits", "metrics", "log"):
        assert getattr(cfg, section) == getattr(builtin, section), section
    assert dataclasses.replace(cfg.policy) == dataclasses.replace(builtin.policy)
    assert [d.name for d in cfg.domains] == ["example.org"]


def test_shipped_policy_files_load(tmp_path):
    shipped = PolicySet.load(SYSTEMD / "policy.d")
    assert shipped.exact == {} and shipped.wildcard == {}       # *.example files are not loaded
    assert dataclasses.replace(shipped.default, source="") == dataclasses.replace(BUILTIN_DEFAULT, source="")
    for example in (SYSTEMD / "policy.d").glob("*.toml.example"):
        shutil.copy(example, tmp_path / example.name.removesuffix(".example"))
    pols = PolicySet.load(tmp_path)
    net = pols.for_domain("example.net")
    assert net.require == "dane" and net.tls_min_version == "1.3" and len(net.tlsa) == 1 and len(net.srv) == 1
    assert pols.for_domain("legacy.example.com").require == "tls"
    assert pols.for_domain("blocked.example").require == "block"
