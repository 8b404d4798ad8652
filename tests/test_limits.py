"""Limits no client can get past: how much memory an episode's history takes, the
server-wide memory bound, and configuration values refused in one line.

Memory is measured as RSS in subprocesses of their own (never timings); the bound
is driven over real sockets against a real server on a loopback port; bad flags
and variables go through ``python -m chatenv serve`` itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import chatenv
from chatenv import ChatAction, ChatEnvironment, ChatServer, handle_frame, serve_in_thread
from helpers import SLACK, ask, raw, wait_until

HERE = Path(__file__).resolve().parents[1]  # the repository's root
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc (Linux)")


def _ws(url: str):
    """helpers.raw without a limit on the size of a reply: big episodes."""
    return raw(url, max_size=None)


def _ask(ws, message, timeout: float = 10):
    """helpers.ask with a longer wait: big episodes."""
    return ask(ws, message, timeout)


# ------------------------------------------------------------------------------
# The compact history: bytes a token, by RSS
# ------------------------------------------------------------------------------

# Runs in its own interpreter: one full episode first (it takes up whatever free
# memory the heap already had), then the RSS growth of a second one is measured
_RSS_SCRIPT = r"""
import gc, json, random, sys
import chatenv

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

steps, size = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(size)
frames = [json.dumps({"type": "step", "data": {"tokens": [rng.randrange(256) for _ in range(size)]}})
          for _ in range(64)]
server = chatenv.ChatServer()  # the defaults: a 2^20-token episode, the memory bound on

def episode(delta):
    session = server._new_session()
    handle_frame = chatenv.handle_frame
    handle_frame(session, json.dumps({"type": "reset", "data": {"chatenv_delta": delta}}))
    for i in range(steps):
        reply = handle_frame(session, frames[i % 64])
        if not reply.parts[0].startswith(b'{"type":"observation"'):
            raise SystemExit(reply.data[:300])
    return session

kept = [episode(True)]
gc.collect()
before, used = rss(), server.memory_used
kept.append(episode(False))  # full replies: each holds the history's buffers, not a copy
gc.collect()
env = kept[-1].env
print(json.dumps({"tokens": env.token_count, "rss": rss() - before, "accounted": server.memory_used - used,
                  "nbytes": kept[-1].history.nbytes}))
