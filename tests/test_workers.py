"""`[server] workers = 2` as real processes: one supervisor, two workers (proxy/workers.py).

The proxy runs as `python -m proxy run -c FILE`, as in tests/test_run_process.py (same scripted
peer with test-PKI certificates, same recording backend, static DNS evidence from the policy
file).  Which worker handled a stream is read from its decision line: every line a worker
logs carries `worker=N`, and the decision names the peer's source port.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket

import pytest
import trio

from proxy.config import ConfigError, load_config
from proxy.workers import worker_count
from proxy.xmlstream import NS_STREAM_ERRORS, NS_STREAMS, Element, StreamClosed
from test_inbound_openssl import LOCAL, PEER, FakeBackend, Peer, world  # noqa: F401  (fixture)
from test_run_process import (
    ProxyProcess, backend_saw, base_env, dane_policy, free_port, metric, notify_socket,  # noqa: F401
    proxy_argv, scrape, write_config,
)

# Connections the kernel spreads by a hash of the source port: the chance that 40 in a row
# all land on one of two workers is 2 ** -39.
MAX_TRIES = 40


async def authenticate_logged(proxy: ProxyProcess, port: int, identity) -> tuple[Peer, object, dict[str, str]]:
    """`authenticate`, plus the decision line the proxy logged for this very connection."""
    peer = await Peer.connect(port)
    source = peer.stream.socket.getsockname()[1]
    await peer.negotiate(identity)
    await peer.send(f"<db:result from='{PEER}' to='{LOCAL}'>key</db:result>")
    answer = await peer.expect(Element)
    line = await proxy.wait_log(rf"event=decision .*peer=127\.0\.0\.1:{source}\b")
    return peer, answer, _fields(line)


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))


async def one_stream_per_worker(proxy: ProxyProcess, port: int, identity, *, keep: bool) -> dict[str, tuple]:
    """Open streams until each of the two workers judged one; {worker: (peer, answer, fields)}."""
    found: dict[str, tuple] = {}
    for _ in range(MAX_TRIES):
        peer, answer, fields = await authenticate_logged(proxy, port, identity)
        worker = fields.get("worker")
        assert worker in ("1", "2"), f"decision line without worker=: {fields}"
        if worker not in found and keep:
            found[worker] = (peer, answer, fields)
        else:
            found.setdefault(worker, (None, answer, fields))
            await peer.aclose()
        if len(found) == 2:
            return found
    raise AssertionError(f"{MAX_TRIES} connections all went to worker(s) {sorted(found)}:\n" + "\n".join(proxy.lines))


async def all_streams_closed(proxy: ProxyProcess, *, after: int = 0, but: int = 0) -> None:
    """Until every stream judged from log line `after` on, but `but` of them, has logged its
    end (matched by the peer's address; the peers' closes are asynchronous)."""
    def peers(event: str) -> set[str]:
        return {m.group(1) for line in proxy.lines[after:] if f"event={event} " in line
                for m in [re.search(r" peer=(\S+)", line)] if m}
    with trio.fail_after(15):
        while len(peers("decision") - peers("stream-closed")) > but:
            await proxy._changed.wait()


def worker_pids(proxy: ProxyProcess, after: int = 0) -> dict[str, int]:
    """The latest pid of each worker, from the supervisor's `worker-started` lines."""
    pids = {}
    for line in proxy.lines[after:]:
        m = re.search(r"event=worker-started worker=(\d+) pid=(\d+)", line)
        if m:
            pids[m.group(1)] = int(m.group(2))
    return pids


