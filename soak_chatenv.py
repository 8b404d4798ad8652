"""Soak chatenv: fuzz, churn and shutdown at larger counts than the tests, with numbers.

    python soak_chatenv.py            # a few minutes
    python soak_chatenv.py --quick    # under a minute
    python soak_chatenv.py --seed 7 --churn 30000 --frames 100000

Every server runs in its own subprocess (``chatenv.serve`` with the phase's
options) on a free loopback port, so its RSS, file descriptors and log are its
own; each is stopped (SIGTERM, then SIGKILL) before the script ends. Phases:

1. pure fuzz: random frames of every shape through ``handle_frame``; each reply
   must be one the protocol allows, and afterwards the session answers a valid
   step correctly;
2. socket fuzz: random frames over real sessions (every reply well formed, the
   session kept) and random wire bytes after the handshake (only documented
   close codes, every session freed);
3. churn: sessions that vanish without a close frame (RST, FIN, half-open,
   mid-frame, mid-handshake, silent, not reading); then zero sessions, file
   descriptors back, RSS compared, full capacity, a clean log;
4. shutdown: SIGTERM with sessions mid-episode, some stuck: every one closed
   with 1001 and the process gone within a second.

Needs only chatenv and websockets. Exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import chatenv
from chatenv import Session, handle_frame

HERE = Path(chatenv.__file__).resolve().parent


def upgrade_request(headers: bytes = b"", path: bytes = b"/ws") -> bytes:
    """A WebSocket upgrade request for ``path``, with extra header lines (each ending in CRLF)."""
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + headers + b"\r\n"
    )


UPGRADE = upgrade_request()
SERVE_SCRIPT = (  # argv: the serve() options as JSON, the log level
    "import json, logging, sys, chatenv\n"
    "logging.basicConfig(level=sys.argv[2], format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "chatenv.serve(**json.loads(sys.argv[1]))\n"
)
RECOVERABLE = {"INVALID_JSON", "UNKNOWN_TYPE", "VALIDATION_ERROR", "EXECUTION_ERROR"}
TYPES = ("reset", "step", "state", "close")
FAILURES: list[str] = []


def check(condition: bool, what: str) -> bool:
    if not condition:
        FAILURES.append(what)
        print(f"  FAIL: {what}", flush=True)
    return condition


# --- servers and raw sockets ---------------------------------------------------------


class ServerProcess:
    """A chatenv server in its own process (its own RSS, file descriptors and log
    ``logdir/name.log``) on a free port, read from its "listening on" line.

    ``chatenv.serve(**options)`` (host 127.0.0.1 unless given), or with ``cli`` the
    command line ``python chatenv.py serve *cli`` (pass "--port", "0"). Stopped with
    ``stop()`` or as a context manager: SIGTERM, then SIGKILL.
    """

    def __init__(self, logdir, name: str, cli=None, env=None, log_level="INFO", **options):
        if cli is not None:
            argv = [sys.executable, str(HERE / "chatenv.py"), "serve", *cli]
        else:
            options.setdefault("host", "127.0.0.1")
            options.setdefault("port", 0)
            argv = [sys.executable, "-c", SERVE_SCRIPT, json.dumps(options), log_level]
        self.log_path = Path(logdir) / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            match = re.search(r"listening on http://(.+?):(\d+) ", self.output())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.output()}")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def active(self) -> int:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.url + "/metadata", timeout=5) as response:
            return json.loads(response.read())["active_sessions"]

    def stop(self, signum=signal.SIGTERM, timeout=5.0) -> float | None:
        """Signal it and wait; seconds from signal to exit (None if it had to be killed)."""
        started = time.monotonic()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signum)
                self.proc.wait(timeout)
            return time.monotonic() - started
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def wait_until(predicate, timeout=10.0, interval=0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def frame(payload: bytes, opcode=1, fin=True, rsv=0, mask=True, rng=random) -> bytes:
    """One client frame (RFC 6455 5.2), any bits, masked with a key from ``rng`` unless told otherwise."""
    first, bit, n = (0x80 if fin else 0) | (rsv << 4) | opcode, 0x80 if mask else 0, len(payload)
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not mask:
        return head + payload
    key = rng.randbytes(4)
    stream = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big") if n else b""
    return head + key + body


def text(message) -> bytes:
    return frame(json.dumps(message).encode())


def connect(port: int, timeout=10) -> socket.socket:
    """A TCP connection to the loopback port; ``timeout`` for every blocking call."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def open_session(port: int, timeout=10) -> tuple[socket.socket, bytes]:
    """A raw socket past its 101, and any bytes read after it (frames follow the 101, RFC 6455 4.1)."""
    sock = connect(port, timeout)
    sock.sendall(UPGRADE)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head[:200])
    return sock, rest