"""


@linux_only
@pytest.mark.parametrize("steps, size, bound", [(200_000, 1, 100), (256, 4096, 12)], ids=["1-token", "4096-token"])
def test_history_bytes_per_token_by_rss(steps, size, bound):
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(steps), str(size)], capture_output=True,
                         text=True, cwd=HERE, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tokens"] == steps * size
    per_token = result["rss"] / result["tokens"]
    assert per_token <= bound, f"{per_token:.1f} bytes a token, over {bound}: {result}"
    # The memory bound counts what the history really holds: its exact buffer sizes
    # and a session's fixed overhead, never less than what RSS shows
    assert result["accounted"] == result["nbytes"] + chatenv._SESSION_OVERHEAD_BYTES
    assert result["rss"] <= result["accounted"] * 1.1 + 2**20, result


@linux_only
def test_session_fixed_overhead_covers_an_open_session_by_rss(tmp_path):
    """What a session costs beyond its history (its connection, protocol, objects) is
    at most what the memory bound charges it: measured over 1,000 open sessions."""
    count = 1000
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "chatenv", "serve", "--port", str(port), "--max-sessions",
                             str(count + 10), "--log-level", "WARNING"], cwd=HERE, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    sessions = []

    def open_session():
        ws = _ws(url)
        _ask(ws, {"type": "reset", "data": {"chatenv_delta": True}})
        _ask(ws, {"type": "step", "data": {"tokens": [72, 105]}})
        return ws

    def rss() -> int:
        with open(f"/proc/{proc.pid}/statm") as f:
            return int(f.read().split()[1]) * 4096

    try:
        assert wait_until(lambda: proc.poll() is not None or _can_connect(port), 20), "server did not start"
        for ws in [open_session() for _ in range(100)]:  # warm-up: allocator pools, caches
            ws.close()
        time.sleep(0.3)
        before = rss()
        sessions = [open_session() for _ in range(count)]
        time.sleep(0.3)
        per_session = (rss() - before) / count
        wire = chatenv._WireHistory()
        env = ChatEnvironment(history=wire)
        env.step(ChatAction([72, 105]))
        history = wire.nbytes  # each session's episode: "Hi"
        assert per_session - history <= chatenv._SESSION_OVERHEAD_BYTES, f"{per_session:.0f} bytes a session"
    finally:
        for ws in sessions:
            ws.close()
        proc.kill()
        proc.wait(10)
        log.close()


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------
# ChatEnvironment's public behaviour over the compact history
# ------------------------------------------------------------------------------


def test_environment_views_equal_a_plain_python_history():
    rng = random.Random(3)
    history = chatenv._WireHistory()
    env = ChatEnvironment(system_prompt='Be "brief"\n\u00e9\U0001f600', history=history)
    system_ids = env.reset(episode_id="e").tokens
    messages = [{"role": "system", "content": 'Be "brief"\n\u00e9\U0001f600'}]
    tokens = [tuple(system_ids)]
    for size in (1, 2, 7, 1, 300, 4096, 3):
        ids = [rng.randrange(256) for _ in range(size)]
        obs = env.step(ChatAction(ids))
        messages.append({"role": "assistant", "content": bytes(ids).decode("utf-8", errors="replace")})
        tokens.append(tuple(ids))
        assert obs.messages == messages and obs.tokens == [t for ids in tokens for t in ids]
    assert env.history_messages == messages and env.history_tokens == tokens
    assert env.token_count == sum(map(len, tokens)) and env.message_count == len(messages)
    state = env.state
    assert (state.episode_id, state.step_count) == ("e", 7)
    assert state.history_messages == messages and state.history_tokens == [list(t) for t in tokens]
    # The JSON the protocol sends is json.dumps of the same values
    assert json.loads(b"[" + history.messages_json + b"]") == messages
    assert json.loads(b"[" + history.tokens_json + b"]") == [t for ids in tokens for t in ids]
    assert json.loads(b"[" + history.history_tokens_json() + b"]") == [list(t) for t in tokens]
    message_json, token_text = history.last()
    assert json.loads(message_json) == messages[-1] and json.loads(b"[" + token_text + b"]") == list(tokens[-1])
    # The views are fresh copies: changing one changes nothing
    env.history_messages[0]["content"] = "changed"
    env.observation().tokens.clear()
    assert env.history_messages == messages and env.observation().tokens == [t for ids in tokens for t in ids]
    assert env.message_to_action({"role": "user", "content": "Hi"}).tokens[0] == chatenv.ByteTokenizer.im_start_id


def test_environment_large_last_step_is_sliced_and_equal():
    history = chatenv._WireHistory()
    env = ChatEnvironment(history=history)
    env.reset()
    big = [65] * (chatenv._LAST_KEPT_BYTES + 1)
    env.step(ChatAction(big))
    message_json, token_text = history.last()
    assert json.loads(message_json) == {"role": "assistant", "content": "A" * len(big)}
    assert json.loads(b"[" + token_text + b"]") == big
    env.step(ChatAction([66]))
    assert history.last() == (b'{"role":"assistant","content":"B"}', b"66")


def test_environment_failed_steps_leave_every_view_unchanged():
    history = chatenv._WireHistory()
    env = ChatEnvironment(max_episode_tokens=10, history=history)
    env.reset(episode_id="e")
    env.step(ChatAction([72, 105]))
    before = (env.state, env.observation(), bytes(history.messages_json), bytes(history.tokens_json), history.nbytes)
    for bad in ([72, 4000], [65] * 9):  # the tokenizer refuses an id; the episode would pass its limit
        with pytest.raises(ValueError):
            env.step(ChatAction(bad))
        assert (env.state, env.observation(), bytes(history.messages_json), bytes(history.tokens_json),
                history.nbytes) == before


# ------------------------------------------------------------------------------
# The server-wide memory bound
# ------------------------------------------------------------------------------


def test_memory_bound_options_and_accounting_without_sockets():
    assert ChatServer().max_memory_bytes == 2**31  # bounded by default
    assert ChatServer(max_memory_bytes=0).max_memory_bytes is None
    assert ChatServer(max_memory_bytes=None).max_memory_bytes is None
    with pytest.raises(ValueError, match="max_memory_bytes"):
        ChatServer(max_memory_bytes=-1)
    server = ChatServer(system_prompt="Be brief.", max_memory_bytes=2**20)
    empty = server._empty_episode_bytes
    assert empty > 0  # the system prompt is part of every episode
    session = server._new_session()
    assert server.memory_used == chatenv._SESSION_OVERHEAD_BYTES + empty  # reserved before the env exists
    handle_frame(session, json.dumps({"type": "step", "data": {"tokens": [72, 105]}}))
    assert server.memory_used == chatenv._SESSION_OVERHEAD_BYTES + session.history.nbytes
    handle_frame(session, '{"type":"reset"}')
    assert server.memory_used == chatenv._SESSION_OVERHEAD_BYTES + empty
    # Named sessions (OpenEnv's MCP) are charged and freed the same way
    named = server.create_named_session()
    assert server.memory_used == 2 * (chatenv._SESSION_OVERHEAD_BYTES + empty)
    assert server.close_named_session(named) == "closed"
    server._close_session(session, None, "test", 1000, 1, 0.0)
    assert server.memory_used == 0 and server.active_sessions == 0
    # The stateless HTTP routes' fresh environments are not sessions: nothing is charged
    assert chatenv.http_reply(server, "POST", "/step", b'{"action":{"tokens":[72]}}')[0] == 200
    assert server.memory_used == 0


def _fill(ws, tokens: list[int]) -> tuple[int, dict]:
    """Step until the server refuses; (steps that succeeded, the refusal)."""
    done = 0
    while True:
        answer = _ask(ws, {"type": "step", "data": {"tokens": tokens}})
        if answer["type"] != "observation":
            return done, answer
        done += 1


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "offloaded"])
def test_memory_bound_refuses_steps_and_sessions_and_loses_nothing(offload):
    bound = 4 * 2**20  # under what one full episode (2^20 tokens) holds: the bound, not the episode, stops it
    rng = random.Random(5)
    big = [rng.randrange(256) for _ in range(4096)]
    with serve_in_thread(max_memory_bytes=bound, offload=offload) as url:
        server = url.server
        first, second = _ws(url), _ws(url)
        try:
            for ws in (first, second):  # delta replies: the test's client reads only what is new
                _ask(ws, {"type": "reset", "data": {"episode_id": "kept", "chatenv_delta": True}})
            assert _ask(second, {"type": "step", "data": {"tokens": [72, 105]}})["type"] == "observation"
            done, refusal = _fill(first, big)  # large steps fill most of it ...
            small, refusal = _fill(first, [65])  # ... one-token steps the rest
            assert done > 100 and small > 0
            assert refusal["data"]["code"] == "EXECUTION_ERROR"
            message = refusal["data"]["message"]
            assert "--max-memory-bytes" in message and str(bound) in message and "memory" in message
            assert server.memory_used <= bound
            # Nothing stored is lost and the session stays usable
            state = _ask(first, {"type": "state"})["data"]
            assert state["episode_id"] == "kept" and state["step_count"] == done + small
            assert state["history_tokens"] == [big] * done + [[65]] * small
            # Other sessions go on: the one already open answers, and is refused a step the same way
            assert _ask(second, {"type": "state"})["data"]["history_tokens"] == [[72, 105]]
            assert _ask(second, {"type": "step", "data": {"tokens": big}})["data"]["code"] == "EXECUTION_ERROR"
            # A newcomer that the bound cannot hold is refused clearly, then closed
            with _ws(url) as newcomer:
                refused = json.loads(newcomer.recv(timeout=10))
                assert refused["data"]["code"] == "CAPACITY_REACHED"
                assert "--max-memory-bytes" in refused["data"]["message"]
                assert "memory" in refused["data"]["message"] or "bytes" in refused["data"]["message"]
                with pytest.raises(Exception):
                    newcomer.recv(timeout=10)
            assert server.active_sessions == 2
            # A reset frees its episode: the other session steps again, newcomers get in
            assert _ask(first, {"type": "reset"})["type"] == "observation"
            assert server.memory_used < 2 * (chatenv._SESSION_OVERHEAD_BYTES + 2**14)
            assert _ask(second, {"type": "step", "data": {"tokens": big}})["type"] == "observation"
            with _ws(url) as newcomer:
                _ask(newcomer, {"type": "reset"})
                assert _ask(newcomer, {"type": "step", "data": {"tokens": [72]}})["type"] == "observation"
        finally:
            first.close()
            second.close()
        # Closed sessions free what they held
        assert wait_until(lambda: server.memory_used == 0 and server.active_sessions == 0), server.memory_used


# ------------------------------------------------------------------------------
# Named sessions (HTTP MCP openenv/session/create): bounded on their own
# ------------------------------------------------------------------------------


def test_named_sessions_have_their_own_cap_a_share_of_max_sessions():
    assert ChatServer(max_sessions=256).max_named_sessions == 64  # a quarter by default
    assert ChatServer(max_sessions=3).max_named_sessions == 1  # at least 1
    assert ChatServer(max_named_sessions=0).max_named_sessions == 0
    with pytest.raises(ValueError, match="max_named_sessions"):
        ChatServer(max_named_sessions=-1)
    create = b'{"jsonrpc":"2.0","id":7,"method":"openenv/session/create"}'
    server = ChatServer(max_sessions=8, max_named_sessions=2)
    made = [chatenv.http_reply(server, "POST", "/mcp", create)[1]["result"]["session_id"] for _ in range(2)]
    refused = chatenv.http_reply(server, "POST", "/mcp", create)[1]["error"]
    assert refused["code"] == -32000 and "--max-named-sessions" in refused["message"] and "2/2" in refused["message"]
    assert refused["data"] == {"named_sessions": 2, "max_named_sessions": 2}
    assert server.active_sessions == 2 and server._new_session() is not None  # room left for /ws
    assert server.close_named_session(made[0]) == "closed"
    assert "result" in chatenv.http_reply(server, "POST", "/mcp", create)[1]  # a closed one frees its place
    server._clock = lambda: time.monotonic() + chatenv._NAMED_SESSION_TTL_S + 1  # all of them unused too long
    assert "result" in chatenv.http_reply(server, "POST", "/mcp", create)[1]  # expired at the cap: room made
    assert len(server._named) == 1
    off = ChatServer(max_named_sessions=0)
    assert "0/0" in chatenv.http_reply(off, "POST", "/mcp", create)[1]["error"]["message"]
    assert off.active_sessions == 0
    _, options = chatenv._server_arguments(chatenv._parser().parse_args(["serve", "--max-named-sessions", "0"]))
    assert options["max_named_sessions"] == 0


@linux_only
def test_a_loop_of_session_creates_leaves_room_for_websockets_and_memory(tmp_path):
    """10,000 openenv/session/create requests on default flags: a quarter of --max-sessions
    are made, the rest refused naming the cap; a new /ws session still connects, resets and
    steps, and the server's RSS grows by less than 50 MB."""
    from support import ServerProcess, read_all
    from support import connect as tcp_connect

    body = b'{"jsonrpc":"2.0","id":1,"method":"openenv/session/create"}'
    request = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATENV_")}
    with ServerProcess(tmp_path, "server", cli=["--port", "0"], env=env) as server:
        before = server.rss_kb()
        made = refused = 0
        for _ in range(10_000):
            with tcp_connect(server.port, 10) as sock:
                sock.sendall(request)
                answer = json.loads(read_all(sock, 10).partition(b"\r\n\r\n")[2])
            if "result" in answer:
                made += 1
            else:
                assert "--max-named-sessions" in answer["error"]["message"], answer
                refused += 1
        grown_mb = (server.rss_kb() - before) / 1024
        assert (made, refused) == (64, 10_000 - 64)
        with chatenv.ChatEnv(server.url) as client:
            client.reset()
            assert client.step([72, 105]).observation.messages == [{"role": "assistant", "content": "Hi"}]
            assert server.active() == 65
        print(f"RSS grew {grown_mb:.1f} MB over 10,000 creates")
        assert grown_mb < 50, f"RSS grew {grown_mb:.1f} MB"


