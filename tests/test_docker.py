"""Tests for chatenv's Docker launcher on a real engine: the repo's Dockerfile is built
once per session and run by ``ChatEnv.from_docker_image``; no test leaves a container.

Skipped when no engine answers, unless ``CHATENV_REQUIRE_DOCKER`` is set (as .ci/run
does, with ``CHATENV_DOCKER_BASE`` naming an offline base image). The launcher's errors
that need no engine are in test_chatenv.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import chatenv
from helpers import wait_until
from chatenv import ChatAction, ChatEnv


# ------------------------------------------------------------------------------
# Docker: the repo's Dockerfile built, then run by from_docker_image on a real engine
# ------------------------------------------------------------------------------

DOCKER_TEST_IMAGE = os.environ.get("CHATENV_DOCKER_TEST_IMAGE", "chatenv-test:latest")
DOCKER_STOP_GRACE_S = 10  # `docker stop` waits this long after SIGTERM, then kills


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
        assert elapsed < DOCKER_STOP_GRACE_S / 2, f"docker stop took {elapsed:.1f} s: the server ignores SIGTERM?"
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
    their commands read from the installed openenv package (support)."""
    import support

    commands = support.launcher_commands(port=8000)
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


_HOOK_MODULE = '''
def score(action, observation):
    """A quarter point when the reply holds the task's answer, minus one otherwise."""
    return 0.25 if observation.task["answer"] in observation.messages[-1]["content"] else -1.0
'''


def _hook_dir(tmp_path):
    """A folder holding myhooks.py and tasks.jsonl, readable by the image's non-root user."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "myhooks.py").write_text(_HOOK_MODULE)
    (hooks / "tasks.jsonl").write_text(json.dumps({"id": "sum", "prompt": "What is 2 plus 3?", "answer": "5"}) + "\n")
    for path in (hooks, *hooks.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return hooks


def test_docker_mounted_hook_file_scores(no_leftovers, tmp_path):
    """A hook module and a task file mounted read-only and named by variables, as the README
    shows: the reward the mounted hook computes reaches the client."""
    hooks = _hook_dir(tmp_path)
    env_vars = {"PYTHONPATH": "/hooks", "CHATENV_RUBRIC": "myhooks:score", "CHATENV_TASKS": "/hooks/tasks.jsonl"}
    with chatenv.ChatEnv.from_docker_image(no_leftovers, env_vars=env_vars, volumes={str(hooks): "/hooks"},
                                           ready_timeout_s=60) as env:
        assert [split["name"] for split in env.list_splits()] == ["train"]
        result = env.reset(task_id="sum")
        assert _messages(result.observation)[-1] == {"role": "user", "content": "What is 2 plus 3?"}
        result = env.step(ChatAction(tokens=list(b"It is 5.")))
        assert (result.reward, result.done) == (0.25, True)
        assert result.observation.metadata["rewards"] == {"myhooks:score": 0.25}
        env.reset(task_id="sum")
        assert env.step(ChatAction(tokens=list(b"It is 6."))).reward == -1.0


def test_docker_mounted_hook_bad_spec_exits_with_its_line(no_leftovers, tmp_path):
    """A spec naming nothing in the mounted module stops the container at start (exit 2),
    its one-line error in the DockerError."""
    hooks = _hook_dir(tmp_path)
    env_vars = {"PYTHONPATH": "/hooks", "CHATENV_RUBRIC": "myhooks:nope"}
    t0 = time.monotonic()
    with pytest.raises(chatenv.DockerError) as info:
        chatenv.ChatEnv.from_docker_image(no_leftovers, env_vars=env_vars, volumes={str(hooks): "/hooks"},
                                          ready_timeout_s=60)
    message = str(info.value)
    assert "exit code 2" in message, message
    assert "chatenv: error: CHATENV_RUBRIC: module 'myhooks' has no attribute 'nope'" in message, message
    assert time.monotonic() - t0 < 30, "a bad spec must stop the container, not be waited out"


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
    ready_timeout_s = 60
    t0 = time.monotonic()
    with pytest.raises(chatenv.DockerError) as info:
        chatenv.ChatEnv.from_docker_image(
            no_leftovers, env_vars={"CHATENV_TOKENIZER": "/nonexistent"}, ready_timeout_s=ready_timeout_s)
    message = str(info.value)
    assert "log" in message and "/nonexistent" in message   # the server's own error line
    assert time.monotonic() - t0 < ready_timeout_s / 2, "a crash must be noticed, not waited out"


def test_docker_not_healthy_in_time_is_removed(no_leftovers):
    # The server cannot answer /health within 1 ms: timeout path, container removed.
    with pytest.raises(chatenv.DockerError, match="health"):
        chatenv._start_container(no_leftovers, ready_timeout_s=0.001)


def test_docker_bad_client_option_leaves_no_container(no_leftovers):
    # The container starts before the client is built: a client error must remove it.
    with pytest.raises(TypeError):
        chatenv.ChatEnv.from_docker_image(no_leftovers, no_such_option=1, ready_timeout_s=60)
