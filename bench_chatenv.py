"""Benchmark chatenv against the best it could do and against OpenEnv.

One command, ``python bench_chatenv.py``, starts three kinds of server, each in
its own subprocess on a free loopback port, drives them from this process with
a raw ``websockets`` asyncio client, and prints one Markdown table:

* chatenv: ``python chatenv.py serve --port P --compression none``;
* the floor: a raw ``websockets`` server written here whose replies are
  byte-identical to chatenv's, built only by joining pre-serialised history
  strings (``python bench_chatenv.py floor --port P``): the best a library on
  ``websockets`` can do;
* the OpenEnv peer: the same chat environment written on ``openenv-core``'s
  public API and run under uvicorn (``python bench_chatenv.py openenv --port
  P``), when ``openenv-core`` is importable.

The module is also importable without ``openenv-core`` installed: the OpenEnv
peer (``openenv_chat_server`` and ``make_openenv_chat_client_class``) imports
it lazily, and the tests use both to prove wire compatibility in each
direction.

Flags: ``--quick`` (small counts, a smoke run), ``--no-openenv``, ``--json
FILE``, ``--openenv-python PATH`` (an interpreter that has ``openenv-core``,
for the OpenEnv server only).
"""

import argparse
import asyncio
import contextlib
import datetime
import functools
import http.client
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

__all__ = [
    # The OpenEnv peer
    "ByteTokenizer",
    "openenv_chat_app",
    "openenv_chat_server",
    "openenv_chat_types",
    "make_openenv_chat_client_class",
    # The floor
    "floor_serve",
    # The benchmark
    "main",
]

HERE = os.path.dirname(os.path.abspath(__file__))
CHATENV_PY = os.path.join(HERE, "chatenv.py")
_COMPACT = (",", ":")  # compact JSON, as OpenEnv (pydantic) and chatenv send it


###############################################################################
# Byte-level tokenizer (shared by the OpenEnv peer and the floor)
###############################################################################


class ByteTokenizer:
    """Token ids 0-255 are UTF-8 bytes: [72, 105] decodes to "Hi"."""

    def encode(self, text, **_kwargs):
        return list(text.encode("utf-8"))

    def decode(self, token_ids, skip_special_tokens=False, **_kwargs):
        # bytes() raises "bytes must be in range(0, 256)" for other ids, which
        # OpenEnv reports as EXECUTION_ERROR (see the recorded transcripts).
        return bytes(token_ids).decode("utf-8", errors="replace")


###############################################################################
# The OpenEnv peer: chat_env on openenv-core's public API (imported lazily)
###############################################################################

_OPENENV_TYPES = None  # namespace of the pydantic models and environment, built once
_OPENENV_CLIENT_CLASS = None  # the EnvClient subclass, built once


def _flatten_token_ids(value):
    """Lenient token coercion as OpenEnv's chat action does it.

    Tensors and arrays via ``.tolist()``, nested lists flattened, every item
    through ``int()`` (so 72.9 -> 72, True -> 1, "105" -> 105).  A string or a
    non-sequence raises TypeError, which pydantic does not wrap, so OpenEnv
    answers EXECUTION_ERROR; ``int("a")`` raises ValueError, which pydantic
    wraps with the exception object inside, and OpenEnv's error reply then
    fails to serialise: SESSION_ERROR and a closed socket, as recorded.
    """
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError("tokens must be provided as a sequence of token ids")
    flat = []
    stack = [iter(value)]
    while stack:
        for item in stack[-1]:
            if hasattr(item, "tolist"):
                item = item.tolist()
            if isinstance(item, (list, tuple)):
                stack.append(iter(item))
                break
            flat.append(int(item))
        else:
            stack.pop()
    return flat


def _tokenize_system_message(tokenizer, message):
    """The system prompt's ids: the tokenizer's chat template if it has one, as
    OpenEnv's chat environment does, else the content's bytes."""
    template = getattr(tokenizer, "apply_chat_template", None)
    if callable(template):
        ids = template(conversation=[message], tokenize=True)
    else:
        ids = tokenizer.encode(message["content"])
    return _flatten_token_ids(ids)