# ------------------------------------------------------------------------------
# Configuration errors: one line, exit 2, never a traceback
# ------------------------------------------------------------------------------

_NOT_A_TOKENIZER = '{"not": "a tokenizer"}'

_BAD_CONFIG = [
    # (flags, environment, the name the error must give, the value it must show)
    (["--port", "abc"], {}, "--port", "abc"),
    (["--port", "70000"], {}, "--port", "70000"),
    (["--port", "-1"], {}, "--port", "-1"),
    (["--max-sessions", "0"], {}, "--max-sessions", "0"),
    (["--max-named-sessions", "-1"], {}, "--max-named-sessions", "-1"),
    (["--max-message-bytes", "-1"], {}, "--max-message-bytes", "-1"),
    (["--max-episode-tokens", "-3"], {}, "--max-episode-tokens", "-3"),
    (["--max-memory-bytes", "-1"], {}, "--max-memory-bytes", "-1"),
    (["--max-memory-bytes", "2GiB"], {}, "--max-memory-bytes", "2GiB"),
    (["--idle-timeout-s", "-5"], {}, "--idle-timeout-s", "-5"),
    (["--idle-timeout-s", "nan"], {}, "--idle-timeout-s", "nan"),
    (["--compression", "gzip"], {}, "--compression", "gzip"),
    (["--log-level", "loud"], {}, "--log-level", "loud"),
    (["--workers", "0"], {}, "--workers", "0"),
    (["--host", ""], {}, "--host", "''"),
    (["--tokenizer", "/no/such/dir"], {}, "--tokenizer", "/no/such/dir"),
    (["--tokenizer", "{tmp}/missing.json"], {}, "--tokenizer", "missing.json"),
    (["--tokenizer", "{tmp}/not-a-tokenizer.json"], {}, "--tokenizer", "not-a-tokenizer.json"),
    (["--tokenizer", "{tmp}/plain.txt"], {}, "--tokenizer", "plain.txt"),
    (["--max-sessions"], {}, "--max-sessions", ""),
    (["--no-such-flag"], {}, "--no-such-flag", ""),
    ([], {"CHATENV_PORT": "abc"}, "CHATENV_PORT", "abc"),
    ([], {"CHATENV_PORT": "99999"}, "CHATENV_PORT", "99999"),
    ([], {"CHATENV_MAX_SESSIONS": "-2"}, "CHATENV_MAX_SESSIONS", "-2"),
    ([], {"CHATENV_MAX_NAMED_SESSIONS": "a few"}, "CHATENV_MAX_NAMED_SESSIONS", "a few"),
    ([], {"CHATENV_MAX_MESSAGE_BYTES": "-1"}, "CHATENV_MAX_MESSAGE_BYTES", "-1"),
    ([], {"CHATENV_MAX_EPISODE_TOKENS": "1e6"}, "CHATENV_MAX_EPISODE_TOKENS", "1e6"),
    ([], {"CHATENV_MAX_MEMORY_BYTES": "lots"}, "CHATENV_MAX_MEMORY_BYTES", "lots"),
    ([], {"CHATENV_IDLE_TIMEOUT_S": "-5"}, "CHATENV_IDLE_TIMEOUT_S", "-5"),
    ([], {"CHATENV_COMPRESSION": "zip"}, "CHATENV_COMPRESSION", "zip"),
    ([], {"CHATENV_LOG_LEVEL": "noisy"}, "CHATENV_LOG_LEVEL", "noisy"),
    ([], {"CHATENV_WORKERS": "none"}, "CHATENV_WORKERS", "none"),
    ([], {"CHATENV_TOKENIZER": "/no/such/dir"}, "CHATENV_TOKENIZER", "/no/such/dir"),
    ([], {"TOKENIZER_NAME": "{tmp}/not-a-tokenizer.json"}, "TOKENIZER_NAME", "not-a-tokenizer.json"),
    (["--auth-token", " "], {}, "--auth-token", ""),
    ([], {"CHATENV_AUTH_TOKEN": ""}, "CHATENV_AUTH_TOKEN", ""),
    (["--auth-token", " t0k-9d1c"], {}, "--auth-token", "whitespace"),  # the token itself is never shown
    (["--auth-token", "t0k-9d1c\n"], {}, "--auth-token", "whitespace"),
    ([], {"CHATENV_AUTH_TOKEN": "t0k-9d1c "}, "CHATENV_AUTH_TOKEN", "whitespace"),
    # rewards, tasks and episode ends: a bad spec, a missing or malformed task file (its line named)
    (["--rubric", "no_such_reward"], {}, "--rubric", "no_such_reward"),
    (["--rubric", "json:no_such_attr"], {}, "--rubric", "json:no_such_attr"),
    (["--rubric", "no_such_module_xyz:f"], {}, "--rubric", "no_such_module_xyz:f"),
    (["--rubric", "exact_match=heavy"], {}, "--rubric", "exact_match=heavy"),
    (["--transform", "json:__version__"], {}, "--transform", "json:__version__"),
    (["--tasks", "{tmp}/no-such-tasks.jsonl"], {}, "--tasks", "no-such-tasks.jsonl"),
    (["--tasks", "{tmp}/bad-tasks.jsonl"], {}, "--tasks", "bad-tasks.jsonl:3"),
    (["--tasks", "{tmp}/not-json-tasks.jsonl"], {}, "--tasks", "not-json-tasks.jsonl:2"),
    (["--tasks", "{tmp}/tasks.jsonl", "--tasks", "{tmp}/tasks.jsonl"], {}, "--tasks", "tasks.jsonl"),
    (["--max-turns", "0"], {}, "--max-turns", "0"),
    (["--stop", ""], {}, "--stop", "''"),
    ([], {"CHATENV_RUBRIC": "exact_match,nope"}, "CHATENV_RUBRIC", "nope"),
    ([], {"CHATENV_TASKS": "test={tmp}/bad-tasks.jsonl"}, "CHATENV_TASKS", "bad-tasks.jsonl:3"),
    ([], {"CHATENV_MAX_TURNS": "many"}, "CHATENV_MAX_TURNS", "many"),
]


