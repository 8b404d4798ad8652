"""Scaling past one process and one machine, on real processes over loopback.

* ``chatenv serve --workers N``: N servers on one port under a supervisor, which
  restarts a worker that dies (only that worker's sessions are lost) and stops
  them all on SIGTERM/SIGINT, every session closed with 1012.
* nginx (Debian's) running ``deploy/nginx/chatenv.conf`` in front of several
  chatenv servers: chatenv's and OpenEnv's clients through it, sessions spread
  over the backends, a backend killed mid-run, chatenv's Host and Origin checks
  behind it.
* ``deploy/kubernetes/chatenv.yaml``, checked against the Dockerfile and the
  server's own bounds (no cluster runs here).

Which process holds a session is read from /proc (Linux): the server side of
each connection is a socket in one worker's file table.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets.sync.client
from websockets.exceptions import ConnectionClosed, InvalidStatus

import chatenv
from chatenv import AsyncChatEnv, ChatEnv, EpisodeLostError
from helpers import SHUTDOWN_S, SLACK, free_port

HERE = Path(__file__).resolve().parents[1]  # the repository's root
NGINX_CONF = HERE / "deploy" / "nginx" / "chatenv.conf"
KUBERNETES = HERE / "deploy" / "kubernetes" / "chatenv.yaml"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and forks: Linux")


# ------------------------------------------------------------------------------
# Processes and /proc: which process holds a session, read from its file table
# ------------------------------------------------------------------------------


def wait_until(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0):
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _healthy(url: str) -> bool:
    try:
        return http_get(url + "/health", timeout=1)[0] == 200
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


ESTABLISHED, LISTEN = 0x01, 0x0A


def tcp_sockets() -> list[tuple[int, int, int, int]]:
    """Every TCP socket of this network namespace: (inode, local port, remote port, state)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                rows.append((int(inode), int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                             int(state, 16)))
    return rows


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def held_connections(port: int, pids) -> dict[int, set[int]]:
    """For each pid, the remote ports of the established connections it holds on local ``port``."""
    rows = tcp_sockets()
    held = {}
    for pid in pids:
        inodes = socket_inodes(pid)
        held[pid] = {remote for inode, local, remote, state in rows
                     if inode in inodes and local == port and state == ESTABLISHED}
    return held


def my_client_ports(port: int) -> set[int]:
    """Local ports of this process's established connections to ``port``."""
    inodes = socket_inodes(os.getpid())
    return {local for inode, local, remote, state in tcp_sockets()
            if inode in inodes and remote == port and state == ESTABLISHED}


def established_on(port: int) -> int:
    """Server-side established connections on local ``port`` (any process)."""
    return sum(1 for _, local, _, state in tcp_sockets() if local == port and state == ESTABLISHED)


def listeners_on(port: int) -> int:
    return sum(1 for _, local, _, state in tcp_sockets() if local == port and state == LISTEN)