def openenv_chat_types():
    """Build (once) the chat models and environment on openenv-core's API.

    Returns a namespace with ``ChatAction``, ``ChatObservation``,
    ``ChatState`` (pydantic models on OpenEnv's Action/Observation/State) and
    ``ChatEnvironment`` (an OpenEnv ``Environment``).
    """
    global _OPENENV_TYPES
    if _OPENENV_TYPES is not None:
        return _OPENENV_TYPES
    from types import SimpleNamespace
    from typing import Any, Dict, List, Optional

    from pydantic import Field, field_validator

    from openenv.core.env_server import Action, Environment, Observation, State

    class ChatAction(Action):
        """One message, as token ids."""

        tokens: List[int] = Field(..., min_length=1)

        @field_validator("tokens", mode="before")
        @classmethod
        def _coerce_tokens(cls, value):
            return _flatten_token_ids(value)

    class ChatObservation(Observation):
        """The whole conversation: messages and flattened token ids."""

        messages: List[Dict[str, str]] = Field(default_factory=list)
        tokens: List[int] = Field(default_factory=list)

    class ChatState(State):
        """The history, one token list per message."""

        history_messages: List[Dict[str, str]] = Field(default_factory=list)
        history_tokens: List[List[int]] = Field(default_factory=list)

    class ChatEnvironment(Environment):
        """OpenEnv's chat_env behaviour with a byte-level tokenizer.

        Like OpenEnv's, it leaves ``episode_id`` None and ``step_count`` 0.
        """

        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self, tokenizer=None, system_prompt=None, system_role="system"):
            super().__init__()
            self._tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
            self._system_prompt = system_prompt
            self._system_role = system_role
            self._state = ChatState()
            self.reset()

        def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, **kwargs: Any):
            messages, tokens = [], []
            if self._system_prompt:
                message = {"role": self._system_role, "content": self._system_prompt}
                messages.append(message)
                tokens.append(_tokenize_system_message(self._tokenizer, message))
            self._state = ChatState(history_messages=messages, history_tokens=tokens)
            return self._observation()

        def step(self, action, timeout_s: Optional[float] = None, **kwargs: Any):
            token_ids = list(action.tokens)
            content = self._tokenizer.decode(token_ids, skip_special_tokens=True)
            self._state.history_messages.append({"role": "assistant", "content": content})
            self._state.history_tokens.append(token_ids)
            return self._observation()

        @property
        def state(self):
            return self._state

        def _observation(self):
            flat = [t for ids in self._state.history_tokens for t in ids]
            return ChatObservation(messages=[dict(m) for m in self._state.history_messages], tokens=flat)

    _OPENENV_TYPES = SimpleNamespace(
        ChatAction=ChatAction,
        ChatObservation=ChatObservation,
        ChatState=ChatState,
        ChatEnvironment=ChatEnvironment,
    )
    return _OPENENV_TYPES


def openenv_chat_app(max_concurrent_envs=1, system_prompt=None, tokenizer=None):
    """The FastAPI app OpenEnv's ``create_app`` builds for the chat environment.

    ``tokenizer`` (default: ``ByteTokenizer``) is shared by every session.
    """
    from openenv.core.env_server import create_app

    types = openenv_chat_types()
    factory = functools.partial(types.ChatEnvironment, tokenizer=tokenizer, system_prompt=system_prompt)
    return create_app(
        factory,
        types.ChatAction,
        types.ChatObservation,
        env_name="chat_env",
        max_concurrent_envs=max_concurrent_envs,
    )


@contextlib.contextmanager
def openenv_chat_server(port=0, max_concurrent_envs=1, system_prompt=None, *, tokenizer=None, host="127.0.0.1",
                        log_level="warning"):
    """Run the OpenEnv chat server under uvicorn in a background thread.

    Yields its base URL ``"http://127.0.0.1:PORT"``; stops it on exit.
    """
    import uvicorn

    app = openenv_chat_app(max_concurrent_envs=max_concurrent_envs, system_prompt=system_prompt, tokenizer=tokenizer)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2))
    errors = []

    def run():
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"openenv-chat-{bound_port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"OpenEnv chat server did not start: {errors!r}")
            time.sleep(0.01)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def make_openenv_chat_client_class():
    """An ``openenv.core.EnvClient`` subclass speaking the chat payloads.

    Async by default (``async with Client(url) as env``), synchronous through
    ``Client(url).sync()``.  Results are OpenEnv ``StepResult`` objects holding
    the peer's pydantic ``ChatObservation``; ``state()`` returns ``ChatState``.
    Any action with ``.tokens`` and ``.metadata`` works, chatenv's included.
    """
    global _OPENENV_CLIENT_CLASS
    if _OPENENV_CLIENT_CLASS is not None:
        return _OPENENV_CLIENT_CLASS
    from openenv.core.client_types import StepResult
    from openenv.core.env_client import EnvClient

    types = openenv_chat_types()

    class OpenEnvChatClient(EnvClient):
        """OpenEnv's client for the chat environment (token ids as JSON lists)."""

        action_cls = types.ChatAction

        def _step_payload(self, action):
            return {"tokens": list(action.tokens), "metadata": dict(getattr(action, "metadata", None) or {})}

        def _parse_result(self, payload):
            obs = payload.get("observation") or {}
            tokens = obs.get("tokens")
            done = bool(payload.get("done", False))
            observation = types.ChatObservation(
                messages=obs.get("messages") or [],
                tokens=tokens if isinstance(tokens, list) else [],
                done=done,
                reward=payload.get("reward"),
                metadata=obs.get("metadata") or {},
            )
            return StepResult(observation=observation, reward=payload.get("reward"), done=done)

        def _parse_state(self, payload):
            history_tokens = [ids if isinstance(ids, list) else [] for ids in payload.get("history_tokens") or []]
            return types.ChatState(
                episode_id=payload.get("episode_id"),
                step_count=payload.get("step_count") or 0,
                history_messages=payload.get("history_messages") or [],
                history_tokens=history_tokens,
            )

    _OPENENV_CLIENT_CLASS = OpenEnvChatClient
    return OpenEnvChatClient


def _openenv_serve_main(port, max_concurrent_envs, system_prompt):
    """``bench_chatenv.py openenv``: the peer in the foreground, as a deployment runs it."""
    import uvicorn

    app = openenv_chat_app(max_concurrent_envs=max_concurrent_envs, system_prompt=system_prompt)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).run()


###############################################################################
# The floor: raw websockets, replies joined from pre-serialised history
###############################################################################

