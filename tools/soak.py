"""Soak chatenv: fuzz, churn and shutdown at larger counts than the tests, with numbers.

    python tools/soak.py            # a few minutes
    python tools/soak.py --quick    # under a minute
    python tools/soak.py --seed 7 --churn 30000 --frames 100000

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
   with 1012 (as OpenEnv's uvicorn does) and the process gone within a second.
5. memory bound (alone with ``--memory-only``): sessions at 1-token and large steps
   drive episodes to their limits against a small ``max_memory_bytes``; steps
   and newcomers are refused, resets free memory, and peak RSS is printed
   against the bound.

6. attacks (alone with ``--attacks``; one with ``--phase NAME``): stalled handshakes
   under ``nofile=1024`` (held, and reopened as fast as they are dropped), 1 MiB of
   headers per connection, one-byte and empty fragments, four clients pulling the
   state of 10 MiB episodes, a 20 MB message from a websockets client on the
   server's CPU, floods of refusals and churn against the log, a server on uvloop,
   sessions stalled just short of 15 MiB frames; each figure is printed beside its
   target. ``--baseline DIR`` serves from the chatenv.py in DIR (an older one) for
   before/after figures.

Needs only chatenv, websockets and tests/support.py (uvloop for its phase); the raw
sockets and server subprocesses it shares with the tests live in tests/support.py. Exit status 0 when every check held.
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
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / part) for part in ("", "tests")]  # chatenv, support
import chatenv  # noqa: E402
from chatenv import Session, handle_frame  # noqa: E402

from support import (  # noqa: E402
    OVERSIZE_CLIENT,
    RECOVERABLE,
    TYPES,
    UPGRADE,
    ServerProcess,
    answer_head,
    churn_mode,
    connect,
    count_logged,
    frame,
    legit_round_trip,
    open_session,
    parse_server_frames,
    read_all,
    recv_frame,
    state_of,
    stuck_reader,
    text,
    upgrade_request,
    wait_until,
)

HERE = Path(chatenv.__file__).resolve().parent
FAILURES: list[str] = []


# ------------------------------------------------------------------------------
# Checks: every failure is listed, and the exit status says whether any held
# ------------------------------------------------------------------------------


def check(condition: bool, what: str) -> bool:
    """Record ``what`` as a failure unless ``condition`` holds (the run goes on)."""
    if not condition:
        FAILURES.append(what)
        print(f"  FAIL: {what}", flush=True)
    return condition


# ------------------------------------------------------------------------------
# Random frames: every shape, for the fuzz phases
# ------------------------------------------------------------------------------


def rand_text(rng: random.Random, size=12) -> str:
    """Up to ``size`` characters from mixed alphabets: JSON syntax, non-ASCII, controls, lone surrogates."""
    alphabets = ["abc", "\"\\{}[]:,", "é✓€😀", "\x00\x1f\x7f", "\ud800\udfff"]
    return "".join(rng.choice(rng.choice(alphabets)) for _ in range(rng.randint(0, size)))


def rand_json(rng: random.Random, depth=0):
    """A random JSON value, nested up to three levels."""
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
    """A token list of some shape: valid, with bad ids, nested, too deep, or not a list at all."""
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
    """Deeply nested JSON (at, just past and far past the depth limit), unterminated or placed
    where the protocol reads."""
    depth = rng.choice([31, 32, 33, 500, 990, 1000, 3000, 50_000])
    inner = "[" * depth + "1" + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
    return rng.choice([
        "[" * depth, '{"a":' * depth, '{"type":%s}' % inner, '{"type":"state","data":{"x":%s}}' % inner,
        '{"type":"step","data":{"tokens":[1],"metadata":{"m":%s}}}' % inner,
        '{"type":"step","data":{"tokens":%s}}' % ("[" * depth + "72" + "]" * depth),
    ])


def rand_frame(rng: random.Random, surrogates=True):
    """A random frame for the protocol: bytes, text, or a request of any type with random fields."""
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


def phase_pure_fuzz(rng: random.Random, count: int) -> dict:
    """Phase 1: ``count`` random frames through ``handle_frame``; every reply one the protocol allows."""
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
    """Phase 2: random frames over real sessions, then random wire bytes after the handshake."""
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


# ------------------------------------------------------------------------------
# Churn: sessions that vanish without a close frame
# ------------------------------------------------------------------------------


CHURN_MODES = {  # share of the sessions, batch size
    "rst": (0.35, 50), "fin": (0.35, 50), "half-open": (0.12, 50), "mid-frame": (0.08, 50),
    "mid-handshake": (0.06, 50), "silent": (0.03, 60), "not-reading": (0.01, 24),
}


def churn_round(server: ServerProcess, total: int, modes) -> int:
    """Churn ``total`` sessions spread over ``modes``; how many sessions (not handshakes) were churned."""
    churned = 0
    for mode in modes:
        share, batch = CHURN_MODES[mode]
        count = max(batch, int(total * share))
        check(churn_mode(server, mode, count, batch), f"churn: {mode} sessions not freed")
        if mode != "mid-handshake":
            churned += count
    return churned


def phase_churn(logdir: str, total: int, max_sessions=128) -> dict:
    """Phase 3: rounds of churn; then zero sessions, descriptors back, RSS compared, full capacity, a clean log."""
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
        fds_after = server.fds()
        server.stop()  # lines held back by the log's rate limit are counted as it stops
        log = server.output()
        opened, closed = count_logged(log, "session opened"), count_logged(log, "session closed")
        check(opened == closed == warm + churned + max_sessions, f"churn: opened {opened}, closed {closed}")
        check("Traceback" not in log and " ERROR " not in log, "churn: traceback in the log")
        return {"sessions": churned, "warm_up": warm, "seconds": seconds, "rss_start_kb": rss_start,
                "rss_before_kb": rss_before, "rss_rounds_kb": rounds, "rss_after_stuck_kb": rss_after_stuck,
                "fds_before": fds_before, "fds_after": fds_after}
    finally:
        server.stop()


# ------------------------------------------------------------------------------
# Shutdown: SIGTERM with sessions mid-episode, some stuck
# ------------------------------------------------------------------------------


def phase_shutdown(logdir: str, sessions: int, stuck: int, rounds: int) -> dict:
    """Phase 4: SIGTERM with sessions mid-episode, some stuck; each closed with 1012, the process gone fast."""
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
    check(set(closes) == {1012}, f"shutdown: close codes {closes}")
    return {"rounds": rounds, "sessions_per_round": sessions, "stuck_per_round": stuck,
            "exit_seconds_max": max(times), "exit_seconds_mean": sum(times) / len(times), "close_codes": closes}


# ------------------------------------------------------------------------------
# Memory bound: episodes driven to their limits under max_memory_bytes
# ------------------------------------------------------------------------------

# Sessions drive episodes to their limits against a server with a small memory bound
# (--max-memory-bytes): the bound refuses steps and newcomers, resets free memory, and
# the server's peak RSS (VmHWM) stays under the bound plus a fixed overhead (the idle
# process and what is in flight)

MEMORY_KINDS = (  # (name, tokens a step, requests in flight, delta replies, sessions for each 64 MiB)
    ("1-token", 1, 32, True, 1), ("4096-token", 4096, 2, True, 12), ("4096-token full", 4096, 1, False, 1),
    ("65536-token", 65536, 1, True, 2),
)  # one episode holds at most 2^20 tokens (about 7.7 MB at large steps): 11 large sessions outgrow 64 MiB
_OBSERVATION = b'{"type":"observation"'


async def _read_message(reader) -> bytes:
    """One whole server message (a large one may come in fragments)."""
    pieces = []
    while True:
        head = await reader.readexactly(2)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await reader.readexactly(8))[0]
        pieces.append(await reader.readexactly(size))
        if head[0] & 0x0F == 8:
            raise ConnectionError(f"closed by the server: {pieces[-1][:2]!r}")
        if head[0] & 0x80:
            return b"".join(pieces)


async def _memory_open(port: int):
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
    writer.write(UPGRADE)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head[:200])
    return reader, writer


async def _memory_session(port: int, kind, stats: dict, stop_at: float, rng: random.Random) -> None:
    import asyncio

    name, size, depth, delta, _ = kind
    steps = [text({"type": "step", "data": {"tokens": [rng.randrange(256) for _ in range(size)]}}) for _ in range(4)]
    reset = text({"type": "reset", "data": {"chatenv_delta": delta}})
    reader, writer = await _memory_open(port)
    count = stats[name]
    try:
        writer.write(reset)
        await _read_message(reader)
        held = 0  # steps in this episode
        while time.monotonic() < stop_at:
            writer.write(b"".join(steps[(held + i) % 4] for i in range(depth)))
            full = False
            for _ in range(depth):
                data = await _read_message(reader)
                if data.startswith(_OBSERVATION):  # a full one may be megabytes: not parsed
                    count["steps"] += 1
                    held += 1
                    continue
                message = json.loads(data)["data"]["message"]
                if "--max-memory-bytes" in message:
                    count["memory refusals"] += 1
                    full = True
                elif "limit of" in message:
                    count["episode limits"] += 1
                    full = True
                else:
                    count["unexpected"] += 1
                    stats["unexpected"].append(message[:200])
            if full:
                await asyncio.sleep(0.3)  # hold the episode a while: the server stays full, newcomers are refused
                if count["memory refusals"] % 4 == 1:  # sometimes read the whole episode back first
                    writer.write(text({"type": "state"}))
                    state = await _read_message(reader)
                    count["states"] += 1
                    step_count = re.search(rb'"step_count":(\d+)', state[:400])
                    if not state.startswith(b'{"type":"state"') or int(step_count.group(1)) != held:
                        stats["unexpected"].append(f"{name}: state {state[:120]!r}, {held} steps sent")
                writer.write(reset)
                await _read_message(reader)
                count["resets"] += 1
                held = 0
            await asyncio.sleep(0)
    finally:
        writer.close()


async def _memory_newcomers(port: int, stats: dict, stop_at: float) -> None:
    """Open a new session now and then: admitted (then closed) or refused for memory."""
    import asyncio

    while time.monotonic() < stop_at:
        reader, writer = await _memory_open(port)
        writer.write(text({"type": "reset"}))
        answer = json.loads(await _read_message(reader))
        if answer["type"] == "observation":
            stats["newcomers"]["admitted"] += 1
        elif answer["data"]["code"] == "CAPACITY_REACHED" and "--max-memory-bytes" in answer["data"]["message"]:
            stats["newcomers"]["refused for memory"] += 1
        else:
            stats["unexpected"].append(f"newcomer: {answer}")
        writer.close()
        await asyncio.sleep(0.2)


def phase_memory(logdir: str, seconds: float, bound_mib: int, seed: int) -> dict:
    """Phase 5: sessions drive episodes against a small memory bound for ``seconds``; peak RSS against it."""
    import asyncio

    bound = bound_mib * 2**20
    stats: dict = {kind[0]: dict.fromkeys(("steps", "memory refusals", "episode limits", "states", "resets",
                                           "unexpected"), 0) for kind in MEMORY_KINDS}
    stats.update(newcomers={"admitted": 0, "refused for memory": 0}, unexpected=[])
    cli = ["--port", "0", "--max-memory-bytes", str(bound)]  # as deployments run it
    with ServerProcess(logdir, "memory", cli=cli) as server:
        idle_kb = server.rss_kb()

        async def drive() -> None:
            stop_at = time.monotonic() + seconds
            rng = random.Random(seed)
            runs = [_memory_session(server.port, kind, stats, stop_at, random.Random(rng.random()))
                    for kind in MEMORY_KINDS for _ in range(max(1, kind[4] * bound_mib // 64))]
            # a reply that never comes fails the phase rather than hanging it
            await asyncio.wait_for(asyncio.gather(_memory_newcomers(server.port, stats, stop_at), *runs),
                                   seconds + 60)
            stats["sessions"] = len(runs)

        asyncio.run(drive())
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
        alive = server.proc.poll() is None
        log = server.output()
    sessions = stats["sessions"]
    check(alive, "memory: the server is still running")
    check("Traceback" not in log, "memory: no traceback in the server log")
    check(not stats["unexpected"], f"memory: unexpected replies {stats['unexpected'][:3]}")
    check(sum(stats[k[0]]["memory refusals"] for k in MEMORY_KINDS) > 0, "memory: the bound was reached")
    check(stats["newcomers"]["admitted"] > 0, "memory: a newcomer was admitted after resets freed memory")
    overhead_kb = peak_kb - bound // 1024
    return {"bound_mib": bound_mib, "sessions": sessions, "seconds": seconds, "idle_rss_kb": idle_kb,
            "peak_rss_kb": peak_kb, "peak_over_bound_kb": overhead_kb,
            "by_kind": {k[0]: stats[k[0]] for k in MEMORY_KINDS}, "newcomers": stats["newcomers"]}


# ------------------------------------------------------------------------------
# Attacks: clients that try to exhaust the server, each figure beside its target
# ------------------------------------------------------------------------------


def quantile(values, q: float) -> float:
    """The ``q`` quantile of ``values`` (NaN if there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def stall_connections(port: int, count: int, reopen: bool, stop, counts, partial=UPGRADE[:60]) -> None:
    """Hold ``count`` connections in the handshake (``partial`` of a request sent, then
    nothing); with ``reopen``, open a new one for each the server drops (a flood).
    ``counts[0]`` counts drops. Runs in a child process until ``stop`` is set."""
    import selectors

    selector = selectors.DefaultSelector()

    def open_one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE)

    for _ in range(count):
        open_one()
    while not stop.is_set():
        for key, events in selector.select(0.1):
            sock = key.fileobj
            try:
                if events & selectors.EVENT_WRITE:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise ConnectionError
                    sock.send(partial)
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                if sock.recv(65536):
                    continue
            except OSError:
                pass
            selector.unregister(sock)
            sock.close()
            counts[0] += 1
            if reopen:
                open_one()
    for key in list(selector.get_map().values()):
        key.fileobj.close()