class Served:
    """``python chatenv.py serve ARGS`` (or ``script serve ARGS``) with its log in a file."""

    def __init__(self, tmp_path: Path, name: str, *args: str, port: int | None = None, env=None,
                 script: Path | None = None) -> None:
        self.port = free_port() if port is None else port
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "w")
        argv = [sys.executable, str(script or HERE / "chatenv.py"), "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=HERE,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.known: set[int] = set()  # every worker pid seen, to clean up after

    def ready(self, workers: int = 0, timeout: float = 20.0) -> Served:
        if self.port == 0:  # the supervisor says which port it bound
            match = wait_until(lambda: re.search(r" on http://[^ ]+:(\d+) ", self.log()), timeout)
            assert match, self.log()
            self.port = int(match.group(1))
        ok = wait_until(lambda: self.proc.poll() is not None or (
            _healthy(self.url) and len(self.workers()) >= workers), timeout)
        assert ok and self.proc.poll() is None, f"server did not start: {self.log()}"
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        return self.log_path.read_text()

    def workers(self) -> list[int]:
        pids = children(self.pid)
        self.known.update(pids)
        return pids

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> float:
        """Signal the process; seconds until it exited."""
        started = time.monotonic()
        self.proc.send_signal(signum)
        self.proc.wait(timeout)
        return time.monotonic() - started

    def cleanup(self) -> None:
        self.workers()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.known:  # a worker outliving its supervisor stops by itself within 1 s; do not wait
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def served(tmp_path):
    started: list[Served] = []

    def start(*args: str, **options) -> Served:
        server = Served(tmp_path, f"server{len(started)}", *args, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.cleanup()


def raw_session(ws_url: str, **options):
    """A raw websockets client (no proxy), as a plain object rather than a context manager."""
    options.setdefault("open_timeout", 10)
    options.setdefault("proxy", None)
    if chatenv._websockets_version() >= (17, 1):
        options.setdefault("legacy", True)
    return websockets.sync.client.connect(ws_url, **options)


def ask(ws, frame: dict) -> dict:
    ws.send(json.dumps(frame))
    return json.loads(ws.recv(timeout=10))


def open_mapped(make, port: int, owners) -> tuple[object, int]:
    """Open one session with ``make()`` (which must connect); return it and the process holding it."""
    before = my_client_ports(port)
    session = make()
    mine = my_client_ports(port) - before
    assert len(mine) == 1, mine
    (client_port,) = mine
    held = held_connections(port, owners)
    owner = [pid for pid, ports in held.items() if client_port in ports]
    assert len(owner) == 1, (client_port, held)
    return session, owner[0]


# ------------------------------------------------------------------------------
# Workers: chatenv serve --workers N under a supervisor
# ------------------------------------------------------------------------------


def test_workers_serve_one_port_spread_sessions_and_answer_health(served):
    server = served("--workers", "3", port=0).ready(workers=3)
    pids = server.workers()
    assert len(pids) == 3 and server.pid not in pids
    assert listeners_on(server.port) == 3  # one SO_REUSEPORT listener per worker (the supervisor's never listens)
    answered = set()
    for _ in range(40):  # a new connection each: any worker answers
        status, meta = http_get(server.url + "/metadata")
        assert status == 200 and meta["max_sessions"] == 256
        answered.add(meta["worker"])
        assert http_get(server.url + "/health") == (200, {"status": "healthy"})
    assert answered == set(pids)
    sessions = {}
    for i in range(30):
        ws, pid = open_mapped(lambda: raw_session(server.ws), server.port, pids)
        assert ask(ws, {"type": "reset"})["type"] == "observation"
        sessions[ws] = pid
    assert set(sessions.values()) == set(pids), "every worker holds sessions"
    for i, ws in enumerate(sessions):
        reply = ask(ws, {"type": "step", "data": {"tokens": [72, 105 + i % 3]}})
        assert reply["data"]["observation"]["messages"][-1]["content"] == "H" + "ijk"[i % 3]
        assert ask(ws, {"type": "state"})["data"]["step_count"] == 1
    with ChatEnv(server.url) as env:
        env.reset()
        assert env.step([72, 105]).observation.messages[-1]["content"] == "Hi"

    async def run_async():
        async with AsyncChatEnv(server.url) as aenv:
            await aenv.reset()
            return (await aenv.step([79, 75])).observation.messages[-1]["content"]

    assert asyncio.run(run_async()) == "OK"
    for ws in sessions:
        ws.close()


def test_max_sessions_is_per_worker(served):
    server = served("--workers", "2", "--max-sessions", "2").ready(workers=2)
    pids = server.workers()
    accepted, refused = {pid: [] for pid in pids}, 0
    for _ in range(20):  # the kernel spreads them at random: each worker sees several
        before = my_client_ports(server.port)
        ws = raw_session(server.ws)
        try:
            ws.send('{"type":"reset"}')
        except ConnectionClosed:  # refused: the error frame came, then the close
            pass
        reply = json.loads(ws.recv(timeout=10))
        if reply["type"] == "observation":  # still open: find who holds it
            (client_port,) = my_client_ports(server.port) - before
            pid, = [p for p, held in held_connections(server.port, pids).items() if client_port in held]
            accepted[pid].append(ws)
        else:
            assert reply["data"]["code"] == "CAPACITY_REACHED" and reply["data"]["max_sessions"] == 2
            refused += 1
            ws.close()
    assert {pid: len(held) for pid, held in accepted.items()} == {pid: 2 for pid in pids}
    assert refused == 16
    for held in accepted.values():
        for ws in held:
            ws.close()


def test_killed_worker_is_restarted_and_only_its_sessions_are_lost(served):
    server = served("--workers", "2").ready(workers=2)
    pids = server.workers()
    envs = {}
    for i in range(16):
        env, pid = open_mapped(lambda: _reset(ChatEnv(server.url)), server.port, pids)
        env.step([65 + i])
        envs[env] = pid
    victim, survivor = pids[0], pids[1]
    lost = [env for env, pid in envs.items() if pid == victim]
    kept = [env for env, pid in envs.items() if pid == survivor]
    assert lost and kept, "the kernel put sessions on both workers"
    os.kill(victim, signal.SIGKILL)
    replacement = wait_until(lambda: [p for p in server.workers() if p not in pids], 1.0 + SLACK)
    assert len(replacement) == 1, server.log()  # after 0.1 s: it died young, which may be a crash loop
    assert sorted(server.workers()) == sorted([survivor, *replacement])
    assert "was killed by SIGKILL" in server.log()
    for env in lost:
        with pytest.raises(EpisodeLostError):
            env.step([33])
    for env in kept:
        assert env.step([33]).observation.messages[-1]["content"] == "!"
        assert env.state().step_count == 2
    for env in lost:  # reset() opens a fresh episode on whichever worker the kernel picks
        assert env.reset().observation.messages == []
        assert env.step([72]).observation.messages[-1]["content"] == "H"
    assert wait_until(lambda: http_get(server.url + "/metadata")[1]["worker"] == replacement[0], 10, 0)
    for env in envs:
        env.close()
    assert server.proc.poll() is None


def _reset(env):
    env.reset()
    return env


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_every_session_in_every_worker_with_1012(served, signum):
    server = served("--workers", "3").ready(workers=3)
    pids = server.workers()
    sessions = {}
    for _ in range(24):
        ws, pid = open_mapped(lambda: raw_session(server.ws), server.port, pids)
        ask(ws, {"type": "reset"})
        ask(ws, {"type": "step", "data": {"tokens": [72]}})
        sessions[ws] = pid
    assert len(set(sessions.values())) >= 2
    elapsed = server.stop(signum)
    assert server.proc.returncode == 0
    assert elapsed < SHUTDOWN_S * SLACK, elapsed
    for ws in sessions:
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == 1012
    assert not [pid for pid in pids if alive(pid)], "a worker outlived its supervisor"
    log = server.log()
    assert "Traceback" not in log and "supervisor stopped" in log
    assert log.count("server stopped") == 3


def test_crash_looping_worker_backs_off_and_sigterm_still_stops(served, tmp_path):
    """A worker that fails as it starts is restarted with doubling delays, not in a tight loop."""
    script = tmp_path / "crashing.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import chatenv\n"
        "async def refuse(self):\n"
        "    raise RuntimeError('cannot start')\n"
        "chatenv.ChatServer.start = refuse\n"
        "sys.exit(chatenv.main())\n"
    )
    server = served("--workers", "2", script=script)
    watched = 3.0
    time.sleep(watched)
    log = server.log()
    deaths = log.count("exited with 1")
    first, longest = chatenv._RESTART_DELAY_S
    # Restarts a slot can make in `watched` seconds when its delays double from `first`
    most = 0
    while first * (2 ** most - 1) <= watched:
        most += 1
    assert 2 * 2 <= deaths <= 2 * (most + 1), (deaths, log)  # 2 slots: each restarted, none spinning
    assert "restarting it in 0.2 s" in log and "restarting it in 0.4 s" in log
    assert server.proc.poll() is None, "the supervisor survives its workers"
    elapsed = server.stop(signal.SIGTERM)
    assert server.proc.returncode == 0 and elapsed < SHUTDOWN_S * SLACK


def _new_sessions_all_served(url: str, count: int) -> None:
    """``count`` new sessions in a row, each reset and stepped within a few seconds."""
    for i in range(count):
        with ChatEnv(url, connect_timeout_s=3, message_timeout_s=3) as env:
            env.reset()
            assert env.step([65 + i % 26]).observation.messages[-1]["content"] == chr(65 + i % 26), i


def _silent_kill_logged(log: str, pid: int) -> float:
    """How long the supervisor says ``pid`` had been silent when it killed it."""
    match = re.search(rf"worker pid {pid} has not answered for ([\d.]+) s", log)
    assert match, log
    return float(match.group(1))


def _wedging_script(tmp_path: Path) -> Path:
    """``chatenv.py`` whose worker blocks its event loop for good on ``GET /wedge``."""
    script = tmp_path / "wedging.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import chatenv\n"
        "reply = chatenv.http_reply\n"
        "def wedge(server, method, path, body=b''):\n"
        "    if path == '/wedge':\n"
        "        time.sleep(3600)\n"
        "    return reply(server, method, path, body)\n"
        "chatenv.http_reply = wedge\n"
        "sys.exit(chatenv.main())\n"
    )
    return script