_OBS_HEAD = '{"type":"observation","data":{"observation":{"messages":['
_OBS_MID = '],"tokens":['
_OBS_TAIL = ']},"reward":null,"done":false}}'
_HEALTH_BODY = '{"status":"healthy"}'


def _floor_error(code, message):
    return json.dumps({"type": "error", "data": {"message": message, "code": code}}, separators=_COMPACT)


def _floor_observation(history_messages, history_tokens):
    return _OBS_HEAD + ",".join(history_messages) + _OBS_MID + ",".join(history_tokens) + _OBS_TAIL


async def _floor_session(ws, system_prompt=None):
    # The history as pre-serialised strings: each message's JSON object, each
    # message's token ids without brackets ("72,105"); replies are joins.
    history_messages, history_tokens = [], []
    episode_id = None
    step_count = 0
    async for frame in ws:
        if not isinstance(frame, str):
            await ws.send(_floor_error("INVALID_JSON", "binary frames are not supported"))
            continue
        try:
            request = json.loads(frame)
        except ValueError as exc:
            await ws.send(_floor_error("INVALID_JSON", f"Invalid JSON: {exc}"))
            continue
        kind = request.get("type") if isinstance(request, dict) else None
        data = request.get("data") if isinstance(request, dict) else None
        if kind == "step":
            tokens = data.get("tokens") if isinstance(data, dict) else None
            if not isinstance(tokens, list) or not tokens:
                await ws.send(_floor_error("VALIDATION_ERROR", "tokens must be a non-empty list"))
                continue
            try:
                content = bytes(tokens).decode("utf-8", errors="replace")
            except (TypeError, ValueError) as exc:
                await ws.send(_floor_error("EXECUTION_ERROR", str(exc)))
                continue
            history_messages.append(
                json.dumps({"role": "assistant", "content": content}, separators=_COMPACT)
            )
            history_tokens.append(",".join(map(str, tokens)))
            step_count += 1
            await ws.send(_floor_observation(history_messages, history_tokens))
        elif kind == "reset":
            data = data if isinstance(data, dict) else {}
            history_messages, history_tokens = [], []
            if system_prompt:
                history_messages.append(
                    json.dumps({"role": "system", "content": system_prompt}, separators=_COMPACT)
                )
                history_tokens.append(",".join(map(str, system_prompt.encode("utf-8"))))
            episode_id = data.get("episode_id") if isinstance(data.get("episode_id"), str) else uuid.uuid4().hex
            step_count = 0
            await ws.send(_floor_observation(history_messages, history_tokens))
        elif kind == "state":
            await ws.send(
                '{"type":"state","data":{"episode_id":'
                + json.dumps(episode_id)
                + ',"step_count":'
                + str(step_count)
                + ',"history_messages":['
                + ",".join(history_messages)
                + '],"history_tokens":['
                + ",".join("[" + ids + "]" for ids in history_tokens)
                + "]}}"
            )
        elif kind == "close":
            return
        else:
            await ws.send(_floor_error("UNKNOWN_TYPE", f"Unknown message type: {kind or ''}"))


def _floor_process_request(connection, request):
    if request.path == "/health":
        response = connection.respond(200, _HEALTH_BODY)
        response.headers["Content-Type"] = "application/json"
        return response
    if request.path != "/ws":
        return connection.respond(404, "not found\n")
    return None


async def floor_serve(port=0, host="127.0.0.1", compression=None, system_prompt=None, ready=None, stop=None):
    """Serve the floor until ``stop`` (an asyncio.Event) is set or forever.

    ``ready`` (optional callable) gets the bound port once listening.
    """
    from websockets.asyncio.server import serve

    async with serve(
        functools.partial(_floor_session, system_prompt=system_prompt),
        host,
        port,
        compression=compression,
        max_size=None,
        close_timeout=1,
        process_request=_floor_process_request,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        if ready is not None:
            ready(bound)
        if stop is None:
            stop = asyncio.Event()
        await stop.wait()


def _floor_main(port):
    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await floor_serve(port=port, stop=stop)

    asyncio.run(run())


###############################################################################
# Load generator (raw websockets asyncio client)
###############################################################################


def _ws_url(base_url):
    return base_url.replace("http://", "ws://", 1).rstrip("/") + "/ws"


def _step_frames(n_tokens, count=64, seed=1234):
    """Pre-serialised step frames of printable lowercase byte ids (97..122)."""
    rng = random.Random(seed)
    token_lists = [[rng.randint(97, 122) for _ in range(n_tokens)] for _ in range(count)]
    frames = [
        json.dumps({"type": "step", "data": {"tokens": ids, "metadata": {}}}, separators=_COMPACT)
        for ids in token_lists
    ]
    return frames, token_lists


def _reset_frame(data=None):
    return json.dumps({"type": "reset", "data": data or {}}, separators=_COMPACT)


def _check_reply(reply):
    # Cheap: the type key comes first in every reply, error replies are short.
    if '"error"' in reply[:40]:
        raise RuntimeError(f"server answered an error: {reply[:300]}")


async def _open_session(base_url, *, compression=None, reset_data=None):
    from websockets.asyncio.client import connect

    ws = await connect(_ws_url(base_url), compression=compression, max_size=None, open_timeout=60, ping_interval=None)
    await ws.send(_reset_frame(reset_data))
    _check_reply(await ws.recv())
    return ws


async def _run_steps(ws, frames, steps, latencies=None, first=0):
    perf = time.perf_counter
    for i in range(first, first + steps):
        frame = frames[i % len(frames)]
        start = perf()
        await ws.send(frame)
        reply = await ws.recv()
        if latencies is not None:
            latencies.append(perf() - start)
        _check_reply(reply)


def _percentile(sorted_values, fraction):
    return sorted_values[min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))]