def start_child(target, *args):
    """``target(*args, stop, counts)`` in a forked child process; returns (process, stop, counts)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    stop, counts = context.Event(), context.Array("l", 4)
    process = context.Process(target=target, args=(*args, stop, counts), daemon=True)
    process.start()
    return process, stop, counts


def phase_stalled_handshakes(logdir: str, stalled: int, reopen: bool, probes: int, window_s: float,
                             **options) -> dict:
    """Stalled handshakes under a small file-descriptor limit, while a client keeps trying to get in."""
    server = ServerProcess(logdir, f"stalled-{reopen}-{options.get('max_handshakes', 'default')}", nofile=1024,
                           **options)
    try:
        log_before, cpu_before, started = len(server.output()), server.cpu_s(), time.monotonic()
        attacker, stop, counts = start_child(stall_connections, server.port, stalled, reopen)
        time.sleep(min(2.0, window_s / 2))  # let the attack fill the server (counted in the figures)
        trips = []
        while (time.monotonic() - started < window_s or len(trips) < probes) and time.monotonic() - started < 60:
            trips.append(legit_round_trip(server.port))
            time.sleep(0.05)
        seconds = time.monotonic() - started
        cpu, grown = server.cpu_s() - cpu_before, server.output()[log_before:]
        # what the attack made the server log: not the probes' own session lines
        log_growth = sum(len(line) + 1 for line in grown.splitlines() if "session opened" not in line
                         and "session closed" not in line)
        fds = server.fds()
        exit_s = server.stop(signal.SIGTERM)
        stop.set()
        attacker.join(10)
        log = server.output()
        return {"stalled": stalled, "reopened": reopen, "probes": len(trips), "p50_s": quantile(trips, 0.5), "p95_s": quantile(trips, 0.95),
                "failed": sum(t >= 10.0 for t in trips), "log_bytes_per_s": log_growth / seconds,
                "cpu_percent": 100 * cpu / seconds, "sigterm_exit_s": exit_s, "server_fds": fds,
                "dropped_by_server": counts[0], "tracebacks": log.count("Traceback")}
    finally:
        server.stop(signal.SIGKILL)


def phase_big_headers(logdir: str, connections: int, header_bytes: int) -> dict:
    """Connections that each send ``header_bytes`` of header lines and never end the request."""
    server = ServerProcess(logdir, "big-headers")
    socks = []
    try:
        rss_before = server.rss_kb()
        line = b"X-Pad: " + b"a" * 8000 + b"\r\n"  # under websockets' 8 KiB line limit
        head = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line * (header_bytes // len(line))
        answered = 0
        for _ in range(connections):
            sock = connect(server.port)
            socks.append(sock)
            try:
                sock.sendall(head)
            except OSError:  # the server answered and closed before it had all of it
                pass
        time.sleep(1.0)
        rss_after = server.rss_kb()
        for sock in socks:
            sock.settimeout(0.5)
            try:
                answered += sock.recv(64).startswith(b"HTTP/1.1 431")
            except OSError:
                pass
        return {"connections": connections, "header_bytes": len(head), "answered_431": answered,
                "rss_kb_per_connection": (rss_after - rss_before) / connections}
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def phase_fragments(logdir: str, tiny: int, big_mib: int) -> dict:
    """A message in one-byte fragments, a stream of empty continuation frames, a big fragmented message."""
    result = {"tracebacks": 0}
    for name, first, rest, count in (
        ("one_byte", b"x", b"x", tiny), ("empty", b"", b"", tiny),
        ("4k", b"x" * 4096, b"x" * 4096, big_mib * 256 - 1),
    ):
        server = ServerProcess(logdir, f"fragments-{name}")  # its own: RSS not recycled from another case
        try:
            sock, leftover = open_session(server.port)
            rss_before = server.rss_kb()
            stream = frame(first, 1, fin=False) + b"".join(frame(rest, 0, fin=False) for _ in range(min(count, 4096)))
            sent, code = 0, None
            try:
                sock.sendall(stream)
                sent = min(count, 4096)
                piece = b"".join(frame(rest, 0, fin=False) for _ in range(4096))
                while sent < count:
                    sock.sendall(piece)
                    sent += 4096
            except OSError:
                pass
            time.sleep(0.5)
            rss = server.rss_kb() - rss_before
            sock.settimeout(2)
            try:
                data = leftover + read_all(sock, 2)
                frames = parse_server_frames(data) or []
                closes = [p for op, p in frames if op == 8]
                code = struct.unpack("!H", closes[0][:2])[0] if closes else None
            except OSError:
                pass
            sock.close()
            payload = len(first) + len(rest) * sent
            result[name] = {"fragments_sent": sent + 1, "payload_bytes": payload, "rss_growth_kb": rss,
                            "close_code": code}
            check(wait_until(lambda: server.active() == 0), "fragments: sessions left behind")
            result["tracebacks"] += server.output().count("Traceback")
        finally:
            server.stop()
    return result


def pull_states(port: int, episode_bytes: int, stop, counts) -> None:
    """Grow an episode to ``episode_bytes`` of state, then ask for its state until ``stop``,
    reading each reply and discarding it (no parsing: the server, not this, is the bottleneck)."""
    sock, rest = open_session(port, 60)
    buffer = bytearray(rest)
    sock.sendall(text({"type": "reset", "data": {"chatenv_delta": True}}))
    recv_frame(sock, buffer)
    grown = 0
    while grown < episode_bytes:  # token 1 is "\\u0001" in the history, 8 bytes of state a token
        sock.sendall(text({"type": "step", "data": {"tokens": [1] * 200_000}}))
        recv_frame(sock, buffer)
        grown += 200_000 * 8
    counts[3] += 1
    request, scratch = text({"type": "state"}), memoryview(bytearray(1 << 20))
    while not stop.is_set():
        sock.sendall(request)
        head = sock.recv(2)
        while len(head) < 2:
            head += sock.recv(2 - len(head))
        length, extra = head[1] & 0x7F, {126: 2, 127: 8}.get(head[1] & 0x7F, 0)
        if extra:
            tail = b""
            while len(tail) < extra:
                tail += sock.recv(extra - len(tail))
            length = int.from_bytes(tail, "big")
        while length:
            got = sock.recv_into(scratch, min(length, len(scratch)))
            if not got:
                return
            length -= got
        counts[0] += 1
    sock.close()


def phase_amplification(logdir: str, pullers: int, episode_mib: int, window_s: float) -> dict:
    """Clients pulling the state of big episodes nonstop; another steps, others connect."""
    server = ServerProcess(logdir, "amplification", max_episode_tokens=None, max_memory_bytes=None)
    children = []
    try:
        for i in range(pullers):
            children.append(start_child(pull_states, server.port, episode_mib * 2**20))
        check(wait_until(lambda: all(c[2][3] for c in children), timeout=120), "amplification: episodes not grown")
        time.sleep(0.5)
        sock, rest = open_session(server.port)
        buffer = bytearray(rest)
        sock.sendall(text({"type": "reset"}))
        recv_frame(sock, buffer)
        steps, started = [], time.monotonic()
        pulled = sum(c[2][0] for c in children)
        while time.monotonic() - started < window_s:
            began = time.monotonic()
            sock.sendall(text({"type": "step", "data": {"tokens": [72]}}))
            recv_frame(sock, buffer)
            steps.append(time.monotonic() - began)
            time.sleep(0.01)
        pulled = sum(c[2][0] for c in children) - pulled
        seconds = time.monotonic() - started
        sock.close()
        newcomers = []
        for _ in range(30):
            newcomers.append(legit_round_trip(server.port))
            time.sleep(0.05)
        return {"pullers": pullers, "episode_mib": episode_mib, "step_p50_s": quantile(steps, 0.5),
                "step_p95_s": quantile(steps, 0.95), "newcomer_p50_s": quantile(newcomers, 0.5),
                "newcomer_p95_s": quantile(newcomers, 0.95),
                "states_per_s": pulled / seconds, "state_mb_per_s": pulled * episode_mib * 1.07 / seconds}
    finally:
        for process, stop, _ in children:
            stop.set()
        for process, _, _ in children:
            process.join(10)
            if process.is_alive():
                process.kill()
        server.stop()


def phase_oversize_close(logdir: str, rounds: int) -> dict:
    """A websockets asyncio client sends 20 MB over the 16 MiB limit, client and server on one CPU."""
    server = ServerProcess(logdir, "oversize", cpus={0})
    try:
        client = subprocess.run([sys.executable, "-c", OVERSIZE_CLIENT, f"ws://127.0.0.1:{server.port}/ws",
                                 str(rounds)], capture_output=True, text=True, timeout=60 * rounds,
                                preexec_fn=lambda: os.sched_setaffinity(0, {0}))
        outcomes = client.stdout.split("\n")[:rounds]
        return {"rounds": rounds, "closed_1009": sum(o == "ConnectionClosedError 1009" for o in outcomes),
                "outcomes": sorted(set(outcomes)), "tracebacks": server.output().count("Traceback")}
    finally:
        server.stop()


def phase_log_volume(logdir: str, attempts: int) -> dict:
    """Refusals of every kind and session churn, as fast as one client can make them."""
    result = {}
    token = "soak-token-5e1f"
    with ServerProcess(logdir, "logs-auth", auth_token=token) as server:
        before, started = server.log_path.stat().st_size, time.monotonic()
        for _ in range(attempts):
            answer_head(server.port, UPGRADE)
        result["auth"] = (server.log_path.stat().st_size - before, time.monotonic() - started)
    with ServerProcess(logdir, "logs", max_sessions=8) as server:
        for kind, headers in (("origin", b"Origin: https://evil.example\r\n"), ("host", None)):
            before, started = server.log_path.stat().st_size, time.monotonic()
            request = UPGRADE.replace(b"Host: 127.0.0.1", b"Host: rebound.example") if headers is None \
                else upgrade_request(headers)
            for _ in range(attempts):
                answer_head(server.port, request)  # a refusal (an older server may take it: then closed)
            result[kind] = (server.log_path.stat().st_size - before, time.monotonic() - started)
        check(wait_until(lambda: server.active() == 0), "logs: sessions left behind")
        before, started = server.log_path.stat().st_size, time.monotonic()
        for _ in range(attempts):  # sessions opened and closed at once
            sock, _ = open_session(server.port)
            sock.sendall(frame(struct.pack("!H", 1000), 8))
            read_all(sock, 5)
            sock.close()
        result["churn"] = (server.log_path.stat().st_size - before, time.monotonic() - started)
        held = [open_session(server.port)[0] for _ in range(8)]
        before, started = server.log_path.stat().st_size, time.monotonic()
        for _ in range(attempts):
            sock, rest = open_session(server.port)
            buffer = bytearray(rest)
            while recv_frame(sock, buffer)[0] != 8:  # CAPACITY_REACHED, then the server's close
                pass
            sock.sendall(frame(struct.pack("!H", 1000), 8))
            read_all(sock, 5)
            sock.close()
        result["capacity"] = (server.log_path.stat().st_size - before, time.monotonic() - started)
        for sock in held:
            sock.close()
        check(wait_until(lambda: server.active() == 0), "logs: sessions left behind")
    return {kind: {"attempts": attempts, "log_bytes": size, "seconds": round(seconds, 2),
                   "log_bytes_per_attempt": size / attempts} for kind, (size, seconds) in result.items()}


def phase_uvloop(logdir: str, sessions: int, steps: int) -> dict:
    """A server on uvloop: sessions, each a reset, a fragmented step and more steps."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {"skipped": "uvloop is not installed"}
    with ServerProcess(logdir, "uvloop", loop="uvloop") as server:
        ok, failed, started = 0, 0, time.monotonic()
        for _ in range(sessions):
            try:
                sock, rest = open_session(server.port, 5)
            except (OSError, ConnectionError):
                failed += 1
                if failed >= 3 and not ok:
                    break  # every connection fails: enough said
                continue
            with sock:
                buffer = bytearray(rest)
                sock.sendall(text({"type": "reset"}) + frame(b'{"type":"step",', 1, fin=False)
                             + frame(b'"data":{"tokens":[72]}}', 0))
                replies = [json.loads(recv_frame(sock, buffer)[1])["type"] for _ in range(2)]
                for _ in range(steps):
                    sock.sendall(text({"type": "step", "data": {"tokens": [65] * 400}}))
                    replies.append(json.loads(recv_frame(sock, buffer)[1])["type"])
                ok += set(replies) == {"observation"}
        seconds = time.monotonic() - started
        log = server.output()
    return {"sessions": sessions, "sessions_ok": ok, "steps_per_s": sessions * (steps + 2) / seconds,
            "errors": log.count("Traceback") + log.count(" ERROR ")}


