"""Benchmark chatenv against the best it could do and against OpenEnv.

One command, ``python tools/bench.py``, starts three kinds of server, each in
its own subprocess on a free loopback port, drives them from this process with
a raw ``websockets`` asyncio client, and prints one Markdown table:

* chatenv: ``python chatenv.py serve --port P --compression none``;
* the floor: a raw ``websockets`` server written here whose replies are
  byte-identical to chatenv's, built only by joining pre-serialised history
  strings (``python tools/bench.py floor --port P``): the best a library on
  ``websockets`` can do;
* the OpenEnv peer: the same chat environment written on OpenEnv's public API
  and run under uvicorn (``tests/support.py serve-peer``), once in each
  release's venv (``python tests/support.py venvs`` builds them): OpenEnv
  0.10.0, the main comparison, and openenv-core 0.3.0, the older release.

The module is also importable without ``openenv-core`` installed: the OpenEnv
peer (``openenv_chat_server`` and ``make_openenv_chat_client_class``) imports
it lazily, and the tests use both to prove wire compatibility in each
direction.

Its options: ``--quick`` (small counts, a smoke run), ``--no-openenv``, ``--json
FILE``, ``--openenv-release R`` (repeatable; default: both), ``--openenv-python
PATH`` (an interpreter with OpenEnv instead of the venvs), ``--plot PATH`` /
``--no-plot`` (the picture of per-step cost against episode length, drawn with
matplotlib from the long-episode runs; default docs/step-cost.png, a temporary
file with ``--quick``).

The other modes are subcommands (``--help`` lists them, ``COMMAND --help`` their
options): ``curve`` runs only the long episodes and draws the picture; ``scale``
measures workers, nginx and memory; ``sync-client`` compares ``ChatEnv`` and
``AsyncChatEnv`` with the raw generator (taking turns on one chatenv server);
``growth`` measures how a client's step time grows over a long episode of full
observations in both of OpenEnv's frame shapes (a server replaying pre-built
frames), ``ChatEnv`` against a bare websockets client; ``keepalive`` holds
sessions through pauses longer than the server's pings allow; ``compare
--baseline DIR`` measures this tree against an older one (a ``git worktree``),
the two taking turns, for a refactor's "figures within noise"; ``hooks`` measures
steps/s with tasks and ``exact_match`` or ``boxed_match`` against no hooks, servers of
one tree taking turns, and each one's CPU per step. ``floor``,
``growth-server`` and ``clients`` are subprocesses the benchmark starts itself.
"""

import argparse
import asyncio
import contextlib
import datetime
import functools
import http.client
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's root: chatenv.py
CHATENV_PY = os.path.join(HERE, "chatenv.py")
sys.path[:0] = [path for path in (HERE, os.path.join(HERE, "tests")) if path not in sys.path]  # chatenv, support
_COMPACT = (",", ":")  # compact JSON, as OpenEnv (pydantic) and chatenv send it


# ------------------------------------------------------------------------------
# The OpenEnv peer: support's chat_env on OpenEnv's API, imported lazily
# ------------------------------------------------------------------------------

# Re-exported under the names the benchmark has always had; support is
# stdlib-only until a peer is built, so this module still imports without OpenEnv.
from support import (  # noqa: E402
    RELEASES as OPENENV_RELEASES,
    ByteTokenizer,
    VenvMissing,
    make_openenv_chat_client_class,
    openenv_chat_app,
    openenv_chat_server,
    openenv_chat_types,
    require_venv,
    venv_ready,
)

SUPPORT_PY = os.path.join(HERE, "tests", "support.py")


# ------------------------------------------------------------------------------
# The floor: raw websockets, replies joined from pre-serialised history
# ------------------------------------------------------------------------------

# OpenEnv 0.10.0's shape, metadata first, which chatenv sends (0.3.0 left metadata out)
_OBS_HEAD = '{"type":"observation","data":{"observation":{"metadata":{},"messages":['
_OBS_MID = '],"tokens":['
_OBS_TAIL = ']},"reward":null,"done":false}}'
_HEALTH_BODY = '{"status":"healthy"}'


def _floor_error(code, message):
    """An error frame, as chatenv and OpenEnv write it."""
    return json.dumps({"type": "error", "data": {"message": message, "code": code}}, separators=_COMPACT)


def _floor_observation(history_messages, history_tokens):
    """A full observation frame: the pre-serialised history joined, nothing encoded."""
    return _OBS_HEAD + ",".join(history_messages) + _OBS_MID + ",".join(history_tokens) + _OBS_TAIL


async def _floor_session(ws, system_prompt=None):
    """One session of the floor: its history as pre-serialised strings (each message's
    JSON object, each message's token ids without brackets, "72,105"); replies are joins."""
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
            history_messages.append(  # raw UTF-8, as chatenv and OpenEnv write text
                json.dumps({"role": "assistant", "content": content}, separators=_COMPACT, ensure_ascii=False)
            )
            history_tokens.append(",".join(map(str, tokens)))
            step_count += 1
            await ws.send(_floor_observation(history_messages, history_tokens))
        elif kind == "reset":
            data = data if isinstance(data, dict) else {}
            history_messages, history_tokens = [], []
            if system_prompt:
                history_messages.append(
                    json.dumps({"role": "system", "content": system_prompt}, separators=_COMPACT, ensure_ascii=False)
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
    """/health answers 200, /ws upgrades, anything else is 404."""
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
    """``tools/bench.py floor``: serve the floor on ``port`` until SIGTERM or SIGINT."""
    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await floor_serve(port=port, stop=stop)

    asyncio.run(run())


# ------------------------------------------------------------------------------
# Load generator: a raw websockets asyncio client, and the modes it drives
# ------------------------------------------------------------------------------


def _ws_url(base_url):
    """The WebSocket URL of a server's ``/ws`` from its ``http://`` base URL."""
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
    """A reset request frame, compact as the step frames."""
    return json.dumps({"type": "reset", "data": data or {}}, separators=_COMPACT)


def _check_reply(reply):
    """Raise on an error reply. Cheap: the type key comes first in every reply, and error
    replies are short."""
    if '"error"' in reply[:40]:
        raise RuntimeError(f"server answered an error: {reply[:300]}")


async def _open_session(base_url, *, compression=None, reset_data=None):
    """A raw websockets connection to the server's /ws, its episode reset."""
    from websockets.asyncio.client import connect

    ws = await connect(_ws_url(base_url), compression=compression, max_size=None, open_timeout=60, ping_interval=None)
    await ws.send(_reset_frame(reset_data))
    _check_reply(await ws.recv())
    return ws


async def _run_steps(ws, frames, steps, latencies=None, first=0):
    """``steps`` steps on ``ws`` from frame ``first`` on, each reply checked; each step's
    seconds appended to ``latencies`` if given."""
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
    """The value at ``fraction`` (0..1) of ``sorted_values``, nearest rank."""
    return sorted_values[min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))]


async def _mode_single(base_url, steps, n_tokens, compression=None):
    """One session of ``steps`` steps: steps/s and p50/p99 latency."""
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
    """``sessions`` sessions stepping at once: aggregate steps/s."""
    frames, _ = _step_frames(n_tokens)
    sockets = [await _open_session(base_url) for _ in range(sessions)]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(_run_steps(ws, frames[i:] + frames[:i], steps) for i, ws in enumerate(sockets)))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"steps_per_s": sessions * steps / elapsed}


async def _mode_long(base_url, steps, n_tokens, window, compression=None, reset_data=None, bin_steps=None):
    """One episode of ``steps`` steps: mean ms/step of its first and last ``window``
    steps, and with ``bin_steps`` the median ms/step of each run of that many steps
    (the step-cost curve; medians, so a scheduling hiccup does not make a bump)."""
    frames, _ = _step_frames(n_tokens)
    ws = await _open_session(base_url, compression=compression, reset_data=reset_data)
    latencies = []
    try:
        start = time.perf_counter()
        await _run_steps(ws, frames, steps, latencies)
        elapsed = time.perf_counter() - start
    finally:
        await ws.close()
    result = {
        "first_ms": statistics.fmean(latencies[:window]) * 1e3,
        "last_ms": statistics.fmean(latencies[-window:]) * 1e3,
        "total_s": elapsed,
    }
    if bin_steps:
        result["bins_ms"] = [statistics.median(latencies[i:i + bin_steps]) * 1e3
                             for i in range(0, steps - bin_steps + 1, bin_steps)]
    return result


def _settle(servers, quiet_s=0.3, timeout_s=20):
    """Wait until no server process uses CPU for ``quiet_s`` (at most ``timeout_s``): a
    server still tearing down the sessions of the last measure (OpenEnv's threads take
    seconds) would slow whichever server is measured next."""
    pids = [server.proc.pid for server in servers.values()]
    tick = 1 / os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout_s
    before = _cpu_s(pids)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = _cpu_s(pids)
        if now - before <= tick * len(pids):  # a tick each: timers and pings, not work
            return
        before = now


def _proc_status(pid):
    """A process's resident set (KB) and thread count, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


async def _mode_idle_rss(base_url, pid, sessions):
    """The server's RSS per idle open session, and its threads before and with them."""
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


# ------------------------------------------------------------------------------
# Server subprocesses: one per kind on a free loopback port, stopped at exit
# ------------------------------------------------------------------------------

_CHILDREN = []  # every server subprocess started, stopped at exit whatever happens