def test_stopped_worker_is_killed_and_replaced_and_new_connections_succeed(served):
    """A SIGSTOPped worker keeps its SO_REUSEPORT socket (the kernel still hands it
    connections) and answers none: the supervisor hears no heartbeat, kills it and
    starts another, and every new connection is served again."""
    server = served("--workers", "2").ready(workers=2)
    victim, survivor = pids = server.workers()
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    replacement = wait_until(lambda: [p for p in server.workers() if p not in pids], 5.0 + SLACK, 0.05)
    took = time.monotonic() - stopped
    assert len(replacement) == 1, server.log()
    assert took < 5.0 + SLACK, took
    assert _silent_kill_logged(server.log(), victim) < 5.0, "detected within 5 s"
    assert not alive(victim) and alive(survivor)
    _new_sessions_all_served(server.url, 40)
    assert server.proc.poll() is None


def test_worker_with_a_blocked_event_loop_is_killed_and_replaced(served, tmp_path):
    """A live process whose event loop is wedged (here a request handler that never
    returns) is found by the same heartbeat: a dead-process check would not see it."""
    script = _wedging_script(tmp_path)
    server = served("--workers", "2", script=script).ready(workers=2)
    pids = server.workers()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /wedge HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        replacement = wait_until(lambda: [p for p in server.workers() if p not in pids], 5.0 + SLACK, 0.05)
    assert len(replacement) == 1, server.log()
    (victim,) = [pid for pid in pids if not alive(pid)]
    assert _silent_kill_logged(server.log(), victim) < 5.0
    _new_sessions_all_served(server.url, 40)
    assert server.proc.poll() is None