def _without_chatenv_variables() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("CHATENV_") and k not in ("TOKENIZER_NAME", "SYSTEM_PROMPT")}


@pytest.fixture
def config_files(tmp_path):
    (tmp_path / "not-a-tokenizer.json").write_text(_NOT_A_TOKENIZER)
    (tmp_path / "plain.txt").write_text("not JSON at all\n")
    (tmp_path / "tasks.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n')
    (tmp_path / "bad-tasks.jsonl").write_text('{"prompt": "1+1?"}\n\n{"answer": "2"}\n')
    (tmp_path / "not-json-tasks.jsonl").write_text('{"prompt": "1+1?"}\n{"prompt": \n')
    return tmp_path


@pytest.mark.parametrize("flags, variables, name, value", _BAD_CONFIG,
                         ids=[" ".join(f) or " ".join(f"{k}={v}" for k, v in e.items()) for f, e, _, _ in _BAD_CONFIG])
def test_cli_bad_value_is_one_error_line_and_exit_2(config_files, flags, variables, name, value):
    flags = [f.replace("{tmp}", str(config_files)) for f in flags]
    env = _without_chatenv_variables()
    env.update({k: v.replace("{tmp}", str(config_files)) for k, v in variables.items()})
    # --port 0 unless the case is about the port: a bad value must fail before any bind
    port = [] if any("PORT" in k for k in variables) or "--port" in flags else ["--port", "0"]
    out = subprocess.run([sys.executable, "-m", "chatenv", "serve", *port, *flags], capture_output=True,
                         text=True, env=env, cwd=HERE, timeout=60)
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatenv: error: "), out.stderr
    assert name in lines[0] and value in lines[0], lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_an_auth_token_with_surrounding_whitespace_is_refused_and_never_shown():
    """Issue 18, 7: a token a header's (stripped) value can never match is refused at start."""
    for token in (" t0k-9d1c", "t0k-9d1c\n", "\tt0k-9d1c"):
        with pytest.raises(ValueError, match="whitespace") as info:
            chatenv.ChatServer(auth_token=token)
        assert "t0k" not in str(info.value)
    assert chatenv.ChatServer(auth_token="t0k-9d1c").auth_token == "t0k-9d1c"


def test_cli_bad_variable_does_not_break_version_or_help():
    env = dict(_without_chatenv_variables(), CHATENV_PORT="abc", CHATENV_MAX_SESSIONS="-1")
    out = subprocess.run([sys.executable, "-m", "chatenv", "--version"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"chatenv {chatenv.__version__}", out
    out = subprocess.run([sys.executable, "-m", "chatenv", "serve", "--help"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 0 and "--max-memory-bytes" in out.stdout and "CHATENV_MAX_MEMORY_BYTES" in out.stdout


def test_cli_flag_wins_over_a_bad_variable_and_zero_lifts_limits():
    env = dict(_without_chatenv_variables(), CHATENV_PORT="abc", CHATENV_MAX_MEMORY_BYTES="0",
               CHATENV_MAX_MESSAGE_BYTES="0", CHATENV_IDLE_TIMEOUT_S="0")
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        _, options = chatenv._server_arguments(chatenv._parser().parse_args(["serve", "--port", "0"]))
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert options["port"] == 0
    assert options["max_memory_bytes"] is None and options["max_message_bytes"] is None
    assert options["idle_timeout_s"] is None
    _, options = chatenv._server_arguments(chatenv._parser().parse_args(["serve", "--max-memory-bytes", "1024"]))
    assert options["max_memory_bytes"] == 1024


def test_asgi_app_gets_the_same_one_line_error_from_a_bad_variable(monkeypatch):
    for name in ("CHATENV_PORT", "CHATENV_TOKENIZER", "TOKENIZER_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATENV_MAX_MEMORY_BYTES", "-4")
    app = chatenv.ASGIApp._from_environment()
    with pytest.raises(ValueError) as info:
        app._server()
    assert str(info.value) == "CHATENV_MAX_MEMORY_BYTES: must be 0 (no limit) or more, not '-4'"


def test_install_hints_name_the_package_needed(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_hf(name, *args, **kwargs):
        if name in ("tokenizers", "transformers"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(builtins, "__import__", no_hf)
    for name in ("tokenizers", "transformers"):  # and not found: load_tokenizer looks before importing
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install tokenizers$"):
        chatenv.load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ImportError, match=r"pip install transformers$"):
        chatenv.load_tokenizer("some-org/some-model")
    with pytest.raises(FileNotFoundError, match="tokenizer path not found: /no/such/dir"):
        chatenv.load_tokenizer("/no/such/dir")
    with pytest.raises(ValueError, match="not a tokenizer.json"):  # not "needs the package": it is no tokenizer
        chatenv.load_tokenizer("/etc/passwd")


# The README's promise for every start-up failure: one line, this shape, exit status 2
_ONE_LINE = re.compile(r"chatenv: error: (argument )?(?P<name>[-A-Z_a-z]+): (?P<what>.+), not (?P<value>'.*')")


def _serve_fails(*flags, timeout=60, **variables):
    """Run `chatenv serve` with these flags and variables, expecting it to refuse to start:
    (the one line's parts, the seconds it took)."""
    env = dict(_without_chatenv_variables(), **variables)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "chatenv", "serve", *flags], capture_output=True, text=True,
                         env=env, cwd=HERE, timeout=timeout)
    took = time.monotonic() - started
    assert out.returncode == 2 and out.stdout == "", (out.returncode, out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if not line.startswith("[transformers]")]  # its import notice
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    match = _ONE_LINE.fullmatch(lines[0])
    assert match, lines[0]
    return match, took


def test_cli_missing_tokenizer_path_is_one_line_and_exit_2():
    for spec in ("/nonexistent/tok.json", "/nonexistent/model-folder"):
        match, _ = _serve_fails("--port", "0", "--tokenizer", spec)
        assert match.group("name", "what", "value") == ("--tokenizer", "no such file or directory", repr(spec))


def test_cli_file_that_is_not_a_tokenizer_says_so_and_exit_2(tmp_path):
    match, _ = _serve_fails("--port", "0", "--tokenizer", "/etc/passwd")
    assert match.group("name", "what", "value") == ("--tokenizer", "not a tokenizer.json (not a JSON object)",
                                                    "'/etc/passwd'")
    (tmp_path / "tokenizer.json").write_text(_NOT_A_TOKENIZER)  # JSON, but not a tokenizer's
    match, _ = _serve_fails("--port", "0", **{"CHATENV_TOKENIZER": str(tmp_path / "tokenizer.json")})
    assert match["name"] == "CHATENV_TOKENIZER" and match["what"].startswith("not a tokenizer.json (")
    match, _ = _serve_fails("--port", "0", "--tokenizer", str(tmp_path))  # a folder without a tokenizer
    assert match["what"].startswith("not a tokenizer folder (") and match["value"] == repr(str(tmp_path))
    # Without the tokenizers package, a file that is not JSON is still "not a tokenizer"
    code = ("import sys; sys.modules['tokenizers'] = sys.modules['transformers'] = None; import chatenv; "
            "sys.exit(chatenv.main(['serve', '--port', '0', '--tokenizer', '/etc/passwd']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=60,
                         env=_without_chatenv_variables())
    assert out.returncode == 2 and out.stderr == (
        "chatenv: error: argument --tokenizer: not a tokenizer.json (not a JSON object), not '/etc/passwd'\n")


def test_cli_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        match, _ = _serve_fails("--port", str(port))
        assert match.group("name", "what", "value") == ("--port", "already in use on 127.0.0.1", f"'{port}'")
        match, _ = _serve_fails(CHATENV_PORT=str(port))
        assert match.group("name", "value") == ("CHATENV_PORT", f"'{port}'")
        match, _ = _serve_fails("--port", str(port), "--workers", "2")  # the supervisor binds: the same line
        assert match.group("name", "what") == ("--port", "already in use on 127.0.0.1")


# The README's bound for a model name that is not here and cannot be downloaded
_MODEL_NOT_HERE_S = 10


def test_cli_model_name_not_available_offline_fails_within_10_s(tmp_path):
    pytest.importorskip("transformers")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: a Hub that refuses at once, on loopback
    hub = f"http://127.0.0.1:{closed.getsockname()[1]}"
    no_proxy = {name: "" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy")}
    try:
        for variables, why in (({"HF_ENDPOINT": hub}, "127.0.0.1 cannot be reached"),
                               ({"HF_ENDPOINT": hub, "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set")):
            match, took = _serve_fails("--port", "0", "--tokenizer", "gpt2", HF_HUB_CACHE=str(tmp_path),
                                       **no_proxy, **variables)
            assert match.group("name", "what", "value") == (
                "--tokenizer", f"not in the local Hugging Face cache, and {why}", "'gpt2'")
            assert took < _MODEL_NOT_HERE_S, took
    finally:
        closed.close()


# ------------------------------------------------------------------------------
# The ASGI app under uvicorn (a subprocess): what it holds, within the native bounds
# ------------------------------------------------------------------------------

# The app as `python -m uvicorn chatenv:app` runs it, with the options a test gives
# (the timeouts and the buffer bound have no variable: they are set here directly)
_ASGI_MODULE = r"""
import json, os
import chatenv

app = chatenv.ASGIApp(**json.loads(os.environ["CHATENV_TEST_OPTIONS"]))
"""


class _Uvicorn:
    """``python -m uvicorn`` serving ASGIApp(**options) on a free loopback port; its log in a file."""

    def __init__(self, tmp_path: Path, env=None, **options) -> None:
        from helpers import free_port

        (tmp_path / "asgi_limits.py").write_text(_ASGI_MODULE)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        variables = {k: v for k, v in os.environ.items() if not k.startswith(("CHATENV_", "UVICORN_"))}
        variables.update(env or {}, CHATENV_TEST_OPTIONS=json.dumps(options),
                         PYTHONPATH=os.pathsep.join([str(HERE), str(tmp_path)]))
        self.log_path = tmp_path / "uvicorn.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "asgi_limits:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"], cwd=tmp_path, env=variables, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        assert wait_until(lambda: self.proc.poll() is not None or self._healthy(), 20) and self.proc.poll() is None, \
            self.log()

    def _healthy(self) -> bool:
        from helpers import http_get

        try:
            return http_get(self.url + "/health", timeout=1)[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def served(self) -> bool:
        """A legitimate client is served: ChatEnv's reset and step."""
        with chatenv.ChatEnv(self.url, connect_timeout_s=5, message_timeout_s=5) as env:
            env.reset()
            return env.step([72, 105]).observation.messages[-1]["content"] == "Hi"

    def __enter__(self) -> _Uvicorn:
        return self

    def __exit__(self, *exc_info) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _peak_rss_while(server: _Uvicorn, work) -> float:
    """The server's highest RSS (MB) sampled while ``work()`` runs in this thread."""
    import threading

    peak, done = [server.rss_mb()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(server.rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join(5)
    return max(peak)


def _http_status(sock: socket.socket, timeout: float) -> int:
    """The status of the answer on ``sock`` (0: closed without one)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else 0


@linux_only
def test_asgi_http_bodies_count_against_the_buffer_bound_and_the_open_timeout(tmp_path):
    """24 concurrent POST bodies of 15 MiB that never finish (360 MiB) are held within
    max_buffered_bytes, answered 503 past it and 408 after open_timeout_s (a stalled one
    too); a legitimate client is served meanwhile. (Before: all 360 MiB, held for good.)"""
    from concurrent.futures import ThreadPoolExecutor

    bound_mb, size, clients = 32, 15 * 2**20, 24
    with _Uvicorn(tmp_path, max_buffered_bytes=bound_mb * 2**20, open_timeout_s=1.0) as server:
        base = server.rss_mb()
        stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        stalled.sendall(b"POST /step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"ac")
        began = time.monotonic()

        def post(_) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            try:
                sock.sendall(b"POST /step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
                chunk = b" " * 2**20
                for i in range(15):
                    sock.sendall(chunk if i < 14 else chunk[1:])  # all but the last byte
            except OSError:  # answered and closed before the body was all sent
                pass
            return sock

        with ThreadPoolExecutor(clients) as pool:
            socks = []
            peak = _peak_rss_while(server, lambda: socks.extend(pool.map(post, range(clients))))
        assert _http_status(stalled, 1.0 + SLACK) == 408, "a stalled body is answered within open_timeout_s"
        assert time.monotonic() - began < 1.0 + SLACK
        assert server.served()
        statuses = [_http_status(sock, 1.0 + SLACK) for sock in socks]
        for sock in [stalled, *socks]:
            sock.close()
        assert set(statuses) <= {408, 503, 0} and 503 in statuses, statuses
        # The bound, the bytearrays' growth beyond it and uvicorn's own buffers (64 KiB each)
        assert peak - base < bound_mb * 1.25 + 48, (peak, base)
        assert server.served()
        assert "Traceback" not in server.log()


@linux_only
@pytest.mark.parametrize("ws", ["websockets-sansio", "websockets"])
def test_asgi_replies_nobody_reads_are_dropped_after_the_send_timeout(tmp_path, ws):
    """Three waves of 10 sessions each step once for a 4 MiB reply and never read it
    (a small receive buffer): each is dropped after send_timeout_s and gives its
    memory back, so the waves do not add up. uvicorn's two websockets implementations
    wait for the peer at different points (before writing, after). (Before: every
    reply kept for good.)"""
    from support import open_session, text

    waves, sessions, timeout = 3, 10, 1.0
    step = text({"type": "step", "data": {"tokens": [65] * (2**20 - 64)}})  # a 4 MiB reply each
    with _Uvicorn(tmp_path, env={"UVICORN_WS": ws}, send_timeout_s=timeout) as server:
        assert server.served()
        base, peaks, held = server.rss_mb(), [], []
        for _ in range(waves):
            wave = []
            for _ in range(sessions):
                sock, _ = open_session(server.port)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(step)
                wave.append(sock)
            held += wave
            peaks.append(_peak_rss_while(server, lambda: time.sleep(timeout + 1.5)))
            assert server.served()
        gone = wait_until(lambda: chatenv_active(server) == 0, SLACK)
        for sock in held:
            sock.close()
        assert gone, "every session that stopped reading was dropped"
        # One wave's replies (40 MiB), their copies on the way out and the episodes: the
        # third wave's peak is less than a wave over the first's, not two waves (before:
        # +172, +331, +494 MB over the start; after: +88, +128, +154)
        assert peaks[-1] - peaks[0] < peaks[0] - base and max(peaks) - base < 250, (peaks, base)
        assert "Traceback" not in server.log()


def chatenv_active(server: _Uvicorn) -> int:
    from helpers import http_get

    return http_get(server.url + "/metadata")[1]["active_sessions"]


@linux_only
def test_asgi_message_limit_closes_with_1009_on_every_message(tmp_path):
    """CHATENV_MAX_MESSAGE_BYTES under uvicorn: a 1.14 MiB frame (within uvicorn's own
    16 MiB), or text whose UTF-8 passes the limit, closes the session with 1009 as the
    native server does; an honest client is served. (Before: both went through.)"""
    from websockets.exceptions import ConnectionClosed

    limit = 65536
    with _Uvicorn(tmp_path, env={"CHATENV_MAX_MESSAGE_BYTES": str(limit)}, max_message_bytes=limit) as server:
        base = server.rss_mb()
        for message in (json.dumps({"type": "step", "data": {"tokens": [65] * 300_000}}),  # 1.14 MiB
                        json.dumps({"type": "step", "data": {"message": {"role": "user", "content": "é" * 40_000}}},
                                   ensure_ascii=False)):  # 40,000 characters, 80,000 bytes
            with _ws(server.url) as ws:
                assert ask(ws, {"type": "reset"})["type"] == "observation"
                ws.send(message)
                with pytest.raises(ConnectionClosed):
                    ws.recv(timeout=10)
                assert ws.close_code == 1009, ws.close_code
        with _ws(server.url) as ws:  # just under the limit: answered
            assert ask(ws, {"type": "reset"})["type"] == "observation"
            assert ask(ws, {"type": "step", "data": {"tokens": [65] * 16_000}})["type"] == "observation"
        assert server.served()
        assert server.rss_mb() - base < 64
        assert chatenv_active(server) == 0


def test_asgi_expires_named_sessions_on_any_request():
    """A named session unused past its TTL stops counting against max_sessions at the
    next request of any kind, not only when a WebSocket connects. (Before: a new one was
    refused until then.)"""
    import asyncio

    app = chatenv.ASGIApp(max_sessions=1)
    server = app._server()
    now = [1000.0]
    server._clock = lambda: now[0]
    create = json.dumps({"jsonrpc": "2.0", "method": "openenv/session/create", "params": {}, "id": 1}).encode()

    async def post_mcp() -> dict:
        events, sent = [{"type": "http.request", "body": create, "more_body": False}], []

        async def receive():
            return events.pop(0) if events else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": [(b"host", b"127.0.0.1")],
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000), "query_string": b""}
        await app(scope, receive, send)
        assert sent[0]["status"] == 200
        return json.loads(sent[1]["body"])

    assert "result" in asyncio.run(post_mcp())
    assert "error" in asyncio.run(post_mcp())  # full: one session
    now[0] += chatenv._NAMED_SESSION_TTL_S + 1
    answer = asyncio.run(post_mcp())
    assert "result" in answer, answer
    assert server.active_sessions == 1 and len(server._named) == 1


def _image_uvicorn_variables() -> dict[str, str]:
    import re

    text = (HERE / "Dockerfile").read_text()
    return dict(re.findall(r"\b(UVICORN_[A-Z0-9_]+)=(\S+)", text))


@linux_only
def test_image_sets_uvicorn_limits_that_uvicorn_reads(tmp_path):
    """The image's UVICORN_* variables name real uvicorn options (it reads UVICORN_<OPTION>),
    match the native defaults, and take effect with no flags: a frame past
    UVICORN_WS_MAX_SIZE is closed by uvicorn itself with 1009."""
    from websockets.exceptions import ConnectionClosed

    variables = _image_uvicorn_variables()
    assert {"UVICORN_WS_MAX_SIZE", "UVICORN_LIMIT_CONCURRENCY", "UVICORN_WS_PING_INTERVAL",
            "UVICORN_WS_PING_TIMEOUT", "UVICORN_H11_MAX_INCOMPLETE_EVENT_SIZE"} <= set(variables)
    options = subprocess.run([sys.executable, "-m", "uvicorn", "--help"], capture_output=True, text=True,
                             check=True).stdout
    for name in variables:
        assert f"--{name[len('UVICORN_'):].lower().replace('_', '-')} " in options, name
    defaults = ChatServer()
    assert int(variables["UVICORN_WS_MAX_SIZE"]) == defaults.max_message_bytes
    assert int(variables["UVICORN_H11_MAX_INCOMPLETE_EVENT_SIZE"]) == chatenv._HTTP_HEAD_BYTES
    assert float(variables["UVICORN_WS_PING_INTERVAL"]) == defaults.ping_interval_s
    assert float(variables["UVICORN_WS_PING_TIMEOUT"]) == defaults.ping_timeout_s
    assert int(variables["UVICORN_LIMIT_CONCURRENCY"]) == defaults.max_sessions + defaults.max_handshakes
    with _Uvicorn(tmp_path, env=dict(variables, UVICORN_WS_MAX_SIZE=str(2**16)), max_message_bytes=None) as server:
        with _ws(server.url) as ws:
            assert ask(ws, {"type": "reset"})["type"] == "observation"
            ws.send(json.dumps({"type": "step", "data": {"tokens": [65] * 20_000}}))  # 80 KB: uvicorn's limit only
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 1009
        assert server.served()


# ------------------------------------------------------------------------------
# Task files: a million tasks index fast and small
# ------------------------------------------------------------------------------

_TASKS_SCRIPT = r"""
import json, sys, time
import chatenv

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

path = sys.argv[1]
before, start = rss(), time.perf_counter()
tasks = chatenv.Tasks(path)
took = time.perf_counter() - start
grown = rss() - before
file = tasks.files["train"]
assert len(file) == 1_000_000
assert file.task(999_999)["id"] == "t999999" and file.find("t123456") == 123456 and file.find("nope") is None
print(json.dumps({"seconds": took, "grown": grown}))
"""


@linux_only
def test_a_million_tasks_load_within_10_s_and_hold_under_1_2x_the_file(tmp_path):
    """Every line is checked at start, yet only an index stays: within 10 s, RSS growth under 1.2x the file."""
    path = tmp_path / "million.jsonl"
    with open(path, "w") as out:
        for i in range(1_000_000):
            out.write(f'{{"id": "t{i:06d}", "prompt": "What is {i} + {i % 97}?", "answer": "{i + i % 97}"}}\n')
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", _TASKS_SCRIPT, str(path)], capture_output=True, text=True,
                         cwd=HERE, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout)
    print(f"1,000,000 tasks ({size / 2**20:.0f} MiB): {figures['seconds']:.1f} s, RSS +{figures['grown'] / 2**20:.1f} MiB")
    assert figures["seconds"] < 10, figures
    assert figures["grown"] < 1.2 * size, (figures, size)
