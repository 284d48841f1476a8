"""SASL EXTERNAL at the proxy's inbound side (DESIGN §3.3), with real servers end to end.

An ejabberd 23.01 peer without `mod_s2s_dialback` authenticates only with SASL EXTERNAL.  It
connects to the proxy (in-process, `outbound.listen` set, so `inbound.sasl_external` is on),
which offers EXTERNAL itself, judges the peer's domain by DANE, answers `<success/>` and
asserts the pair to the backend -- Prosody 0.12 or ejabberd 23.01 behind contrib/'s module --
by dialback with a key of its own.  The backend checks that key through `outbound.listen`,
where the proxy answers it: no connection to the peer is made for it.  A peer whose TLSA names
another key gets `<failure><not-authorized/>` and its message never reaches the backend.

Certificates: dNSName SANs only (ejabberd 23.01 crashes on an xmppAddr SAN when checking
EXTERNAL); the peer trusts the test CA (the proxy's server certificate).
"""
from __future__ import annotations

import re
from contextlib import ExitStack

import pytest

from ejabberdenv import ejabberd_factory  # noqa: F401 (fixture)
from prosodyenv import prosody_factory  # noqa: F401 (fixture)
from test_ejabberd_outbound import PASSWORD, TIMEOUT, USER, ca_file, module_dir, send_for_bounce  # noqa: F401

from test_outbound_external import _external_only_peer, _site_of
from xmppclient import deliver_message


@pytest.mark.parametrize("backend_kind", ["prosody", "ejabberd"])
def test_external_only_ejabberd_peer_delivers_through_the_proxys_sasl(
        ejabberd_factory, prosody_factory, dns_env, ca_file, module_dir, tmp_path, backend_kind):
    with ExitStack() as stack:
        local, proxy, backend = _site_of(backend_kind, stack, tmp_path, dns_env, ca_file, ejabberd_factory,
                                              prosody_factory, module_dir)
        name, peer = _external_only_peer(ejabberd_factory, dns_env, ca_file, matching=True, local=local)

        got = deliver_message(peer.account(f"{USER}@{name}", PASSWORD), backend.account(f"{USER}@{local}", PASSWORD),
                              "external only, inbound", timeout=TIMEOUT)
        assert got.get("from") == f"{USER}@{name}/sender"
        decision = proxy.log.wait_for(TIMEOUT, event="decision", direction="inbound", domain=name)
        assert (decision["verdict"], decision["prooftype"]) == ("accept", "dane-ee"), decision
        sasl = proxy.log.wait_for(TIMEOUT, event="sasl-external", domain=name)
        assert sasl["reason"].startswith(f"{name} -> {local} authenticated by its certificate (dane-ee)"), sasl
        # The peer authenticated by EXTERNAL at the proxy ...
        peer.wait_for_log(rf"Accepted outbound s2s EXTERNAL authentication {re.escape(name)} -> {re.escape(local)}")
        # ... and the backend's check of the proxy's key was answered by the proxy itself.
        answered = proxy.log.wait_for(TIMEOUT, event="dialback-answered-locally", domain=name)
        assert answered["local"] == local, answered
        if backend_kind == "ejabberd":
            # ejabberd checks the key on a verification-only stream: the proxy answered it with
            # no connection to the peer, so no outbound verdict at all.  (Prosody checks it on
            # the outgoing stream it authenticates for its own traffic to the peer, which the
            # proxy does connect -- by SASL EXTERNAL.)
            assert proxy.decisions(direction="outbound", domain=name) == []


@pytest.mark.parametrize("backend_kind", ["prosody", "ejabberd"])
def test_mismatching_external_only_peer_gets_a_failure_and_the_backend_nothing(
        ejabberd_factory, prosody_factory, dns_env, ca_file, module_dir, tmp_path, backend_kind):
    with ExitStack() as stack:
        local, proxy, backend = _site_of(backend_kind, stack, tmp_path, dns_env, ca_file, ejabberd_factory,
                                              prosody_factory, module_dir)
        name, peer = _external_only_peer(ejabberd_factory, dns_env, ca_file, matching=False, local=local)

        bounce = send_for_bounce(peer.account(f"{USER}@{name}", PASSWORD), f"{USER}@{local}", "must not arrive")
        assert bounce is not None, "no bounce\n" + proxy.log.text()
        decision = proxy.log.wait_for(TIMEOUT, event="decision", direction="inbound", domain=name)
        assert decision["verdict"] == "reject" and "no usable TLSA record matches" in decision["reason"], decision
        failure = proxy.log.wait_for(TIMEOUT, event="sasl-external-failure", domain=name)
        assert failure["reason"].startswith(f"not-authorized: {name} not authenticated: "), failure
        # The backend never heard of the peer's domain beyond the stream header: no
        # authentication attempt, no message.
        log = backend.log_text()
        assert "must not arrive" not in log
        assert not re.search(rf"{re.escape(name)}.*(dialback|authenticat)", log, re.I), log