@pytest.mark.parametrize("how", ["stopped", "blocked"])
def test_sigterm_stops_the_supervisor_at_once_with_a_stopped_or_blocked_worker(served, tmp_path, how):
    """A stopped worker does not act on SIGTERM until continued, a wedged one never: the
    supervisor continues the first and kills the second, so it exits within 1.5 s."""
    script = _wedging_script(tmp_path)
    server = served("--workers", "2", script=script).ready(workers=2)
    pids = server.workers()
    with ChatEnv(server.url) as env, socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        env.reset()
        if how == "stopped":
            os.kill(pids[0], signal.SIGSTOP)
        else:
            sock.sendall(b"GET /wedge HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.3)  # well before the supervisor would notice by itself
        elapsed = server.stop(signal.SIGTERM)
    assert server.proc.returncode == 0, server.log()
    assert elapsed < SHUTDOWN_S * 2, (elapsed, server.log())  # 1.5 s, with room for a loaded machine
    assert not [pid for pid in pids if alive(pid)], "a worker outlived its supervisor"


def test_workers_fall_back_to_one_shared_listening_socket(served, tmp_path):
    """Where SO_REUSEPORT does not balance, the supervisor binds one socket every worker accepts from."""
    script = tmp_path / "shared.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import chatenv\n"
        "chatenv._REUSE_PORT = False\n"
        "sys.exit(chatenv.main())\n"
    )
    server = served("--workers", "2", script=script).ready(workers=2)
    pids = server.workers()
    assert listeners_on(server.port) == 1
    assert "one shared socket" in server.log()
    sessions = {}
    for _ in range(50):  # the workers race to accept: both win some (not necessarily half)
        ws, pid = open_mapped(lambda: raw_session(server.ws), server.port, pids)
        assert ask(ws, {"type": "reset"})["type"] == "observation"
        sessions[ws] = pid
        if len(sessions) >= 10 and len(set(sessions.values())) == 2:
            break
    assert set(sessions.values()) == set(pids)
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)  # the socket stays open in the supervisor and the other worker
    assert wait_until(lambda: len([p for p in server.workers() if p not in pids]) == 1, 1.0 + SLACK)
    for _ in range(10):
        with ChatEnv(server.url) as env:
            assert env.reset().observation.messages == []
    elapsed = server.stop(signal.SIGTERM)
    assert server.proc.returncode == 0 and elapsed < SHUTDOWN_S * SLACK
    for ws, pid in sessions.items():
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == (1006 if pid == victim else 1012), (pid, victim, ws.close_code)