async def _mode_single(base_url, steps, n_tokens, compression=None):
    frames, _ = _step_frames(n_tokens)
    ws = await _open_session(base_url, compression=compression)
    latencies = []
    try:
        start = time.perf_counter()
        await _run_steps(ws, frames, steps, latencies)
        elapsed = time.perf_counter() - start
    finally:
        await ws.close()
    ordered = sorted(latencies)
    return {
        "steps_per_s": steps / elapsed,
        "p50_ms": _percentile(ordered, 0.50) * 1e3,
        "p99_ms": _percentile(ordered, 0.99) * 1e3,
    }


async def _mode_concurrent(base_url, sessions, steps, n_tokens):
    frames, _ = _step_frames(n_tokens)
    sockets = [await _open_session(base_url) for _ in range(sessions)]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(_run_steps(ws, frames[i:] + frames[:i], steps) for i, ws in enumerate(sockets)))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"steps_per_s": sessions * steps / elapsed}


async def _mode_long(base_url, steps, n_tokens, window, compression=None, reset_data=None):
    frames, _ = _step_frames(n_tokens)
    ws = await _open_session(base_url, compression=compression, reset_data=reset_data)
    latencies = []
    try:
        start = time.perf_counter()
        await _run_steps(ws, frames, steps, latencies)
        elapsed = time.perf_counter() - start
    finally:
        await ws.close()
    return {
        "first_ms": statistics.fmean(latencies[:window]) * 1e3,
        "last_ms": statistics.fmean(latencies[-window:]) * 1e3,
        "total_s": elapsed,
    }


def _proc_status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


async def _mode_idle_rss(base_url, pid, sessions):
    frames, _ = _step_frames(16)
    warm = await _open_session(base_url)  # one-time allocations are not per session
    await _run_steps(warm, frames, 10)
    await warm.close()
    await asyncio.sleep(0.5)
    rss_before, threads_before = _proc_status(pid)
    sockets = []
    try:
        for _ in range(0, sessions, 16):
            batch = min(16, sessions - len(sockets))
            sockets.extend(await asyncio.gather(*(_open_session(base_url) for _ in range(batch))))
        await asyncio.sleep(1.0)
        rss_after, threads_after = _proc_status(pid)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {
        "rss_kb_per_session": (rss_after - rss_before) / sessions,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "threads_idle": threads_before,
        "threads_with_sessions": threads_after,
    }


async def _exchange(base_url, frames, compression=None):
    """Send frames on one fresh session and return the raw replies."""
    from websockets.asyncio.client import connect

    replies = []
    async with connect(_ws_url(base_url), compression=compression, max_size=None, ping_interval=None) as ws:
        for frame in frames:
            await ws.send(frame)
            replies.append(await ws.recv())
    return replies


###############################################################################
# Server subprocesses
###############################################################################

_CHILDREN = []  # every server subprocess started, stopped at exit whatever happens


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health_ok(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class _Server:
    """One server subprocess on a free loopback port."""

    def __init__(self, name, argv, port):
        self.name = name
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.start_s = None
        self.proc = None

    def start(self, timeout_s=60):
        begin = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=HERE, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _CHILDREN.append(self)
        while not _health_ok(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.output()[-2000:]}")
            if time.perf_counter() - begin > timeout_s:
                raise RuntimeError(f"{self.name} did not answer /health within {timeout_s} s")
            time.sleep(0.005)
        self.start_s = time.perf_counter() - begin
        return self

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _stop_all():
    for server in reversed(_CHILDREN):
        with contextlib.suppress(Exception):
            server.stop()


def _server_argv(kind, port, args, compression="none"):
    if kind == "chatenv":
        return [sys.executable, CHATENV_PY, "serve", "--port", str(port), "--compression", compression,
                "--max-sessions", "4096"]
    if kind == "floor":
        return [sys.executable, os.path.abspath(__file__), "floor", "--port", str(port)]
    if kind == "openenv":
        return [args.openenv_python, os.path.abspath(__file__), "openenv", "--port", str(port),
                "--max-concurrent-envs", "4096"]
    raise ValueError(kind)


def _start_server(kind, args, compression="none"):
    port = _free_port()
    return _Server(kind, _server_argv(kind, port, args, compression), port).start()


def _min_start_s(kind, args, runs):
    times = []
    for _ in range(runs):
        server = _start_server(kind, args)
        times.append(server.start_s)
        server.stop()
    return min(times)


###############################################################################
# The benchmark
###############################################################################

_COUNTS = {
    "full": dict(single_steps=1000, single_tokens=16, conc_sessions=32, conc_steps=100, long_steps=2000,
                 long_tokens=64, window=100, idle_sessions=256, import_runs=15, start_runs=3, repeats=5, long_repeats=2,
                 client_rounds=9),
    "quick": dict(single_steps=200, single_tokens=16, conc_sessions=32, conc_steps=20, long_steps=300,
                  long_tokens=64, window=50, idle_sessions=64, import_runs=3, start_runs=1, repeats=1, long_repeats=1,
                  client_rounds=1),
}


def _openenv_available(python):
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec("openenv") is not None
    probe = subprocess.run([python, "-c", "import openenv.core.env_server"], capture_output=True)
    return probe.returncode == 0


def _import_times(runs):
    """Wall time of ``python -c "import chatenv"`` against a stdlib baseline.

    With bytecode cached (in a temporary PYTHONPYCACHEPREFIX, as an installed
    module would have it) and with no bytecode written at all.
    """
    codes = {"chatenv": "import chatenv", "baseline": "import dataclasses, json, logging"}

    def once(code, env):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True, env=env)
        return (time.perf_counter() - start) * 1e3

    results = {}
    with tempfile.TemporaryDirectory() as cache:
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = cache
        uncached = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        for label, env in (("cached", cached), ("uncached", uncached)):
            samples = {name: [] for name in codes}
            for name, code in codes.items():
                once(code, env)  # fills the bytecode cache (when there is one)
            for _ in range(runs):  # alternated, so drifting load hits both alike
                for name, code in codes.items():
                    samples[name].append(once(code, env))
            results[label] = {name: (min(v), statistics.median(v)) for name, v in samples.items()}
    return results