def phase_buffered(logdir: str, sessions: int, frame_mib: int) -> dict:
    """Sessions that each send all but the last byte of a big frame, then stall."""
    with ServerProcess(logdir, "buffered") as server:
        rss_before = server.rss_kb()
        socks, codes = [], {}
        body = b"x" * (frame_mib * 2**20)
        whole = frame(body, 1)
        for _ in range(sessions):
            sock, _ = open_session(server.port)
            socks.append(sock)
            try:
                sock.sendall(whole[:-1])
            except OSError:
                pass
        time.sleep(1.0)
        rss_growth = server.rss_kb() - rss_before
        newcomer = legit_round_trip(server.port)
        for sock in socks:
            sock.settimeout(0.2)
            try:
                data = sock.recv(64)
                code = struct.unpack("!H", data[2:4])[0] if data[:1] == b"\x88" else None
            except OSError:
                code = None
            codes[code] = codes.get(code, 0) + 1
            sock.close()
        log = server.output()
    return {"sessions": sessions, "held_mib_offered": sessions * frame_mib, "rss_growth_mib": rss_growth / 1024,
            "close_codes": codes, "newcomer_s": newcomer, "tracebacks": log.count("Traceback")}


def attack_rows(results: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target) for each attack phase that ran."""
    rows = []

    def add(figure, value, target):
        rows.append((figure, value, target))

    for key, label in (("stalled", "held"), ("stalled flood", "each dropped one reopened at once"),
                       ("stalled flood, 256", "reopened, max_handshakes 256")):
        r = results.get(key)
        if r:
            add(f"{r['stalled']} stalled handshakes ({label}), nofile 1024: new client connect+reset+step p95",
                f"{r['p95_s']:.3f} s (p50 {r['p50_s']:.3f} s, {r['failed']}/{r['probes']} failed)", "<= 1 s")
            add("  same: server log growth (besides the new clients' session lines)",
                f"{r['log_bytes_per_s'] / 1024:.2f} KiB/s", "a few KB")
            add("  same: server CPU", f"{r['cpu_percent']:.0f} % ({r['dropped_by_server']} stalled connections "
                "dropped)", "no spinning")
            add("  same: SIGTERM to exit", f"{r['sigterm_exit_s']:.2f} s" if r['sigterm_exit_s'] else "killed",
                "<= 1 s")
    r = results.get("big headers")
    if r:
        add(f"{r['connections']} stalled handshakes of {r['header_bytes'] // 1024} KiB headers: RSS per connection",
            f"{r['rss_kb_per_connection']:.1f} KiB ({r['answered_431']} got 431)", f"<= {16 + 16} KiB")
    r = results.get("fragments")
    if r:
        one, empty, big = r["one_byte"], r["empty"], r["4k"]
        add(f"{one['fragments_sent']} one-byte fragments: RSS held", f"{one['rss_growth_kb']} KiB, close "
            f"{one['close_code']}", "closed (1009) before it costs memory")
        add(f"{empty['fragments_sent']} empty continuation frames", f"close {empty['close_code']}", "1009")
        add(f"{big['payload_bytes'] >> 20} MiB in 4 KiB fragments: RSS held / payload",
            f"{big['rss_growth_kb'] * 1024 / big['payload_bytes']:.2f}", "<= 2")
    r = results.get("amplification")
    if r:
        add(f"{r['pullers']} clients pulling {r['episode_mib']} MiB states: another client's step p95",
            f"{r['step_p95_s'] * 1000:.0f} ms (p50 {r['step_p50_s'] * 1000:.0f} ms; {r['state_mb_per_s']:.0f} MB/s "
            "of state out)", "<= 100 ms")
        add("  same: new client connect+reset+step p95",
            f"{r['newcomer_p95_s'] * 1000:.0f} ms (p50 {r['newcomer_p50_s'] * 1000:.0f} ms)", "<= 100 ms")
    r = results.get("oversize close")
    if r:
        add("websockets asyncio client sends 20 MB over 16 MiB, one CPU: ConnectionClosedError 1009",
            f"{r['closed_1009']}/{r['rounds']} ({'; '.join(r['outcomes'])})", f"{r['rounds']}/{r['rounds']}")
    r = results.get("log volume")
    if r:
        for kind, v in r.items():
            add(f"{v['attempts']} {kind} refusals or sessions in {v['seconds']} s: log bytes",
                f"{v['log_bytes']} ({v['log_bytes_per_attempt']:.1f} per attempt)", "a few lines a second")
    r = results.get("uvloop")
    if r:
        add("server on uvloop: sessions that worked",
            r.get("skipped") or f"{r['sessions_ok']}/{r['sessions']} ({r['steps_per_s']:.0f} steps/s, "
            f"{r['errors']} errors)", "all")
    r = results.get("buffered")
    if r:
        add(f"{r['sessions']} sessions stalled 1 byte short of a {r['held_mib_offered'] // r['sessions']} MiB frame: "
            "RSS growth", f"{r['rss_growth_mib']:.0f} MiB (offered {r['held_mib_offered']} MiB; closes "
            f"{r['close_codes']})", "<= max_buffered_bytes (256 MiB) + a little")
    return rows


def attack_phases(logdir: str, quick: bool) -> list[tuple[str, Any]]:
    """The attack phases by name, each a thunk returning its figures (smaller with ``quick``)."""
    stalled, window = (1100, 4.0) if not quick else (1100, 2.0)
    return [
        ("stalled", lambda: phase_stalled_handshakes(logdir, stalled, False, 10 if quick else 30, window)),
        ("stalled flood", lambda: phase_stalled_handshakes(logdir, stalled, True, 10 if quick else 30, window)),
        ("stalled flood, 256", lambda: phase_stalled_handshakes(logdir, stalled, True, 10 if quick else 30, window,
                                                                max_handshakes=256)),
        ("big headers", lambda: phase_big_headers(logdir, 50 if quick else 200, 2**20)),
        ("fragments", lambda: phase_fragments(logdir, 2**17 if quick else 2**20, 8)),
        ("amplification", lambda: phase_amplification(logdir, 4, 10, 4.0 if quick else 8.0)),
        ("oversize close", lambda: phase_oversize_close(logdir, 5)),
        ("log volume", lambda: phase_log_volume(logdir, 300 if quick else 2000)),
        ("uvloop", lambda: phase_uvloop(logdir, 20 if quick else 100, 20)),
        ("buffered", lambda: phase_buffered(logdir, 10 if quick else 24, 15)),
    ]


# ------------------------------------------------------------------------------
# Command line: the phases, their sizes, the report
# ------------------------------------------------------------------------------


def main(argv=None) -> int:
    """Run the phases the arguments choose, print each one's figures and every failed check; 0 if none failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: under a minute")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--frames", type=int, help="frames fuzzed at the protocol level")
    parser.add_argument("--socket-frames", type=int)
    parser.add_argument("--wire-sessions", type=int)
    parser.add_argument("--churn", type=int, help="sessions churned")
    parser.add_argument("--shutdown-sessions", type=int)
    parser.add_argument("--memory-only", action="store_true", help="run only the memory-bound phase")
    parser.add_argument("--memory-bound-mib", type=int, help="the memory phase's --max-memory-bytes, in MiB")
    parser.add_argument("--attacks", action="store_true", help="run only the attack phases (stalled handshakes, "
                        "fragments, amplification, oversize close, log volume, uvloop, buffered)")
    parser.add_argument("--phase", action="append", help="run only this phase (repeatable), e.g. 'stalled'")
    parser.add_argument("--baseline", type=Path, help="serve from the chatenv.py in this folder (an older one, "
                        "for before/after figures); options it lacks are dropped")
    args = parser.parse_args(argv)
    if args.baseline:
        ServerProcess.chatenv_dir = args.baseline.resolve()
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
            ("memory", lambda: phase_memory(logdir, 20 if q else 60, args.memory_bound_mib or (64 if q else 256),
                                            args.seed)),
            *attack_phases(logdir, q),
        ]:
            if args.memory_only and name != "memory":
                continue
            attack = name in dict(attack_phases(logdir, q))
            if (args.phase and name not in args.phase) or (args.attacks and not attack):
                continue
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
    if "memory" in results:
        r = results["memory"]
        print(f"| memory bound | {r['sessions']} sessions for {r['seconds']} s against {r['bound_mib']} MiB: peak RSS "
              f"{r['peak_rss_kb']} kB, {r['peak_over_bound_kb']} kB over the bound (idle {r['idle_rss_kb']} kB); "
              f"newcomers {r['newcomers']}; by kind {r['by_kind']} |")
    rows = attack_rows(results)
    if rows:
        print()
        baseline = ServerProcess.chatenv_dir
        print(f"| attack{' (baseline ' + str(baseline) + ')' if baseline != HERE else ''} | figure | target |")
        print("| --- | --- | --- |")
        for figure, value, target in rows:
            print(f"| {figure} | {value} | {target} |")
    print()
    print("FAILED: " + "; ".join(FAILURES) if FAILURES else "all checks held")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
