"""Record what an OpenEnv chat server sends: raw frames and HTTP answers, as JSONL.

Run with a venv's interpreter (``python tests/support.py venvs`` builds them)::

    ~/.cache/chatenv/venvs/openenv-0.10.0/bin/python tools/record_openenv.py \\
        --chat-env ../OpenEnv/envs/chat_env --out tests/recordings/openenv-0.10.0.jsonl

``--chat-env`` names an OpenEnv checkout's ``envs/chat_env``: its own app
(``server/app.py``) is served under uvicorn with a byte-level tokenizer patched
in for ``get_tokenizer`` (ids 0-255 are UTF-8 bytes, no chat template, so a
system prompt is ``encode("system: <prompt>\\n")``). Without it the OpenEnv
peer of tests/support.py is recorded, which should read the same. ``--hooks``
records the peer's hooks server instead (support.openenv_hooks_app: a
transform, a WeightedSum rubric and the task API, on openenv 0.10.0)::

    ~/.cache/chatenv/venvs/openenv-0.10.0/bin/python tools/record_openenv.py --hooks \\
        --out tests/recordings/openenv-0.10.0-hooks.jsonl

One JSON object a line: ``case``, ``sent``, ``received``; HTTP cases add
``http_status``, ``content_type``, ``server_header``; WebSocket cases may add
``prelude`` (what was sent first), ``probe`` (a ``state`` taken after) and
``close`` (the close code and reason, when the server closed). Session ids the
server makes up are written as ``<session_id>``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "tests"  # support.py, the peer it serves
sys.path.insert(0, str(HERE))

from websockets.exceptions import ConnectionClosed  # noqa: E402  (in every OpenEnv venv)
from websockets.sync.client import connect as _connect  # noqa: E402
import websockets  # noqa: E402

# websockets 17 warns unless a connection not used as a context manager says legacy=True
_LEGACY = {"legacy": True} if int(websockets.__version__.split(".")[0]) >= 17 else {}


def connect(url, **kwargs):
    return _connect(url, **_LEGACY, **kwargs)

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PRELUDE = ["{\"type\":\"reset\",\"data\":{}}", "{\"type\":\"step\",\"data\":{\"tokens\":[72,105],\"metadata\":{}}}"]
STATE = '{"type":"state"}'


def _scrub(value):
    """Replace the server's random session ids, so recordings diff cleanly."""
    if isinstance(value, str):
        return _UUID.sub("<session_id>", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    return value


class Recorder:
    def __init__(self, url, out):
        self.url = url
        self.host, port = url.split("://", 1)[1].split(":")
        self.port = int(port)
        self.out = out
        self.count = 0

    def write(self, case, **fields):
        self.out.write(json.dumps(_scrub(dict(case=case, **fields)), ensure_ascii=False) + "\n")
        self.out.flush()
        self.count += 1

    # HTTP

    def http(self, method, path, body=None, raw=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        headers = {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif raw is not None:
            payload = raw.encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read().decode("utf-8", "replace")
            return response.status, data, response.getheader("content-type"), response.getheader("server")
        finally:
            conn.close()

    def record_http(self, method, path, body=None, raw=None, summarise=None):
        status, data, content_type, server = self.http(method, path, body, raw)
        received = summarise(data) if summarise else data
        self.write(f"HTTP {method} {path}", sent=body if raw is None else raw, http_status=status,
                   received=received, content_type=content_type, server_header=server)
        return status, data

    # WebSocket

    def open(self, path="/ws", **kwargs):
        """A session; retried while the server still counts the previous one
        (OpenEnv frees a slot only after its handler finishes)."""
        for _ in range(100):
            ws = connect(f"ws://{self.host}:{self.port}{path}", max_size=None, open_timeout=10, proxy=None, **kwargs)
            try:
                first = ws.recv(timeout=0.2)
            except TimeoutError:
                return ws
            except ConnectionClosed:
                first = None
            ws.close()
            if first is None or "CAPACITY_REACHED" not in first:
                raise RuntimeError(f"unexpected first frame: {first!r}")
            time.sleep(0.1)
        raise RuntimeError("the server never freed its session slot")

    @staticmethod
    def ask(ws, frame, timeout=30):
        try:
            if isinstance(frame, bytes):
                ws.send(frame)
            else:
                ws.send(frame)
            return ws.recv(timeout=timeout)
        except ConnectionClosed:
            return {"closed": Recorder.closed(ws)}

    @staticmethod
    def closed(ws):
        with contextlib.suppress(Exception):
            ws.recv(timeout=5)
        return {"code": ws.close_code, "reason": ws.close_reason}

    def record_frame(self, case, frame, prelude=True, probe=True):
        """One frame after the prelude (reset + step [72,105]), then a state probe."""
        with self.open() as ws:
            if prelude:
                for p in PRELUDE:
                    self.ask(ws, p)
            received = self.ask(ws, frame)
            fields = {"prelude": "reset + step [72,105]"} if prelude else {}
            sent = frame if isinstance(frame, str) else {"frame": "binary", "hex": frame.hex()}
            fields.update(sent=sent, received=received)
            if isinstance(received, dict):
                fields["close"] = received["closed"]
            elif probe:
                fields["probe"] = self.ask(ws, STATE)
                if isinstance(fields["probe"], dict):
                    fields["close"] = fields["probe"]["closed"]
            self.write(case, **fields)


def _openapi_summary(data):
    doc = json.loads(data)
    return {
        "info": {k: v for k, v in (doc.get("info") or {}).items() if k in ("title", "version")},
        "paths": {path: sorted(ops) for path, ops in sorted(doc.get("paths", {}).items())},
    }


def record_http_routes(rec):
    rec.record_http("GET", "/health")
    rec.record_http("HEAD", "/health")
    rec.record_http("GET", "/health?probe=1")
    rec.record_http("POST", "/health", body={})
    rec.record_http("GET", "/metadata")
    rec.record_http("GET", "/schema")
    rec.record_http("GET", "/state")
    rec.record_http("POST", "/reset", body={})
    rec.record_http("POST", "/reset", body={"seed": 1, "episode_id": "ep-1"})
    rec.record_http("POST", "/step", body={"action": {"tokens": [72, 105]}})
    rec.record_http("POST", "/step", body={"action": {"tokens": []}})
    rec.record_http("GET", "/docs", summarise=lambda d: d[:120])
    rec.record_http("GET", "/openapi.json", summarise=_openapi_summary)
    rec.record_http("GET", "/web")
    rec.record_http("GET", "/web/")
    rec.record_http("GET", "/list_environments")
    rec.record_http("GET", "/chat_env/splits")
    rec.record_http("POST", "/chat_env/num_tasks", body={"split": "test"})
    rec.record_http("GET", "/chat_env/tasks")
    rec.record_http("POST", "/chat_env/tasks", body={"split": "test"})
    rec.record_http("POST", "/chat_env/task", body={"split": "test", "index": 0})
    rec.record_http("POST", "/chat_env/task_range", body={"split": "test", "start": 0, "stop": 1})
    rec.record_http("GET", "/other_env/splits")
    rec.record_http("POST", "/mcp", body={})
    rec.record_http("POST", "/mcp", body={"jsonrpc": "2.0", "method": "tools/list", "params": {}, "id": 1})
    rec.record_http("POST", "/mcp", body={"jsonrpc": "2.0", "method": "tools/call",
                                          "params": {"name": "x", "arguments": {}}, "id": 2})
    rec.record_http("POST", "/mcp", raw="not json")
    rec.record_http("GET", "/mcp")
    rec.record_http("GET", "/harness")
    rec.record_http("GET", "/nonexistent")
    rec.record_http("HEAD", "/nonexistent")
    rec.record_http("GET", "/")
    rec.record_http("GET", "/ws")


def record_handshake(rec):
    with rec.open() as ws:
        headers = {k: v for k, v in ws.response.headers.raw_items() if k.lower() not in ("date", "sec-websocket-accept")}
        rec.write("handshake response", status=ws.response.status_code, headers=headers, subprotocol=ws.subprotocol)
    with rec.open(compression=None) as ws:
        headers = {k: v for k, v in ws.response.headers.raw_items() if k.lower() not in ("date", "sec-websocket-accept")}
        rec.write("handshake without compression", status=ws.response.status_code, headers=headers)
    with rec.open(subprotocols=["openenv.v1"]) as ws:
        rec.write("handshake asking subprotocol openenv.v1", status=ws.response.status_code, subprotocol=ws.subprotocol)


def record_normal_session(rec):
    with rec.open() as ws:
        for case, frame in [
            ("reset", '{"type":"reset","data":{}}'),
            ("reset with seed and episode_id", '{"type":"reset","data":{"seed":1,"episode_id":"ep-1"}}'),
            ("step tokens [72,105]", '{"type":"step","data":{"tokens":[72,105],"metadata":{}}}'),
            ("step tokens [33] (second step)", '{"type":"step","data":{"tokens":[33],"metadata":{}}}'),
            ("state after two steps", STATE),
            ("step UTF-8 [195,169] (third step)", '{"type":"step","data":{"tokens":[195,169],"metadata":{}}}'),
            ("step with characters JSON escapes", '{"type":"step","data":{"tokens":[34,92,10,1,127],"metadata":{}}}'),
            ("state after four steps", STATE),
            ("reset after steps", '{"type":"reset","data":{}}'),
        ]:
            rec.write(case, sent=frame, received=rec.ask(ws, frame))
        ws.send('{"type":"close"}')
        rec.write("close after a session", sent='{"type":"close"}', received={"closed": rec.closed(ws)})


ERROR_CASES = [
    ("invalid JSON text", '{"type": "step", "data": '),
    ("unknown type", '{"type":"bogus"}'),
    ("step with tokens missing", '{"type":"step","data":{"metadata":{}}}'),
    ('step with tokens ["a"]', '{"type":"step","data":{"tokens":["a"]}}'),
    ("step with empty tokens list", '{"type":"step","data":{"tokens":[]}}'),
    ("binary frame (bytes of a valid state message)", b'{"type":"state"}'),
    ("close message", '{"type":"close"}'),
    ("extra: type missing", '{"data":{}}'),
    ("extra: type not a string", '{"type":7}'),
    ("extra: step data not an object", '{"type":"step","data":[72]}'),
    ("extra: step tokens as a string", '{"type":"step","data":{"tokens":"Hi"}}'),
    ("extra: step tokens floats/bools/strings coerced", '{"type":"step","data":{"tokens":[72.9,true,"105"]}}'),
    ("extra: step tokens nested lists flattened", '{"type":"step","data":{"tokens":[[72],[105]]}}'),
    ("extra: step tokens with null", '{"type":"step","data":{"tokens":[72,null]}}'),
    ("extra: step tokens negative", '{"type":"step","data":{"tokens":[-1]}}'),
    ("extra: step unknown action field", '{"type":"step","data":{"tokens":[72],"extra":1}}'),
    ("extra: reset unknown kwarg", '{"type":"reset","data":{"foo":1}}'),
    ("extra: token id out of byte range (byte tokenizer)", '{"type":"step","data":{"tokens":[300]}}'),
    ("extra: JSON array frame", "[1,2]"),
    ("extra: JSON number frame", "42"),
    ("extra: message with extra top-level key", '{"type":"state","x":1}'),
    ('new: step with metadata {"k":1}', '{"type":"step","data":{"tokens":[33],"metadata":{"k":1}}}'),
    ("new: step with metadata null", '{"type":"step","data":{"tokens":[33],"metadata":null}}'),
    ("new: step with metadata a list", '{"type":"step","data":{"tokens":[33],"metadata":[]}}'),
    ("new: step with data null", '{"type":"step","data":null}'),
    ("new: reset with chatenv_delta true, then probe state", '{"type":"reset","data":{"chatenv_delta":true}}'),
    ("new: reset seed -1", '{"type":"reset","data":{"seed":-1}}'),
    ('new: reset seed "x"', '{"type":"reset","data":{"seed":"x"}}'),
    ("new: reset episode_id 5", '{"type":"reset","data":{"episode_id":5}}'),
    ("new: reset data null", '{"type":"reset","data":null}'),
    ("new: reset without data", '{"type":"reset"}'),
    ("new: state with data {}", '{"type":"state","data":{}}'),
    ("new: close with data {}", '{"type":"close","data":{}}'),
    ("new: mcp tools/list", '{"type":"mcp","data":{"jsonrpc":"2.0","method":"tools/list","params":{},"id":1}}'),
    ("new: mcp tools/call",
     '{"type":"mcp","data":{"jsonrpc":"2.0","method":"tools/call","params":{"name":"echo","arguments":{}},"id":2}}'),
    ("new: mcp openenv/session/create",
     '{"type":"mcp","data":{"jsonrpc":"2.0","method":"openenv/session/create","params":{},"id":3}}'),
    ("new: mcp bad request", '{"type":"mcp","data":{"nope":1}}'),
    ("new: type call_tool as a step", '{"type":"step","data":{"type":"call_tool","tool_name":"x","arguments":{}}}'),
]


def record_errors(rec):
    for case, frame in ERROR_CASES:
        rec.record_frame(case, frame)
    # Frames on a fresh session, no prelude
    with rec.open() as ws:
        received = [rec.ask(ws, STATE), rec.ask(ws, '{"type":"step","data":{"tokens":[72,105]}}')]
        rec.write("new: state then step before any reset", received=received)
    with rec.open() as ws:
        received = [rec.ask(ws, '{"type":"reset","data":{"chatenv_delta":true}}'),
                    rec.ask(ws, '{"type":"step","data":{"tokens":[72,105]}}'),
                    rec.ask(ws, '{"type":"step","data":{"tokens":[33]}}')]
        rec.write("new: chatenv_delta reset then two steps", received=received)


def record_big_messages(rec):
    tokens = [104] * 300_000
    frame = json.dumps({"type": "step", "data": {"tokens": tokens, "metadata": {}}})
    with rec.open() as ws:
        rec.ask(ws, '{"type":"reset","data":{}}')
        reply = rec.ask(ws, frame, timeout=120)
        summary = reply if isinstance(reply, dict) else {
            "bytes": len(reply), "type": json.loads(reply)["type"],
            "tokens": len(json.loads(reply)["data"]["observation"]["tokens"]),
        }
        rec.write("step of 300000 tokens", sent={"bytes": len(frame), "tokens": len(tokens)}, received=summary)
    oversize = '{"type":"state","pad":"' + "x" * (16 * 2**20) + '"}'
    with rec.open() as ws:
        rec.ask(ws, '{"type":"reset","data":{}}')
        reply = rec.ask(ws, oversize, timeout=60)
        rec.write("message over 16 MiB", sent={"bytes": len(oversize)},
                  received=reply if isinstance(reply, dict) else reply[:300])
    limit = 16 * 2**20
    exact = '{"type":"state","pad":"' + "x" * (limit - 25) + '"}'
    with rec.open() as ws:
        rec.ask(ws, '{"type":"reset","data":{}}')
        reply = rec.ask(ws, exact, timeout=60)
        if not isinstance(reply, dict):  # the reply echoes the 16 MiB: keep what it says
            reply = {"type": json.loads(reply)["type"], "code": json.loads(reply)["data"].get("code")}
        rec.write("message of exactly 16 MiB", sent={"bytes": len(exact)}, received=reply)


def record_sessions(rec):
    # /ws?session_id=<unknown>: what arrives unprompted, then the close
    ws = connect(f"ws://{rec.host}:{rec.port}/ws?session_id=does-not-exist", max_size=None, proxy=None)
    frames = []
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            frames.append(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        close = {"still_open_after_s": 3.0}
    except TimeoutError:
        close = {"still_open_after_s": 3.0}
    except ConnectionClosed:
        close = {"code": ws.close_code, "reason": ws.close_reason}
    fields = {}
    if "still_open_after_s" in close:  # then it is a session: of which episode?
        fields["then_reset"] = rec.ask(ws, '{"type":"reset","data":{}}')
        fields["then_state"] = rec.ask(ws, STATE)
    ws.close()
    rec.write("new: /ws?session_id=does-not-exist", sent=None, received=frames, close=close, **fields)
    time.sleep(0.5)
    # An HTTP MCP session, attached to over /ws
    status, data = rec.http("POST", "/mcp", body={"jsonrpc": "2.0", "method": "openenv/session/create",
                                                   "params": {}, "id": 7})[:2]
    rec.write("new: HTTP POST /mcp openenv/session/create", http_status=status, received=data)
    session_id = (json.loads(data).get("result") or {}).get("session_id")
    if session_id:
        received = []
        ws = connect(f"ws://{rec.host}:{rec.port}/ws?session_id={session_id}", max_size=None, proxy=None)
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            received.append({"unprompted": ws.recv(timeout=0.5)})
        for frame in ('{"type":"reset","data":{}}', '{"type":"step","data":{"tokens":[72,105]}}', STATE):
            received.append(rec.ask(ws, frame))
        ws.close()
        time.sleep(0.5)
        ws = connect(f"ws://{rec.host}:{rec.port}/ws?session_id={session_id}", max_size=None, proxy=None)
        try:
            received.append({"reattached_unprompted": ws.recv(timeout=0.5)})
        except TimeoutError:
            received.append({"reattached_state": rec.ask(ws, STATE)})
        except ConnectionClosed:
            received.append({"reattached_closed": {"code": ws.close_code, "reason": ws.close_reason}})
        ws.close()
        rec.write("new: /ws?session_id=<HTTP MCP session>: reset, step, state; reattach, state", received=received)
        status, data = rec.http("POST", "/mcp", body={"jsonrpc": "2.0", "method": "openenv/session/close",
                                                       "params": {"session_id": session_id}, "id": 8})[:2]
        rec.write("new: HTTP POST /mcp openenv/session/close", http_status=status, received=data)
    time.sleep(0.5)
    with contextlib.suppress(Exception):
        ws = connect(f"ws://{rec.host}:{rec.port}/mcp", max_size=None, proxy=None)
        ws.send('{"jsonrpc":"2.0","method":"tools/list","params":{},"id":1}')
        rec.write("new: WebSocket /mcp tools/list", received=ws.recv(timeout=10))
        ws.close()
    time.sleep(0.5)


def record_capacity(rec):
    with rec.open() as first:
        rec.ask(first, '{"type":"reset","data":{}}')
        second = connect(f"ws://{rec.host}:{rec.port}/ws", max_size=None, proxy=None)
        try:
            received = second.recv(timeout=10)
            close = rec.closed(second)
        except ConnectionClosed:
            received, close = None, {"code": second.close_code, "reason": second.close_reason}
        rec.write("second concurrent session", received=received, close=close)
        still = rec.ask(first, '{"type":"step","data":{"tokens":[72,105]}}')
        rec.write("first session after the refusal", received=still)
    with rec.open() as third:
        rec.write("a third session after both closed", received=rec.ask(third, '{"type":"reset","data":{}}'))


def record_shutdown(rec, proc):
    """SIGTERM to the server with one session open: the close it sees, the exit status."""
    ws = rec.open()
    rec.ask(ws, '{"type":"reset","data":{}}')
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        frame = ws.recv(timeout=30)
        close = {"frame": frame}
    except ConnectionClosed:
        close = {"code": ws.close_code, "reason": ws.close_reason}
    except TimeoutError:
        close = {"still_open_after_s": 30}
    closed_after = time.monotonic() - began
    code = proc.wait(30)
    rec.write("SIGTERM to the server with a session open", close=close,
              closed_within_s=2 if closed_after < 2 else round(closed_after), server_exit_status=code)


# The hooks server's steps, as byte-level token ids
HOOK_STEPS = {word: list(text.encode()) for word, text in (
    ("4", "4"), ("no", "no"), ("pass", "pass"), ("yes", "yes"), ("long", "I am not sure at all"), ("bye", "bye"))}


def _step(tokens):
    return json.dumps({"type": "step", "data": {"tokens": tokens, "metadata": {}}}, separators=(",", ":"))


def _reset(**data):
    return json.dumps({"type": "reset", "data": data}, separators=(",", ":"))


# WebSocket sessions on the hooks server: (case, [frames]); each a session of its own
HOOK_SESSIONS = [
    ("hooks: reset without a task", [_reset()]),
    ("hooks: reset train/0, right answer ends the episode; a step after done; state", [
        _reset(split="train", index=0), _step(HOOK_STEPS["4"]), _step(HOOK_STEPS["4"]), STATE]),
    ("hooks: reset test/1; wrong short, boolean reward, right, state", [
        _reset(split="test", index=1), _step(HOOK_STEPS["no"]), _step(HOOK_STEPS["pass"]),
        _step(HOOK_STEPS["yes"]), STATE]),
    ("hooks: reset seed 4 (train[4 % 3]); long wrong answer, bye", [
        _reset(seed=4), _step(HOOK_STEPS["long"]), _step(HOOK_STEPS["bye"])]),
    ("hooks: reset unknown split, bad index, task_id; then a task", [
        _reset(split="nope", index=0), _reset(split="train", index=3), _reset(split="train", index=-1),
        _reset(task_id="test-1"), _reset(split="hard", index=0)]),
    ("hooks: reset with chatenv_delta true, split test/0; two steps", [
        _reset(chatenv_delta=True, split="test", index=0), _step(HOOK_STEPS["no"]), _step([51])]),
    ("hooks: a step before any reset", [_step(HOOK_STEPS["4"])]),
]


def record_hooks(rec):
    """The hooks server (support.openenv_hooks_app): task routes, HTTP reset
    and step, and WebSocket sessions whose frames carry reward, done and metadata."""
    rec.record_http("GET", "/list_environments")
    rec.record_http("GET", "/chat_env/splits")
    rec.record_http("GET", "/CHAT_ENV/splits")
    rec.record_http("GET", "/other_env/splits")
    for split in ("train", "test", "hard", "nope"):
        rec.record_http("POST", "/chat_env/tasks", body={"split": split})
    for split in ("train", "nope"):
        rec.record_http("POST", "/chat_env/num_tasks", body={"split": split})
    for body in ({"split": "train", "index": 1}, {"split": "train", "index": 3}, {"split": "train", "index": -1},
                 {"split": "nope", "index": 0}, {"split": "train"}, {"split": "train", "index": "x"}):
        rec.record_http("POST", "/chat_env/task", body=body)
    for body in ({"split": "train", "start": 1, "stop": 5}, {"split": "train"}, {"split": "train", "start": -2},
                 {"split": "test", "start": 1, "stop": 0}, {"split": "nope", "start": 0, "stop": 1}):
        rec.record_http("POST", "/chat_env/task_range", body=body)
    rec.record_http("POST", "/other_env/num_tasks", body={"split": "train"})
    rec.record_http("GET", "/chat_env/tasks")
    for body in ({}, {"split": "test", "index": 1}, {"seed": 4}, {"split": "test", "index": 9},
                 {"split": "nope"}):
        rec.record_http("POST", "/reset", body=body)
    for words in ("4", "pass", "long"):
        rec.record_http("POST", "/step", body={"action": {"tokens": HOOK_STEPS[words]}})
    for case, frames in HOOK_SESSIONS:
        with rec.open() as ws:
            rec.write(case, sent=frames, received=[rec.ask(ws, frame) for frame in frames])


def start_server(chat_env, env=None, server=None):
    argv = [sys.executable, str(HERE / "support.py"), "serve-peer", "--port", "0"]
    if chat_env:
        argv += ["--chat-env", chat_env]
    if server:  # the hooks server: its failing task routes would log a traceback each
        argv += ["--server", json.dumps(server), "--log-level", "critical"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the server exited with {proc.wait()}")
    return proc, json.loads(line)["urls"][0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat-env", help="an OpenEnv checkout's envs/chat_env (default: the peer)")
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--hooks", action="store_true",
                        help="record the hooks server instead (transform, rubric, tasks; openenv 0.10.0)")
    args = parser.parse_args(argv)
    dist = "openenv" if _has_dist("openenv") else "openenv-core"
    env = {k: v for k, v in os.environ.items() if k not in ("SYSTEM_PROMPT", "TOKENIZER_NAME")}
    if args.hooks:
        return _record_hooks_main(args.out, dist, env)
    proc, url = start_server(args.chat_env, env)
    with open(args.out, "w") as out:
        rec = Recorder(url, out)
        try:
            rec.write("server", source="chat_env" if args.chat_env else "support_chatenv peer",
                      distribution=dist, version=importlib.metadata.version(dist),
                      uvicorn=importlib.metadata.version("uvicorn"),
                      websockets=importlib.metadata.version("websockets"),
                      pydantic=importlib.metadata.version("pydantic"), tokenizer="bytes (0-255), no chat template")
            record_http_routes(rec)
            record_handshake(rec)
            record_normal_session(rec)
            record_errors(rec)
            record_big_messages(rec)
            record_sessions(rec)
            record_capacity(rec)
            record_shutdown(rec, proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # A system prompt, from SYSTEM_PROMPT as chat_env reads it
        proc, url = start_server(args.chat_env, dict(env, SYSTEM_PROMPT="You are terse."))
        try:
            rec.url = url
            rec.port = int(url.rsplit(":", 1)[1])
            with rec.open() as ws:
                received = [rec.ask(ws, '{"type":"reset","data":{}}'),
                            rec.ask(ws, '{"type":"step","data":{"tokens":[72,105]}}'), rec.ask(ws, STATE),
                            rec.ask(ws, '{"type":"reset","data":{}}')]
            rec.write("system prompt (SYSTEM_PROMPT=You are terse.): reset, step, state, reset", received=received)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"{rec.count} cases written to {args.out}", file=sys.stderr)
    return 0


def _record_hooks_main(out_path, dist, env):
    proc, url = start_server(None, env, server={"hooks": True, "max_concurrent_envs": 8})
    with open(out_path, "w") as out:
        rec = Recorder(url, out)
        try:
            rec.write("server", source="support_chatenv openenv_hooks_app", distribution=dist,
                      version=importlib.metadata.version(dist), uvicorn=importlib.metadata.version("uvicorn"),
                      websockets=importlib.metadata.version("websockets"),
                      pydantic=importlib.metadata.version("pydantic"), tokenizer="bytes (0-255), no chat template")
            record_hooks(rec)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"{rec.count} cases written to {out_path}", file=sys.stderr)
    return 0


def _has_dist(name):
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