def test_workers_refuse_a_port_in_use_and_the_variable_sets_workers(served, tmp_path):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        out = subprocess.run([sys.executable, str(HERE / "chatenv.py"), "serve", "--port", str(port),
                              "--workers", "2"], capture_output=True, text=True, timeout=30)
    port_error = f"chatenv: error: argument --port: already in use on 127.0.0.1, not '{port}'\n"
    assert out.returncode == 2 and out.stderr == port_error, out.stderr  # the README's one line
    first = served(env=dict(os.environ, CHATENV_WORKERS="2")).ready(workers=2)
    assert len(first.workers()) == 2
    # A second supervisor on the same port (SO_REUSEPORT would let it share) is refused
    out = subprocess.run([sys.executable, str(HERE / "chatenv.py"), "serve", "--port", str(first.port),
                          "--workers", "2"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.startswith("chatenv: error: argument --port: already in use"), \
        out.stderr
    out = subprocess.run([sys.executable, str(HERE / "chatenv.py"), "serve", "--workers", "0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--workers" in out.stderr and "Traceback" not in out.stderr


def test_one_worker_by_default_means_no_fork(served):
    server = served().ready()
    assert server.workers() == []  # the server is the process itself
    assert http_get(server.url + "/metadata")[1]["worker"] == server.pid


# ------------------------------------------------------------------------------
# nginx in front: deploy/nginx/chatenv.conf before several chatenv servers
# ------------------------------------------------------------------------------


def nginx_executable() -> str:
    exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if exe is None:
        if os.environ.get("CHATENV_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is not installed: apt-get install -y nginx")
        pytest.skip("nginx is not installed (apt-get install -y nginx; CI sets CHATENV_REQUIRE_NGINX=1)")
    return exe


def render_nginx_conf(text: str, backends: list[int], port: int) -> str:
    """deploy/nginx/chatenv.conf with its upstream servers and listen address replaced, nothing else."""
    block = re.search(r"^upstream chatenv \{\n.*?^\}", text, re.S | re.M).group(0)
    servers = [line for line in block.splitlines() if line.strip().startswith("server ")]
    assert servers, block
    options = servers[0].strip().rstrip(";").split(None, 2)[2]  # max_fails=... fail_timeout=...
    lines = [line for line in block.splitlines() if line not in servers]
    lines[-1:-1] = [f"    server 127.0.0.1:{backend} {options};" for backend in backends]
    text = text.replace(block, "\n".join(lines))
    text, listens = re.subn(r"^(\s*)listen \d+;", rf"\g<1>listen 127.0.0.1:{port};", text, flags=re.M)
    assert listens == 1
    return text


class Nginx:
    """Debian's nginx, not as a service: in the foreground, with its own prefix, pid and logs."""

    def __init__(self, tmp_path: Path, backends: list[int]) -> None:
        self.exe = nginx_executable()
        self.dir = tmp_path / "nginx"
        self.dir.mkdir()
        self.backends = backends
        self.proc = None
        for _ in range(5):  # a port picked free may be taken before nginx binds it: pick another
            self.port = free_port()
            (self.dir / "chatenv.conf").write_text(render_nginx_conf(NGINX_CONF.read_text(), backends, self.port))
            (self.dir / "nginx.conf").write_text(
                "daemon off;\n"
                "worker_processes 1;\n"
                f"pid {self.dir}/nginx.pid;\n"
                f"error_log {self.dir}/error.log info;\n"
                "events { worker_connections 1024; }\n"
                "http {\n"
                f"    access_log {self.dir}/access.log;\n"
                + "".join(f"    {kind}_temp_path {self.dir}/{kind}_temp;\n"
                          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
                + f"    include {self.dir}/chatenv.conf;\n"
                "}\n"
            )
            self.proc = subprocess.Popen([self.exe, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                          "-e", str(self.dir / "error.log")],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if wait_until(lambda: self.proc.poll() is not None or _healthy(self.url), 20):
                if self.proc.poll() is None:
                    return
            self.stop()
        raise AssertionError(f"nginx did not start: {self.errors()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.proc.stderr.close()


@pytest.fixture
def behind_nginx(tmp_path, served):
    """``behind_nginx(n, *args)``: n chatenv servers (``serve ARGS``) and nginx in front of them."""
    fronts: list[Nginx] = []

    def start(count: int, *args: str) -> tuple[Nginx, list[Served]]:
        backends = [served(*args) for _ in range(count)]
        for backend in backends:
            backend.ready()
        front = Nginx(tmp_path, [backend.port for backend in backends])
        fronts.append(front)
        return front, backends

    yield start
    for front in fronts:
        front.stop()
        errors = front.errors()
        assert "[emerg]" not in errors and "[crit]" not in errors, errors


def backend_of(make, backends: list[Served]):
    """Open one session through nginx with ``make()``; return it and the backend nginx chose."""
    before = [established_on(b.port) for b in backends]
    session = make()
    gained = [b for b, n in zip(backends, before) if established_on(b.port) == n + 1]
    assert len(gained) == 1, (before, [established_on(b.port) for b in backends])
    return session, gained[0]


def test_nginx_config_balances_chatenv_clients_over_backends(behind_nginx):
    front, backends = behind_nginx(3)
    assert http_get(front.url + "/health") == (200, {"status": "healthy"})
    envs = {}
    for i in range(12):
        env, backend = backend_of(lambda: _reset(ChatEnv(front.url)), backends)
        envs[env] = backend
    counts = sorted(list(envs.values()).count(b) for b in backends)
    assert counts == [4, 4, 4], counts  # least_conn: sessions open at once are spread evenly
    for i, env in enumerate(envs):
        for step in range(20):
            result = env.step([72, 105])
        assert result.observation.messages[-1] == {"role": "assistant", "content": "Hi"}
        assert env.state().step_count == 20

    async def async_sessions():
        clients = [AsyncChatEnv(front.url) for _ in range(6)]
        for client in clients:
            await client.reset()
        results = await asyncio.gather(*(client.step([79, 75]) for client in clients))
        held = [established_on(b.port) for b in backends]
        for client in clients:
            await client.close()
        return [r.observation.messages[-1]["content"] for r in results], held

    contents, held = asyncio.run(async_sessions())
    assert contents == ["OK"] * 6
    assert held == [4 + 2] * 3, held  # 12 sync + 6 async sessions, 6 on each
    for env in envs:
        env.close()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_nginx_backend_lost_mid_run_costs_only_its_own_sessions(behind_nginx, signum):
    front, backends = behind_nginx(3)
    sessions = {}
    for i in range(9):
        env, backend = backend_of(lambda: _reset(ChatEnv(front.url)), backends)
        env.step([65 + i])
        sessions[env] = backend
    loop = asyncio.new_event_loop()
    try:
        for i in range(3):
            async def open_async():
                client = AsyncChatEnv(front.url)
                await client.reset()
                await client.step([97 + i])
                return client
            client, backend = backend_of(lambda: loop.run_until_complete(open_async()), backends)
            sessions[client] = backend
        victim = backends[0]
        lost = [s for s, b in sessions.items() if b is victim]
        kept = [s for s, b in sessions.items() if b is not victim]
        assert len(lost) == 4 and len(kept) == 8
        victim.stop(signum)  # SIGKILL: a crash; SIGTERM: a restart, sessions closed with 1012

        def step(session, tokens):
            if isinstance(session, AsyncChatEnv):
                return loop.run_until_complete(session.step(tokens))
            return session.step(tokens)

        def reset(session):
            if isinstance(session, AsyncChatEnv):
                return loop.run_until_complete(session.reset())
            return session.reset()

        for session in lost:
            with pytest.raises(EpisodeLostError):
                step(session, [33])
        for session in kept:
            assert step(session, [33]).observation.messages[-1]["content"] == "!"
        for session in lost:  # a fresh episode, on a live backend (the dead one is tried, refused, skipped)
            _, backend = backend_of(lambda: reset(session), backends)
            assert backend is not victim
            assert step(session, [72]).observation.messages[-1]["content"] == "H"
        assert established_on(victim.port) == 0
        assert sum(established_on(b.port) for b in backends) == 12
        for session in sessions:
            if isinstance(session, AsyncChatEnv):
                loop.run_until_complete(session.close())
            else:
                session.close()
    finally:
        loop.close()


def test_openenv_client_runs_sessions_through_nginx(behind_nginx):
    from support import OpenEnvClients

    front, backends = behind_nginx(3)
    with OpenEnvClients("0.10.0") as openenv:
        clients = {}
        for mode in ("sync", "async", "sync"):
            client, backend = backend_of(lambda: openenv.open(front.url, mode), backends)
            clients[client] = backend
        assert len(set(clients.values())) == 3  # one on each backend
        for client in clients:
            assert client.reset()["observation"]["messages"] == []
            result = client.step([72, 105])
            assert result["observation"]["messages"] == [{"role": "assistant", "content": "Hi"}]
            assert result["done"] is False
            assert client.state()["step_count"] == 1
        for client in clients:
            client.close()


def test_host_and_origin_checks_work_behind_nginx(behind_nginx):
    front, backends = behind_nginx(2, "--allow-host", "chatenv.test")

    def through_nginx(host: str, **options):
        sock = socket.create_connection(("127.0.0.1", front.port), timeout=10)
        try:  # the URL names the Host header; the socket goes to nginx
            return raw_session(f"ws://{host}:{front.port}/ws", sock=sock, **options)
        except BaseException:
            sock.close()
            raise

    with through_nginx("chatenv.test") as ws:  # a name allowed with --allow-host reaches a session
        assert ask(ws, {"type": "reset"})["type"] == "observation"
        reply = ask(ws, {"type": "step", "data": {"tokens": [72, 105]}})
        assert reply["data"]["observation"]["messages"][-1]["content"] == "Hi"
    with pytest.raises(InvalidStatus) as refused:
        through_nginx("chatenv.test", origin="https://evil.example")  # a browser page elsewhere
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as refused:
        through_nginx("evil.example")  # DNS rebinding: a name the servers were not given
    assert 400 <= refused.value.response.status_code < 500
    assert sum(established_on(b.port) for b in backends) == 0


# ------------------------------------------------------------------------------
# Kubernetes: the manifest against the image and the server, as far as this machine allows
# ------------------------------------------------------------------------------

# Measured (docs/deployment.md, "Scaling out": `python tools/bench.py scale`): a server's RSS
# with its episodes at the memory bound is up to 1.27x the bound (many small
# messages), plus ~42 MiB idle
RSS_PER_BOUND_BYTE, IDLE_RSS = 1.27, 42 * 2**20


def quantity(text) -> float:
    """A Kubernetes quantity: 2560Mi, 2Gi, 500m, 1."""
    text = str(text)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def image_setting(dockerfile: str, name: str) -> str | None:
    """What the image's command line or environment sets ``--NAME`` / ``CHATENV_NAME`` to."""
    command = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    argv = json.loads(command.group(1)) if command else []
    if f"--{name}" in argv:
        return argv[argv.index(f"--{name}") + 1]
    found = re.search(rf"\bCHATENV_{name.upper()}=(\S+)", dockerfile)
    return found.group(1) if found else None


def test_kubernetes_manifest_agrees_with_the_image_and_the_server(served):
    import yaml

    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERNETES.read_text())}
    assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget"}
    dockerfile = (HERE / "Dockerfile").read_text()
    exposed = int(re.search(r"^EXPOSE (\d+)$", dockerfile, re.M).group(1))
    health_port, health_path = re.search(r"'http://127\.0\.0\.1:(\d+)(/\w+)'", dockerfile).groups()
    uid = int(re.search(r"useradd --uid (\d+)", dockerfile).group(1))
    assert image_setting(dockerfile, "port") == str(exposed) and image_setting(dockerfile, "host") == "0.0.0.0"

    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert "command" not in container and "args" not in container  # the image's own CMD: 0.0.0.0:8000
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert list(ports.values()) == [exposed]
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        probed = (ports.get(get["port"], get["port"]), get["path"])
        assert probed == (int(health_port), health_path) == (8000, "/health")
        assert container[probe]["timeoutSeconds"] >= 1
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid

    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    assert not {"CHATENV_HOST", "CHATENV_PORT"} & env.keys(), "the probes and Service assume the image's port"
    workers = int(env.get("CHATENV_WORKERS", "1"))
    stop_bound = chatenv._WORKER_STOP_S if workers > 1 else SHUTDOWN_S
    assert pod["spec"]["terminationGracePeriodSeconds"] > 2 * stop_bound

    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() and {"cpu", "memory"} <= resources["limits"].keys()
    for kind in ("cpu", "memory"):
        assert quantity(resources["requests"][kind]) <= quantity(resources["limits"][kind])
    bound = int(env["CHATENV_MAX_MEMORY_BYTES"])
    assert quantity(resources["limits"]["memory"]) >= workers * (RSS_PER_BOUND_BYTE * bound + IDLE_RSS), \
        "the kernel would kill the pod before the memory bound refuses a step"
    assert quantity(resources["requests"]["cpu"]) >= workers * 0.5

    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert ports.get(port["targetPort"], port["targetPort"]) == exposed
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # The pod's configuration, as the container would get it, is one the server accepts
    server = served(env=dict(os.environ, **env)).ready(workers=workers if workers > 1 else 0)
    meta = http_get(server.url + "/metadata")[1]
    assert meta["max_sessions"] == int(env["CHATENV_MAX_SESSIONS"])