def _take_turns(open_runners, steps, repeats, block):
    """Steps/s of each runner, ``repeats`` rounds of ``steps`` steps each.

    Every runner holds its own session on the server at once and they take turns
    in blocks of ``block`` steps, so load drifting on this shared machine hits all
    alike. ``open_runners()`` returns ``({name: run(start_step)}, close)``.
    """
    rates = {}
    for _ in range(repeats):
        runners, close = open_runners()
        elapsed = dict.fromkeys(runners, 0.0)
        try:
            for start in range(0, steps, block):
                for name, run in runners.items():
                    began = time.perf_counter()
                    run(start)
                    elapsed[name] += time.perf_counter() - began
        finally:
            close()
        for name, seconds in elapsed.items():
            rates.setdefault(name, []).append(steps / seconds)
    return rates


def _medians(rates, base):
    """Median steps/s of each runner, and the median over rounds of its ratio to ``base``."""
    result = {f"{name}_steps_per_s": statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        result[f"{name}_vs_{base}"] = statistics.median(v / b for v, b in zip(values, rates[base]))
    return result


def _client_block(env, actions, block):
    def run(start):
        for i in range(start, start + block):
            env.step(actions[i % len(actions)])
    return run


def _sync_client_vs_raw(url, steps, n_tokens, repeats, block=50):
    """chatenv.ChatEnv (sync) against the raw generator: same server, same steps, taking turns."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import chatenv
    from websockets.sync.client import connect as sync_connect

    frames, token_lists = _step_frames(n_tokens)
    actions = [chatenv.ChatAction(tokens=ids) for ids in token_lists]
    loop = asyncio.new_event_loop()

    async def parse_block(ws, start):  # the raw generator plus json.loads of each reply
        for i in range(start, start + block):
            await ws.send(frames[i % len(frames)])
            reply = await ws.recv()
            if json.loads(reply)["type"] != "observation":
                raise RuntimeError(reply[:300])

    def open_runners():
        raw = loop.run_until_complete(_open_session(url))
        raw_parse = loop.run_until_complete(_open_session(url))
        threading_raw = sync_connect(_ws_url(url), compression=None, max_size=None, proxy=None,
                                     ping_interval=None, legacy=True)
        threading_raw.send(_reset_frame())
        threading_raw.recv()
        default, full = chatenv.ChatEnv(url), chatenv.ChatEnv(url, delta=False)
        default.reset()
        full.reset()

        def threading_block(start):
            for i in range(start, start + block):
                threading_raw.send(frames[i % len(frames)])
                threading_raw.recv()

        def close():
            loop.run_until_complete(raw.close())
            loop.run_until_complete(raw_parse.close())
            threading_raw.close()
            default.close()
            full.close()

        return {
            "raw": lambda start: loop.run_until_complete(_run_steps(raw, frames, block, first=start)),
            "sync": _client_block(default, actions, block),
            "sync_full": _client_block(full, actions, block),
            "threading_raw": threading_block,
            "raw_parse": lambda start: loop.run_until_complete(parse_block(raw_parse, start)),
        }, close

    try:
        return dict(_medians(_take_turns(open_runners, steps, repeats, block), "raw"), rounds=repeats)
    finally:
        loop.close()


def _clients_main(url, steps, n_tokens, repeats, block=50):
    """chatenv.ChatEnv against OpenEnv's own sync client, taking turns on one server.

    Run in a subprocess of its own: importing ``openenv.core`` (torch and more)
    changes how this process's threads are scheduled, which would skew the rest.
    """
    sys.path.insert(0, HERE)
    import chatenv

    _, token_lists = _step_frames(n_tokens)
    actions = [chatenv.ChatAction(tokens=ids) for ids in token_lists]
    openenv_client = make_openenv_chat_client_class()

    def open_runners():
        ours = chatenv.ChatEnv(url)
        theirs = openenv_client(url).sync()
        theirs.__enter__()
        ours.reset()
        theirs.reset()

        def close():
            ours.close()
            theirs.__exit__(None, None, None)

        return {"chatenv": _client_block(ours, actions, block), "openenv": _client_block(theirs, actions, block)}, close

    print(json.dumps(_medians(_take_turns(open_runners, steps, repeats, block), "openenv")))


def _chatenv_vs_openenv_client(python, url, steps, n_tokens, repeats):
    out = subprocess.run([python, os.path.join(HERE, "bench_chatenv.py"), "clients", "--url", url,
                          "--steps", str(steps), "--tokens", str(n_tokens), "--rounds", str(repeats)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _identity_check(servers):
    """Byte-compare replies of the floor with chatenv (and OpenEnv) on a few steps."""
    frames, _ = _step_frames(16, count=5, seed=7)
    ascii_frames = [_reset_frame()] + frames + [json.dumps({"type": "step", "data": {"tokens": [72, 105], "metadata": {}}}, separators=_COMPACT)]
    non_ascii = ascii_frames + [json.dumps({"type": "step", "data": {"tokens": list("é \" \\ \n".encode()), "metadata": {}}}, separators=_COMPACT)]
    result = {}
    floor_ascii = asyncio.run(_exchange(servers["floor"].url, ascii_frames))
    floor_all = asyncio.run(_exchange(servers["floor"].url, non_ascii))
    for name in ("chatenv", "openenv"):
        if name not in servers:
            continue
        other_ascii = asyncio.run(_exchange(servers[name].url, ascii_frames))
        other_all = asyncio.run(_exchange(servers[name].url, non_ascii))
        result[name] = {
            "identical": other_ascii == floor_ascii,
            "identical_with_non_ascii": other_all == floor_all,
        }
        if other_ascii != floor_ascii:
            for mine, theirs in zip(floor_ascii, other_ascii):
                if mine != theirs:
                    result[name]["first_difference"] = {"floor": mine[:300], name: theirs[:300]}
                    break
        elif other_all != floor_all:
            result[name]["non_ascii_difference"] = {"floor": floor_all[-1][-200:], name: other_all[-1][-200:]}
    return result


def _machine():
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    import websockets

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "platform": platform.platform(),
    }


def _interleaved(kinds, measure, repeats, key, higher_is_better=True):
    """Run ``measure(kind)`` round-robin over the kinds, ``repeats`` rounds, and
    keep each kind's best run by ``key`` (the machine is shared and noisy: the
    best run is the one least disturbed).  A kind mapped to a smaller count in
    ``repeats`` (a dict) runs fewer rounds.
    """
    runs = {kind: [] for kind in kinds}
    rounds = max(repeats.values()) if isinstance(repeats, dict) else repeats
    for round_index in range(rounds):
        for kind in kinds:
            wanted = repeats.get(kind, rounds) if isinstance(repeats, dict) else repeats
            if round_index < wanted:
                runs[kind].append(measure(kind))
    pick = max if higher_is_better else min
    best = {}
    for kind, samples in runs.items():
        best[kind] = dict(pick(samples, key=lambda r: r[key]))
        best[kind]["runs"] = [round(r[key], 4) for r in samples]
        if key == "last_ms":
            best[kind]["samples"] = samples
    return best


def run_benchmark(args):
    counts = _COUNTS["quick" if args.quick else "full"]
    kinds = ["chatenv", "floor"]
    if not args.no_openenv and _openenv_available(args.openenv_python):
        kinds.append("openenv")
    results = {"machine": _machine(), "counts": counts, "kinds": kinds, "modes": {}}
    modes = results["modes"]
    log = functools.partial(print, file=sys.stderr, flush=True)

    log(f"# servers: {', '.join(kinds)}")
    servers = {}
    for kind in kinds:
        servers[kind] = _start_server(kind, args)
        log(f"  {kind}: /health after {servers[kind].start_s * 1e3:.0f} ms (pid {servers[kind].proc.pid})")
    start_ms = {kind: servers[kind].start_s * 1e3 for kind in kinds}
    for kind in ("chatenv", "floor"):
        if counts["start_runs"] > 1:
            start_ms[kind] = min(start_ms[kind], _min_start_s(kind, args, counts["start_runs"] - 1) * 1e3)
    modes["start_ms"] = start_ms

    results["identity"] = _identity_check(servers)
    log(f"# byte identity with the floor: {json.dumps(results['identity'])}")

    log("# idle sessions (RSS, threads)")
    modes["idle"] = {
        kind: asyncio.run(_mode_idle_rss(servers[kind].url, servers[kind].proc.pid, counts["idle_sessions"]))
        for kind in kinds
    }

    log("# one session")
    modes["single"] = _interleaved(
        kinds, lambda kind: asyncio.run(_mode_single(servers[kind].url, counts["single_steps"], counts["single_tokens"])),
        counts["repeats"], "steps_per_s")
    log(f"  {modes['single']}")

    log("# concurrent sessions")
    modes["concurrent"] = _interleaved(
        kinds, lambda kind: asyncio.run(_mode_concurrent(servers[kind].url, counts["conc_sessions"],
                                                         counts["conc_steps"], counts["single_tokens"])),
        counts["repeats"], "steps_per_s")
    log(f"  {modes['concurrent']}")

    log("# long episode")
    long_kinds = kinds + ["chatenv-delta"]

    def long_run(kind):
        if kind == "chatenv-delta":
            return asyncio.run(_mode_long(servers["chatenv"].url, counts["long_steps"], counts["long_tokens"],
                                          counts["window"], reset_data={"chatenv_delta": True}))
        return asyncio.run(_mode_long(servers[kind].url, counts["long_steps"], counts["long_tokens"],
                                      counts["window"]))

    # OpenEnv's long episode takes ~25 s on 2 cores: one run of it is enough
    long_best = _interleaved(long_kinds, long_run,
                             {k: (1 if k == "openenv" else 2 * counts["repeats"] if k == "chatenv-delta"
                                  else counts["long_repeats"]) for k in long_kinds},
                             "last_ms", higher_is_better=False)
    modes["long_delta"] = long_best.pop("chatenv-delta")
    # Its target is a ratio of two windows of one episode, each ~0.2 ms a step, close
    # to this machine's scheduling noise: take each window's median over the runs
    samples = modes["long_delta"].pop("samples")
    modes["long_delta"]["first_ms"] = statistics.median(r["first_ms"] for r in samples)
    modes["long_delta"]["last_ms"] = statistics.median(r["last_ms"] for r in samples)
    modes["long_delta"]["first_runs"] = [round(r["first_ms"], 4) for r in samples]
    for result in long_best.values():
        result.pop("samples")
    modes["long"] = long_best
    log(f"  {modes['long']}\n  chatenv delta: {modes['long_delta']}")

    log("# sync client vs raw generator (chatenv)")
    modes["sync_client"] = _sync_client_vs_raw(servers["chatenv"].url, counts["single_steps"], counts["single_tokens"],
                                               counts["client_rounds"])
    log(f"  {modes['sync_client']}")
    if "openenv" in kinds:
        log("# chatenv's sync client vs OpenEnv's, on the chatenv server")
        modes["clients"] = _chatenv_vs_openenv_client(args.openenv_python, servers["chatenv"].url,
                                                      counts["single_steps"], counts["single_tokens"], counts["client_rounds"])
        log(f"  {modes['clients']}")

    log("# compression (chatenv --compression deflate)")
    deflate = _start_server("chatenv", args, compression="deflate")
    try:
        modes["deflate_single"] = _interleaved(
            ["deflate"], lambda _: asyncio.run(_mode_single(deflate.url, counts["single_steps"], counts["single_tokens"],
                                                            compression="deflate")),
            counts["repeats"], "steps_per_s")["deflate"]
        modes["deflate_long"] = asyncio.run(_mode_long(deflate.url, counts["long_steps"], counts["long_tokens"],
                                                       counts["window"], compression="deflate"))
    finally:
        deflate.stop()
    log(f"  single {modes['deflate_single']}, long {modes['deflate_long']}")

    for kind in kinds:
        servers[kind].stop()

    log("# cold import")
    modes["import_ms"] = _import_times(counts["import_runs"])
    return results


def _fmt(value, digits=None):
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if abs(value) >= 100 else (1 if abs(value) >= 10 else 2)
    return f"{value:,.{digits}f}"


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def render_table(results):
    m = results["modes"]
    has_oe = "openenv" in results["kinds"]
    c = results["counts"]

    def get(mode, kind, key):
        entry = m.get(mode, {}).get(kind)
        return None if entry is None else entry.get(key)

    rows = []

    def row(label, mode, key, target="", ce=None, fl=None, oe=None, unit_digits=None):
        ce = get(mode, "chatenv", key) if ce is None and mode else ce
        fl = get(mode, "floor", key) if fl is None and mode else fl
        oe = (get(mode, "openenv", key) if oe is None and mode else oe) if has_oe else None
        rows.append([label, _fmt(ce, unit_digits), _fmt(fl, unit_digits), _fmt(oe, unit_digits),
                     _fmt(_ratio(ce, fl), 2), _fmt(_ratio(ce, oe), 2), target])

    s, w = c["single_steps"], c["window"]
    row(f"1 session x {s} steps x {c['single_tokens']} tok: steps/s", "single", "steps_per_s", "chatenv/floor >= 1.0")
    row("1 session: p50 latency ms", "single", "p50_ms")
    row("1 session: p99 latency ms", "single", "p99_ms")
    row(f"{c['conc_sessions']} sessions x {c['conc_steps']} steps: aggregate steps/s", "concurrent", "steps_per_s",
        "chatenv/floor >= 1.0")
    row(f"long {c['long_steps']} x {c['long_tokens']} tok: first-{w} ms/step", "long", "first_ms")
    row(f"long: last-{w} ms/step", "long", "last_ms", "chatenv/floor <= 1.1")
    row("long: total s", "long", "total_s")
    d = m["long_delta"]
    rows.append([f"long, chatenv delta on: first-{w} / last-{w} ms/step (medians of {len(d['first_runs'])} runs)",
                 f"{_fmt(d['first_ms'])} / {_fmt(d['last_ms'])}", "-", "-", "-", "-",
                 f"last/first = {_fmt(_ratio(d['last_ms'], d['first_ms']), 2)} (<= 1.5)"])
    row(f"idle sessions ({c['idle_sessions']}): RSS KB per session", "idle", "rss_kb_per_session", "<= 64 KB")
    threads = {k: m["idle"][k] for k in results["kinds"]}
    rows.append(["server threads: idle -> with idle sessions"]
                + [f"{threads[k]['threads_idle']} -> {threads[k]['threads_with_sessions']}" if k in threads else "-"
                   for k in ("chatenv", "floor", "openenv")]
                + ["-", "-", "no thread per session"])
    sc = m["sync_client"]
    rows.append([f"chatenv.ChatEnv sync client (delta, its default) vs raw generator, 1 session x {s}: steps/s",
                 f"{_fmt(sc['sync_steps_per_s'])} vs raw {_fmt(sc['raw_steps_per_s'])}", "-", "-", "-", "-",
                 f"sync/raw = {_fmt(sc['sync_vs_raw'], 2)} (>= 0.9)"])
    rows.append(["  same, ChatEnv(delta=False): full observations, as from an OpenEnv server",
                 _fmt(sc["sync_full_steps_per_s"]), "-", "-", "-", "-",
                 f"sync full/raw = {_fmt(sc['sync_full_vs_raw'], 2)}"])
    rows.append(["  same steps on websockets' threading client, parsing nothing",
                 _fmt(sc["threading_raw_steps_per_s"]), "-", "-", "-", "-",
                 f"threading raw/raw = {_fmt(sc['threading_raw_vs_raw'], 2)}"])
    if "clients" in m:
        cl = m["clients"]
        rows.append(["  ChatEnv vs OpenEnv's own sync client (`EnvClient.sync()`), same chatenv server, taking turns",
                     f"{_fmt(cl['chatenv_steps_per_s'])} vs {_fmt(cl['openenv_steps_per_s'])}", "-", "-", "-", "-",
                     f"ChatEnv/OpenEnv client = {_fmt(cl['chatenv_vs_openenv'], 2)}"])
    rows.append(["  same steps on the raw generator with json.loads of each reply",
                 _fmt(sc["raw_parse_steps_per_s"]), "-", "-", "-", "-",
                 f"raw+loads/raw = {_fmt(sc['raw_parse_vs_raw'], 2)}"])
    for label, imp in m["import_ms"].items():
        rows.append([f"cold import ms, bytecode {label} (min / median): chatenv vs `import dataclasses, json, logging`",
                     f"{_fmt(imp['chatenv'][0], 1)} / {_fmt(imp['chatenv'][1], 1)}", "-",
                     f"baseline {_fmt(imp['baseline'][0], 1)} / {_fmt(imp['baseline'][1], 1)}", "-", "-",
                     f"chatenv/baseline = {_fmt(_ratio(imp['chatenv'][0], imp['baseline'][0]), 2)} (<= 1.25)"])
    st = m["start_ms"]
    row("start until /health 200: ms", None, None, "chatenv <= 500 ms", ce=st.get("chatenv"), fl=st.get("floor"),
        oe=st.get("openenv"))
    ds, dl = m["deflate_single"], m["deflate_long"]
    rows.append([f"deflate: 1 session steps/s (chatenv none = {_fmt(get('single', 'chatenv', 'steps_per_s'))})",
                 _fmt(ds["steps_per_s"]), "-", "-", "-", "-",
                 f"deflate/none = {_fmt(_ratio(ds['steps_per_s'], get('single', 'chatenv', 'steps_per_s')), 2)}"])
    rows.append([f"deflate: long first-{w} / last-{w} ms/step",
                 f"{_fmt(dl['first_ms'])} / {_fmt(dl['last_ms'])}", "-", "-", "-", "-",
                 f"last deflate/none = {_fmt(_ratio(dl['last_ms'], get('long', 'chatenv', 'last_ms')), 2)}"])

    mach = results["machine"]
    ident = results.get("identity", {})
    lines = [
        f"chatenv benchmark, {mach['date']}: {mach['cpu']} ({mach['cpus']} cpus), Python {mach['python']}, "
        f"websockets {mach['websockets']}, {mach['platform']}",
        "floor byte-identical to chatenv on start-up steps: "
        + ", ".join(f"{k}: {'yes' if v['identical'] else 'NO'}"
                    f"{'' if v['identical_with_non_ascii'] else ' (differs on non-ASCII content)'}"
                    for k, v in ident.items()),
        "",
        "| metric | chatenv | floor | openenv | chatenv/floor | chatenv/openenv | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


###############################################################################
# Command line
###############################################################################


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "clients":
        parser = argparse.ArgumentParser(prog="bench_chatenv.py clients")
        parser.add_argument("--url", required=True)
        parser.add_argument("--steps", type=int, default=1000)
        parser.add_argument("--tokens", type=int, default=16)
        parser.add_argument("--rounds", type=int, default=5)
        sub = parser.parse_args(argv[1:])
        _clients_main(sub.url, sub.steps, sub.tokens, sub.rounds)
        return 0
    if argv and argv[0] in ("floor", "openenv"):
        parser = argparse.ArgumentParser(prog=f"bench_chatenv.py {argv[0]}")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--max-concurrent-envs", type=int, default=1)
        parser.add_argument("--system-prompt", default=None)
        sub = parser.parse_args(argv[1:])
        if argv[0] == "floor":
            _floor_main(sub.port)
        else:
            _openenv_serve_main(sub.port, sub.max_concurrent_envs, sub.system_prompt)
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run")
    parser.add_argument("--no-openenv", action="store_true", help="leave the OpenEnv peer out")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    parser.add_argument("--openenv-python", default=sys.executable,
                        help="interpreter with openenv-core for the OpenEnv server (default: this one)")
    args = parser.parse_args(argv)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        results = run_benchmark(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _stop_all()
    table = render_table(results)
    results["table"] = table
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
