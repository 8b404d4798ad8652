"""Tests for chatenv's clients, ChatEnv and AsyncChatEnv, on real loopback sockets.

Each behaviour runs with both clients: interpreter exit (real subprocesses), one
client shared by threads or tasks, replies the client cannot read, limits and
close codes, capacity waits, several servers, keepalive through long pauses,
TLS, and the O(new) parse of full observations in both of OpenEnv's frame
shapes. Servers are chatenv's (serve_in_thread) or scripted WebSocket servers
on raw sockets, for the replies a correct server never sends.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatenv
from helpers import AT_ONCE_S, SLACK, SyncClient, free_port, server_frame, wait_until
from support import StallingTokenizer, open_session
from chatenv import AsyncChatEnv, ChatEnv, ChatEnvError, EpisodeLostError, serve_in_thread

HERE = Path(__file__).resolve().parents[1]  # the repository's root


# ------------------------------------------------------------------------------
# Helpers: scripted servers and frames (the client drivers and server_frame: helpers)
# ------------------------------------------------------------------------------


class Peer:
    """One connection of a ScriptServer: the script reads requests and writes what it likes."""

    def __init__(self, conn: socket.socket) -> None:
        from websockets.server import ServerProtocol

        self.conn = conn
        self.proto = ServerProtocol(max_size=None)
        self.opcodes: list[str] = []
        self.pending: list = []

    def _feed(self) -> bool:
        data = self.conn.recv(65536)
        if not data:
            self.proto.receive_eof()
            return False
        self.proto.receive_data(data)
        self.pending += self.proto.events_received()
        return True

    def handshake(self) -> None:
        from websockets.http11 import Request

        while not any(isinstance(e, Request) for e in self.pending):
            if not self._feed():
                raise EOFError
        request = next(e for e in self.pending if isinstance(e, Request))
        self.pending = [e for e in self.pending if not isinstance(e, Request)]
        self.proto.send_response(self.proto.accept(request))
        self.conn.sendall(b"".join(self.proto.data_to_send()))

    def recv(self, answer_pings: bool = True):
        """The next request (a dict), or None once the client has closed."""
        while True:
            while self.pending:
                event = self.pending.pop(0)
                self.opcodes.append(event.opcode.name)
                if event.opcode.name == "CLOSE":
                    return None
                if event.opcode.name == "TEXT":
                    return json.loads(event.data)
            out = self.proto.data_to_send()  # pongs to the client's pings, the echo of its close
            if answer_pings:
                self.conn.sendall(b"".join(out))
            if not self._feed():
                return None

    def send(self, payload: bytes | str) -> None:
        self.conn.sendall(server_frame(payload))

    def send_raw(self, data: bytes) -> None:
        self.conn.sendall(data)

    def close(self, code: int, reason: str = "") -> None:
        self.proto.send_close(code, reason)
        self.conn.sendall(b"".join(self.proto.data_to_send()))
        time.sleep(0.05)
        self.conn.shutdown(socket.SHUT_WR)


class ScriptServer:
    """A WebSocket server on a loopback port whose every connection runs ``script(peer)``
    in a thread of its own: the replies no correct server sends, on demand."""

    def __init__(self, script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.peers: list[Peer] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        peer = Peer(conn)
        self.peers.append(peer)
        try:
            peer.handshake()
            self.script(peer)
        except (OSError, EOFError):
            pass
        finally:
            time.sleep(0.05)
            conn.close()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc_info) -> None:
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def observation(messages, tokens, reward=None, done=False, *, shape="0.3.0", metadata=None, where=None,
                top_metadata=None, ascii_only=True) -> bytes:
    """A full observation frame as OpenEnv sends it: ``shape`` 0.3.0 has no metadata, 0.10.0
    puts it first in the observation (and beside reward when not empty); ``where`` puts
    the observation's metadata "first", "between" messages and tokens, or "last"."""
    body: dict = {}
    where = where or ("first" if shape == "0.10.0" else None)
    meta = {} if metadata is None else metadata
    if where == "first":
        body["metadata"] = meta
    body["messages"] = messages
    if where == "between":
        body["metadata"] = meta
    body["tokens"] = tokens
    if where == "last":
        body["metadata"] = meta
    data = {"observation": body, "reward": reward, "done": done}
    top = top_metadata if top_metadata is not None else (meta if shape == "0.10.0" and meta else None)
    if top:
        data["metadata"] = top
    frame = {"type": "observation", "data": data}
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=ascii_only).encode()


def expected(frame: bytes):
    """What a reply means, read with json.loads: (messages, tokens, reward, done, metadata)."""
    data = json.loads(frame)["data"]
    body = data["observation"]
    metadata = body.get("metadata") or data.get("metadata")  # inside when it holds anything, else beside
    return body["messages"], body["tokens"], data.get("reward"), data.get("done", False), metadata or {}


def seen(result):
    obs = result.observation
    return obs.messages, obs.tokens, result.reward, result.done, obs.metadata


def replay_server(frames_by_request):
    """A ScriptServer answering the n-th request of each connection with ``frames_by_request[n]``."""
    def script(peer):
        for frame in frames_by_request:
            if peer.recv() is None:
                return
            peer.send(frame)
        peer.recv()

    return ScriptServer(script)


HI = [{"role": "assistant", "content": "Hi"}]


# ------------------------------------------------------------------------------
# Interpreter exit: an unclosed client never holds it up (real subprocesses)
# ------------------------------------------------------------------------------

_EXIT_SCRIPT = """
import asyncio, sys, time
sys.path.insert(0, {here!r})
from chatenv import AsyncChatEnv, ChatEnv
url, how = sys.argv[1], sys.argv[2]
if how == "global":
    env = ChatEnv(url)
    env.reset()
    env.step([72, 105])
elif how == "cycle":  # unreachable at once, collected only by the GC, late
    env = ChatEnv(url)
    env.reset()
    env.me = env
    del env
elif how == "idle":  # the keepalive thread is tending it when the interpreter exits
    env = ChatEnv(url, ping_interval_s=0.05, ping_timeout_s=5)
    env.reset()
    time.sleep(0.5)
elif how == "mid-call":  # a call in another thread waits on a server that never answers
    import threading
    env = ChatEnv(url, message_timeout_s=None)
    env.reset()
    env.step([72, 105])
    threading.Thread(target=env.step, args=([33],), daemon=True).start()
    time.sleep(0.3)
elif how == "async":
    loop = asyncio.new_event_loop()
    env = AsyncChatEnv(url)
    loop.run_until_complete(env.reset())
    loop.run_until_complete(env.step([72, 105]))
print("done", time.time(), flush=True)
"""