def recv_frame(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """The next server frame (opcode, payload); ``buffer`` keeps bytes read past it."""
    def need(n):
        while len(buffer) < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed mid-frame")
            buffer.extend(chunk)

    need(2)
    n, start = buffer[1] & 0x7F, 2
    if n == 126:
        need(4)
        n, start = struct.unpack("!H", buffer[2:4])[0], 4
    elif n == 127:
        need(10)
        n, start = struct.unpack("!Q", buffer[2:10])[0], 10
    need(start + n)
    opcode, payload = buffer[0] & 0x0F, bytes(buffer[start:start + n])
    del buffer[:start + n]
    return opcode, payload


def read_all(sock: socket.socket, timeout=10) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection."""
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = sock.recv(1 << 18)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out


def parse_server_frames(data: bytes, strict=False) -> list[tuple[int, bytes]] | None:
    """A server's byte stream as (opcode, payload) pairs; None if anything is malformed
    (``strict``: an AssertionError saying what)."""

    def malformed(why: str) -> None:
        if strict:
            raise AssertionError(why)

    frames, i = [], 0
    while i < len(data):
        if len(data) - i < 2:
            return malformed(f"truncated frame header at {i}: {data[i:]!r}")
        if data[i] & 0x70 or data[i + 1] & 0x80:
            return malformed(f"server frame with RSV or mask bits: {data[i:i + 2]!r}")
        n, i, opcode = data[i + 1] & 0x7F, i + 2, data[i] & 0x0F
        if n == 126:
            n, i = struct.unpack("!H", data[i:i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack("!Q", data[i:i + 8])[0], i + 8
        if len(data) - i < n:
            return malformed("truncated frame payload")
        frames.append((opcode, data[i:i + n]))
        i += n
    return frames


# --- random frames ----------------------------------------------------------------------


def rand_text(rng: random.Random, size=12) -> str:
    alphabets = ["abc", "\"\\{}[]:,", "é✓€😀", "\x00\x1f\x7f", "\ud800\udfff"]
    return "".join(rng.choice(rng.choice(alphabets)) for _ in range(rng.randint(0, size)))


def rand_json(rng: random.Random, depth=0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 72, 255, 258, 259, 2**31, 2**63, 2**200, -2**70])
    if kind == 3:
        return rng.choice([0.0, 72.9, -1.5, 1e308, float("inf"), float("nan")])
    if kind in (4, 5):
        return rand_text(rng)
    if kind in (6, 7):
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rand_text(rng, 6): rand_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def rand_tokens(rng: random.Random):
    kind = rng.randrange(8)
    if kind == 0:
        return [rng.randint(0, 258) for _ in range(rng.randint(1, 50))]
    if kind == 1:
        return [rng.choice([rng.randint(0, 300), -1, 1.5, True, None, "72", [72], {}]) for _ in range(rng.randint(0, 8))]
    if kind == 2:
        value = [72]
        for _ in range(rng.randint(1, 60)):
            value = [value]
        return value
    if kind == 3:
        return rng.choice([[], [[]], {"input_ids": [72]}, {"ids": [1]}, "Hi", 72, None])
    if kind == 4:
        return [[rng.randint(0, 258) for _ in range(3)] for _ in range(rng.randint(1, 4))]
    if kind == 5:  # valid ids, one past the embedded vocabulary: EXECUTION_ERROR
        return [rng.randint(0, 255), rng.choice([259, 4000, 2**40])]
    return rand_json(rng)


def deep(rng: random.Random) -> str:
    depth = rng.choice([31, 32, 33, 500, 990, 1000, 3000, 50_000])
    inner = "[" * depth + "1" + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
    return rng.choice([
        "[" * depth, '{"a":' * depth, '{"type":%s}' % inner, '{"type":"state","data":{"x":%s}}' % inner,
        '{"type":"step","data":{"tokens":[1],"metadata":{"m":%s}}}' % inner,
        '{"type":"step","data":{"tokens":%s}}' % ("[" * depth + "72" + "]" * depth),
    ])


def rand_frame(rng: random.Random, surrogates=True):
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 64))
    if kind == 1:
        value = rand_text(rng, 40)
        return value if surrogates else value.encode("utf-8", "ignore").decode()
    if kind == 2:
        return json.dumps(rand_json(rng))
    if kind == 3:
        return deep(rng)
    if kind == 4:  # a valid frame with one character changed
        base = rng.choice(['{"type":"step","data":{"tokens":[72,105],"metadata":{}}}', '{"type":"state"}',
                           '{"type":"reset","data":{"seed":1,"episode_id":"e"}}'])
        i = rng.randrange(len(base))
        return base[:i] + rng.choice(['"', "{", "]", ",", "x", "", "\\", "\u2713"]) + base[i + 1:]
    message = {"type": rng.choice(TYPES[:3] + ("close", "bogus", "", None, 7, ["step"]))}
    if message["type"] == "step":
        message["data"] = {"tokens": rand_tokens(rng)}
        if rng.random() < 0.3:
            message["data"]["metadata"] = rand_json(rng)
        if rng.random() < 0.1:
            message["data"]["x" * rng.randint(1, 500)] = 1
    elif message["type"] == "reset" and rng.random() < 0.7:
        message["data"] = {k: v for k, v in {
            "seed": rng.choice([None, 1, "1", 1.5, True]), "episode_id": rng.choice([None, "e", 5, "x" * 300]),
            "chatenv_delta": rng.choice([True, False, 1]), "junk": rand_json(rng)}.items() if rng.random() < 0.6}
    elif rng.random() < 0.5:
        message["data"] = rand_json(rng)
    if rng.random() < 0.05:
        message[rand_text(rng, 4)] = 1
    return json.dumps(message)


def state_of(session: Session) -> dict:
    """The session's state, as a "state" request answers it."""
    return handle_frame(session, '{"type":"state"}').json()["data"]


def phase_pure_fuzz(rng: random.Random, count: int) -> dict:
    codes: dict = {}
    session = Session(chatenv.ChatEnvironment)
    started = time.monotonic()
    for i in range(count):
        before = state_of(session)
        data = rand_frame(rng)
        result = handle_frame(session, data)
        if result.parts is None:
            check(result.close, f"pure: no reply and no close for {str(data)[:80]!r}")
            codes["close"] = codes.get("close", 0) + 1
            session = Session(chatenv.ChatEnvironment)
            continue
        reply = result.json()
        outcome = reply["data"]["code"] if reply["type"] == "error" else reply["type"]
        codes[outcome] = codes.get(outcome, 0) + 1
        if reply["type"] == "error":
            check(outcome in RECOVERABLE and not result.close, f"pure: {outcome} for {str(data)[:80]!r}")
            check(len(reply["data"]["message"]) <= 300, f"pure: long error message for {str(data)[:80]!r}")
            check(state_of(session) == before, f"pure: refused frame changed the state {str(data)[:80]!r}")
        else:
            check(reply["type"] in ("observation", "state") and not result.close, f"pure: {reply['type']}")
        if i % 10 == 0:  # and the session still answers a valid step correctly
            before = state_of(session)
            step = handle_frame(session, '{"type":"step","data":{"tokens":[72,105]}}').json()
            after = state_of(session)
            check(step["type"] == "observation" and after["history_tokens"] == before["history_tokens"] + [[72, 105]]
                  and after["step_count"] == before["step_count"] + 1, "pure: valid step after garbage")
    return {"frames": count, "seconds": time.monotonic() - started, "outcomes": codes}


def phase_socket_fuzz(rng: random.Random, logdir: str, frames: int, wire_sessions: int) -> dict:
    server = ServerProcess(logdir, "fuzz", max_message_bytes=1 << 20)
    codes: dict = {}
    close_codes: dict = {}
    try:
        sock, rest = open_session(server.port)
        buffer = bytearray(rest)
        sessions = 1
        for _ in range(frames):
            data = rand_frame(rng, surrogates=False)
            payload = data if isinstance(data, bytes) else data.encode()
            sock.sendall(frame(payload, opcode=2 if isinstance(data, bytes) else 1, rng=rng))
            try:
                opcode, reply = recv_frame(sock, buffer)
            except ConnectionError:
                opcode, reply = 8, b""
            if opcode == 8:
                expected = handle_frame(Session(chatenv.ChatEnvironment), data)
                check(expected.close and expected.parts is None, f"socket: closed after {str(data)[:80]!r}")
                codes["close"] = codes.get("close", 0) + 1
                sock.close()
                sock, rest = open_session(server.port)
                buffer, sessions = bytearray(rest), sessions + 1
                continue
            message = json.loads(reply)
            outcome = message["data"]["code"] if message["type"] == "error" else message["type"]
            codes[outcome] = codes.get(outcome, 0) + 1
            check(outcome in RECOVERABLE | {"observation", "state"}, f"socket: {outcome} for {str(data)[:80]!r}")
            sock.sendall(text({"type": "step", "data": {"tokens": [72]}}))
            check(json.loads(recv_frame(sock, buffer)[1])["type"] == "observation", "socket: valid step after garbage")
        sock.close()
        for _ in range(wire_sessions):  # raw bytes after the handshake
            sock, rest = open_session(server.port)
            chunks = []
            for _ in range(rng.randint(1, 4)):
                kind = rng.randrange(4)
                if kind == 0:
                    chunks.append(rng.randbytes(rng.randint(0, 64)))
                elif kind == 1:
                    chunks.append(frame(rng.randbytes(rng.randint(0, 200)), rng.randrange(16), rng.random() < 0.7,
                                        rng.randrange(8) if rng.random() < 0.3 else 0, rng.random() < 0.9, rng))
                elif kind == 2:
                    chunks.append(frame(b'{"type":', 1, False, rng=rng) + frame(b"p", 9, rng=rng)
                                  + frame(b'"state"}', 0, rng=rng))
                else:
                    chunks.append(frame(struct.pack("!H", rng.randrange(65536)) + rng.randbytes(5), 8, rng=rng))
            sock.sendall(text({"type": "reset"}) + b"".join(chunks))
            sock.shutdown(socket.SHUT_WR)
            parsed = parse_server_frames(rest + read_all(sock))
            sock.close()
            if not check(parsed is not None and len(parsed) > 0, "wire: malformed or empty server stream"):
                continue
            for opcode, payload in parsed:
                check(opcode in (1, 8, 10), f"wire: server sent opcode {opcode}")
                if opcode == 8:
                    code = struct.unpack("!H", payload[:2])[0] if payload else None
                    close_codes[code] = close_codes.get(code, 0) + 1
                elif opcode == 1:
                    message = json.loads(payload)
                    check(message["type"] != "error" or message["data"]["code"] in RECOVERABLE, "wire: error code")
        check(wait_until(lambda: server.active() == 0), "socket fuzz: sessions left behind")
        log = server.output()
        check("Traceback" not in log and " ERROR " not in log, "socket fuzz: traceback in the log")
    finally:
        server.stop()
    return {"frames": frames, "sessions": sessions, "wire_sessions": wire_sessions, "outcomes": codes,
            "close_codes": close_codes}


# --- churn ------------------------------------------------------------------------------------

CHURN_MODES = {  # share of the sessions, batch size
    "rst": (0.35, 50), "fin": (0.35, 50), "half-open": (0.12, 50), "mid-frame": (0.08, 50),
    "mid-handshake": (0.06, 50), "silent": (0.03, 60), "not-reading": (0.01, 24),
}


def churn_batch(port: int, mode: str, count: int, held: list, timeout=10) -> None:
    """Open ``count`` sessions (each answers a reset), then make each vanish by ``mode``.
    Sockets the server must let go of by itself are appended to ``held``."""
    socks = []
    try:
        for _ in range(count):
            sock = connect(port, timeout)
            socks.append(sock)
            sock.sendall(UPGRADE[:40] if mode == "mid-handshake" else UPGRADE)
        if mode == "mid-handshake":
            return
        reset = text({"type": "reset"})
        for sock in socks:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(head[:200])
            sock.sendall(reset)
            while b'"done":false}}' not in rest:
                chunk = sock.recv(65536)
                if not chunk or b"CAPACITY_REACHED" in rest:
                    raise ConnectionError(f"no reset reply: {rest[:200]!r}")
                rest += chunk
        for sock in socks:
            if mode == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == "half-open":
                sock.shutdown(socket.SHUT_WR)  # EOF without a close frame; we keep reading
            elif mode == "mid-frame":
                sock.sendall(text({"type": "state"})[:5])
            elif mode == "not-reading":  # pipeline steps whose replies grow, never read them
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                step = text({"type": "step", "data": {"tokens": [65] * 4000}})
                sock.setblocking(False)
                try:
                    for _ in range(200):
                        sock.send(step)
                except BlockingIOError:
                    pass
    finally:
        if mode in ("half-open", "silent", "not-reading"):
            held.extend(socks)
        else:
            for sock in socks:
                sock.close()


def churn_mode(server: ServerProcess, mode: str, count: int, batch: int, timeout=20, sock_timeout=10) -> bool:
    """Churn ``count`` sessions by ``mode``, ``batch`` at a time; True once the server
    holds no session (waiting up to ``timeout`` s) while the held sockets are still open."""
    held: list = []
    try:
        for done in range(0, count, batch):
            churn_batch(server.port, mode, min(batch, count - done), held, timeout=sock_timeout)
            if mode in ("silent", "not-reading"):  # the server must drop each batch itself
                if not wait_until(lambda: server.active() == 0, timeout=20):
                    break
                while held:
                    held.pop().close()
        # the server lets go of these by itself: EOF, keepalive, send timeout
        return wait_until(lambda: server.active() == 0, timeout=timeout)
    finally:
        for sock in held:
            sock.close()


def churn_round(server: ServerProcess, total: int, modes) -> int:
    churned = 0
    for mode in modes:
        share, batch = CHURN_MODES[mode]
        count = max(batch, int(total * share))
        check(churn_mode(server, mode, count, batch), f"churn: {mode} sessions not freed")
        if mode != "mid-handshake":
            churned += count
    return churned


def phase_churn(logdir: str, total: int, max_sessions=128) -> dict:
    server = ServerProcess(logdir, "churn", max_sessions=max_sessions, ping_interval_s=0.3, ping_timeout_s=0.3,
                           send_timeout_s=0.5, open_timeout_s=0.5)
    cheap = [m for m in CHURN_MODES if m != "not-reading"]
    try:
        rss_start = server.rss_kb()
        warm = churn_round(server, total // 4, cheap)
        fds_before, rss_before = server.fds(), server.rss_kb()
        started = time.monotonic()
        rounds = []
        churned = 0
        for _ in range(3):  # three rounds: a leak grows every round, a working set does not
            churned += churn_round(server, total // 3, cheap)
            rounds.append(server.rss_kb())
        churned += churn_round(server, total // 3, ["not-reading"])
        seconds = time.monotonic() - started
        check(wait_until(lambda: server.active() == 0), "churn: sessions counted after churn")
        check(wait_until(lambda: server.fds() <= fds_before), f"churn: fds {server.fds()} > {fds_before}")
        rss_after_stuck = server.rss_kb()
        check(rounds[-1] - rss_before < 4 * 1024, f"churn: RSS {rss_before} -> {rounds[-1]} kB")
        # full capacity, then refused
        socks = []
        try:
            for _ in range(max_sessions):
                sock, _ = open_session(server.port)
                socks.append(sock)
            extra, rest = open_session(server.port)
            buffer = bytearray(rest)
            check(b"CAPACITY_REACHED" in recv_frame(extra, buffer)[1], "churn: capacity + 1 not refused")
            extra.close()
            check(server.active() == max_sessions, "churn: capacity not fully available")
        finally:
            for sock in socks:
                sock.close()
        check(wait_until(lambda: server.active() == 0), "churn: capacity sessions not freed")
        log = server.output()
        opened, closed = log.count("session opened"), log.count("session closed")
        check(opened == closed == warm + churned + max_sessions, f"churn: opened {opened}, closed {closed}")
        check("Traceback" not in log and " ERROR " not in log, "churn: traceback in the log")
        return {"sessions": churned, "warm_up": warm, "seconds": seconds, "rss_start_kb": rss_start,
                "rss_before_kb": rss_before, "rss_rounds_kb": rounds, "rss_after_stuck_kb": rss_after_stuck,
                "fds_before": fds_before, "fds_after": server.fds()}
    finally:
        server.stop()


# --- shutdown -------------------------------------------------------------------------------------


def stuck_reader(port: int, sends=300, timeout=10) -> socket.socket:
    """A session that pipelines steps with growing replies and never reads one: buffers full."""
    sock, _ = open_session(port, timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    step = text({"type": "step", "data": {"tokens": [65] * 4000}})
    sock.setblocking(False)
    try:
        for _ in range(sends):
            sock.send(step)
    except BlockingIOError:
        pass
    return sock


def phase_shutdown(logdir: str, sessions: int, stuck: int, rounds: int) -> dict:
    times, closes = [], {}
    for r in range(rounds):
        server = ServerProcess(logdir, f"shutdown-{r}", max_sessions=sessions + stuck + 8)
        socks = []
        try:
            for _ in range(sessions):
                sock, rest = open_session(server.port)
                sock.sendall(text({"type": "reset"}) + text({"type": "step", "data": {"tokens": [72, 105]}}))
                buffer = bytearray(rest)
                recv_frame(sock, buffer)
                recv_frame(sock, buffer)
                socks.append((sock, buffer))
            # buffers full: the close frame cannot even be written
            stuck_socks = [stuck_reader(server.port) for _ in range(stuck)]
            check(wait_until(lambda: server.active() == sessions + stuck), "shutdown: sessions not open")
            elapsed = server.stop(signal.SIGTERM)
            check(elapsed is not None and elapsed < 1.0, f"shutdown: exit took {elapsed}")
            check(server.proc.returncode == 0, f"shutdown: exit status {server.proc.returncode}")
            times.append(elapsed if elapsed is not None else float("inf"))
            for sock, buffer in socks:
                sock.settimeout(5)
                try:
                    opcode, payload = recv_frame(sock, buffer)
                    code = struct.unpack("!H", payload[:2])[0] if opcode == 8 and payload else None
                except (ConnectionError, OSError):
                    code = None
                closes[code] = closes.get(code, 0) + 1
            for sock in stuck_socks:
                sock.close()
            log = server.output()
            check("Traceback" not in log and " ERROR " not in log, "shutdown: traceback in the log")
        finally:
            server.stop(signal.SIGKILL)
            for sock, _ in socks:
                sock.close()
    check(set(closes) == {1001}, f"shutdown: close codes {closes}")
    return {"rounds": rounds, "sessions_per_round": sessions, "stuck_per_round": stuck,
            "exit_seconds_max": max(times), "exit_seconds_mean": sum(times) / len(times), "close_codes": closes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: under a minute")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--frames", type=int, help="frames fuzzed at the protocol level")
    parser.add_argument("--socket-frames", type=int)
    parser.add_argument("--wire-sessions", type=int)
    parser.add_argument("--churn", type=int, help="sessions churned")
    parser.add_argument("--shutdown-sessions", type=int)
    args = parser.parse_args(argv)
    q = args.quick
    frames = args.frames or (10_000 if q else 100_000)
    socket_frames = args.socket_frames or (1_000 if q else 10_000)
    wire_sessions = args.wire_sessions or (300 if q else 3_000)
    churn = args.churn or (3_000 if q else 20_000)
    shutdown_sessions = args.shutdown_sessions or (50 if q else 200)
    rng = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="chatenv-soak-") as logdir:
        for name, run in [
            ("pure fuzz", lambda: phase_pure_fuzz(rng, frames)),
            ("socket fuzz", lambda: phase_socket_fuzz(rng, logdir, socket_frames, wire_sessions)),
            ("churn", lambda: phase_churn(logdir, churn)),
            ("shutdown", lambda: phase_shutdown(logdir, shutdown_sessions, 4, 3 if q else 5)),
        ]:
            print(f"{name} ...", flush=True)
            started = time.monotonic()
            try:
                results[name] = run()
            except Exception as exc:  # noqa: BLE001 - reported, and the run fails
                FAILURES.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"  FAIL: {name}: {type(exc).__name__}: {exc}", flush=True)
                continue
            print(f"  {json.dumps(results[name], default=str)}  ({time.monotonic() - started:.1f} s)", flush=True)
    print()
    print("| phase | numbers |")
    print("| --- | --- |")
    if "pure fuzz" in results:
        r = results["pure fuzz"]
        print(f"| pure fuzz | {r['frames']} frames in {r['seconds']:.1f} s; outcomes {r['outcomes']} |")
    if "socket fuzz" in results:
        r = results["socket fuzz"]
        print(f"| socket fuzz | {r['frames']} frames over {r['sessions']} sessions, outcomes {r['outcomes']}; "
              f"{r['wire_sessions']} raw-byte sessions, close codes {r['close_codes']} |")
    if "churn" in results:
        r = results["churn"]
        print(f"| churn | {r['sessions']} sessions (+{r['warm_up']} warm-up) in {r['seconds']:.1f} s; RSS start "
              f"{r['rss_start_kb']} kB, before {r['rss_before_kb']} kB, after each round {r['rss_rounds_kb']} kB, "
              f"after stuck clients {r['rss_after_stuck_kb']} kB; fds {r['fds_before']} -> {r['fds_after']} |")
    if "shutdown" in results:
        r = results["shutdown"]
        print(f"| shutdown | {r['rounds']} x ({r['sessions_per_round']} sessions + {r['stuck_per_round']} stuck): "
              f"exit max {r['exit_seconds_max']:.3f} s, mean {r['exit_seconds_mean']:.3f} s; close codes "
              f"{r['close_codes']} |")
    print()
    print("FAILED: " + "; ".join(FAILURES) if FAILURES else "all checks held")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