def test_two_workers_share_a_port_reload_and_drain(world, tmp_path, notify_socket):  # noqa: F811
    """One lifetime with two workers: READY=1 once both serve; streams land on both; SIGHUP with
    a broken policy is refused once, by the supervisor, and both keep the old policy; SIGHUP
    with `block` changes the next verdict in both while their open streams flow on; /metrics
    sums both; SIGTERM drains both (system-shutdown, what was in flight still delivered), exit 0."""
    listen_port, metrics_port = free_port(), free_port()
    policy_file = tmp_path / "policy.d" / f"{PEER}.toml"

    async def main():
        backend = FakeBackend()
        async with backend.running(), trio.open_nursery() as nursery:
            config = write_config(tmp_path, world, backend.port, listen_port=listen_port,
                                  metrics_port=metrics_port, workers=2)
            policy_file.write_text(dane_policy(world))
            proxy = ProxyProcess(proxy_argv(config), base_env(NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
            await proxy.start(nursery)
            try:
                await notify_socket.wait_for("READY=1")
                line = await proxy.wait_log(r"event=ready workers=2")
                assert f"127.0.0.1:{listen_port}" in line
                assert set(worker_pids(proxy)) == {"1", "2"}

                # Streams on one port, judged by both workers; one held open on each.
                held = await one_stream_per_worker(proxy, listen_port, world.peer_self, keep=True)
                accepted = sum(1 for line in proxy.lines if "event=decision" in line)
                for worker, (peer, answer, _) in held.items():
                    assert answer.attrs.get("type") == "valid", "\n".join(proxy.lines)
                    await peer.send(f"<message from='{PEER}' to='{LOCAL}'><body>hello {worker}</body></message>")
                    await backend.wait_for(backend_saw(backend, f"<body>hello {worker}</body>".encode()))

                # A broken policy: refused once, by the supervisor; both workers keep the old one.
                policy_file.write_text('require = "dane"\nrequire_typo = 1\n')
                mark = len(proxy.lines)
                proxy.signal(signal.SIGHUP)
                seen = await notify_socket.wait_for("READY=1")
                assert any("RELOADING=1" in m for m in seen)
                where = re.escape(f"{policy_file}:2: unknown key 'require_typo'")
                await proxy.wait_log(where, after=mark)
                assert sum(1 for line in proxy.lines[mark:] if re.search(where, line)) == 1, \
                    "\n".join(proxy.lines[mark:])
                assert not any("worker=" in line and "reload" in line for line in proxy.lines[mark:])
                mark = len(proxy.lines)
                for worker, (_, answer, fields) in (await one_stream_per_worker(
                        proxy, listen_port, world.peer_self, keep=False)).items():
                    assert answer.attrs.get("type") == "valid" and fields["verdict"] == "accept", fields
                accepted += sum(1 for line in proxy.lines[mark:] if "event=decision" in line)

                # `block`: the next verdict changes in both workers; the held streams flow on.
                policy_file.write_text('require = "block"\n')
                mark = len(proxy.lines)
                proxy.signal(signal.SIGHUP)
                await notify_socket.wait_for("READY=1")
                await proxy.wait_log(r"event=reloaded generation=1 workers=2 failed=0", after=mark)
                for worker, (_, answer, fields) in (await one_stream_per_worker(
                        proxy, listen_port, world.peer_self, keep=False)).items():
                    assert answer.attrs.get("type") == "error" and fields["verdict"] == "reject", fields
                    assert "blocked" in fields["reason"]
                rejected = sum(1 for line in proxy.lines[mark:] if "event=decision" in line)
                # DESIGN §3.4: the open pairs are judged again against the new policy and closed.
                for worker, (peer, _, _) in held.items():
                    await peer.until_closed()
                # Only accepted streams' dialback reached the backend.
                assert sum(bytes(c.received).count(b"<db:result") for c in backend.connections) == accepted

                await all_streams_closed(proxy)
                text = await scrape(metrics_port)
                assert metric(text, "xmpp_dane_proxy_verdicts_total", direction="inbound",
                              verdict="accept", prooftype="dane-ee") == accepted
                assert metric(text, "xmpp_dane_proxy_verdicts_total", direction="inbound",
                              verdict="reject", reason="blocked") == rejected
                assert metric(text, "xmpp_dane_proxy_connections_open", direction="inbound") == 0
                assert metric(text, "xmpp_dane_proxy_config_reloads_total", result="failure") == 1
                assert metric(text, "xmpp_dane_proxy_config_reloads_total", result="success") == 2
                for worker in ("1", "2"):
                    assert metric(text, "xmpp_dane_proxy_worker_up", worker=worker) == 1
                    assert metric(text, "xmpp_dane_proxy_worker_resident_memory_bytes", worker=worker) > 0
                assert text.count("# TYPE xmpp_dane_proxy_verdicts_total counter") <= 1

                # SIGTERM: both workers stop, exit 0.
                proxy.signal(signal.SIGTERM)
                await notify_socket.wait_for("STOPPING=1")
                assert await proxy.exit_code() == 0, "\n".join(proxy.lines)
                for worker in ("1", "2"):
                    await proxy.wait_log(rf"event=worker-stopped worker={worker} .*exited with 0")
            finally:
                proxy.kill()

    trio.run(main)


def test_killed_worker_is_restarted_logged_and_its_counts_kept(world, tmp_path):  # noqa: F811
    listen_port, metrics_port = free_port(), free_port()

    async def main():
        backend = FakeBackend()
        async with backend.running(), trio.open_nursery() as nursery:
            config = write_config(tmp_path, world, backend.port, listen_port=listen_port,
                                  metrics_port=metrics_port, workers=2)
            (tmp_path / "policy.d" / f"{PEER}.toml").write_text(dane_policy(world))
            proxy = ProxyProcess(proxy_argv(config), base_env())
            await proxy.start(nursery)
            try:
                await proxy.wait_log(r"event=ready workers=2")
                await one_stream_per_worker(proxy, listen_port, world.peer_self, keep=False)
                before = sum(1 for line in proxy.lines if "event=decision" in line)
                old = worker_pids(proxy)

                mark = len(proxy.lines)
                os.kill(old["2"], signal.SIGKILL)
                line = await proxy.wait_log(r"event=worker-exited worker=2", after=mark)
                assert f"pid={old['2']}" in line and "killed by SIGKILL" in line and "action=restart" in line
                await proxy.wait_log(r"event=worker-ready worker=2", after=mark)
                new = worker_pids(proxy, after=mark)["2"]
                assert new != old["2"] and worker_pids(proxy)["1"] == old["1"]

                # The new worker 2 serves on the same port; worker 1 never stopped.
                mark = len(proxy.lines)
                await one_stream_per_worker(proxy, listen_port, world.peer_self, keep=False)
                after = sum(1 for line in proxy.lines[mark:] if "event=decision" in line)

                await all_streams_closed(proxy, after=mark)
                text = await scrape(metrics_port)
                assert metric(text, "xmpp_dane_proxy_worker_restarts_total", worker="2") == 1
                assert metric(text, "xmpp_dane_proxy_worker_restarts_total", worker="1") == 0
                # The dead worker's counts stay in the sums.
                assert metric(text, "xmpp_dane_proxy_verdicts_total", direction="inbound",
                              verdict="accept", prooftype="dane-ee") == before + after
                assert metric(text, "xmpp_dane_proxy_connections_open", direction="inbound") == 0

                # The supervisor killed outright: its workers notice (their stdin pipe ends),
                # drain and exit by themselves instead of serving on unsupervised.
                pids = worker_pids(proxy)
                proxy.kill()
                await proxy.exit_code()
                with trio.fail_after(30):
                    while any(_alive(pid) for pid in pids.values()):
                        await trio.sleep(0.05)    # polling the process table, bounded above
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", listen_port)
            finally:
                proxy.kill()

    trio.run(main)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan's zombie waits for init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_restarted_while_the_files_are_broken_recovers(world, tmp_path):  # noqa: F811
    """A worker restarted while a broken file is on disk (refused by the supervisor's reload)
    cannot load it: it exits, is logged and retried, the other worker serves on with the old
    configuration, and once the file is fixed the retried worker comes up."""
    listen_port = free_port()
    policy_file = tmp_path / "policy.d" / f"{PEER}.toml"

    async def main():
        backend = FakeBackend()
        async with backend.running(), trio.open_nursery() as nursery:
            config = write_config(tmp_path, world, backend.port, listen_port=listen_port,
                                  metrics_port=free_port(), workers=2)
            policy_file.write_text(dane_policy(world))
            proxy = ProxyProcess(proxy_argv(config), base_env())
            await proxy.start(nursery)
            try:
                await proxy.wait_log(r"event=ready workers=2")
                policy_file.write_text('require = "dane"\nrequire_typo = 1\n')
                mark = len(proxy.lines)
                proxy.signal(signal.SIGHUP)
                await proxy.wait_log(r"reload failed", after=mark)

                os.kill(worker_pids(proxy)["2"], signal.SIGKILL)
                await proxy.wait_log(r"event=worker-exited worker=2 .*killed by SIGKILL", after=mark)
                await proxy.wait_log(re.escape(f"worker 2: {policy_file}:2: unknown key 'require_typo'"), after=mark)
                await proxy.wait_log(r"event=worker-exited worker=2 .*exited with 1\" action=restart", after=mark)
                # Worker 1 serves on, with the policy it had.
                peer, answer, fields = await authenticate_logged(proxy, listen_port, world.peer_self)
                assert answer.attrs.get("type") == "valid" and fields["worker"] == "1", fields
                await peer.aclose()

                policy_file.write_text(dane_policy(world))
                mark = len(proxy.lines)
                await proxy.wait_log(r"event=worker-ready worker=2", after=mark)
                proxy.signal(signal.SIGTERM)
                assert await proxy.exit_code() == 0, "\n".join(proxy.lines)
            finally:
                proxy.kill()

    trio.run(main)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate missing (Debian package systemd; scripts/bootstrap installs it)")
def test_socket_activation_with_two_workers(world, tmp_path):  # noqa: F811
    """systemd hands over one listening socket; both workers accept on it; SIGTERM drains."""
    activated_port, configured_port = free_port(), free_port()

    async def main():
        backend = FakeBackend()
        async with backend.running(), trio.open_nursery() as nursery:
            config = write_config(tmp_path, world, backend.port, listen_port=configured_port,
                                  metrics_port=free_port(), workers=2)
            (tmp_path / "policy.d" / f"{PEER}.toml").write_text(dane_policy(world))
            argv = ["systemd-socket-activate", f"--listen=127.0.0.1:{activated_port}",
                    "--fdname=inbound", *proxy_argv(config)]
            proxy = ProxyProcess(argv, base_env())
            await proxy.start(nursery)
            try:
                await proxy.wait_log(r"Listening on")
                peer, answer, fields = await authenticate_logged(proxy, activated_port, world.peer_self)
                assert answer.attrs.get("type") == "valid", "\n".join(proxy.lines)
                line = await proxy.wait_log(r"event=ready workers=2")
                assert f"inbound=127.0.0.1:{activated_port}" in line
                await proxy.wait_log(r"event=worker-ready worker=1")
                await proxy.wait_log(r"event=worker-ready worker=2")
                for worker in ("1", "2"):
                    assert any(re.search(rf"worker={worker} .*event=listening .*127\.0\.0\.1:{activated_port}", line)
                               for line in proxy.lines), "\n".join(proxy.lines)
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", configured_port)
                more, answer, _ = await authenticate_logged(proxy, activated_port, world.peer_self)
                assert answer.attrs.get("type") == "valid"
                proxy.signal(signal.SIGTERM)
                for p in (peer, more):
                    error = await p.expect(Element)
                    assert error.find(NS_STREAM_ERRORS, "system-shutdown") is not None
                    await p.send(b"</stream:stream>")
                    await p.until_closed()
                assert await proxy.exit_code() == 0, "\n".join(proxy.lines)
            finally:
                proxy.kill()

    trio.run(main)


def test_port_in_use_is_refused_even_with_reuseport(world, tmp_path):  # noqa: F811
    """SO_REUSEPORT must not let a second proxy join a port another one listens on."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        config = write_config(tmp_path, world, free_port(), listen_port=port, metrics_port=free_port(), workers=2)
        import subprocess
        out = subprocess.run(proxy_argv(config), env=base_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"xmpp-dane-proxy run: cannot listen on 127.0.0.1:{port}: Address already in use\n" in out.stderr


def test_workers_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("")
    assert load_config(path).server.workers == 0
    assert worker_count(0) == len(os.sched_getaffinity(0)) and worker_count(3) == 3
    path.write_text("[server]\nworkers = 4\n")
    assert load_config(path).server.workers == 4
    for bad in ("-1", '"2"', "true", "1.5", "100000"):
        path.write_text(f"[server]\nworkers = {bad}\n")
        with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:2: server.workers must be an integer"):
            load_config(path)
    path.write_text("[server]\nworker = 2\n")
    with pytest.raises(ConfigError, match="unknown key server.worker"):
        load_config(path)