def _free_port():
    """A loopback port free now (a server started right after binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health_ok(port):
    """Whether ``GET /health`` on the loopback ``port`` answers 200."""
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

    def __init__(self, name, argv, port, env=None, cwd=HERE):
        self.name = name
        self.argv = argv
        self.port = port
        self.env = env  # None: this process's environment
        self.cwd = cwd
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.start_s = None
        self.proc = None

    def start(self, timeout_s=60):
        return self.launch().wait_ready(timeout_s)

    def launch(self):
        """Start the process and return at once (``wait_ready`` waits for /health)."""
        self.begin = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        _CHILDREN.append(self)
        return self

    def wait_ready(self, timeout_s=60):
        """Wait until /health answers 200; ``start_s`` is the time since ``launch``."""
        while not _health_ok(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.output()[-2000:]}")
            if time.perf_counter() - self.begin > timeout_s:
                raise RuntimeError(f"{self.name} did not answer /health within {timeout_s} s")
            time.sleep(0.005)
        self.start_s = time.perf_counter() - self.begin
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
    """Stop every server subprocess still running, newest first."""
    for server in reversed(_CHILDREN):
        with contextlib.suppress(Exception):
            server.stop()


def _server_argv(kind, port, args, compression="none"):
    """The command line of a server ``kind`` listening on ``port``."""
    if kind in ("chatenv", "chatenv-uvloop") or kind.startswith("chatenv@"):
        # chatenv@DIR: DIR's chatenv.py (compare). The loop named always, so a CHATENV_LOOP
        # in the environment changes nothing
        script = os.path.join(kind[len("chatenv@"):], "chatenv.py") if "@" in kind else CHATENV_PY
        return [sys.executable, script, "serve", "--port", str(port), "--compression", compression,
                "--max-sessions", "4096", "--loop", "uvloop" if kind == "chatenv-uvloop" else "asyncio"]
    if kind == "floor":
        return [sys.executable, os.path.abspath(__file__), "floor", "--port", str(port)]
    if kind.startswith("openenv-"):  # support's peer, in the release's venv
        return [args.openenv_peers[kind], SUPPORT_PY, "serve-peer", "--port", str(port),
                "--server", json.dumps({"max_concurrent_envs": 4096})]
    raise ValueError(kind)


def _openenv_peers(args):
    """``{kind: interpreter}`` of the OpenEnv peers to run, ``"openenv-0.10.0"`` first.

    Each release's venv as support builds it, or the one interpreter
    ``--openenv-python`` names (its release read from it); ``{}`` with ``--no-openenv``.
    A venv that is missing stops the run before it starts, saying how to build it.
    """
    if args.no_openenv:
        print("# OpenEnv left out (--no-openenv): no OpenEnv columns or curve", file=sys.stderr)
        return {}
    if args.openenv_python:
        code = ("import importlib.metadata as m, openenv.core.env_server\n"
                "for d in ('openenv', 'openenv-core'):\n"
                "    try:\n        print(m.version(d)); break\n"
                "    except m.PackageNotFoundError:\n        pass\n")
        probe = subprocess.run([args.openenv_python, "-c", code], capture_output=True, text=True)
        if probe.returncode or not probe.stdout.strip():
            raise SystemExit(f"tools/bench.py: --openenv-python {args.openenv_python} cannot import OpenEnv: "
                             f"{probe.stderr.strip()[-500:]}")
        return {f"openenv-{probe.stdout.split()[0]}": args.openenv_python}
    peers = {}
    for release in sorted(set(args.openenv_release or OPENENV_RELEASES), key=list(OPENENV_RELEASES).index):
        try:
            peers[f"openenv-{release}"] = str(require_venv(release))
        except VenvMissing as exc:
            others = [r for r in OPENENV_RELEASES if r != release and venv_ready(r)]
            hint = "".join(f"--openenv-release {r} (that release only) or " for r in others)
            raise SystemExit(f"tools/bench.py: {exc}.\n  Or run without it: {hint}--no-openenv (no OpenEnv "
                             "at all).") from None
    return peers


def _start_servers(kinds, args, together=False):
    """``{kind: _Server}``, each answering /health. ``together`` launches them all before
    waiting (quick runs: OpenEnv's imports take seconds), so their start times overlap."""
    servers = {}
    for kind in kinds:
        port = _free_port()
        servers[kind] = _Server(kind, _server_argv(kind, port, args), port)
        if not together:
            servers[kind].start(timeout_s=180)
    if together:
        for server in servers.values():
            server.launch()
        for server in servers.values():
            server.wait_ready(timeout_s=180)
    return servers


def _start_server(kind, args, compression="none"):
    """One server of ``kind`` on a free port, answering /health."""
    port = _free_port()
    return _Server(kind, _server_argv(kind, port, args, compression), port).start()


def _min_start_s(kind, args, runs):
    """The fastest of ``runs`` starts of ``kind``, launch until /health answers (s)."""
    times = []
    for _ in range(runs):
        server = _start_server(kind, args)
        times.append(server.start_s)
        server.stop()
    return min(times)


# ------------------------------------------------------------------------------
# Measures: import time, the clients taking turns, keepalive, identity, long episodes
# ------------------------------------------------------------------------------

_COUNTS = {
    "full": dict(single_steps=1000, single_tokens=16, conc_sessions=32, conc_steps=100, long_steps=2000,
                 long_tokens=64, window=100, idle_sessions=256, import_runs=15, start_runs=3, repeats=5, long_repeats=3,
                 client_rounds=9, curve_bin=25),
    "quick": dict(single_steps=200, single_tokens=16, conc_sessions=32, conc_steps=20, long_steps=300,
                  long_tokens=64, window=50, idle_sessions=64, import_runs=3, start_runs=1, repeats=1, long_repeats=1,
                  client_rounds=1, curve_bin=15),
}


def _uvloop_available():
    """Whether the chatenv server (this interpreter) can run ``--loop uvloop``."""
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


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
    """A runner for ``_take_turns``: ``block`` steps of a sync client from step ``start``."""
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

    async def async_block(env, start):  # chatenv.AsyncChatEnv on the raw generator's loop
        for i in range(start, start + block):
            await env.step(actions[i % len(actions)])

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
        async_env = chatenv.AsyncChatEnv(url)
        loop.run_until_complete(async_env.reset())

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
            loop.run_until_complete(async_env.close())

        return {
            "raw": lambda start: loop.run_until_complete(_run_steps(raw, frames, block, first=start)),
            "sync": _client_block(default, actions, block),
            "sync_full": _client_block(full, actions, block),
            "async": lambda start: loop.run_until_complete(async_block(async_env, start)),
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
    """``_clients_main`` in a subprocess of ``python`` (an OpenEnv venv); its JSON result."""
    out = subprocess.run([python, os.path.abspath(__file__), "clients", "--url", url,
                          "--steps", str(steps), "--tokens", str(n_tokens), "--rounds", str(repeats)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sync_client_main(steps, n_tokens, rounds):
    """``tools/bench.py sync-client``: the client comparison alone, on a chatenv server subprocess."""
    server = _start_server("chatenv", None)
    try:
        result = _sync_client_vs_raw(server.url, steps, n_tokens, rounds)
    finally:
        server.stop()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


def _keepalive_main(ping_s, pause_s):
    """``tools/bench.py keepalive``: sessions held through a pause longer than the
    server's ping interval plus ping timeout, while the caller sleeps or computes.

    The server (in this process) pings every ``ping_s`` and drops a peer that has
    not answered ``ping_s`` later; a raw socket that never reads stands beside the
    clients as the control: it must be dropped, which proves the pause was long enough.
    """
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import chatenv

    with chatenv.serve_in_thread(ping_interval_s=ping_s, ping_timeout_s=ping_s) as url:
        silent = socket.create_connection(("127.0.0.1", url.server.port))
        silent.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        sleeper, worker = chatenv.ChatEnv(url), chatenv.ChatEnv(url)
        for env in (sleeper, worker):
            env.reset()
            env.step([72, 105])
        started = time.monotonic()
        time.sleep(pause_s)  # sleeping: the keepalive thread answers for both clients
        slept = time.monotonic() - started
        started, spins = time.monotonic(), 0
        while time.monotonic() - started < pause_s:  # computing in pure Python, holding the GIL
            spins += sum(range(1000)) > 0
        busy = time.monotonic() - started
        result = {"ping_interval_s": ping_s, "ping_timeout_s": ping_s, "slept_s": round(slept, 2),
                  "computed_s": round(busy, 2)}
        for name, env in (("sleeping_client", sleeper), ("computing_client", worker)):
            try:
                env.step([33])
                result[name] = f"held: step {env.state().step_count} answered"
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                result[name] = f"lost: {type(exc).__name__}: {exc}"
        silent.settimeout(1)
        gone = False
        try:
            while not gone:  # the 101 and the pings it never answered, then the end
                gone = silent.recv(65536) == b""
        except socket.timeout:
            pass
        except OSError:  # reset: dropped
            gone = True
        result["silent_raw_socket"] = "dropped by the server" if gone else "still open"
        sleeper.close()
        worker.close()
        silent.close()
    return result


def _identity_check(servers):
    """Byte-compare replies of the floor with chatenv (and OpenEnv) on a few steps."""
    frames, _ = _step_frames(16, count=5, seed=7)
    ascii_frames = [_reset_frame()] + frames + [json.dumps({"type": "step", "data": {"tokens": [72, 105], "metadata": {}}}, separators=_COMPACT)]
    non_ascii = ascii_frames + [json.dumps({"type": "step", "data": {"tokens": list("é \" \\ \n".encode()), "metadata": {}}}, separators=_COMPACT)]
    result = {}
    floor_ascii = asyncio.run(_exchange(servers["floor"].url, ascii_frames))
    floor_all = asyncio.run(_exchange(servers["floor"].url, non_ascii))
    for name in servers:
        if name == "floor":
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
    """What the figures were measured on: date, CPU, Python, websockets, platform."""
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


def _long_episodes(servers, kinds, counts, log):
    """The long-episode runs (``long_steps`` steps of ``long_tokens`` tokens, one session)
    on each server and on chatenv with delta observations, interleaved: the long rows
    (best run by its last window) and the step-cost curve (each bin's median over the
    runs), from the same runs."""
    long_kinds = kinds + ["chatenv-delta"]

    def long_run(kind):
        url = servers["chatenv" if kind == "chatenv-delta" else kind].url
        return asyncio.run(_mode_long(url, counts["long_steps"], counts["long_tokens"], counts["window"],
                                      reset_data={"chatenv_delta": True} if kind == "chatenv-delta" else None,
                                      bin_steps=counts["curve_bin"]))

    # OpenEnv's long episode takes ~25 s on 2 cores: one run of it is enough
    long_best = _interleaved(long_kinds, long_run,
                             {k: (1 if k.startswith("openenv") else 2 * counts["repeats"] if k == "chatenv-delta"
                                  else counts["long_repeats"]) for k in long_kinds},
                             "last_ms", higher_is_better=False)
    bins = counts["long_steps"] // counts["curve_bin"]
    curve = {"tokens": counts["long_tokens"], "bin_steps": counts["curve_bin"],
             "steps": [(b + 0.5) * counts["curve_bin"] for b in range(bins)], "ms": {}, "runs": {}}
    for kind, best in long_best.items():
        samples = best.pop("samples")
        best.pop("bins_ms")
        curve["ms"][kind] = [round(statistics.median(r["bins_ms"][b] for r in samples), 4) for b in range(bins)]
        curve["runs"][kind] = len(samples)
        if kind == "chatenv-delta":
            # Its target is a ratio of two windows of one episode, each ~0.2 ms a step, close
            # to this machine's scheduling noise: take each window's median over the runs
            best["first_ms"] = statistics.median(r["first_ms"] for r in samples)
            best["last_ms"] = statistics.median(r["last_ms"] for r in samples)
            best["first_runs"] = [round(r["first_ms"], 4) for r in samples]
    long_delta = long_best.pop("chatenv-delta")
    log(f"  {long_best}\n  chatenv delta: {long_delta}")
    return long_best, long_delta, curve


# ------------------------------------------------------------------------------
# The step-cost picture: the long episodes' curve, drawn with matplotlib
# ------------------------------------------------------------------------------

_CURVE_LINES = {  # kind: (legend label, line style), in legend order
    "openenv-0.3.0": ("OpenEnv 0.3.0 (openenv-core, older)", dict(color="tab:orange", linestyle=":")),
    "openenv-0.10.0": ("OpenEnv 0.10.0", dict(color="tab:red")),
    "floor": ("floor: raw websockets, same bytes as chatenv", dict(color="tab:gray", linestyle="-.")),
    "chatenv": ("chatenv, full observations (as OpenEnv sends)", dict(color="tab:blue")),
    "chatenv-delta": ("chatenv, delta observations (its clients' default)", dict(color="tab:green",
                                                                                  linestyle="--")),
}


def plot_curve(curve, machine, path):
    """Draw the step-cost curve (ms/step against episode length, log y) as a PNG at ``path``.

    matplotlib is imported here only (``pip install matplotlib``, or the ``bench`` extra).
    """
    from matplotlib import transforms
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    ends = []  # [log10 of the last value, its label, colour]
    for kind, (label, style) in _CURVE_LINES.items():
        values = curve["ms"].get(kind)
        if not values:
            continue
        runs = curve["runs"][kind]
        ax.plot(curve["steps"], values, label=f"{label}{'' if runs == 1 else f'; {runs} runs'}", linewidth=1.8,
                **style)
        ends.append([math.log10(values[-1]), f"{values[-1]:.2g} ms", style["color"]])
    ax.set_yscale("log")
    ax.set_xlim(0, curve["steps"][-1] + curve["bin_steps"] / 2)
    ax.set_ylim(top=max(max(v) for v in curve["ms"].values()) * 3)  # room for the legend above the lines
    # Each line's last value at its right end, nudged apart so close ones stay legible
    low, high = (math.log10(v) for v in ax.get_ylim())
    gap = (high - low) * 11 / (fig.get_figheight() * 72 * 0.8)  # ~11 points, in decades
    ends.sort()
    for i in range(1, len(ends)):
        ends[i][0] = max(ends[i][0], ends[i - 1][0] + gap)
    at_right = transforms.offset_copy(ax.transData, fig=fig, x=4, units="points")
    for y, text, color in ends:
        ax.text(curve["steps"][-1], 10 ** y, text, transform=at_right, va="center", fontsize=8, color=color)
    ax.set_xlabel(f"episode length (steps of {curve['tokens']} tokens)")
    ax.set_ylabel(f"ms per step (log; median of each {curve['bin_steps']}-step bin)")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", axis="y", alpha=0.15)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    date = machine["date"][:16].replace("T", " ")
    ax.set_title(f"Per-step cost against episode length, one session on loopback\n{date}, {machine['cpu']} "
                 f"({machine['cpus']} CPUs), Python {machine['python']}, websockets {machine['websockets']}",
                 fontsize=9)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _plot_path(args):
    """Where the picture goes: ``--plot PATH``, else docs/step-cost.png (a temporary file
    with ``--quick``); None with ``--no-plot``."""
    if args.no_plot:
        return None
    if args.plot:
        return args.plot
    if args.quick:
        return os.path.join(tempfile.mkdtemp(prefix="chatenv-bench-"), "step-cost.png")
    return os.path.join(HERE, "docs", "step-cost.png")


def _draw(results, args, log):
    """Draw the picture where ``_plot_path`` says, if matplotlib is there; note where in ``results``."""
    path = _plot_path(args)
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("# picture skipped: matplotlib is not installed (pip install matplotlib, or the bench extra); "
            "the curve's data is in --json")
        return
    results["plot"] = plot_curve(results["modes"]["curve"], results["machine"], path)
    log(f"# picture: {path} ({os.path.getsize(path) / 1024:.0f} KB)")


def run_curve(args):
    """``tools/bench.py curve``: the long episodes alone, for the step-cost picture."""
    counts = _COUNTS["quick" if args.quick else "full"]
    kinds = ["chatenv", "floor"] + list(args.openenv_peers)
    log = functools.partial(print, file=sys.stderr, flush=True)
    results = {"machine": _machine(), "counts": counts, "kinds": kinds, "openenv": args.openenv_peers, "modes": {}}
    log(f"# servers: {', '.join(kinds)}")
    servers = _start_servers(kinds, args, together=True)
    _settle(servers)
    log(f"# long episodes, {counts['long_steps']} x {counts['long_tokens']} tokens")
    modes = results["modes"]
    modes["long"], modes["long_delta"], modes["curve"] = _long_episodes(servers, kinds, counts, log)
    for server in servers.values():
        server.stop()
    return results


def render_curve(results):
    """The step-cost curve at five episode lengths, as a Markdown table."""
    curve = results["modes"]["curve"]
    kinds = [k for k in _CURVE_LINES if k in curve["ms"]]
    picks = sorted({min(len(curve["steps"]) - 1, round(i * (len(curve["steps"]) - 1) / 4)) for i in range(5)})
    lines = [f"ms per step (median of each {curve['bin_steps']}-step bin) at episode length, "
             f"{curve['tokens']}-token steps",
             "", "| steps | " + " | ".join(kinds) + " |", "| ---: |" + " ---: |" * len(kinds)]
    for b in picks:
        lines.append(f"| {curve['steps'][b]:.0f} | " + " | ".join(_fmt(curve["ms"][k][b]) for k in kinds) + " |")
    if results.get("plot"):
        lines += ["", f"picture: {results['plot']}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------
# The benchmark: every server side by side, the clients taking turns, one table
# ------------------------------------------------------------------------------


def run_benchmark(args):
    """``tools/bench.py``: every measure on every server kind; the results dict."""
    counts = _COUNTS["quick" if args.quick else "full"]
    kinds = ["chatenv", "floor"] + list(args.openenv_peers)
    uvloop = _uvloop_available()
    results = {"machine": _machine(), "counts": counts, "kinds": kinds, "openenv": args.openenv_peers, "modes": {}}
    modes = results["modes"]
    log = functools.partial(print, file=sys.stderr, flush=True)
    if not uvloop:
        log("# uvloop is not installed: the `--loop uvloop` row is left out (pip install uvloop)")

    log(f"# servers: {', '.join(kinds)}{', chatenv --loop uvloop' if uvloop else ''}")
    # Quick runs start them together: each OpenEnv peer spends seconds importing
    servers = _start_servers(kinds + (["chatenv-uvloop"] if uvloop else []), args, together=args.quick)
    for kind, server in servers.items():
        log(f"  {kind}: /health after {server.start_s * 1e3:.0f} ms (pid {server.proc.pid})")
    start_ms = {kind: servers[kind].start_s * 1e3 for kind in kinds}
    modes["start_together"] = bool(args.quick)
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

    _settle(servers)
    log("# one session (and chatenv --loop uvloop, in the same rounds)")
    modes["single"] = _interleaved(
        kinds + (["chatenv-uvloop"] if uvloop else []),
        lambda kind: asyncio.run(_mode_single(servers[kind].url, counts["single_steps"], counts["single_tokens"])),
        counts["repeats"], "steps_per_s")
    if uvloop:
        fast, base = modes["single"].pop("chatenv-uvloop"), modes["single"]["chatenv"]
        modes["uvloop"] = {"uvloop": fast, "asyncio_steps_per_s": base["steps_per_s"],
                           "uvloop_steps_per_s": fast["steps_per_s"],
                           "uvloop_vs_asyncio": fast["steps_per_s"] / base["steps_per_s"],
                           "round_ratios": [round(u / a, 3) for u, a in zip(fast["runs"], base["runs"])]}
    log(f"  {modes['single']}")
    if uvloop:
        log(f"  uvloop/asyncio: {modes['uvloop']['uvloop_vs_asyncio']:.2f} (rounds {modes['uvloop']['round_ratios']})")

    _settle(servers)
    log("# concurrent sessions")
    modes["concurrent"] = _interleaved(
        kinds, lambda kind: asyncio.run(_mode_concurrent(servers[kind].url, counts["conc_sessions"],
                                                         counts["conc_steps"], counts["single_tokens"])),
        counts["repeats"], "steps_per_s")
    log(f"  {modes['concurrent']}")

    _settle(servers)
    log("# long episode (and the step-cost curve, from the same runs)")
    modes["long"], modes["long_delta"], modes["curve"] = _long_episodes(servers, kinds, counts, log)

    log("# sync client vs raw generator (chatenv)")
    modes["sync_client"] = _sync_client_vs_raw(servers["chatenv"].url, counts["single_steps"], counts["single_tokens"],
                                               counts["client_rounds"])
    log(f"  {modes['sync_client']}")
    log("# keepalive: sessions held through pauses longer than ping interval + timeout")
    modes["keepalive"] = _keepalive_main(1.0, 3.0)
    log(f"  {modes['keepalive']}")
    if args.openenv_peers:  # OpenEnv's client of the main comparison (0.10.0 unless told otherwise)
        log("# chatenv's sync client vs OpenEnv's, on the chatenv server")
        modes["clients"] = _chatenv_vs_openenv_client(next(iter(args.openenv_peers.values())), servers["chatenv"].url,
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

    for server in servers.values():
        server.stop()

    log("# cold import")
    modes["import_ms"] = _import_times(counts["import_runs"])
    return results


def _fmt(value, digits=None):
    """A figure for the table: fewer decimals the larger it is, ``-`` for none."""
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if abs(value) >= 100 else (1 if abs(value) >= 10 else 2)
    return f"{value:,.{digits}f}"


def _ratio(a, b):
    """``a / b``, or None when either is missing or ``b`` is zero."""
    return None if a is None or b is None or b == 0 else a / b


def render_table(results):
    """The main run's results as one Markdown table, chatenv beside the floor and OpenEnv."""
    m = results["modes"]
    openenv = [k for k in results["kinds"] if k.startswith("openenv-")]
    primary = openenv[0] if openenv else None  # the OpenEnv column: 0.10.0 unless told otherwise
    others = openenv[1:]  # older releases get rows of their own below
    c = results["counts"]

    def get(mode, kind, key):
        entry = m.get(mode, {}).get(kind)
        return None if entry is None else entry.get(key)

    rows = []

    def row(label, mode, key, target="", ce=None, fl=None, oe=None, unit_digits=None, oe_kind=primary):
        ce = get(mode, "chatenv", key) if ce is None and mode else ce
        fl = get(mode, "floor", key) if fl is None and mode else fl
        oe = (get(mode, oe_kind, key) if oe is None and mode else oe) if oe_kind else None
        rows.append([label, _fmt(ce, unit_digits), _fmt(fl, unit_digits), _fmt(oe, unit_digits),
                     _fmt(_ratio(ce, fl), 2), _fmt(_ratio(ce, oe), 2), target])

    s, w = c["single_steps"], c["window"]
    row(f"1 session x {s} steps x {c['single_tokens']} tok: steps/s", "single", "steps_per_s", "chatenv/floor >= 1.0")
    row("1 session: p50 latency ms", "single", "p50_ms")
    row("1 session: p99 latency ms", "single", "p99_ms")
    if "uvloop" in m:
        uv = m["uvloop"]
        rows.append(["1 session, chatenv `--loop uvloop` vs the default asyncio loop (same rounds): steps/s",
                     f"{_fmt(uv['uvloop_steps_per_s'])} vs {_fmt(uv['asyncio_steps_per_s'])}", "-", "-", "-", "-",
                     f"uvloop/asyncio = {_fmt(uv['uvloop_vs_asyncio'], 2)}"])
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
                   for k in ("chatenv", "floor", primary)]
                + ["-", "-", "no thread per session"])
    for kind in others:  # the same measures on an older OpenEnv release, in its OpenEnv column
        name = "OpenEnv " + kind.split("-", 1)[1]
        row(f"{name}: 1 session steps/s", "single", "steps_per_s", oe_kind=kind)
        row(f"{name}: {c['conc_sessions']} sessions aggregate steps/s", "concurrent", "steps_per_s", oe_kind=kind)
        row(f"{name}: long last-{w} ms/step", "long", "last_ms", oe_kind=kind)
        row(f"{name}: RSS KB per idle session", "idle", "rss_kb_per_session", oe_kind=kind)
        rows.append([f"{name}: server threads: idle -> with idle sessions", "-", "-",
                     f"{threads[kind]['threads_idle']} -> {threads[kind]['threads_with_sessions']}", "-", "-", ""])
        row(f"{name}: start until /health 200: ms", None, None, ce=m["start_ms"].get("chatenv"),
            oe=m["start_ms"].get(kind), oe_kind=kind)
    sc = m["sync_client"]
    rows.append([f"chatenv.ChatEnv sync client (delta, its default) vs raw generator, 1 session x {s}: steps/s",
                 f"{_fmt(sc['sync_steps_per_s'])} vs raw {_fmt(sc['raw_steps_per_s'])}", "-", "-", "-", "-",
                 f"sync/raw = {_fmt(sc['sync_vs_raw'], 2)} (>= 1.0)"])
    rows.append(["  same, ChatEnv(delta=False): full observations, as from an OpenEnv server",
                 _fmt(sc["sync_full_steps_per_s"]), "-", "-", "-", "-",
                 f"sync full/raw = {_fmt(sc['sync_full_vs_raw'], 2)} (>= 0.74)"])
    rows.append(["  chatenv.AsyncChatEnv, on the raw generator's own event loop",
                 _fmt(sc["async_steps_per_s"]), "-", "-", "-", "-",
                 f"async/raw = {_fmt(sc['async_vs_raw'], 2)}"])
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
    if "keepalive" in m:
        ka = m["keepalive"]
        rows.append([f"keepalive: server pings every {ka['ping_interval_s']:g} s, drops {ka['ping_timeout_s']:g} s later; "
                     f"ChatEnv sleeps {ka['slept_s']:g} s, computes {ka['computed_s']:g} s", ka["sleeping_client"],
                     "-", "-", "-", "-", f"computing: {ka['computing_client']}; a silent socket: {ka['silent_raw_socket']}"])
    for label, imp in m["import_ms"].items():
        rows.append([f"cold import ms, bytecode {label} (min / median): chatenv vs `import dataclasses, json, logging`",
                     f"{_fmt(imp['chatenv'][0], 1)} / {_fmt(imp['chatenv'][1], 1)}", "-",
                     f"baseline {_fmt(imp['baseline'][0], 1)} / {_fmt(imp['baseline'][1], 1)}", "-", "-",
                     f"chatenv/baseline = {_fmt(_ratio(imp['chatenv'][0], imp['baseline'][0]), 2)} (<= 1.25)"])
    st = m["start_ms"]
    row("start until /health 200: ms" + (" (started together)" if m.get("start_together") else ""), None, None,
        "chatenv <= 500 ms", ce=st.get("chatenv"), fl=st.get("floor"), oe=st.get(primary))
    ds, dl = m["deflate_single"], m["deflate_long"]
    rows.append([f"deflate: 1 session steps/s (chatenv none = {_fmt(get('single', 'chatenv', 'steps_per_s'))})",
                 _fmt(ds["steps_per_s"]), "-", "-", "-", "-",
                 f"deflate/none = {_fmt(_ratio(ds['steps_per_s'], get('single', 'chatenv', 'steps_per_s')), 2)}"])
    rows.append([f"deflate: long first-{w} / last-{w} ms/step",
                 f"{_fmt(dl['first_ms'])} / {_fmt(dl['last_ms'])}", "-", "-", "-", "-",
                 f"last deflate/none = {_fmt(_ratio(dl['last_ms'], get('long', 'chatenv', 'last_ms')), 2)}"])

    mach = results["machine"]
    ident = results.get("identity", {})
    oe_name = "OpenEnv " + primary.split("-", 1)[1] if primary else "OpenEnv (left out)"
    lines = [
        f"chatenv benchmark, {mach['date']}: {mach['cpu']} ({mach['cpus']} cpus), Python {mach['python']}, "
        f"websockets {mach['websockets']}, {mach['platform']}",
        "replies byte-identical to the floor's on a few steps (OpenEnv 0.3.0 leaves out the observation's "
        "\"metadata\":{}): "
        + ", ".join(f"{k}: {'yes' if v['identical'] else 'NO'}"
                    f"{'' if v['identical_with_non_ascii'] else ' (differs on non-ASCII content)'}"
                    for k, v in ident.items()),
        "",
        f"| metric | chatenv | floor | {oe_name} | chatenv/floor | chatenv/{oe_name} | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------
# Client growth: early and late steps of a long episode of full observations
# ------------------------------------------------------------------------------

_GROWTH_HEADS = {  # the head of a full observation frame, as each OpenEnv release writes it
    "0.3.0": '{"type":"observation","data":{"observation":{"messages":[',
    "0.10.0": '{"type":"observation","data":{"observation":{"metadata":{},"messages":[',
}


class _ReplayEpisode:
    """One episode's full observation frames, byte for byte as OpenEnv's ``shape`` sends them.

    The frames the benchmark times (the first and last ``window`` steps) are built
    before any client connects, so the server answers them at once; the others are
    joined on demand.
    """

    def __init__(self, shape, steps, n_tokens, window, seed=1234):
        rng = random.Random(seed)
        self.head = _GROWTH_HEADS[shape]
        self.messages, self.tokens = [], []
        for _ in range(steps):
            ids = [rng.randint(97, 122) for _ in range(n_tokens)]
            self.messages.append(json.dumps({"role": "assistant", "content": bytes(ids).decode()}, separators=_COMPACT))
            self.tokens.append(",".join(map(str, ids)))
        timed = set(range(window + 1)) | set(range(steps - window, steps + 1))
        self.built = {i: self.build(i) for i in timed}

    def build(self, i):
        return "".join((self.head, ",".join(self.messages[:i]), '],"tokens":[', ",".join(self.tokens[:i]),
                        ']},"reward":null,"done":false}}')).encode()

    def frame(self, i):
        frame = self.built.get(i)
        return frame if frame is not None else self.build(i)


async def _replay_serve(port, shape, steps, n_tokens, window):
    """A websockets server answering each session's n-th request with its episode's n-th frame."""
    from websockets.asyncio.server import serve

    episode = _ReplayEpisode(shape, steps, n_tokens, window)

    async def session(ws):
        i = 0
        async for _ in ws:
            await ws.send(episode.frame(min(i, steps)), text=True)
            i += 1

    async with serve(session, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None) as server:
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
        await asyncio.Future()


def _start_replay(shape, steps, n_tokens, window):
    """``tools/bench.py growth-server`` in a subprocess: ``(process, base URL)``."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "growth-server", "--shape", shape,
                             "--steps", str(steps), "--tokens", str(n_tokens), "--window", str(window)],
                            cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        return proc, f"http://127.0.0.1:{json.loads(proc.stdout.readline())['port']}"
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise


def _growth_one(kind, url, steps, window, frames, actions):
    """Per-step ms of the first and the last ``window`` steps of one episode, for one client."""
    perf = time.perf_counter
    times = []
    if kind == "chatenv":
        import chatenv

        env = chatenv.ChatEnv(url, delta=False)
        try:
            env.reset()
            for i in range(steps):
                start = perf()
                env.step(actions[i % len(actions)])
                times.append(perf() - start)
        finally:
            env.close()
    else:
        async def bare():
            ws = await _open_session(url)
            try:
                await _run_steps(ws, frames, steps, times)
            finally:
                await ws.close()

        asyncio.run(bare())
    return statistics.mean(times[:window]) * 1e3, statistics.mean(times[-window:]) * 1e3


def _growth_main(steps, n_tokens, window, rounds):
    """``tools/bench.py growth``: how a client's step time grows over a long episode of
    full observations (OpenEnv's frames), for both frame shapes: chatenv's ChatEnv
    (delta=False) against a bare websockets client receiving the same frames. The target:
    chatenv's growth (last-window / first-window ms) within 1.5x of the bare client's."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import chatenv

    frames, token_lists = _step_frames(n_tokens)
    actions = [chatenv.ChatAction(tokens=ids) for ids in token_lists]
    results = {}
    for shape in _GROWTH_HEADS:
        proc, url = _start_replay(shape, steps, n_tokens, window)
        try:
            runs = {"chatenv": [], "bare": []}
            for r in range(rounds):  # alternated, so drifting load hits both alike
                for kind in (("chatenv", "bare") if r % 2 == 0 else ("bare", "chatenv")):
                    runs[kind].append(_growth_one(kind, url, steps, window, frames, actions))
        finally:
            proc.terminate()
            proc.wait(10)
        shape_result = {}
        for kind, samples in runs.items():
            first = statistics.median(f for f, _ in samples)
            last = statistics.median(l for _, l in samples)
            shape_result[kind] = {"first_ms": round(first, 4), "last_ms": round(last, 4), "growth": round(last / first, 2)}
        shape_result["growth_ratio"] = round(shape_result["chatenv"]["growth"] / shape_result["bare"]["growth"], 2)
        results[shape] = shape_result
        print(f"# {shape}: {json.dumps(shape_result)}", file=sys.stderr, flush=True)
    print(json.dumps({"steps": steps, "tokens": n_tokens, "window": window, "rounds": rounds, "shapes": results}))
    ok = all(r["growth_ratio"] <= 1.5 for r in results.values())
    print("chatenv growth / bare growth: " + ", ".join(f"{k} {v['growth_ratio']}" for k, v in results.items())
          + f" (target <= 1.5: {'met' if ok else 'MISSED'})", file=sys.stderr)
    return 0 if ok else 1


# ------------------------------------------------------------------------------
# Compare: this tree against a baseline tree, measure by measure, taking turns
# ------------------------------------------------------------------------------


class _Tree:
    """One chatenv tree under comparison, and how its processes run.

    Its subprocesses (servers, ``import chatenv``) run with ``PYTHONPATH`` set to the
    tree and their working directory outside any repository, so ``import chatenv`` finds
    the tree's module and no other; their bytecode goes to ``pycache`` (a
    ``PYTHONPYCACHEPREFIX`` shared by both trees), never into the tree. In this process the
    tree's module is loaded under a name of its own (``module``), so both trees' clients
    take turns on one event loop.
    """

    def __init__(self, key, label, path, workdir, pycache):
        self.key = key  # "baseline" or "new"
        self.label = label
        self.path = os.path.abspath(path)
        self.script = os.path.join(self.path, "chatenv.py")
        if not os.path.isfile(self.script):
            raise SystemExit(f"tools/bench.py compare: no chatenv.py in {self.path}")
        self.cwd = workdir
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env.update(PYTHONPATH=self.path, PYTHONPYCACHEPREFIX=pycache)
        # Where the interpreter caches this tree's chatenv.py under the prefix (the tree's
        # directories mirrored beneath it, no __pycache__ level)
        self.pyc = os.path.join(pycache, self.path.lstrip(os.sep), f"chatenv.{sys.implementation.cache_tag}.pyc")
        self.module = None

    def describe(self):
        """The tree's commit (and whether its chatenv.py differs from it) and its chatenv.py's digest."""
        import hashlib

        with open(self.script, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        git = functools.partial(subprocess.run, cwd=self.path, capture_output=True, text=True)
        head = git(["git", "log", "-1", "--format=%h %s"]).stdout.strip()
        dirty = git(["git", "status", "--porcelain", "--", "chatenv.py"]).stdout.strip()
        return {"path": self.path, "commit": head or "-", "chatenv_py_modified": bool(dirty), "sha256": digest}

    def imported_file(self):
        """``chatenv.__file__`` as a subprocess of this tree imports it (and caches its bytecode)."""
        out = subprocess.run([sys.executable, "-c", "import chatenv; print(chatenv.__file__)"], cwd=self.cwd,
                             env=self.env, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def load(self):
        """The tree's chatenv.py as a module of this process: ``chatenv`` for this tree (the
        one beside this file), ``chatenv_<key>`` for the other, no bytecode written."""
        import importlib.util

        name = "chatenv" if os.path.realpath(self.path) == os.path.realpath(HERE) else f"chatenv_{self.key}"
        if name in sys.modules:
            self.module = sys.modules[name]
        else:
            spec = importlib.util.spec_from_file_location(name, self.script)
            self.module = importlib.util.module_from_spec(spec)
            sys.modules[name] = self.module  # before running it: dataclasses look their module up
            writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True
            try:
                spec.loader.exec_module(self.module)
            finally:
                sys.dont_write_bytecode = writes
        if os.path.realpath(self.module.__file__) != os.path.realpath(self.script):
            raise RuntimeError(f"{name} is {self.module.__file__}, not {self.script}")
        return self.module

    def server(self, *options, key=None):
        """A chatenv server of this tree as the main run's ``chatenv`` kind runs, with ``options``
        added to its command line (not started)."""
        port = _free_port()
        argv = _server_argv(f"chatenv@{self.path}", port, None) + list(options)
        return _Server(f"chatenv@{key or self.key}", argv, port, env=self.env, cwd=self.cwd)


def _import_round(trees, runs):
    """``import chatenv`` ms of each tree, the least of ``runs`` runs taking turns: with its
    bytecode cached, then with none (its .pyc removed, none written; the standard
    library's and websockets' stay cached, so only chatenv.py is compiled)."""

    def once(tree, env):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import chatenv"], cwd=tree.cwd, env=env, check=True)
        return (time.perf_counter() - start) * 1e3

    result = {}
    for label in ("cached", "uncached"):
        envs = {}
        for tree in trees:
            if label == "cached":
                if not os.path.exists(tree.pyc):
                    tree.imported_file()
                envs[tree.key] = tree.env
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tree.pyc)
                envs[tree.key] = dict(tree.env, PYTHONDONTWRITEBYTECODE="1")
            if os.path.exists(tree.pyc) != (label == "cached"):
                raise RuntimeError(f"{tree.pyc}: the bytecode is not where `import chatenv` {label} needs it")
        samples = {tree.key: [] for tree in trees}
        for _ in range(runs):
            for tree in trees:
                samples[tree.key].append(once(tree, envs[tree.key]))
        result[label] = {key: min(values) for key, values in samples.items()}
    return result


def _alternating(runners, steps, block, blocks=None):
    """Seconds each runner spends on ``steps`` steps: ``runners[key](start, n)`` runs steps
    ``start`` to ``start + n``; the runners take turns in blocks of ``block`` steps, their
    order reversed every block, so load drifting on this shared machine hits all alike.
    ``blocks``: a dict given gets each runner's list of block seconds."""
    elapsed = dict.fromkeys(runners, 0.0)
    keys = list(runners)
    for b, start in enumerate(range(0, steps, block)):
        for key in keys if b % 2 == 0 else keys[::-1]:
            began = time.perf_counter()
            runners[key](start, min(block, steps - start))
            seconds = time.perf_counter() - began
            elapsed[key] += seconds
            if blocks is not None:
                blocks.setdefault(key, []).append(seconds)
    return elapsed


def _compare_servers(servers, counts, block=50):
    """The raw generator on each tree's server, sessions held on both at once and the trees
    taking turns in blocks: steps/s with 1 session and with ``conc_sessions``, and a long
    episode's last-window ms/step."""
    c = counts
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    frames, _ = _step_frames(c["single_tokens"])
    long_frames, _ = _step_frames(c["long_tokens"])
    result, opened = {}, []

    async def together(coroutines, return_exceptions=False):
        return await asyncio.gather(*coroutines, return_exceptions=return_exceptions)

    def open_sessions(n):
        groups = {key: [run(_open_session(server.url)) for _ in range(n)] for key, server in servers.items()}
        opened.extend(ws for group in groups.values() for ws in group)
        return groups

    def close_sessions():
        run(together((ws.close() for ws in opened), return_exceptions=True))
        opened.clear()
        _settle(servers)

    def steps_of(group, frames, latencies=None):
        if len(group) == 1:
            return lambda start, n: run(_run_steps(group[0], frames, n, latencies, first=start))
        return lambda start, n: run(together(_run_steps(ws, frames[i:] + frames[:i], n, first=start)
                                             for i, ws in enumerate(group)))

    try:
        groups = open_sessions(1)
        elapsed = _alternating({key: steps_of(group, frames) for key, group in groups.items()}, c["single_steps"],
                               block)
        result["single"] = {key: c["single_steps"] / seconds for key, seconds in elapsed.items()}
        close_sessions()
        groups = open_sessions(c["conc_sessions"])
        elapsed = _alternating({key: steps_of(group, frames) for key, group in groups.items()}, c["conc_steps"],
                               max(1, block // 5))  # each block is that many steps of every session
        result["concurrent"] = {key: c["conc_sessions"] * c["conc_steps"] / seconds for key, seconds in elapsed.items()}
        close_sessions()
        groups, latencies = open_sessions(1), {key: [] for key in servers}
        _alternating({key: steps_of(group, long_frames, latencies[key]) for key, group in groups.items()},
                     c["long_steps"], block)
        # medians of the window, not means: on a shared machine one preempted step would outweigh the rest
        result["long_last_ms"] = {key: statistics.median(s[-c["window"]:]) * 1e3 for key, s in latencies.items()}
        close_sessions()
    finally:
        run(together((ws.close() for ws in opened), return_exceptions=True))
        loop.close()
    return result


def _compare_clients(trees, urls, replay_url, counts, block=50):
    """Each tree's clients, all holding a session at once and taking turns in blocks:
    ChatEnv (sync, its delta default) and AsyncChatEnv steps/s, each on its tree's server;
    then ChatEnv(delta=False) on the replay server's growing full observations, the
    last-window ms/step and its growth over the first window."""
    c = counts
    _, token_lists = _step_frames(c["single_tokens"])
    _, long_token_lists = _step_frames(c["long_tokens"])
    loop = asyncio.new_event_loop()
    result, sync_envs, async_envs = {"sync": {}, "async": {}}, [], []

    async def async_steps(env, actions, start, n):
        for i in range(start, start + n):
            await env.step(actions[i % len(actions)])

    def async_runner(env, actions):
        return lambda start, n: loop.run_until_complete(async_steps(env, actions, start, n))

    def sync_steps(env, actions, latencies=None):
        def steps(start, n):
            perf = time.perf_counter
            for i in range(start, start + n):
                began = perf()
                env.step(actions[i % len(actions)])
                if latencies is not None:
                    latencies.append(perf() - began)
        return steps

    try:
        runners = {}
        for tree in trees:
            chatenv = tree.module
            actions = [chatenv.ChatAction(tokens=ids) for ids in token_lists]
            sync_env, async_env = chatenv.ChatEnv(urls[tree.key]), chatenv.AsyncChatEnv(urls[tree.key])
            sync_envs.append(sync_env)
            async_envs.append(async_env)
            sync_env.reset()
            loop.run_until_complete(async_env.reset())
            runners[(tree.key, "sync")] = sync_steps(sync_env, actions)
            runners[(tree.key, "async")] = async_runner(async_env, actions)
        for (key, kind), seconds in _alternating(runners, c["single_steps"], block).items():
            result[kind][key] = c["single_steps"] / seconds
        runners, latencies = {}, {tree.key: [] for tree in trees}
        for tree in trees:
            actions = [tree.module.ChatAction(tokens=ids) for ids in long_token_lists]
            env = tree.module.ChatEnv(replay_url, delta=False)
            sync_envs.append(env)
            env.reset()
            runners[tree.key] = sync_steps(env, actions, latencies[tree.key])
        _alternating(runners, c["growth_steps"], block)
        window = c["window"]
        result["growth_last_ms"] = {key: statistics.median(s[-window:]) * 1e3 for key, s in latencies.items()}
        result["growth"] = {key: statistics.median(s[-window:]) / statistics.median(s[:window])
                            for key, s in latencies.items()}
    finally:
        for env in sync_envs:
            env.close()
        for env in async_envs:
            loop.run_until_complete(env.close())
        loop.close()
    return result


def _compare_round(trees, counts, replay_url, log):
    """One round of every measure, the trees taking turns (``trees`` in the order to begin
    with): ``{measure: {tree key: value}}``. Each round starts fresh servers (their start is
    a measure) and measures their idle sessions first, as the main run does."""
    c = counts
    sample, servers, starts = {}, {}, {tree.key: [] for tree in trees}
    try:
        for run in range(c["start_runs"]):  # taking turns; the last servers stay up for the measures
            for tree in trees:
                servers[tree.key] = tree.server().start(timeout_s=60)
                starts[tree.key].append(servers[tree.key].start_s * 1e3)
                if run < c["start_runs"] - 1:
                    servers.pop(tree.key).stop()
        sample["start_ms"] = {key: min(values) for key, values in starts.items()}
        sample["idle_rss_kb"] = {key: asyncio.run(_mode_idle_rss(server.url, server.proc.pid, c["idle_sessions"]))
                                 ["rss_kb_per_session"] for key, server in servers.items()}
        _settle(servers)
        sample.update(_compare_servers(servers, c))
        sample.update(_compare_clients(trees, {key: server.url for key, server in servers.items()}, replay_url, c))
    finally:
        for server in servers.values():
            server.stop()
    imports = _import_round(trees, c["import_runs"])
    sample["import_cached_ms"], sample["import_uncached_ms"] = imports["cached"], imports["uncached"]
    log("  " + ", ".join(f"{m} {_fmt(_ratio(v['new'], v['baseline']), 3)}" for m, v in sample.items()))
    return sample


_COMPARE_ROWS = [  # measure: label (formatted with the counts)
    ("single", "server, 1 session x {single_steps} steps x {single_tokens} tok (raw generator): steps/s"),
    ("concurrent", "server, {conc_sessions} sessions x {conc_steps} steps: aggregate steps/s"),
    ("long_last_ms", "server, long episode {long_steps} x {long_tokens} tok: last-{window} ms/step (median)"),
    ("idle_rss_kb", "server RSS per idle session ({idle_sessions} open): KB"),
    ("start_ms", "server start until /health 200 (least of {start_runs}): ms"),
    ("import_cached_ms", "`import chatenv`, bytecode cached (least of {import_runs}): ms"),
    ("import_uncached_ms", "`import chatenv`, no bytecode (least of {import_runs}): ms"),
    ("sync", "ChatEnv (sync, delta) on its tree's server, taking turns: steps/s"),
    ("async", "AsyncChatEnv on its tree's server, same turns: steps/s"),
    ("growth", "ChatEnv(delta=False), {growth_steps} x {long_tokens} tok full observations: "
               "last-{window} / first-{window} ms/step (growth; medians)"),
    ("growth_last_ms", "  same, last-{window} ms/step (median)"),
]


def run_compare(args):
    """``tools/bench.py compare``: every measure, the trees taking turns (their order
    swapped each round), ``rounds`` rounds; the results dict with each tree's medians."""
    counts = dict(_COUNTS["quick" if args.quick else "full"])
    counts.update(import_runs=2 if args.quick else 5, growth_steps=300 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 5)
    log = functools.partial(print, file=sys.stderr, flush=True)
    workdir = tempfile.mkdtemp(prefix="chatenv-compare-")  # outside any repository
    pycache = os.path.join(workdir, "pycache")
    trees = [_Tree("baseline", "baseline", args.baseline, workdir, pycache),
             _Tree("new", "this tree", HERE, workdir, pycache)]
    results = {"machine": _machine(), "counts": counts, "rounds": rounds, "trees": {}, "samples": {}}
    for tree in trees:
        found = {"server_script": tree.script, "import_chatenv": tree.imported_file(),
                 "this_process": tree.load().__file__}
        if os.path.realpath(found["import_chatenv"]) != os.path.realpath(tree.script):
            raise RuntimeError(f"`import chatenv` with PYTHONPATH={tree.path} found {found['import_chatenv']}")
        tree.server().start(timeout_s=60).stop()  # once unmeasured: the prefix caches what serving imports
        results["trees"][tree.key] = dict(tree.describe(), **found)
        log(f"# {tree.label}: {json.dumps(results['trees'][tree.key])}")
    if results["trees"]["baseline"]["sha256"] == results["trees"]["new"]["sha256"]:
        log("# the two chatenv.py are identical: the ratios are this machine's noise")
    proc, replay_url = _start_replay("0.10.0", counts["growth_steps"], counts["long_tokens"], counts["window"])
    try:
        for r in range(rounds):
            log(f"# round {r + 1} of {rounds} (this tree / baseline)")
            sample = _compare_round(trees if r % 2 == 0 else trees[::-1], counts, replay_url, log)
            for measure, values in sample.items():
                for key, value in values.items():
                    results["samples"].setdefault(measure, {}).setdefault(key, []).append(value)
    finally:
        proc.terminate()
        proc.wait(10)
    results["medians"] = {measure: {key: statistics.median(values) for key, values in by_tree.items()}
                          for measure, by_tree in results["samples"].items()}
    # The ratio: the median of each round's, since a round's two figures were taken in turns
    results["ratios"] = {measure: statistics.median(_ratio(n, b) for b, n in zip(by_tree["baseline"], by_tree["new"]))
                         for measure, by_tree in results["samples"].items()}
    return results


def render_compare(results):
    """The comparison as a Markdown table: each tree's median, the median and each of the
    rounds' ratios."""
    trees, counts, medians, samples = results["trees"], results["counts"], results["medians"], results["samples"]
    mach = results["machine"]
    lines = [f"chatenv compare, {mach['date']}: {mach['cpu']} ({mach['cpus']} cpus), Python {mach['python']}, "
             f"websockets {mach['websockets']}; medians of {results['rounds']} rounds, the trees taking turns"]
    for key, name in (("baseline", "baseline"), ("new", "this tree")):
        tree = trees[key]
        modified = " (chatenv.py modified)" if tree["chatenv_py_modified"] else ""
        lines.append(f"{name}: {tree['path']} at {tree['commit']}{modified}, chatenv.py sha256 {tree['sha256']}; "
                     f"`import chatenv` there: {tree['import_chatenv']}")
    lines += ["", "| measure | baseline | this tree | this tree / baseline (median of the rounds') | each round |",
              "| --- | ---: | ---: | ---: | --- |"]
    for measure, label in _COMPARE_ROWS:
        base, new = medians[measure]["baseline"], medians[measure]["new"]
        each = ", ".join(_fmt(_ratio(n, b), 2) for b, n in zip(samples[measure]["baseline"], samples[measure]["new"]))
        ratio = _fmt(results["ratios"][measure], 3)
        lines.append(f"| {label.format(**counts)} | {_fmt(base)} | {_fmt(new)} | {ratio} | {each} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------
# Hooks: a step with tasks and a built-in reward against one with none, taking turns
# ------------------------------------------------------------------------------

_HOOK_TURNS = 7  # each task's scripted turns by default: an episode is 8 steps, then a reset (every server's)
_HOOK_KINDS = {  # server: the options it adds after --tasks PATH (None: no hooks, no --tasks)
    "none": None,
    "exact_match": ("--rubric", "exact_match"),
    "boxed_match": ("--rubric", "boxed_match"),
}


def _hook_tasks(directory, turns, count=100):
    """A task file in ``directory``: sums with numeric answers, each with ``turns`` follow-ups."""
    path = os.path.join(directory, "tasks.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            task = {"id": f"sum-{i}", "prompt": f"What is {i} plus {i + 1}? Answer with the number.",
                    "answer": str(2 * i + 1)}
            if turns:
                task["turns"] = [f"Check step {k + 1} of your sum of {i} and {i + 1} once more." for k in range(turns)]
            f.write(json.dumps(task) + "\n")
    return path


async def _run_episodes(ws, frames, steps, episode, first=0):
    """``_run_steps``, with a reset before every ``episode``-th step (the session's first
    reset is its opening's): the tasks' episodes end there, and the plain server's are
    kept as long."""
    reset = _reset_frame()
    for i in range(first, first + steps):
        if i and i % episode == 0:
            await ws.send(reset)
            _check_reply(await ws.recv())
        await _run_steps(ws, frames, 1, first=i)


def _hook_round(servers, counts):
    """Steps/s of each server, 1 session and ``conc_sessions`` at once, the servers taking turns
    in blocks of whole episodes: from each one's median block, as a burst of load from
    elsewhere on this shared machine slows a few blocks and a mean would carry it. And each
    server's CPU per step (its own process's, so the client's share of the cores is not in it)."""
    c = counts
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    frames, _ = _step_frames(c["tokens"])
    result, opened = {}, []

    async def together(coroutines, return_exceptions=False):
        return await asyncio.gather(*coroutines, return_exceptions=return_exceptions)

    def steps_of(group):
        return lambda start, n: run(together(
            _run_episodes(ws, frames[i:] + frames[:i], n, c["turns"] + 1, first=start) for i, ws in enumerate(group)))

    try:
        for measure, sessions, steps in (("single", 1, c["single_steps"]),
                                         ("concurrent", c["conc_sessions"], c["conc_steps"])):
            groups = {key: [run(_open_session(server.url)) for _ in range(sessions)] for key, server in servers.items()}
            opened.extend(ws for group in groups.values() for ws in group)
            episode, blocks = c["turns"] + 1, {}
            block = episode * -(-(48 if sessions == 1 else 8) // episode)  # about 48 steps, or 8 of every session's
            cpu = {key: _cpu_s([server.proc.pid]) for key, server in servers.items()}
            _alternating({key: steps_of(group) for key, group in groups.items()}, steps - steps % block, block, blocks)
            result[measure] = {key: sessions * block / statistics.median(times) for key, times in blocks.items()}
            result[f"{measure}_cpu_us"] = {key: (_cpu_s([server.proc.pid]) - cpu[key]) * 1e6 / (sessions * block
                                                 * len(blocks[key])) for key, server in servers.items()}
            run(together((ws.close() for ws in opened), return_exceptions=True))
            opened.clear()
            _settle(servers)
    finally:
        run(together((ws.close() for ws in opened), return_exceptions=True))
        loop.close()
    return result


def run_hooks(args):
    """``tools/bench.py hooks``: steps/s with no hooks and with tasks and each built-in
    reward, the servers (one tree's) taking turns, ``rounds`` rounds; medians and ratios."""
    counts = {"tokens": 64, "conc_sessions": 32, "single_steps": 192 if args.quick else 960,
              "conc_steps": 24 if args.quick else 96, "turns": args.turns}
    rounds = args.rounds or (1 if args.quick else 5)
    log = functools.partial(print, file=sys.stderr, flush=True)
    workdir = tempfile.mkdtemp(prefix="chatenv-hooks-")  # outside any repository; the task file too
    tree = _Tree("new", "this tree", args.tree, workdir, os.path.join(workdir, "pycache"))
    tasks = _hook_tasks(workdir, args.turns)
    results = {"machine": _machine(), "counts": counts, "rounds": rounds, "tree": tree.describe(), "samples": {}}
    log(f"# {json.dumps(results['tree'])}; tasks {tasks}")
    servers = {}
    try:
        for key, options in _HOOK_KINDS.items():
            servers[key] = tree.server(*(("--tasks", tasks) + options if options else ()), key=key)
            servers[key].start(timeout_s=60)
        _settle(servers)
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            sample = _hook_round({key: servers[key] for key in order}, counts)
            log(f"# round {r + 1} of {rounds} (hooked / none): " + "; ".join(
                f"{m} " + ", ".join(f"{k} {_fmt(v[k] / v['none'], 3)}" for k in v if k != "none")
                for m, v in sample.items()))
            for measure, values in sample.items():
                for key, value in values.items():
                    results["samples"].setdefault(measure, {}).setdefault(key, []).append(value)
    finally:
        for server in servers.values():
            server.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    results["medians"] = {m: {k: statistics.median(v) for k, v in by.items()} for m, by in results["samples"].items()}
    # The ratio: the median of each round's, since a round's figures were taken in turns
    results["ratios"] = {m: {k: statistics.median(_ratio(h, n) for n, h in zip(by["none"], by[k]))
                             for k in by if k != "none"} for m, by in results["samples"].items()}
    return results


def render_hooks(results):
    """The hooks' cost as a Markdown table: each server's median steps/s and the median of
    the rounds' ratios to no hooks."""
    c, medians, ratios, mach = results["counts"], results["medians"], results["ratios"], results["machine"]
    lines = [f"chatenv hooks, {mach['date']}: {mach['cpu']} ({mach['cpus']} cpus), Python {mach['python']}, "
             f"websockets {mach['websockets']}; {results['tree']['path']} at {results['tree']['commit']}; medians "
             f"of {results['rounds']} rounds, the servers taking turns (steps/s from each one's median block); "
             f"{c['tokens']}-token steps, a task's episode its prompt and {c['turns']} scripted turns, then a reset "
             "(the plain server's too)",
             "", "| measure | no hooks | tasks + exact_match | / no hooks | tasks + boxed_match | / no hooks |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for measure, label in (("single", "1 session x {single_steps} steps: steps/s"),
                           ("concurrent", "{conc_sessions} sessions x {conc_steps} steps: steps/s"),
                           ("single_cpu_us", "  1 session: server CPU us/step"),
                           ("concurrent_cpu_us", "  {conc_sessions} sessions: server CPU us/step")):
        m, r = medians[measure], ratios[measure]
        lines.append(f"| {label.format(**c)} | {_fmt(m['none'])} | {_fmt(m['exact_match'])} | "
                     f"{_fmt(r['exact_match'], 3)} | {_fmt(m['boxed_match'])} | {_fmt(r['boxed_match'], 3)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------
# Scaling: workers, nginx, and RSS per byte of the memory bound
# ------------------------------------------------------------------------------

NGINX_CONF = os.path.join(HERE, "deploy", "nginx", "chatenv.conf")


def _scale_generator(url, sessions, steps, n_tokens, barrier, results):
    """One load-generator process: open its sessions, wait for the others, step them all."""
    async def run():
        frames, _ = _step_frames(n_tokens)
        sockets = [await _open_session(url) for _ in range(sessions)]
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 120)
        begin = time.time()
        await asyncio.gather(*(_run_steps(ws, frames[i:] + frames[:i], steps) for i, ws in enumerate(sockets)))
        end = time.time()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        return begin, end

    results.put(asyncio.run(run()))


def _cpu_s(pids):
    """CPU seconds (user + system) used so far by these processes and their children."""
    ticks, tree = 0, set(pids)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(entry) in tree or int(fields[1]) in tree:
                    ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _scale_round(url, sessions, steps, n_tokens, generators, watched=()):
    """Aggregate steps/s of ``sessions`` sessions driven by ``generators`` processes at once,
    and the CPU seconds each group of ``watched`` pids used meanwhile."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(generators), context.Queue()
    share = [sessions // generators + (i < sessions % generators) for i in range(generators)]
    procs = [context.Process(target=_scale_generator, args=(url, n, steps, n_tokens, barrier, results))
             for n in share]
    before = [_cpu_s(pids) for pids in watched]
    for proc in procs:
        proc.start()
    try:
        spans = [results.get(timeout=300) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    cpu = [_cpu_s(pids) - used for pids, used in zip(watched, before)]  # opening sessions included
    return sessions * steps / (max(end for _, end in spans) - min(begin for begin, _ in spans)), cpu


class _Nginx:
    """Debian's nginx running deploy/nginx/chatenv.conf (upstream and port replaced) in the foreground."""

    def __init__(self, backends):
        import re
        import shutil

        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(exe, os.X_OK):
            raise RuntimeError("nginx is not installed (apt-get install -y nginx)")
        self.dir = tempfile.mkdtemp(prefix="chatenv-bench-nginx-")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(NGINX_CONF) as f:
            text = f.read()
        block = re.search(r"^upstream chatenv \{\n.*?^\}", text, re.S | re.M).group(0)
        lines = [line for line in block.splitlines() if not line.strip().startswith("server ")]
        lines[-1:-1] = [f"    server 127.0.0.1:{port};" for port in backends]
        text = text.replace(block, "\n".join(lines))
        text = re.sub(r"^(\s*)listen \d+;", rf"\g<1>listen 127.0.0.1:{self.port};", text, flags=re.M)
        with open(os.path.join(self.dir, "chatenv.conf"), "w") as f:
            f.write(text)
        temp = "".join(f"    {kind}_temp_path {self.dir}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                                  "uwsgi", "scgi"))
        with open(os.path.join(self.dir, "nginx.conf"), "w") as f:
            f.write(f"daemon off;\nworker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.dir}/error.log;\n"
                    "events { worker_connections 4096; }\n"
                    f"http {{\n    access_log off;\n{temp}    include {self.dir}/chatenv.conf;\n}}\n")
        argv = [exe, "-p", self.dir, "-c", f"{self.dir}/nginx.conf", "-e", f"{self.dir}/error.log"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _CHILDREN.append(self)
        deadline = time.monotonic() + 30
        while not _health_ok(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start (logs in {self.dir})")
            time.sleep(0.02)

    def stop(self):
        import shutil

        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _scale_memory(bound, sessions=128, n_tokens=8192):
    """RSS of one server whose episodes fill ``--max-memory-bytes``: (idle RSS, RSS at the bound)."""
    port = _free_port()
    server = _Server("chatenv", [sys.executable, CHATENV_PY, "serve", "--port", str(port), "--log-level", "WARNING",
                                 "--max-memory-bytes", str(bound)], port).start()

    async def fill():
        from websockets.asyncio.client import connect

        frame, _ = _step_frames(n_tokens, count=1)
        sockets = [await connect(_ws_url(server.url), max_size=None, ping_interval=None) for _ in range(sessions)]
        for ws in sockets:
            await ws.send(_reset_frame({"chatenv_delta": True}))  # replies O(new), not O(history)
            await ws.recv()
        full, steps = False, 0
        while not full:
            for ws in sockets:
                await ws.send(frame[0])
                if '"error"' in (await ws.recv())[:40]:  # the memory bound (or an episode's own) refused it
                    full = True
                    break
                steps += 1
        rss = _proc_status(server.proc.pid)[0] * 1024
        await asyncio.gather(*(ws.close() for ws in sockets))
        return rss, steps

    try:
        idle = _proc_status(server.proc.pid)[0] * 1024
        full, steps = asyncio.run(fill())
    finally:
        server.stop()
    return {"bound": bound, "n_tokens": n_tokens, "tokens": steps * n_tokens, "idle_rss": idle, "full_rss": full,
            "rss_per_bound_byte": (full - idle) / bound}


def run_scale(args):
    """``tools/bench.py scale``: steps/s and CPU per step with workers and nginx, and memory."""
    sessions, steps, rounds = (64, 40, 1) if args.quick else (64, 300, args.rounds)
    started = []

    def chatenv(*extra):
        port = _free_port()
        server = _Server("chatenv", [sys.executable, CHATENV_PY, "serve", "--port", str(port), "--log-level",
                                     "WARNING", "--max-sessions", "4096", *extra], port).start()
        started.append(server)
        return server

    try:
        one, two = chatenv(), chatenv("--workers", "2")
        backends = [chatenv(), chatenv()]
        front_one, front_two = _Nginx([one.port]), _Nginx([b.port for b in backends])
        servers = [b.proc.pid for b in backends]
        setups = {  # name: (URL, the servers' pids, nginx's pids)
            "1 worker, direct": (one.url, [one.proc.pid], []),
            "2 workers (--workers 2), direct": (two.url, [two.proc.pid], []),
            "nginx -> the 1-worker server": (front_one.url, [one.proc.pid], [front_one.proc.pid]),
            "nginx -> 2 servers (least_conn)": (front_two.url, servers, [front_two.proc.pid]),
        }
        best = {name: 0.0 for name in setups}
        cpu = {name: [] for name in setups}  # per round: (server, nginx) CPU microseconds per step
        for _ in range(rounds):  # interleaved, best of each: the machine is shared and noisy
            for name, (url, server_pids, nginx_pids) in setups.items():
                rate, used = _scale_round(url, sessions, steps, 16, args.generators, (server_pids, nginx_pids))
                best[name] = max(best[name], rate)
                cpu[name].append(tuple(seconds * 1e6 / (sessions * steps) for seconds in used))
        for front in (front_one, front_two):
            front.stop()
    finally:
        for server in started:
            server.stop()
    results = {"machine": _machine(), "sessions": sessions, "steps": steps, "generators": args.generators,
               "rounds": rounds, "steps_per_s": best,
               "cpu_us_per_step": {name: [statistics.median(c[i] for c in rounds_cpu) for i in (0, 1)]
                                   for name, rounds_cpu in cpu.items()}}
    if not args.no_memory:  # many small messages cost more per byte counted than few large ones
        results["memory"] = [_scale_memory(2**22 if args.quick else 2**24, sessions=64, n_tokens=16),
                             _scale_memory(2**24 if args.quick else 2**27, sessions=128, n_tokens=8192)]
    return results


def render_scale(results):
    """The scaling results as a Markdown table and a line per memory run."""
    base = results["steps_per_s"]["1 worker, direct"]
    lines = [
        f"{results['sessions']} sessions x {results['steps']} steps x 16 tokens, driven by "
        f"{results['generators']} load-generator processes on the same machine; best of {results['rounds']} "
        f"interleaved rounds; {results['machine'].get('cpu', '?')}, {results['machine'].get('cpus', '?')} CPUs",
        "",
        "| setup | aggregate steps/s | vs 1 worker, direct | server CPU per step | nginx CPU per step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, rate in results["steps_per_s"].items():
        server_us, nginx_us = results["cpu_us_per_step"][name]
        lines.append(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {server_us:.0f} us | "
                     + (f"{nginx_us:.0f} us |" if nginx_us else "- |"))
    for memory in results.get("memory", ()):
        lines += ["", f"memory, {memory['n_tokens']}-token steps: RSS {memory['idle_rss'] / 2**20:.1f} MiB idle, "
                  f"{memory['full_rss'] / 2**20:.1f} MiB with episodes at --max-memory-bytes "
                  f"{memory['bound'] / 2**20:.0f} MiB: {memory['rss_per_bound_byte']:.2f} bytes of RSS per byte "
                  f"of the bound, {memory['bound'] / memory['tokens']:.1f} bytes of the bound per token"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------
# Command line: one subcommand per mode; the main benchmark without one
# ------------------------------------------------------------------------------


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _measured(run, args):
    """``run(args)`` with every server stopped after it, SIGTERM taken as an interrupt;
    None when interrupted."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return None
    finally:
        _stop_all()


def _report(results, table, json_path):
    """Print the table, keep it in ``results``, and write those as JSON if asked."""
    results["table"] = table
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _bench_command(args):
    """The main benchmark (no subcommand) and ``curve``: the table and the picture."""
    curve = args.command == "curve"
    args.openenv_peers = _openenv_peers(args)
    results = _measured(run_curve if curve else run_benchmark, args)
    if results is None:
        return 130
    _draw(results, args, functools.partial(print, file=sys.stderr, flush=True))
    return _report(results, render_curve(results) if curve else render_table(results) + "\n\n" + render_curve(results),
                   args.json)


def _scale_command(args):
    """``scale``: the scaling table."""
    results = _measured(run_scale, args)
    return 130 if results is None else _report(results, render_scale(results), args.json)


def _compare_command(args):
    """``compare``: the two trees' table."""
    results = _measured(run_compare, args)
    return 130 if results is None else _report(results, render_compare(results), args.json)


def _hooks_command(args):
    """``hooks``: the hooks' cost table."""
    results = _measured(run_hooks, args)
    return 130 if results is None else _report(results, render_hooks(results), args.json)


def _growth_command(args):
    """``growth``: 0 when chatenv's growth is within its target on both frame shapes."""
    try:
        return _growth_main(args.steps, args.tokens, args.window, args.rounds)
    finally:
        _stop_all()


def _run_options(parser, inherit=False):
    """The options of the main run, which ``curve`` shares. ``inherit``: on a subcommand,
    one left out keeps what was given before the subcommand's name."""
    default = {"default": argparse.SUPPRESS} if inherit else {}
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run", **default)
    parser.add_argument("--no-openenv", action="store_true", help="leave the OpenEnv peers out", **default)
    parser.add_argument("--openenv-release", action="append", choices=list(OPENENV_RELEASES),
                        help="an OpenEnv release to run, from its venv (`python tests/support.py venvs`); "
                        "repeat for more (default: all of them, 0.10.0 the main comparison)", **default)
    parser.add_argument("--openenv-python", metavar="PATH",
                        help="an interpreter with OpenEnv installed, instead of the venvs (one release)", **default)
    _json_option(parser, inherit)
    parser.add_argument("--plot", metavar="PATH", help="the per-step cost picture (PNG; default: "
                        "docs/step-cost.png, a temporary file with --quick)", **default)
    parser.add_argument("--no-plot", action="store_true", help="draw no picture (its data is still in --json)",
                        **default)


def _quick_option(parser):
    parser.add_argument("--quick", action="store_true", default=argparse.SUPPRESS, help="small counts, a smoke run")


def _json_option(parser, inherit=True):
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON",
                        **({"default": argparse.SUPPRESS} if inherit else {}))


def _parser():
    """The command line: the main run's options, and one subcommand per other mode."""
    parser = argparse.ArgumentParser(
        prog="tools/bench.py", description=__doc__.split("\n\n")[0] + " Without a subcommand, the main "
        "benchmark runs (about six minutes on 2 cores): chatenv, the floor and the OpenEnv peers side by side.",
        epilog="Started by the benchmark itself, not listed above: floor --port P (the floor server), growth-server "
        "(growth's replay server), clients --url URL (ChatEnv against OpenEnv's sync client, run in an OpenEnv venv).")
    parser.set_defaults(handler=_bench_command, command=None)
    _run_options(parser.add_argument_group("the main benchmark's options (and curve's)"))
    commands = parser.add_subparsers(title="subcommands", dest="command", metavar="[COMMAND]",
                                     description="`tools/bench.py COMMAND --help` lists each one's options")

    def command(name, handler, summary=None, description=None):
        """A subcommand; one without a summary is left out of the list (a subprocess entry point)."""
        listed = {} if summary is None else {"help": summary}
        sub = commands.add_parser(name, description=description or summary, **listed)
        sub.set_defaults(handler=handler)
        return sub

    # Modes for people
    sub = command("curve", _bench_command, "the long episodes alone, and the per-step cost picture (about two minutes)")
    _run_options(sub, inherit=True)
    sub = command("scale", _scale_command, "aggregate steps/s with workers and behind nginx, and RSS per byte of "
                  "the memory bound (about four minutes)")
    _quick_option(sub)
    sub.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    sub.add_argument("--generators", type=int, default=2, help="load-generator processes (default: %(default)s)")
    sub.add_argument("--no-memory", action="store_true", help="leave out the memory measurement")
    _json_option(sub)
    sub = command("growth", _growth_command, "how a client's step time grows over a long episode of full "
                  "observations, ChatEnv against a bare websockets client, both OpenEnv frame shapes; exits 1 if "
                  "chatenv's growth is above 1.5x the bare client's")
    sub.add_argument("--steps", type=int, default=1000, help="steps per episode (default: %(default)s)")
    sub.add_argument("--tokens", type=int, default=64, help="tokens per step (default: %(default)s)")
    sub.add_argument("--window", type=int, default=100, help="steps timed at each end (default: %(default)s)")
    sub.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    sub = command("sync-client", lambda a: _sync_client_main(a.steps, a.tokens, a.rounds) or 0,
                  "ChatEnv and AsyncChatEnv against the raw generator, taking turns on one chatenv server")
    sub.add_argument("--steps", type=int, default=1000, help="steps per episode (default: %(default)s)")
    sub.add_argument("--tokens", type=int, default=16, help="tokens per step (default: %(default)s)")
    sub.add_argument("--rounds", type=int, default=9, help="rounds (default: %(default)s)")
    sub = command("keepalive", lambda a: print(json.dumps(_keepalive_main(a.ping_s, a.pause_s))) or 0,
                  "ChatEnv sessions held through pauses (sleeping, computing) longer than the server's ping interval "
                  "plus timeout")
    sub.add_argument("--ping-s", type=float, default=1.0, help="the server's ping interval and timeout")
    sub.add_argument("--pause-s", type=float, default=3.0, help="each pause: above twice --ping-s")
    sub = command("compare", _compare_command, "this tree against an older one, measure by measure, taking turns",
                  "This tree's chatenv.py against the one in --baseline DIR (a `git worktree` of an older commit, "
                  "say): server steps/s (1 and 32 sessions, the raw generator), long-episode late steps, RSS per "
                  "idle session, start until /health, `import chatenv` (bytecode cached and not), ChatEnv and "
                  "AsyncChatEnv steps/s each on its tree's server, and ChatEnv's growth over full observations. The "
                  "trees take turns in blocks of steps; the table gives each tree's median over the rounds and the "
                  "median of the rounds' ratios (about 35 s a round on 2 busy cores).")
    sub.add_argument("--baseline", metavar="DIR", required=True, help="the tree to compare with (holds chatenv.py)")
    sub.add_argument("--rounds", type=int, help="rounds of every measure (default: 5; 1 with --quick)")
    _quick_option(sub)
    _json_option(sub)
    sub = command("hooks", _hooks_command, "steps/s with tasks and a built-in reward against none, taking turns",
                  "Three servers of one tree: no hooks; --tasks (a file of sums written to a temporary directory, "
                  "each task a prompt and --turns scripted turns) with --rubric exact_match; the same with --rubric "
                  "boxed_match. A raw generator steps each with 64-token steps, 1 session and 32 at once, resetting "
                  "every --turns + 1 steps on all three (when a task's episode ends); the servers take turns in "
                  "blocks of steps. The table gives each server's median steps/s and the median of the rounds' "
                  "ratios to no hooks (about 25 s a round).")
    sub.add_argument("--tree", metavar="DIR", default=HERE, help="the tree whose chatenv.py serves (default: this one)")
    sub.add_argument("--turns", type=int, default=_HOOK_TURNS, help="each task's scripted turns; 0: a reset before "
                     "every step (default: %(default)s)")
    sub.add_argument("--rounds", type=int, help="rounds (default: 5; 1 with --quick)")
    _quick_option(sub)
    _json_option(sub)
    # Subprocess entry points: the benchmark starts these itself
    sub = command("floor", lambda a: _floor_main(a.port) or 0, description="the floor server, until SIGTERM")
    sub.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    sub = command("growth-server", lambda a: asyncio.run(_replay_serve(0, a.shape, a.steps, a.tokens, a.window)) or 0,
                  description="growth's replay server: prints its port as JSON, serves until killed")
    sub.add_argument("--shape", choices=sorted(_GROWTH_HEADS), default="0.10.0",
                     help="whose frames (default: %(default)s)")
    sub.add_argument("--steps", type=int, default=1000, help="steps per episode (default: %(default)s)")
    sub.add_argument("--tokens", type=int, default=64, help="tokens per step (default: %(default)s)")
    sub.add_argument("--window", type=int, default=100, help="steps timed at each end (default: %(default)s)")
    sub = command("clients", lambda a: _clients_main(a.url, a.steps, a.tokens, a.rounds) or 0,
                  description="ChatEnv against OpenEnv's sync client on the server at --url (in an OpenEnv venv)")
    sub.add_argument("--url", required=True, help="the chatenv server's base URL")
    sub.add_argument("--steps", type=int, default=1000, help="steps per episode (default: %(default)s)")
    sub.add_argument("--tokens", type=int, default=16, help="tokens per step (default: %(default)s)")
    sub.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    return parser


def main(argv=None):
    """``python tools/bench.py [COMMAND] [options]``: the mode's exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