@pytest.mark.parametrize("how", ["global", "cycle", "idle", "mid-call", "async"])
def test_an_unclosed_client_never_delays_interpreter_exit(how, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(_EXIT_SCRIPT.format(here=str(HERE)))

    def answer_reset_then_stall(peer):  # answers a reset and a step, then never reads again
        peer.recv()
        peer.send(observation([], []))
        if peer.recv() is not None:
            peer.send(observation(HI, [72, 105]))
        time.sleep(30)

    with ScriptServer(answer_reset_then_stall) as url:
        for _ in range(2):
            proc = subprocess.Popen([sys.executable, str(script), url, how], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            line = proc.stdout.readline()
            assert line.startswith("done"), proc.communicate(timeout=10)
            printed = float(line.split()[1])
            proc.wait(10)
            exited = time.time()
            assert proc.returncode == 0, proc.stderr.read()
            assert exited - printed < AT_ONCE_S, f"exit took {exited - printed:.2f} s after the script's last line"
            proc.stderr.close()
            proc.stdout.close()


# ------------------------------------------------------------------------------
# One client, several threads or tasks: calls are serialised, replies never cross
# ------------------------------------------------------------------------------


def test_one_chatenv_shared_by_two_threads_serialises_their_calls():
    with serve_in_thread() as url, ChatEnv(url) as env:
        env.reset()
        errors, wrong = [], []

        def steps(token: int) -> None:
            try:
                for i in range(200):
                    result = env.step([token])
                    obs = result.observation
                    if obs.tokens[-1] != token or obs.messages[-1] != {"role": "assistant", "content": chr(token)}:
                        wrong.append((token, i))
            except Exception as exc:  # recorded for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=steps, args=(token,)) for token in (65, 66)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors and not wrong
        state = env.state()
        assert state.step_count == 400 and sorted(ids[0] for ids in state.history_tokens) == [65] * 200 + [66] * 200
        for token in (67, 68, 69):  # afterwards, alone, each step gets its own reply
            assert env.step([token]).observation.tokens[-1] == token
        assert env.state().step_count == 403 and url.server.active_sessions == 1


def test_one_async_chatenv_shared_by_two_tasks_serialises_their_calls():
    async def main(url):
        async with AsyncChatEnv(url) as env:
            await env.reset()

            async def steps(token):
                wrong = 0
                for _ in range(200):
                    obs = (await env.step([token])).observation
                    wrong += obs.tokens[-1] != token or obs.messages[-1]["content"] != chr(token)
                return wrong

            assert await asyncio.gather(steps(65), steps(66)) == [0, 0]
            state = await env.state()
            assert state.step_count == 400
            assert (await env.step([67])).observation.tokens[-1] == 67

    with serve_in_thread() as url:
        asyncio.run(main(url))


def test_a_sync_call_interrupted_before_its_reply_drops_the_connection():
    """KeyboardInterrupt between request and reply: the late reply must never answer a later call."""
    with serve_in_thread(StallingTokenizer(1.0)) as url:
        env = ChatEnv(url)
        env.reset()
        env.step([72])
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                env.step([0])  # the server stalls 1 s on this one
        finally:
            timer.cancel()
        with pytest.raises(EpisodeLostError, match="KeyboardInterrupt"):
            env.step([105])
        assert wait_until(lambda: url.server.active_sessions == 0)
        time.sleep(1.0)  # the stalled reply is sent now, to a socket already gone
        assert env.reset().observation.tokens == []
        assert env.step([105]).observation.tokens == [105]
        env.close()


def test_an_async_call_cancelled_before_its_reply_drops_the_connection():
    async def main(url, server):
        env = AsyncChatEnv(url)
        await env.reset()
        await env.step([72])
        task = asyncio.ensure_future(env.step([0]))  # the server stalls 1 s on this one
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(EpisodeLostError, match="CancelledError"):
            await env.step([105])
        for _ in range(100):
            if server.active_sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert server.active_sessions == 0
        await asyncio.sleep(1.0)
        assert (await env.reset()).observation.tokens == []
        assert (await env.step([105])).observation.tokens == [105]
        await env.close()

    with serve_in_thread(StallingTokenizer(1.0)) as url:
        asyncio.run(main(url, url.server))


def test_step_and_state_after_close_name_close_and_reset_reconnects(make_client):
    with serve_in_thread() as url:
        env = make_client(url)
        env.reset()
        env.step([72])
        env.close() if make_client.kind == "sync" else env.run(env.client.close())
        for call in (lambda: env.step([105]), env.state):
            with pytest.raises(EpisodeLostError, match=r"close\(\)") as info:
                call()
            assert info.value.close_code is None
        assert wait_until(lambda: url.server.active_sessions == 0)
        assert env.reset().observation.tokens == []  # a new episode on a new connection
        assert env.step([105]).observation.tokens == [105] and url.server.active_sessions == 1


def test_a_frame_no_request_asked_for_is_a_protocol_error_not_a_later_reply(make_client):
    """A data frame that arrives between calls is kept and handed to the next call, which
    raises it and drops the connection: it can never be read as that call's reply."""
    def script(peer):
        peer.recv()
        peer.send(observation([], []))
        time.sleep(0.2)
        peer.send(observation(HI, [72, 105]))  # unasked
        peer.recv()

    with ScriptServer(script) as url:
        env = make_client(url)
        env.reset()
        env.pause(0.6)
        with pytest.raises(ChatEnvError) as info:
            env.step([33])
        assert info.value.code == "PROTOCOL_ERROR" and "no request asked for" in info.value.message
        with pytest.raises(EpisodeLostError, match="no request asked for"):
            env.step([33])


def test_a_frame_that_came_before_the_request_was_written_is_never_its_reply(make_client):
    """A data frame in the client's socket before a request goes out (sent after the last
    reply, read by nobody yet: no loop turn, no keepalive turn in between) is raised as a
    frame no request asked for, never returned as the request's reply."""
    stale, fresh = observation(HI, [72, 105]), observation([], [33])

    def script(peer):
        peer.recv()
        peer.send(observation([], []))
        time.sleep(0.01)
        peer.send(stale)  # before the step request: no request asked for it
        if peer.recv() is not None:
            peer.send(fresh)
        peer.recv()

    async def reset_then_step(client):  # no loop turn between the reset's reply and the step
        await client.reset()
        time.sleep(0.05)
        return await client.step([33])

    with ScriptServer(script) as url:
        env = make_client(url)
        with pytest.raises(ChatEnvError) as info:
            if make_client.kind == "sync":
                env.reset()
                time.sleep(0.05)  # under the keepalive's _IDLE_S: the frame waits in the socket
                env.step([33])
            else:
                env.run(reset_then_step(env.client))
        assert info.value.code == "PROTOCOL_ERROR" and "no request asked for" in info.value.message


# ------------------------------------------------------------------------------
# Replies the client cannot read: always ChatEnvError(PROTOCOL_ERROR), naming what is wrong
# ------------------------------------------------------------------------------

_DEEP = 100_000  # far past the interpreter's recursion limit


def _with(messages=HI, tokens=(72, 105), **data):
    """An observation frame with ``data`` members replaced (raw JSON text values)."""
    members = {"observation": json.dumps({"messages": messages, "tokens": list(tokens)}), "reward": "null",
               "done": "false"}
    members.update(data)
    return ('{"type":"observation","data":{' + ",".join(f'"{k}":{v}' for k, v in members.items()) + "}}").encode()


_BAD_OBSERVATIONS = {
    "nested too deep": (b'{"type":"observation","data":' + b"[" * _DEEP + b"]" * _DEEP + b"}", "nested too deeply"),
    "nested too deep in messages": (
        _with(observation='{"messages":' + "[" * _DEEP + "]" * _DEEP + ',"tokens":[]}'), "nested too deeply"),
    "messages a string": (_with(observation='{"messages":"abc","tokens":[97]}'), "messages"),
    "messages a number": (_with(observation='{"messages":5,"tokens":[97]}'), "messages"),
    "message not an object": (_with(messages=["Hi"]), "observation.messages"),
    "role not a string": (_with(messages=[{"role": 1, "content": "Hi"}]), "observation.messages"),
    "content not a string": (_with(messages=[{"role": "assistant", "content": ["Hi"]}]), "observation.messages"),
    "content missing": (_with(messages=[{"role": "assistant"}]), "observation.messages"),
    "token a string": (_with(tokens=[72, "105"]), "observation.tokens"),
    "token a float": (_with(tokens=[72, 105.0]), "observation.tokens"),
    "token a bool": (_with(tokens=[72, True]), "observation.tokens"),
    "token a list": (_with(tokens=[72, [105]]), "observation.tokens"),
    "tokens an object": (_with(observation='{"messages":[],"tokens":{"a":1}}'), "tokens"),
    "reward a string": (_with(reward='"1.0"'), "reward"),
    "reward a list": (_with(reward="[1]"), "reward"),
    "done a string": (_with(done='"no"'), "done"),
    "done a number": (_with(done="1"), "done"),
    "metadata a string": (_with(observation='{"messages":[],"tokens":[],"metadata":"x"}'), "metadata"),
    "metadata beside reward a string": (_with(metadata='"x"'), "metadata"),
    "delta not an object": (_with(observation='{"messages":[],"tokens":[],"delta":3}'), "delta"),
    "observation a list": (_with(observation="[1]"), "observation"),
    "not UTF-8": (_with(messages=[{"role": "assistant", "content": "H\udcff"}]).replace(b"\\udcff", b"\xff"),
                  "UTF-8"),
}


@pytest.mark.parametrize("bad", sorted(_BAD_OBSERVATIONS))
@pytest.mark.parametrize("after", ["empty", "other"], ids=["as-extension", "whole"])
def test_a_bad_observation_is_a_protocol_error_naming_what_is_wrong(make_client, bad, after):
    """The same errors whether the bad frame is read as an extension of the last one
    (after an empty observation) or whole (after one it does not extend)."""
    reply, named = _BAD_OBSERVATIONS[bad]
    first = observation([], []) if after == "empty" else observation([{"role": "system", "content": "x"}], [1])
    with replay_server([first, reply, observation(HI, [72, 105])]) as url:
        env = make_client(url, delta=False)
        env.reset()
        with pytest.raises(ChatEnvError) as info:
            env.step([72, 105])
        assert type(info.value) is ChatEnvError and info.value.code == "PROTOCOL_ERROR"
        assert "the server sent" in info.value.message and named in info.value.message
        assert env.step([72, 105]).observation.tokens == [72, 105]  # the connection is still in step


_BAD_STATES = {
    "history_messages a number": ('"history_messages":5', "state.history_messages"),
    "history_messages a string": ('"history_messages":"abc"', "state.history_messages"),
    "history message not an object": ('"history_messages":["Hi"]', "state.history_messages"),
    "history message role missing": ('"history_messages":[{"content":"Hi"}]', "state.history_messages"),
    "history_tokens flat": ('"history_tokens":[72,105]', "state.history_tokens"),
    "history_tokens a string": ('"history_tokens":"Hi"', "state.history_tokens"),
    "history token a string": ('"history_tokens":[["a"]]', "state.history_tokens"),
    "history token a bool": ('"history_tokens":[[true]]', "state.history_tokens"),
    "episode_id a number": ('"episode_id":5', "state.episode_id"),
    "step_count a string": ('"step_count":"1"', "state.step_count"),
    "step_count a bool": ('"step_count":true', "state.step_count"),
    "step_count null": ('"step_count":null', "state.step_count"),
    "nested too deep": ('"history_tokens":' + "[" * _DEEP + "]" * _DEEP, "nested too deeply"),
}


@pytest.mark.parametrize("bad", sorted(_BAD_STATES))
def test_a_bad_state_is_a_protocol_error_naming_what_is_wrong(make_client, bad):
    member, named = _BAD_STATES[bad]
    good = {"episode_id": None, "step_count": 0, "history_messages": [], "history_tokens": []}
    members = ",".join(f'"{k}":{json.dumps(v)}' for k, v in good.items() if f'"{k}"' not in member)
    reply = '{"type":"state","data":{' + members + "," + member + "}}"
    with replay_server([observation([], []), reply, json.dumps({"type": "state", "data": good})]) as url:
        env = make_client(url)
        env.reset()
        with pytest.raises(ChatEnvError) as info:
            env.state()
        assert type(info.value) is ChatEnvError and info.value.code == "PROTOCOL_ERROR"
        assert named in info.value.message
        assert env.state().history_tokens == []


def test_a_well_typed_state_reads_as_the_server_sent_it(make_client):
    """OpenEnv's history_tokens may hold more lists than history_messages (a failed step): accepted."""
    state = {"episode_id": "e", "step_count": 3, "history_messages": HI, "history_tokens": [[72, 105], [300]]}
    with replay_server([observation([], []), json.dumps({"type": "state", "data": state})]) as url:
        env = make_client(url)
        env.reset()
        got = env.state()
        assert (got.episode_id, got.step_count, got.history_messages, got.history_tokens) == (
            "e", 3, HI, [[72, 105], [300]])


# ------------------------------------------------------------------------------
# Limits and close codes: named in the error, raised at once
# ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["whole", "header-only", "fragmented"])
def test_a_reply_over_max_message_bytes_raises_at_once_naming_the_limit_and_size(make_client, how):
    big = observation(HI, [72] * 3000)  # about 9 KB

    def script(peer):
        peer.recv()
        peer.send(observation([], []))
        peer.recv()
        if how == "whole":
            peer.send(big)
        elif how == "header-only":  # announces 10 MB, sends nothing more: never wait for it
            peer.send_raw(bytes((0x81, 127)) + (10 * 2**20).to_bytes(8, "big"))
        else:  # every fragment is small, the message is not
            for i in range(0, len(big), 1000):
                peer.send_raw(server_frame(big[i:i + 1000], opcode=1 if i == 0 else 0, fin=i + 1000 >= len(big)))
        time.sleep(5)

    with ScriptServer(script) as url:
        message_timeout_s = 30
        env = make_client(url, max_message_bytes=4000, message_timeout_s=message_timeout_s)
        env.reset()
        started = time.monotonic()
        with pytest.raises(EpisodeLostError) as info:
            env.step([72])
        assert time.monotonic() - started < message_timeout_s / 10  # far within message_timeout_s
        text = str(info.value)
        assert "max_message_bytes=4000" in text and info.value.close_code == 1009
        if how != "fragmented":
            assert str(len(big) if how == "whole" else 10 * 2**20) in text  # the size, from the header
        with pytest.raises(EpisodeLostError, match="max_message_bytes"):
            env.step([72])


def test_a_session_closed_for_a_request_over_the_servers_limit_names_it(make_client):
    with serve_in_thread(max_message_bytes=1000) as url:
        env = make_client(url)
        env.reset()
        with pytest.raises(EpisodeLostError) as info:
            env.step([65] * 500)  # about 2 KB of request
        assert info.value.close_code == 1009 and isinstance(info.value, ConnectionError)
        assert "1009" in str(info.value) and "--max-message-bytes" in str(info.value)
        assert env.reset().observation.tokens == []  # a new session is fine


@pytest.mark.parametrize("code, words", [
    (1001, "going away"), (1008, "policy violation"), (1011, "internal error"), (1012, "restarting"),
    (1013, "try again later"), (4321, "no known meaning"),
])
def test_a_session_the_server_closes_names_its_code_and_meaning(make_client, code, words):
    def script(peer):
        peer.recv()
        peer.send(observation([], []))
        time.sleep(0.1)
        peer.close(code, "because")
        time.sleep(1)

    with ScriptServer(script) as url:
        env = make_client(url)
        env.reset()
        env.pause(0.5)  # the close arrives while the client is idle
        with pytest.raises(EpisodeLostError) as info:
            env.step([72])
        assert info.value.close_code == code
        assert f"closed the connection with {code}" in str(info.value) and words in str(info.value)
        assert "because" in str(info.value) and "reset()" in str(info.value)


def test_a_session_error_then_close_raises_it_then_names_it(make_client):
    def script(peer):
        peer.recv()
        peer.send(observation([], []))
        peer.recv()
        peer.send(json.dumps({"type": "error", "data": {"message": "it broke", "code": "SESSION_ERROR"}}))
        peer.close(1000)
        time.sleep(1)

    with ScriptServer(script) as url:
        env = make_client(url)
        env.reset()
        with pytest.raises(ChatEnvError) as info:
            env.step([72])
        assert info.value.code == "SESSION_ERROR" and info.value.message == "it broke"
        with pytest.raises(EpisodeLostError) as info:
            env.step([72])
        assert "SESSION_ERROR" in str(info.value) and "it broke" in str(info.value)


def test_chatenv_shutdown_and_idle_timeout_close_codes_are_named(make_client):
    with serve_in_thread(idle_timeout_s=0.3) as url:
        env = make_client(url)
        env.reset()
        env.pause(1.0)
        with pytest.raises(EpisodeLostError) as info:
            env.step([72])
        assert info.value.close_code == 1001 and "idle timeout" in str(info.value)
    server = serve_in_thread()
    url = server.__enter__()
    env = make_client(url)
    env.reset()
    server.stop()
    env.pause(0.3)
    with pytest.raises(EpisodeLostError) as info:
        env.step([72])
    assert info.value.close_code in (1001, 1012) and "shut" in str(info.value)


def test_a_websocket_protocol_violation_is_a_protocol_error_then_a_lost_session(make_client):
    def script(peer):
        peer.recv()
        peer.send(observation([], []))
        peer.recv()
        peer.send_raw(bytes((0x81 | 0x40, 2)) + b"{}")  # RSV1 set, no extension negotiated
        time.sleep(1)

    with ScriptServer(script) as url:
        env = make_client(url)
        env.reset()
        with pytest.raises((ChatEnvError, EpisodeLostError)) as info:
            env.step([72])
        if isinstance(info.value, ChatEnvError):
            assert info.value.code == "PROTOCOL_ERROR" and "WebSocket protocol" in info.value.message
        else:  # websockets' asyncio client reports it as the close it answered with
            assert info.value.close_code == 1002
        with pytest.raises(EpisodeLostError):
            env.step([72])


# ------------------------------------------------------------------------------
# Capacity waits: capacity_wait_s retries a full server until that deadline
# ------------------------------------------------------------------------------


def test_capacity_wait_gets_the_slot_freed_while_waiting(make_client):
    with serve_in_thread(max_sessions=1) as url:
        holder = ChatEnv(url)  # closed from another thread while the client waits
        holder.reset()
        release_s, wait_s = 0.5, 10
        waiter = make_client(url, capacity_wait_s=wait_s)
        releaser = threading.Timer(release_s, holder.close)
        started = time.monotonic()
        releaser.start()
        try:
            result = waiter.reset()
        finally:
            releaser.join()
        elapsed = time.monotonic() - started
        assert result.observation.tokens == [] and release_s - 0.05 <= elapsed < wait_s / 2  # freed, not the deadline
        assert waiter.step([72]).observation.tokens == [72] and url.server.active_sessions == 1


def test_capacity_wait_gives_up_at_its_deadline_with_capacity_reached(make_client):
    with serve_in_thread(max_sessions=1) as url:
        make_client(url).reset()
        for wait_s in (None, 0.6):
            env = make_client(url, capacity_wait_s=wait_s)
            started = time.monotonic()
            with pytest.raises(ChatEnvError) as info:
                env.reset()
            elapsed = time.monotonic() - started
            assert info.value.code == "CAPACITY_REACHED" and "1/1" in info.value.message
            if wait_s is None:
                assert elapsed < AT_ONCE_S / 2  # no wait unless asked: well under the 0.6 s asked next
            else:
                assert wait_s <= elapsed < (1 + SLACK) * wait_s  # tried until the deadline, then stopped
        assert url.server.active_sessions == 1


def test_capacity_wait_retries_with_jittered_exponential_backoff(make_client):
    attempts = []

    def full(peer):
        attempts.append(time.monotonic())
        peer.send(json.dumps({"type": "error", "data": {"message": "full", "code": "CAPACITY_REACHED"}}))
        peer.close(1000)

    with ScriptServer(full) as url:
        env = make_client(url, capacity_wait_s=1.6)
        with pytest.raises(ChatEnvError, match="CAPACITY_REACHED"):
            env.reset()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert 4 <= len(attempts) <= 12, attempts  # backoff from 50 ms doubling: neither one try nor a flood
    assert max(gaps) > 2 * min(gaps[:2]), gaps  # the pauses grow (the last is cut by the deadline)


# ------------------------------------------------------------------------------
# Several servers: a new session goes to one with room
# ------------------------------------------------------------------------------


def test_several_servers_skip_a_full_one_and_a_down_one(make_client):
    down = f"http://127.0.0.1:{free_port()}"
    with serve_in_thread(max_sessions=1) as full, serve_in_thread() as room:
        make_client(full).reset()  # now full
        for _ in range(6):  # whatever server each starts from, each session lands on the one with room
            env = make_client([full, down, room])
            assert env.reset().observation.tokens == []
            assert env.base_url == room and env.step([72]).observation.tokens == [72]
        assert room.server.active_sessions == 6 and full.server.active_sessions == 1


def test_several_servers_spread_new_sessions(make_client):
    with serve_in_thread() as a, serve_in_thread() as b:
        for _ in range(16):
            make_client((a, b)).reset()
        assert a.server.active_sessions + b.server.active_sessions == 16
        assert a.server.active_sessions >= 2 and b.server.active_sessions >= 2  # not all on one


def test_several_servers_all_down_name_each(make_client):
    ports = [free_port(), free_port()]
    connect_timeout_s = 2
    env = make_client([f"http://127.0.0.1:{p}" for p in ports], connect_timeout_s=connect_timeout_s, capacity_wait_s=5)
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        env.reset()
    assert time.monotonic() - started < connect_timeout_s  # down is not full: no wait for room
    assert all(f"ws://127.0.0.1:{p}/ws" in str(info.value) for p in ports)


def test_several_servers_all_full_wait_for_room_on_any(make_client):
    with serve_in_thread(max_sessions=1) as a, serve_in_thread(max_sessions=1) as b:
        holders = [ChatEnv(a), ChatEnv(b)]  # closed from another thread while the client waits
        for holder in holders:
            holder.reset()
        env = make_client([a, b], capacity_wait_s=10)
        releaser = threading.Timer(0.5, holders[1].close)
        releaser.start()
        try:
            assert env.reset().observation.tokens == []
        finally:
            releaser.join()
        assert env.base_url == b and b.server.active_sessions == 1
        with pytest.raises(ChatEnvError, match="CAPACITY_REACHED"):
            make_client([a, b]).reset()  # both full again, and no wait asked for
        holders[0].close()


def test_a_reset_on_a_session_the_server_ended_goes_to_another_server(make_client):
    first, second = serve_in_thread(), serve_in_thread()
    a, b = first.__enter__(), second.__enter__()
    try:
        env = make_client([a, b])
        env.reset()
        env.step([72])
        (first if env.base_url == a else second).stop()
        other = b if env.base_url == a else a
        env.pause(0.3)
        with pytest.raises(EpisodeLostError):
            env.step([105])
        assert env.reset().observation.tokens == [] and env.base_url == other
        assert env.step([105]).observation.tokens == [105]
    finally:
        first.stop()
        second.stop()


# ------------------------------------------------------------------------------
# Keepalive: sessions survive user code that sleeps or computes between calls
# ------------------------------------------------------------------------------


def _raw_session(url: str) -> socket.socket:
    """A WebSocket session on a bare socket that never reads after its handshake, so it
    never answers a ping: the control that shows the pause is long enough to be dropped."""
    sock, _ = open_session(int(url.rsplit(":", 1)[1]))  # raises unless the server answers 101
    return sock


def test_a_session_survives_a_pause_longer_than_the_servers_ping_timeout(make_client):
    _survives_a_pause(make_client, busy=False)


def test_a_chatenv_session_survives_pure_python_computing_longer_than_the_ping_timeout():
    """User code holding the GIL: the keepalive thread still gets it (the switch interval).
    (An async client cannot: a busy loop blocks its event loop.)"""
    _survives_a_pause(SyncClient, busy=True)


def _survives_a_pause(make_client, busy: bool) -> None:
    interval_s, timeout_s = 0.2, 0.2
    with serve_in_thread(ping_interval_s=interval_s, ping_timeout_s=timeout_s) as url:
        env = make_client(url)
        env.reset(episode_id="kept")
        env.step([72])
        control = _raw_session(url)
        assert wait_until(lambda: url.server.active_sessions == 2)
        env.pause(6 * (interval_s + timeout_s), busy=busy)
        assert url.server.active_sessions == 1  # the silent control was dropped; the client was not
        assert env.step([105]).observation.tokens == [72, 105]
        state = env.state()
        assert (state.episode_id, state.step_count) == ("kept", 2)
        control.close()
        env.close()


def test_the_clients_own_pings_give_up_on_a_server_that_stopped_answering(make_client):
    """A server frozen mid-session (it neither reads nor answers pings): the idle client
    notices within ping_interval_s + ping_timeout_s, and the next call says so at once."""
    def freeze(peer):
        peer.recv()
        peer.send(observation([], []))
        time.sleep(5)  # reads nothing: the client's pings go unanswered

    with ScriptServer(freeze) as url:
        interval_s, timeout_s = 0.1, 0.2
        env = make_client(url, ping_interval_s=interval_s, ping_timeout_s=timeout_s, message_timeout_s=30)
        env.reset()
        env.pause(1.0)
        started = time.monotonic()
        with pytest.raises(EpisodeLostError) as info:
            env.step([72])
        assert time.monotonic() - started < SLACK * (interval_s + timeout_s)  # not the 30 s message timeout
        assert "keepalive" in str(info.value) and "ping_timeout_s=0.2" in str(info.value)


def test_a_long_call_still_answers_the_servers_pings(make_client):
    """A reply that takes longer than the server's ping timeout: pings are answered mid-call."""
    with serve_in_thread(StallingTokenizer(1.0), ping_interval_s=0.2, ping_timeout_s=0.2) as url:
        env = make_client(url)
        env.reset()
        assert env.step([0, 72]).observation.tokens == [0, 72]  # 1 s on the server
        assert env.step([105]).observation.tokens == [0, 72, 105] and url.server.active_sessions == 1


def test_keepalive_thread_is_one_per_process_and_a_daemon():
    with serve_in_thread() as url:
        clients = [ChatEnv(url) for _ in range(5)]
        for env in clients:
            env.reset()
        keepalive = [t for t in threading.enumerate() if t.name == "chatenv-keepalive"]
        assert len(keepalive) == 1 and keepalive[0].daemon
        for env in clients:
            env.close()


# ------------------------------------------------------------------------------
# TLS: wss:// through a TLS front to a chatenv server
# ------------------------------------------------------------------------------


@pytest.fixture
def tls_front(tmp_path, monkeypatch):
    """A TLS-terminating relay to a chatenv server; its self-signed certificate is the only
    one trusted (SSL_CERT_FILE, which the default context reads)."""
    openssl = shutil.which("openssl")
    assert openssl, "the TLS test needs the openssl command to make a certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with serve_in_thread() as backend:
        backend_port = int(backend.rsplit(":", 1)[1])
        listener = socket.create_server(("127.0.0.1", 0))

        def pipe(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def serve():
            while True:
                try:
                    conn, _ = listener.accept()
                    tls = context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    if listener.fileno() < 0:
                        return
                    continue
                plain = socket.create_connection(("127.0.0.1", backend_port))
                threading.Thread(target=pipe, args=(tls, plain), daemon=True).start()
                threading.Thread(target=pipe, args=(plain, tls), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        yield f"https://localhost:{listener.getsockname()[1]}", backend
        listener.close()


def test_wss_through_tls_with_keepalive(make_client, tls_front):
    url, backend = tls_front
    env = make_client(url, ping_interval_s=0.1, ping_timeout_s=5)
    assert env.reset().observation.tokens == []
    env.pause(0.5)  # pings over TLS while idle
    assert env.step([72, 105]).observation.messages == HI and backend.server.active_sessions == 1
    assert env.state().step_count == 1


def test_wss_refuses_a_certificate_it_does_not_trust(make_client, tls_front, monkeypatch):
    url, _ = tls_front
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)
    env = make_client(url, connect_timeout_s=5)
    with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        env.reset()


def test_task_methods_over_tls(make_client, tls_front):
    """The task API's HTTP requests go over TLS when the URL says https:// (or wss://):
    the chatenv server behind the front answers (no tasks: its 501)."""
    url, _ = tls_front
    env = make_client(url.replace("https://", "wss://") + "/ws")
    with pytest.raises(ChatEnvError, match="HTTP 501") as info:
        _task(env, "list_splits")
    assert info.value.code == "EXECUTION_ERROR" and "on wss://localhost" in info.value.message


# ------------------------------------------------------------------------------
# The task API: OpenEnv 0.10's HTTP routes under its method names
# ------------------------------------------------------------------------------

TASK_METHODS = [("list_splits", ()), ("list_tasks", ("train",)), ("num_tasks", ("train",)),
                ("get_task", ("train", 0)), ("get_task_range", ("train", 0, 1))]


def _task(env, name, *args):
    """Call a task method on either driver (helpers' async driver runs its coroutine)."""
    if env.kind == "async":
        return env.run(getattr(env.client, name)(*args))
    return getattr(env.client, name)(*args)


class TaskServer:
    """A scripted HTTP server: ``answers[(method, path)] = (status, body)`` (a body not a
    str is sent as JSON); it records each request's method, path, headers and body."""

    def __init__(self, answers):
        import http.server

        self.answers, self.requests = answers, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                outer.requests.append((self.command, self.path, dict(self.headers),
                                       json.loads(body) if body else None))
                status, answer = outer.answers.get((self.command, self.path), (404, {"detail": "Not Found"}))
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.httpd.shutdown()
        self.httpd.server_close()


_SPLITS = [{"name": "train", "type": "train"}, {"name": "dev", "type": "validation"}]
_TASKS = [{"id": "a", "prompt": "1+1?"}, {"id": "b", "prompt": "2+2?"}]


@pytest.mark.parametrize("form", ["ws", "http", "host:port", "prefix"])
def test_task_methods_call_openenv_s_routes_with_the_token(make_client, form):
    """Each method is its route, under the env name GET /list_environments gives (asked
    once); the answer unwrapped as OpenEnv's TaskProvider returns it; the auth token
    and User-Agent sent; any base URL form, a path prefix kept; start/stop left out
    when None."""
    prefix = "/under/here" if form == "prefix" else ""
    answers = {
        ("GET", f"{prefix}/list_environments"): (200, ["my_env"]),
        ("GET", f"{prefix}/my_env/splits"): (200, _SPLITS),
        ("POST", f"{prefix}/my_env/tasks"): (200, {"tasks": _TASKS, "env_name": "my_env"}),
        ("POST", f"{prefix}/my_env/num_tasks"): (200, {"num_tasks": 2}),
        ("POST", f"{prefix}/my_env/task"): (200, {"task": _TASKS[1]}),
        ("POST", f"{prefix}/my_env/task_range"): (200, {"tasks": _TASKS[:1]}),
    }
    with TaskServer(answers) as server:
        url = {"ws": f"ws://127.0.0.1:{server.port}/ws", "http": f"http://127.0.0.1:{server.port}/",
               "host:port": f"127.0.0.1:{server.port}", "prefix": f"http://127.0.0.1:{server.port}{prefix}"}[form]
        env = make_client(url, auth_token="s3cret")
        assert _task(env, "list_splits") == _SPLITS
        assert _task(env, "list_tasks", "train") == _TASKS
        assert _task(env, "num_tasks", "train") == 2
        assert _task(env, "get_task", "train", 1) == _TASKS[1]
        assert _task(env, "get_task_range", "train", None, 1) == _TASKS[:1]
        assert _task(env, "get_task_range", "train") == _TASKS[:1]
    sent = [(method, path, body) for method, path, _, body in server.requests]
    assert sent == [
        ("GET", f"{prefix}/list_environments", None), ("GET", f"{prefix}/my_env/splits", None),
        ("POST", f"{prefix}/my_env/tasks", {"split": "train"}), ("POST", f"{prefix}/my_env/num_tasks", {"split": "train"}),
        ("POST", f"{prefix}/my_env/task", {"split": "train", "index": 1}),
        ("POST", f"{prefix}/my_env/task_range", {"split": "train", "stop": 1}),
        ("POST", f"{prefix}/my_env/task_range", {"split": "train"}),
    ]
    for _, _, headers, body in server.requests:
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["User-Agent"].startswith("chatenv/")
        assert (headers.get("Content-Type") == "application/json") == (body is not None)


_TASK_FAILURES = {  # the server's answer -> the error raised, and what its message holds
    "400 bad index": ((400, {"detail": "Invalid task index"}), ChatEnvError, "VALIDATION_ERROR", "HTTP 400: Invalid task index"),
    "422 pydantic errors": ((422, {"detail": [{"type": "missing", "loc": ["body", "index"], "msg": "Field required"}]}),
                            ChatEnvError, "VALIDATION_ERROR", "HTTP 422: Field required"),
    "404 unknown environment": ((404, {"detail": "unknown environment 'x'"}), ChatEnvError, "VALIDATION_ERROR",
                                "HTTP 404: unknown environment 'x'"),
    "501 no tasks": ((501, {"detail": "get_task is not supported for this environment"}), ChatEnvError,
                     "EXECUTION_ERROR", "HTTP 501: get_task is not supported"),
    "500 text": ((500, "Internal Server Error"), ChatEnvError, "EXECUTION_ERROR", "HTTP 500: Internal Server Error"),
    "401": ((401, {"detail": "Unauthorized"}), ConnectionError, None, "auth token"),
    "200 not an object": ((200, [1]), ChatEnvError, "PROTOCOL_ERROR", "not an object holding 'task'"),
    "200 without task": ((200, {"tasks": []}), ChatEnvError, "PROTOCOL_ERROR", "not an object holding 'task'"),
    "200 not JSON": ((200, "<html>"), ChatEnvError, "PROTOCOL_ERROR", "<html>"),
}


@pytest.mark.parametrize("case", sorted(_TASK_FAILURES))
def test_task_method_failures_are_named(make_client, case):
    answer, error, code, text = _TASK_FAILURES[case]
    answers = {("GET", "/list_environments"): (200, ["chat_env"]), ("POST", "/chat_env/task"): answer}
    with TaskServer(answers) as server:
        env = make_client(f"http://127.0.0.1:{server.port}")
        with pytest.raises(error) as info:
            _task(env, "get_task", "train", 9)
        assert type(info.value) is error and text in str(info.value)
        assert "get_task() (POST /chat_env/task on http://127.0.0.1:" in str(info.value)
        if code:
            assert info.value.code == code


def test_task_methods_check_their_arguments_before_sending(make_client):
    with TaskServer({}) as server:
        env = make_client(f"http://127.0.0.1:{server.port}")
        for name, args, named in [("list_tasks", (1,), "split"), ("get_task", ("train", "0"), "index"),
                                  ("get_task", ("train", True), "index"), ("get_task", ("train", None), "index"),
                                  ("get_task_range", ("train", 0.5), "start")]:
            with pytest.raises(TypeError, match=f"{name}\\(\\): {named} must be"):
                _task(env, name, *args)
        assert [path for _, path, _, _ in server.requests] == []


def test_task_methods_against_a_server_without_tasks_say_so(make_client):
    """A chatenv server without tasks answers each route 501, as OpenEnv's does for an
    environment without the methods: EXECUTION_ERROR naming the method; the session
    (none needed for the task API) still works."""
    with serve_in_thread() as url:
        env = make_client(url)
        for name, args in TASK_METHODS:
            with pytest.raises(ChatEnvError) as info:
                _task(env, name, *args)
            assert info.value.code == "EXECUTION_ERROR"
            assert f"HTTP 501: {name} is not supported for this environment" in info.value.message
        assert env.reset().observation.tokens == []


def test_task_methods_with_no_message_limit_read_the_whole_answer(make_client):
    """max_message_bytes=None (no limit) reads a task route's answer whole: it once named
    a constant that was gone (NameError)."""
    tasks = chatenv.Tasks({"train": str(HERE / "examples" / "arithmetic.jsonl")})
    with serve_in_thread(tasks=tasks) as url:
        env = make_client(url, max_message_bytes=None)
        assert _task(env, "num_tasks", "train") == tasks.num_tasks("train")
        assert _task(env, "get_task", "train", 0) == tasks.get_task("train", 0)


def test_task_methods_on_a_server_that_is_not_there(make_client):
    env = make_client(f"http://127.0.0.1:{free_port()}", message_timeout_s=5)
    with pytest.raises(ConnectionError, match="GET /list_environments on http://127.0.0.1"):
        _task(env, "list_splits")


# ------------------------------------------------------------------------------
# Full observations, OpenEnv's two shapes: parsed O(new), equal to json.loads
# ------------------------------------------------------------------------------

SHAPES = ["0.3.0", "0.10.0"]


def _episode_frames(shape, steps, **frame_options):
    """A reset's frame and ``steps`` step frames of one growing episode, as OpenEnv sends them."""
    messages, tokens, frames = [], [], [observation([], [], shape=shape, **frame_options)]
    for i in range(steps):
        ids = [97 + (i + k) % 26 for k in range(1 + i % 3)]
        messages = messages + [{"role": "assistant", "content": bytes(ids).decode()}]
        tokens = tokens + ids
        frames.append(observation(messages, tokens, shape=shape, **frame_options))
    return frames


def _counting_full_parses(core):
    """Count the core's whole-frame parses (what the O(new) path avoids)."""
    counts = {"full": 0}
    whole = core._parse_observation

    def counted(data):
        counts["full"] += 1
        return whole(data)

    core._parse_observation = counted
    return counts


@pytest.mark.parametrize("shape", SHAPES)
def test_full_observations_of_both_shapes_are_parsed_only_past_the_last_one(make_client, shape):
    frames = _episode_frames(shape, 40)
    with replay_server(frames) as url:
        env = make_client(url, delta=False)
        counts = _counting_full_parses(env.client._core)
        results = [env.reset()] + [env.step([1]) for _ in range(40)]
    assert counts["full"] == 1  # the reset's frame; every step only past the one before
    for frame, result in zip(frames, results):  # read only now, after every step
        assert seen(result) == expected(frame)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("delta", [True, False])
def test_observations_read_late_are_still_their_own_step(make_client, shape, delta):
    """Observations share the episode's history until read; each still shows its own step,
    and a new episode does not change the old one's."""
    frames = _episode_frames(shape, 30)
    second = _episode_frames(shape, 3)
    with replay_server(frames + second) as url:
        env = make_client(url, delta=delta)  # a replayed server sends full frames: delta or not
        results = [env.reset()] + [env.step([1]) for _ in range(30)]
        env.reset()
        env.step([1])
    for frame, result in zip(frames, results):
        assert seen(result) == expected(frame)
    results[5].observation.tokens.append(7)  # a reader's list is its own
    assert results[6].observation.tokens == expected(frames[6])[1]


def test_a_0_10_0_observation_with_metadata_reads_it(make_client):
    """OpenEnv 0.10.0 sends non-empty metadata inside the observation and beside reward."""
    frames = [observation([], [], shape="0.10.0"),
              observation(HI, [72, 105], shape="0.10.0", metadata={"turn": 1}),
              observation(HI + HI, [72, 105] * 2, 0.5, True, shape="0.10.0", metadata={"turn": 2})]
    with replay_server(frames) as url:
        env = make_client(url, delta=False)
        env.reset()
        assert env.step([72, 105]).observation.metadata == {"turn": 1}
        last = env.step([72, 105])
        assert (last.observation.metadata, last.reward, last.done) == ({"turn": 2}, 0.5, True)
        assert last.observation.tokens == [72, 105] * 2


def _delta(messages, tokens, totals, reward=None, done=False, metadata=None, top_metadata=None) -> bytes:
    """A chatenv delta observation frame: only what the step added, and the totals."""
    body = {} if metadata is None else {"metadata": metadata}
    body.update(messages=messages, tokens=tokens, delta={"messages": totals[0], "tokens": totals[1]})
    data = {"observation": body, "reward": reward, "done": done}
    if top_metadata is not None:
        data["metadata"] = top_metadata
    return json.dumps({"type": "observation", "data": data}, separators=(",", ":")).encode()


@pytest.mark.parametrize("frames", ["full", "delta"])
def test_reward_done_and_metadata_are_read_from_full_and_delta_frames(make_client, frames):
    """A boolean reward (OpenEnv 0.10 passes one through, recorded) is kept as sent, as
    OpenEnv's client keeps it; done; metadata inside the observation, or beside reward
    when only there. The same from full frames (parsed past the last one) and deltas."""
    task = {"split": "train", "index": 0, "task_id": "train-0"}
    outcomes = [(True, False, {**task, "turn": 1}, "both"), (0.25, False, {**task, "turn": 2}, "inside"),
                (False, False, {"turn": 3}, "beside"), (1, True, {**task, "turn": 4}, "both")]
    script, messages, tokens = [observation([], [], shape="0.10.0", metadata=task)], [], []
    for reward, done, meta, where in outcomes:
        messages, tokens = messages + HI, tokens + [72, 105]
        inside = meta if where != "beside" else None
        beside = meta if where != "inside" else None
        if frames == "full":
            script.append(observation(messages, tokens, reward, done, where="first" if inside else None,
                                      metadata=inside, top_metadata=beside or {}))
        else:
            script.append(_delta(HI, [72, 105], (len(messages), len(tokens)), reward, done, inside, beside))
    with replay_server(script) as url:
        env = make_client(url, delta=frames == "delta")
        first = env.reset(split="train", index=0)
        assert (first.reward, first.done, first.observation.metadata) == (None, False, task)
        for i, (reward, done, meta, _) in enumerate(outcomes, 1):
            result = env.step([72, 105])
            assert (result.reward, result.done, result.observation.metadata) == (reward, done, meta)
            assert type(result.reward) is type(reward) and type(result.observation.reward) is type(reward)
            assert (result.observation.messages, result.observation.tokens) == (HI * i, [72, 105] * i)
    assert json.loads(script[0])["data"]["observation"]["metadata"] == task


_texts = st.text(alphabet=st.sampled_from('ab "\\]}[{,:\u00e9\u2713\U0001f600\n\x00'), max_size=10) | st.sampled_from(
    ['],"tokens":[', '"}]', "\\", '{"role":"x"}', '],"metadata":{},"tokens":[', '"messages":['])
_metadata = st.dictionaries(st.sampled_from(["a", "messages", "tokens", "\u00e9"]),
                            st.integers(0, 3) | st.lists(st.integers(0, 3), max_size=2) | _texts, max_size=2)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(SHAPES), where=st.sampled_from([None, "first", "between", "last"]),
       steps=st.lists(st.tuples(_texts, st.lists(st.integers(0, 2**40), max_size=4), st.booleans(), _metadata,
                                st.booleans()), min_size=1, max_size=10),
       restart_at=st.integers(0, 12), ascii_only=st.booleans(), top=st.booleans())
def test_the_o_new_parse_equals_json_loads(shape, where, steps, restart_at, ascii_only, top):
    """Random episodes, both shapes, metadata before messages, between, after tokens or beside
    reward, changing or not, non-ASCII raw or escaped, a reset anywhere: always json.loads' result."""
    core = chatenv._ClientCore("http://h:1", delta=False)
    counts = _counting_full_parses(core)
    placed = where or ("first" if shape == "0.10.0" else None)  # where the observation's metadata lies
    messages, tokens, results, last_meta = [], [], [], None
    for i, (content, ids, change_metadata, metadata, done) in enumerate(steps):
        if i == restart_at:
            messages, tokens = [], []
        messages = messages + [{"role": "assistant", "content": content}]
        tokens = tokens + ids
        meta = metadata if change_metadata else {}
        frame = observation(messages, tokens, float(i) if done else None, done, shape=shape, where=where,
                            metadata=meta, top_metadata=meta if top else None, ascii_only=ascii_only)
        before = counts["full"]
        result = core.parse_result(frame if i % 2 else bytearray(frame))
        assert seen(result) == expected(frame)
        head_unchanged = placed not in ("first", "between") or json.dumps(meta) == json.dumps(last_meta)
        if i and i != restart_at and head_unchanged:  # it extends the last frame: parsed past it only
            assert counts["full"] == before, "an extension of the last frame was parsed whole"
        last_meta = meta
        results.append((result, frame))
    for result, frame in results:  # read late, too
        assert seen(result) == expected(frame)


def test_the_o_new_parse_handles_spacing_and_key_order_it_has_not_seen():
    """Frames with spaces and unusual key order still read right (whole, when they must be)."""
    core = chatenv._ClientCore("http://h:1", delta=False)
    frames = [
        b'{ "data" : { "done" : false , "observation" : { "tokens" : [ ] , "messages" : [ ] } },'
        b' "type" : "observation" }',
        b'{ "type" : "observation", "data" : { "observation" : { "messages" : [ {"role": "a", "content": "b"} ] ,'
        b' "tokens" : [ 1 ] } , "reward" : null } }',
        b'{ "type" : "observation", "data" : { "observation" : { "messages" : [ {"role": "a", "content": "b"},'
        b' {"role": "a", "content": "c"} ] , "tokens" : [ 1, 2 ] } , "reward" : 1 } }',
    ]
    for frame in frames:
        assert seen(core.parse_result(frame)) == expected(frame)


_OPENENV_PEER = """
import asyncio, json, socket, sys
sys.path.insert(0, {here!r})
import uvicorn
import support
app = support.openenv_chat_app(max_concurrent_envs=4)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
config = uvicorn.Config(app, log_level="warning", ws_ping_interval={interval}, ws_ping_timeout={timeout})
server = uvicorn.Server(config)
async def main():
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    print(json.dumps({{"port": sock.getsockname()[1]}}), flush=True)
    await task
asyncio.run(main())
"""


@pytest.fixture(scope="module", params=["0.10.0", "0.3.0"])
def openenv_pinging(request):
    """OpenEnv's server of each release (uvicorn) pinging every 0.2 s, dropping a client
    that does not answer within 0.2 s (20 + 20 s by default)."""
    import support

    python = support.require_venv(request.param)  # the suite builds the venvs first; a missing one fails
    code = _OPENENV_PEER.format(here=str(HERE / "tests"), interval=0.2, timeout=0.2)  # support.py
    proc = subprocess.Popen([str(python), "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{json.loads(proc.stdout.readline())['port']}"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_a_session_survives_a_pause_longer_than_openenvs_ping_timeout(make_client, openenv_pinging):
    url = openenv_pinging
    env = make_client(url)
    assert env.reset().observation.tokens == []
    env.step([72])
    control = _raw_session(url)  # never answers a ping
    env.pause(2.0)
    assert _dropped(control), "OpenEnv's server did not drop a client that never answers pings"
    assert env.step([105]).observation.tokens == [72, 105]  # the same episode
    assert env.state().history_tokens == [[72], [105]]
    env.close()


def _dropped(sock: socket.socket) -> bool:
    """Whether the server has ended this raw session (its stream ends within a second)."""
    sock.settimeout(1.0)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset by the server
        return True
    finally:
        sock.close()


def test_close_from_another_thread_ends_a_call_under_way():
    stall_s = 5.0
    with serve_in_thread(StallingTokenizer(stall_s)) as url:
        env = ChatEnv(url, message_timeout_s=30)
        env.reset()
        outcome = {}

        def stalled_step():
            try:
                env.step([0])  # the server stalls 5 s on this one
            except Exception as exc:  # recorded for the assertion below
                outcome["error"] = exc

        worker = threading.Thread(target=stalled_step)
        worker.start()
        time.sleep(0.3)
        started = time.monotonic()
        env.close()
        worker.join(5)
        assert time.monotonic() - started < stall_s / 2.5  # not the 5 s stall, nor the 30 s timeout
        assert isinstance(outcome.get("error"), EpisodeLostError) and "close()" in str(outcome["error"])
        assert wait_until(lambda: url.server.active_sessions == 0)


# ------------------------------------------------------------------------------
# A bad server: each call is bounded by message_timeout_s, the client's memory by
# max_message_bytes + 64 MB, whatever arrives (the client runs in a subprocess, so a
# hang or a blow-up is killed and measured, never the test run's)
# ------------------------------------------------------------------------------

_ATTACK_TIMEOUT_S = 2.0  # the client's message_timeout_s in these cases
_ATTACK_LIMIT = 4 * 2**20  # the client's max_message_bytes (None in the impossible-header cases)
_ATTACK_HEADROOM = 64 * 2**20  # what the client process may grow by beyond max_message_bytes
_ATTACK_RUN_S = 8.0  # how long any scripted attack goes on at most
_ATTACK_IDLE_S = 1.5  # the idle cases: how long the client sleeps while the server floods it

_ATTACK_SCRIPT = """
import asyncio, json, sys, time
sys.path.insert(0, {here!r})
from chatenv import AsyncChatEnv, ChatEnv, ChatEnvError
url, kind, idle_s, limit = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
options = dict(message_timeout_s={timeout}, max_message_bytes=None if limit == "none" else int(limit))

def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

async def steps(env, report):
    await env.reset()
    report["base"] = peak()
    await asyncio.sleep(idle_s)
    started = time.monotonic()
    try:
        await env.step([72])
        report["outcome"] = "returned"
    except ChatEnvError as exc:
        report["outcome"] = "ChatEnvError:" + exc.code
    except Exception as exc:
        report["outcome"] = type(exc).__name__
    report["elapsed"] = time.monotonic() - started

report = {{}}
if kind == "sync":
    env = ChatEnv(url, **options)
    env.reset()
    report["base"] = peak()
    time.sleep(idle_s)
    started = time.monotonic()
    try:
        env.step([72])
        report["outcome"] = "returned"
    except ChatEnvError as exc:
        report["outcome"] = "ChatEnvError:" + exc.code
    except Exception as exc:
        report["outcome"] = type(exc).__name__
    report["elapsed"] = time.monotonic() - started
else:
    asyncio.run(steps(AsyncChatEnv(url, **options), report))
report["peak"] = peak()
print(json.dumps(report), flush=True)
"""


def _flood(peer, chunk: bytes, first: bytes = b"", every_s: float = 0.0) -> None:
    """Send ``first``, then ``chunk`` again and again (every ``every_s``), for _ATTACK_RUN_S at most."""
    peer.send_raw(first)
    end = time.monotonic() + _ATTACK_RUN_S
    while time.monotonic() < end:
        peer.send_raw(chunk)
        if every_s:
            time.sleep(every_s)


def _attack(when: str, attack):
    """A scripted server that answers the reset, then runs ``attack(peer)`` on the step
    request (``when="call"``) or at once, while the client idles (``when="idle"``)."""
    def script(peer):
        peer.recv()
        peer.send(observation([], []))
        if when == "call":
            peer.recv(answer_pings=False)
        attack(peer)

    return script


_REPLY = observation(HI, [72])
_ATTACKS = {  # name: (when, attack, max_message_bytes)
    "reply-trickled-1-byte-per-0.2s": ("call", lambda peer: [
        (peer.send_raw(server_frame(_REPLY)[i:i + 1]), time.sleep(0.2)) for i in range(40)], _ATTACK_LIMIT),
    "one-ping-a-second": ("call", lambda peer: _flood(peer, server_frame(b"p", opcode=9), every_s=1.0),
                          _ATTACK_LIMIT),
    "ping-flood": ("call", lambda peer: _flood(peer, server_frame(b"", opcode=9) * 8192), _ATTACK_LIMIT),
    "pong-flood": ("call", lambda peer: _flood(peer, server_frame(b"", opcode=10) * 8192), _ATTACK_LIMIT),
    "endless-1-byte-fragments": ("call", lambda peer: _flood(
        peer, server_frame(b"x", opcode=0, fin=False) * 8192, server_frame(b"{", fin=False)), _ATTACK_LIMIT),
    "endless-empty-fragments": ("call", lambda peer: _flood(
        peer, server_frame(b"", opcode=0, fin=False) * 8192, server_frame(b"", fin=False)), _ATTACK_LIMIT),
    "idle-1-MiB-frames": ("idle", lambda peer: _flood(peer, server_frame(b" " * 2**20)), _ATTACK_LIMIT),
    "idle-empty-fragments": ("idle", lambda peer: _flood(
        peer, server_frame(b"", opcode=0, fin=False) * 8192, server_frame(b"", fin=False)), _ATTACK_LIMIT),
    "2-GiB-header-no-limit": ("call", lambda peer: _flood(
        peer, b"x" * 2**16, bytes((0x81, 127)) + (2**31).to_bytes(8, "big"), every_s=0.05), None),
    "2^62-header-no-limit": ("call", lambda peer: _flood(
        peer, b"x" * 2**16, bytes((0x81, 127)) + (2**62).to_bytes(8, "big"), every_s=0.05), None),
}


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("case", list(_ATTACKS))
def test_a_bad_server_holds_a_call_to_its_timeout_and_the_client_to_its_memory_bound(case, kind, tmp_path):
    """Whatever a server sends (trickles, pings, pongs, endless fragments, frames while
    idle, a length no reply has), a call ends within message_timeout_s + 1 s with
    TimeoutError or EpisodeLostError (a frame that came while idle: PROTOCOL_ERROR, as
    no request asked for it), and the client grows by at most max_message_bytes + 64 MB."""
    when, attack, limit = _ATTACKS[case]
    if kind == "async" and "fragments" in case and chatenv._websockets_version() < (17, 0):
        pytest.xfail("websockets' asyncio client before 17.0 gathers endless fragments until the timeout "
                     "(+75 to 100 MB in 2 s here); AsyncChatEnv cannot count them through its public API")
    script = tmp_path / "client.py"
    script.write_text(_ATTACK_SCRIPT.format(here=str(HERE), timeout=_ATTACK_TIMEOUT_S))
    idle_s = _ATTACK_IDLE_S if when == "idle" else 0.0
    with ScriptServer(_attack(when, attack)) as url:
        try:
            run = subprocess.run([sys.executable, str(script), url, kind, str(idle_s), str(limit).lower()],
                                 capture_output=True, text=True, timeout=idle_s + _ATTACK_TIMEOUT_S + 2 * SLACK)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the client hung past message_timeout_s={_ATTACK_TIMEOUT_S} s + {2 * SLACK} s")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    allowed = {"TimeoutError", "EpisodeLostError"} | ({"ChatEnvError:PROTOCOL_ERROR"} if when == "idle" else set())
    assert report["outcome"] in allowed, report
    # AsyncChatEnv only: asyncio reads up to 256 KiB at a time (its default), and websockets
    # answers every ping in it before a timer can fire: 128k empty pings, 1 to 1.5 s of CPU
    # here. Only asyncio's private transport.max_size bounds that read, and chatenv reaches
    # no private (with it: 2.2 s; without: 3.4 s; before any of this work: 3.0 to 3.8 s)
    read_s = 1.0 if kind == "async" and case == "ping-flood" else 0.0
    assert report["elapsed"] < _ATTACK_TIMEOUT_S + 1.0 + read_s, report
    assert report["peak"] - report["base"] < (limit or 0) + _ATTACK_HEADROOM, report
