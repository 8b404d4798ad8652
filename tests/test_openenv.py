"""OpenEnv interoperability, both ways, against both OpenEnv releases.

Real servers on loopback, real clients: OpenEnv's own clients (``openenv`` 0.10.0
and ``openenv-core`` 0.3.0, each in its venv, driven through support)
against a chatenv server; chatenv's clients against the OpenEnv peer (chat_env
on OpenEnv's API, served by uvicorn in each venv); chatenv's frames against the
frames recorded from OpenEnv's own chat_env (``tests/recordings/``); OpenEnv's
validator and launchers against chatenv. This process never imports OpenEnv.
The suite builds the venvs on first use (conftest.py): a missing one fails.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

import chatenv
from helpers import free_port, raw
import record_openenv
import support
from support import OpenEnvClients, PeerProcess, RemoteError

HERE = Path(__file__).resolve().parents[1]  # the repository's root
RELEASES = ("0.10.0", "0.3.0")
RECORDINGS = {
    "0.10.0": HERE / "tests" / "recordings" / "openenv-0.10.0.jsonl",
    "0.3.0": HERE / "tests" / "recordings" / "openenv-core-0.3.0.jsonl",
}
HOOKS_RECORDING = HERE / "tests" / "recordings" / "openenv-0.10.0-hooks.jsonl"  # 0.10.0 with a transform, rubric, tasks
PROMPT = "You are terse."
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Steps shared by both directions: "Hi", "!", "hello", and a UTF-8 "é"
_STEPS = [[72, 105], [33], [104, 101, 108, 108, 111], [195, 169]]
_OUT_OF_VOCAB = 10**6  # an id no byte-level tokenizer decodes: EXECUTION_ERROR on both servers
_BIG_STEP = [104] * 300_000  # 1.5 MB as OpenEnv's client writes it ("104, " a token), under 16 MiB


# ------------------------------------------------------------------------------
# The venvs, the OpenEnv peers and OpenEnv's clients (started once, in parallel)
# ------------------------------------------------------------------------------


def _require_venv(release):
    try:
        return support.require_venv(release)
    except support.VenvMissing as exc:
        pytest.fail(str(exc), pytrace=False)


class _OpenEnv:
    """For each release: one peer process (three servers) and one client host."""

    def __init__(self):
        self.peers, self.clients = {}, {}
        for release in RELEASES:
            _require_venv(release)
        for release in RELEASES:  # importing OpenEnv takes seconds: start all four at once
            servers = [
                {"max_concurrent_envs": 8},
                {"max_concurrent_envs": 1},
                {"max_concurrent_envs": 8, "system_prompt": PROMPT, "tokenizer": "chatenv"},
            ]
            if release == "0.10.0":  # rubrics and the task API are 0.10's: its hooks server too
                servers.append({"hooks": True, "max_concurrent_envs": 8})
            self.peers[release] = PeerProcess(release, *servers).start()
            self.clients[release] = OpenEnvClients(release).start()

    def urls(self, release):
        main, single, prompt, *hooks = self.peers[release].wait_started()
        return {"main": main, "single": single, "prompt": prompt, "hooks": hooks[0] if hooks else None}

    def client_host(self, release):
        return self.clients[release].wait_started()

    def stop(self):
        for clients in self.clients.values():
            clients.stop()
        return {release: peer.stop() for release, peer in self.peers.items()}


@pytest.fixture(scope="session")
def openenv():
    hosts = _OpenEnv()
    yield hosts
    codes = hosts.stop()
    logs = {release: peer.stderr_tail for release, peer in hosts.peers.items() if peer.stderr_tail}
    assert codes == dict.fromkeys(RELEASES, 0), f"the peers should exit 0 on SIGTERM: {codes} {logs}"


@pytest.fixture(params=RELEASES, scope="module")
def release(request):
    return request.param


@pytest.fixture(scope="module")
def peer(openenv, release):
    """The OpenEnv peer of this release: URLs of its three servers."""
    return openenv.urls(release)


@pytest.fixture(scope="module")
def openenv_url(peer):
    return peer["main"]


@pytest.fixture(scope="module")
def oe(openenv, release):
    """OpenEnv's own clients, this release's: ``oe.open(url, "sync"|"async")``."""
    return openenv.client_host(release)


@pytest.fixture(scope="module")
def chatenv_url():
    with chatenv.serve_in_thread(max_sessions=8) as url:
        yield url


def _recording(release):
    with open(RECORDINGS[release]) as f:
        return [json.loads(line) for line in f]


def _cases(release):
    cases = {}
    for case in _recording(release):
        cases.setdefault(case["case"], case)
    return cases


# ------------------------------------------------------------------------------
# Helpers: what a result says, comparable across OpenEnv's (JSON) and chatenv's types
# ------------------------------------------------------------------------------


def _observed(result):
    if isinstance(result, dict):  # from OpenEnv's client, as support reports it
        obs = result["observation"]
        return ([dict(m) for m in obs["messages"]], list(obs["tokens"]), result["reward"], result["done"],
                obs["reward"], obs["done"])
    obs = result.observation
    return ([dict(m) for m in obs.messages], list(obs.tokens), result.reward, result.done, obs.reward, obs.done)


def _state_of(state):
    if isinstance(state, dict):
        return (state["episode_id"], state["step_count"], [dict(m) for m in state["history_messages"]],
                [list(t) for t in state["history_tokens"]])
    return (state.episode_id, state.step_count, [dict(m) for m in state.history_messages],
            [list(t) for t in state.history_tokens])


def _expected_history(steps):
    messages = [{"role": "assistant", "content": bytes(ids).decode("utf-8")} for ids in steps]
    return messages, [t for ids in steps for t in ids]


def _raw(url, **kwargs):
    """helpers.raw with a longer wait for the opening handshake (a venv's peer is slower)."""
    kwargs.setdefault("open_timeout", 10)
    return raw(url, **kwargs)


def _until_admitted(open_session, budget_s=10.0):
    """``open_session()`` on a one-session OpenEnv server, retried while the server
    still counts a session that has just closed (it frees the slot only after that
    session's handler finishes, asynchronously: a newcomer can be refused meanwhile)."""
    deadline = time.monotonic() + budget_s
    while True:
        try:
            return open_session()
        except (chatenv.ChatEnvError, ConnectionError) as exc:
            if getattr(exc, "code", "CAPACITY_REACHED") != "CAPACITY_REACHED" or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sync_session(url):
    env = chatenv.ChatEnv(url)
    try:
        env.reset()
    except BaseException:
        env.close()
        raise
    return env


# ------------------------------------------------------------------------------
# OpenEnv's clients (both releases) -> a chatenv server
# ------------------------------------------------------------------------------


def test_openenv_sync_client_matches_chatenv_client(chatenv_url, oe):
    with oe.open(chatenv_url, "sync") as theirs, chatenv.ChatEnv(chatenv_url) as ce:
        assert _observed(theirs.reset(episode_id="ep-sync")) == _observed(ce.reset(episode_id="ep-sync"))
        assert _observed(ce.reset(episode_id="ep-sync"))[:2] == ([], [])
        for ids in _STEPS:
            assert _observed(theirs.step(ids)) == _observed(ce.step(chatenv.ChatAction(tokens=ids)))
        oe_state, ce_state = theirs.state(), ce.state()
        assert _state_of(oe_state) == _state_of(ce_state)
        messages, tokens = _expected_history(_STEPS)
        assert _state_of(ce_state) == ("ep-sync", len(_STEPS), messages, [list(ids) for ids in _STEPS])
        assert _observed(ce.step(chatenv.ChatAction(tokens=[33])))[1] == tokens + [33]
        # OpenEnv's client reads the observation's metadata (0.10.0's first key) as {}
        assert theirs.step([33])["observation"]["metadata"] == {}


def test_openenv_async_client_matches_chatenv_async_client(chatenv_url, oe):
    async def run():
        with oe.open(chatenv_url, "async") as theirs:
            async with chatenv.AsyncChatEnv(chatenv_url) as ce:
                assert _observed(theirs.reset(episode_id="ep-async")) == _observed(await ce.reset(episode_id="ep-async"))
                for ids in _STEPS:
                    mine = theirs.step(ids)
                    other = await ce.step(chatenv.ChatAction(tokens=ids))
                    assert _observed(mine) == _observed(other)
                assert _state_of(theirs.state()) == _state_of(await ce.state())
                assert theirs.state()["step_count"] == len(_STEPS)

    asyncio.run(run())


def test_openenv_client_errors_from_chatenv_server(chatenv_url, oe):
    with oe.open(chatenv_url, "sync") as theirs, chatenv.ChatEnv(chatenv_url) as ce:
        theirs.reset()
        ce.reset()
        theirs.step([72, 105])
        ce.step(chatenv.ChatAction(tokens=[72, 105]))
        # The same error frame reaches both: OpenEnv raises RuntimeError with the code in its text
        with pytest.raises(chatenv.ChatEnvError) as info:
            ce.step(chatenv.ChatAction(tokens=[_OUT_OF_VOCAB]))
        assert info.value.code == "EXECUTION_ERROR"
        with pytest.raises(RemoteError, match=r"\(code: EXECUTION_ERROR\)") as oe_info:
            theirs.step([_OUT_OF_VOCAB])
        assert oe_info.value.type == "RuntimeError"
        assert info.value.message in oe_info.value.message
        # An empty token list, which chatenv's own client refuses to send
        with pytest.raises(RemoteError, match=r"\(code: VALIDATION_ERROR\)"):
            theirs.step([], construct=True)
        # chatenv keeps the session after both errors, history unchanged
        assert _observed(theirs.step([33])) == _observed(ce.step(chatenv.ChatAction(tokens=[33])))
        assert theirs.state()["history_tokens"] == [[72, 105], [33]]


def test_openenv_client_at_chatenv_capacity(oe):
    """A full chatenv server answers as OpenEnv's does (recorded): the handshake
    completes, one CAPACITY_REACHED frame comes unprompted, then a 1000 close."""
    with chatenv.serve_in_thread(max_sessions=1) as url:
        with oe.open(url, "sync") as first:
            first.reset()
            with _raw(url, compression=None) as raw:
                frame = raw.recv(timeout=10)
                assert frame == (
                    '{"type":"error","data":{"message":"Server at capacity: 1/1 sessions active. '
                    'Cannot accept new connections.","code":"CAPACITY_REACHED","active_sessions":1,'
                    '"max_sessions":1}}'
                )
                with pytest.raises(ConnectionClosed):
                    raw.recv(timeout=10)
                assert raw.close_code == 1000
            # OpenEnv's own client reads the frame if its reset is not yet refused by the
            # close, else its send fails: against OpenEnv's own server exactly the same
            with pytest.raises(RemoteError) as info:
                with oe.open(url, "sync") as second:
                    second.reset()
            assert info.value.isa("RuntimeError") or info.value.isa("ConnectionClosed"), info.value
            if not info.value.isa("ConnectionClosed"):
                assert "(code: CAPACITY_REACHED)" in info.value.message
            assert first.step([72, 105])["observation"]["tokens"] == [72, 105]


def test_openenv_clients_run_a_scripted_scenario_from_a_file(chatenv_url, tmp_path):
    """support's batch form: JSON requests in a file, the answers printed as a list."""
    requests = [
        {"client": "a", "op": "open", "url": chatenv_url, "mode": "sync"},
        {"client": "b", "op": "open", "url": chatenv_url, "mode": "async"},
        {"client": "a", "op": "reset", "kwargs": {"episode_id": "file"}},
        {"client": "b", "op": "reset"},
        {"client": "a", "op": "step", "tokens": [72, 105]},
        {"client": "b", "op": "step", "tokens": [_OUT_OF_VOCAB]},
        {"client": "a", "op": "state"},
        {"client": "a", "op": "close"},
        {"client": "b", "op": "close"},
    ]
    scenario = tmp_path / "scenario.jsonl"
    scenario.write_text("".join(json.dumps(r) + "\n" for r in requests))
    done = subprocess.run([str(_require_venv("0.10.0")), str(HERE / "tests" / "support.py"), "openenv-clients",
                           "--scenario", str(scenario)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert [a["ok"] for a in answers] == [True, True, True, True, True, False, True, True, True]
    assert answers[4]["value"]["observation"]["messages"] == [{"role": "assistant", "content": "Hi"}]
    assert "(code: EXECUTION_ERROR)" in answers[5]["error"]["message"]
    assert _state_of(answers[6]["value"]) == ("file", 1, [{"role": "assistant", "content": "Hi"}], [[72, 105]])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_openenv_client_big_step_is_accepted_by_a_chatenv_server(oe, mode):
    """OpenEnv's server takes messages up to 16 MiB (uvicorn's limit, recorded); so does
    chatenv by default: a 300,000-token step from OpenEnv's client goes through."""
    assert len(json.dumps({"type": "step", "data": {"tokens": _BIG_STEP, "metadata": {}}})) > 2**20
    with chatenv.serve_in_thread() as url, oe.open(url, mode) as theirs:
        theirs.reset()
        result = theirs.step(_BIG_STEP)
        assert result["observation"]["tokens"] == _BIG_STEP
        assert result["observation"]["messages"] == [{"role": "assistant", "content": "h" * len(_BIG_STEP)}]
        assert theirs.step([33])["observation"]["tokens"][-2:] == [104, 33]


# ------------------------------------------------------------------------------
# chatenv's clients -> the OpenEnv peer (both releases)
# ------------------------------------------------------------------------------


def test_chatenv_client_against_openenv_server(openenv_url):
    with chatenv.ChatEnv(openenv_url) as env:
        first = env.reset(seed=1, episode_id="ep-1")
        assert _observed(first) == ([], [], None, False, None, False)
        seen = []
        for ids in _STEPS:
            seen.append(ids)
            result = env.step(chatenv.ChatAction(tokens=ids))
            assert (result.observation.messages, result.observation.tokens) == _expected_history(seen)
            assert (result.reward, result.done) == (None, False)
        state = env.state()
        messages, _ = _expected_history(_STEPS)
        # OpenEnv's chat environment leaves episode_id empty and step_count at 0
        assert _state_of(state) == (None, 0, messages, _STEPS)
        assert env.reset().observation.messages == []


def test_chatenv_async_client_against_openenv_server(openenv_url):
    async def run():
        async with chatenv.AsyncChatEnv(openenv_url) as env:
            assert (await env.reset()).observation.tokens == []
            for i, ids in enumerate(_STEPS, 1):
                result = await env.step(chatenv.ChatAction(tokens=ids))
                assert (result.observation.messages, result.observation.tokens) == _expected_history(_STEPS[:i])
            state = await env.state()
            assert state.history_tokens == _STEPS

    asyncio.run(run())


def test_chatenv_clients_see_openenv_error_frames(openenv_url):
    with chatenv.ChatEnv(openenv_url) as env:
        env.reset()
        env.step(chatenv.ChatAction(tokens=[72, 105]))
        with pytest.raises(chatenv.ChatEnvError) as info:
            env.step(chatenv.ChatAction(tokens=[300]))  # bytes() refuses it: OpenEnv's EXECUTION_ERROR
        assert info.value.code == "EXECUTION_ERROR"
        assert "range(0, 256)" in info.value.message
        # OpenEnv keeps the session after an execution error, and keeps the failed
        # step's tokens (stored before decoding) without adding a message (recorded)
        result = env.step(chatenv.ChatAction(tokens=[33]))
        assert result.observation.tokens == [72, 105, 300, 33]
        assert result.observation.messages == [{"role": "assistant", "content": "Hi"},
                                               {"role": "assistant", "content": "!"}]
        assert env.state().history_tokens == [[72, 105], [300], [33]]

    async def run():
        async with chatenv.AsyncChatEnv(openenv_url) as env:
            await env.reset()
            with pytest.raises(chatenv.ChatEnvError) as info:
                await env.step(chatenv.ChatAction(tokens=[300]))
            assert info.value.code == "EXECUTION_ERROR"
            state = await env.state()
            assert (state.history_messages, state.history_tokens) == ([], [[300]])

    asyncio.run(run())


@pytest.mark.parametrize("client", ["sync", "async"])
def test_chatenv_clients_at_openenv_capacity(peer, client):
    url = peer["single"]  # max_concurrent_envs=1, chat_env's own default
    first = _until_admitted(lambda: _sync_session(url))
    with first:
        if client == "sync":
            with pytest.raises((chatenv.ChatEnvError, ConnectionError)) as info:
                with chatenv.ChatEnv(url) as second:
                    second.reset()
        else:
            async def run():
                async with chatenv.AsyncChatEnv(url) as second:
                    await second.reset()

            with pytest.raises((chatenv.ChatEnvError, ConnectionError)) as info:
                asyncio.run(run())
        if isinstance(info.value, chatenv.ChatEnvError):
            assert info.value.code == "CAPACITY_REACHED"
        # the first session is unaffected
        assert first.step(chatenv.ChatAction(tokens=[72, 105])).observation.tokens == [72, 105]
    # and once it is gone, a newcomer gets in
    with _until_admitted(lambda: _sync_session(url)) as third:
        assert third.reset().observation.messages == []


def test_chatenv_delta_client_against_openenv_server_gets_full_observations(openenv_url):
    with chatenv.ChatEnv(openenv_url) as delta, chatenv.ChatEnv(openenv_url, delta=False) as full:
        assert _observed(delta.reset()) == _observed(full.reset())
        for ids in _STEPS * 3:
            assert _observed(delta.step(chatenv.ChatAction(tokens=ids))) == _observed(full.step(chatenv.ChatAction(tokens=ids)))
        assert _state_of(delta.state()) == _state_of(full.state())
        # a new episode on the same connection starts from scratch
        assert _observed(delta.reset()) == _observed(full.reset())
        assert _observed(delta.step(chatenv.ChatAction(tokens=[33]))) == _observed(full.step(chatenv.ChatAction(tokens=[33])))


def test_chatenv_async_delta_client_against_openenv_server(openenv_url):
    async def run():
        async with chatenv.AsyncChatEnv(openenv_url, delta=True) as env:
            await env.reset()
            for i, ids in enumerate(_STEPS, 1):
                result = await env.step(chatenv.ChatAction(tokens=ids))
                assert (result.observation.messages, result.observation.tokens) == _expected_history(_STEPS[:i])

    asyncio.run(run())


def test_chatenv_client_against_openenv_server_with_system_prompt(peer):
    # Both servers tokenize the system prompt with chatenv's embedded tokenizer's chat template
    with chatenv.serve_in_thread(system_prompt=PROMPT) as ce_url:
        with chatenv.ChatEnv(peer["prompt"]) as theirs, chatenv.ChatEnv(ce_url) as ce:
            oe_first, ce_first = theirs.reset(), ce.reset()
            assert oe_first.observation.messages == [{"role": "system", "content": PROMPT}]
            assert _observed(oe_first) == _observed(ce_first)
            assert _observed(theirs.step(chatenv.ChatAction(tokens=[72, 105]))) == _observed(
                ce.step(chatenv.ChatAction(tokens=[72, 105])))
            assert _state_of(theirs.state())[2:] == _state_of(ce.state())[2:]


@pytest.mark.parametrize("client", ["sync", "async"])
def test_chatenv_client_big_step_against_openenv_server(openenv_url, client):
    if client == "sync":
        with chatenv.ChatEnv(openenv_url) as env:
            env.reset()
            assert env.step(chatenv.ChatAction(tokens=_BIG_STEP)).observation.tokens == _BIG_STEP
    else:
        async def run():
            async with chatenv.AsyncChatEnv(openenv_url) as env:
                await env.reset()
                return (await env.step(chatenv.ChatAction(tokens=_BIG_STEP))).observation.tokens

        assert asyncio.run(run()) == _BIG_STEP


# ------------------------------------------------------------------------------
# chatenv's clients -> OpenEnv 0.10.0 serving a transform, a rubric and tasks
# (support.openenv_hooks_app; its frames are tests/recordings/openenv-0.10.0-hooks.jsonl)
# ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hooks_url(openenv):
    return openenv.urls("0.10.0")["hooks"]


def _hooks_recording():
    with open(HOOKS_RECORDING) as f:
        return [json.loads(line) for line in f]


def _hooks_cases():
    """The recording's cases by name (the WebSocket sessions' names are unique; an HTTP
    route's are not: several bodies, so read those from the list)."""
    return {case["case"]: case for case in _hooks_recording()}


def _meaning(frame):
    """What an observation frame says, as a chatenv result should read it (the reward's
    type too: a boolean stays one); an error frame as (code, message)."""
    frame = json.loads(frame)
    data = frame["data"]
    if frame["type"] == "error":
        return ("error", data["code"], data["message"])
    if frame["type"] == "state":
        return ("state", data["history_messages"], data["history_tokens"])
    body = data["observation"]
    return ("observation", body["messages"], body["tokens"], data["reward"], type(data["reward"]), data["done"],
            body.get("metadata") or data.get("metadata") or {})


def _read(result):
    if isinstance(result, chatenv.ChatEnvError):
        return ("error", result.code, result.message)
    if isinstance(result, chatenv.ChatState):
        return ("state", result.history_messages, result.history_tokens)
    obs = result.observation
    assert (obs.reward, obs.done) == (result.reward, result.done) and type(obs.reward) is type(result.reward)
    return ("observation", obs.messages, obs.tokens, result.reward, type(result.reward), result.done, obs.metadata)


def _calls(frames):
    """Recorded request frames as client calls: (method name, positional args, keyword args)."""
    calls = []
    for frame in map(json.loads, frames):
        data = dict(frame.get("data") or {})
        data.pop("chatenv_delta", None)  # the client's own option (delta=), not a reset argument
        if frame["type"] == "reset":
            calls.append(("reset", (), data))
        elif frame["type"] == "step":
            calls.append(("step", (chatenv.ChatAction(tokens=data["tokens"]),), {}))
        else:
            calls.append((frame["type"], (), {}))
    return calls


def _drive(url, client, calls, **options):
    """Make ``calls`` on one ChatEnv or AsyncChatEnv session: each one's result, or its ChatEnvError."""
    if client == "sync":
        results = []
        with chatenv.ChatEnv(url, **options) as env:
            for name, args, kwargs in calls:
                try:
                    results.append(getattr(env, name)(*args, **kwargs))
                except chatenv.ChatEnvError as exc:
                    results.append(exc)
        return results

    async def run():
        results = []
        async with chatenv.AsyncChatEnv(url, **options) as env:
            for name, args, kwargs in calls:
                try:
                    results.append(await getattr(env, name)(*args, **kwargs))
                except chatenv.ChatEnvError as exc:
                    results.append(exc)
        return results

    return asyncio.run(run())


HOOK_SESSIONS = sorted(name for name in _hooks_cases() if name.startswith("hooks:") and "before any reset" not in name)


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "full"])
@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("name", HOOK_SESSIONS)
def test_chatenv_clients_read_openenv_hooks_frames(hooks_url, client, delta, name):
    """Each recorded session replayed by chatenv's clients against the live OpenEnv 0.10.0
    hooks server: every reset (by split and index, by seed; an unknown split or a bad
    index an EXECUTION_ERROR with OpenEnv's words) and step reads as the recorded frame
    says: messages, tokens, reward (1.0, 0.25, 0.0, and a boolean true kept a bool),
    done (by the rubric's 1.0, by "bye", and again after done), metadata."""
    case = _hooks_cases()[name]
    results = _drive(hooks_url, client, _calls(case["sent"]), delta=delta)
    assert [_read(r) for r in results] == [_meaning(frame) for frame in case["received"]]


def test_chatenv_client_keeps_openenv_s_boolean_reward(hooks_url):
    """The one reward OpenEnv 0.10 sends as JSON true (recorded): chatenv's client used to
    refuse it with PROTOCOL_ERROR; it now reads it, a bool, as OpenEnv's client does."""
    frames = _hooks_cases()["hooks: reset test/1; wrong short, boolean reward, right, state"]["received"]
    assert '"reward":true' in frames[2]
    with chatenv.ChatEnv(hooks_url) as env:
        env.reset(split="test", index=1)
        assert env.step(chatenv.ChatAction(tokens=list(b"no"))).reward == 0.25
        result = env.step(chatenv.ChatAction(tokens=list(b"pass")))
        assert result.reward is True and result.observation.reward is True and result.done is False
        assert result.observation.metadata == {"split": "test", "index": 1, "task_id": "test-1", "turn": 2}


# The recorded task-route requests, as client calls: path -> the method and its arguments
_TASK_ROUTE_CALLS = {
    "/chat_env/splits": ("list_splits", ()),
    "/chat_env/tasks": ("list_tasks", ("split",)),
    "/chat_env/num_tasks": ("num_tasks", ("split",)),
    "/chat_env/task": ("get_task", ("split", "index")),
    "/chat_env/task_range": ("get_task_range", ("split", "start", "stop")),
}
_TASK_ROUTE_ANSWERS = {"list_splits": None, "list_tasks": "tasks", "num_tasks": "num_tasks", "get_task": "task",
                       "get_task_range": "tasks"}


def _task_route_cases():
    """The recorded task-route requests chatenv's typed methods can make (not a malformed
    body, another env name, or a GET where OpenEnv wants POST)."""
    cases = []
    for case in _hooks_recording():
        method, _, path = case["case"].partition(" ")[2].partition(" ")
        if path not in _TASK_ROUTE_CALLS or (method == "GET") != (path == "/chat_env/splits"):
            continue
        name, keys = _TASK_ROUTE_CALLS[path]
        body = case["sent"] or {}
        if ("index" in keys and "index" not in body) or type(body.get("index", 0)) is not int:
            continue  # a 422 only an untyped request can get (recorded; chatenv's method checks first)
        cases.append((name, tuple(body.get(k) for k in keys), case))
    return cases


@pytest.mark.parametrize("client", ["sync", "async"])
def test_chatenv_task_methods_answer_as_openenv_routes(hooks_url, client):
    """list_splits, list_tasks, num_tasks, get_task, get_task_range against the live
    OpenEnv 0.10.0 server return the recorded route's answer, unwrapped as OpenEnv's
    TaskProvider returns it; its 400 (bad index) is VALIDATION_ERROR, its 500 (the
    environment raised on an unknown split) EXECUTION_ERROR; reset(split=, index=)
    then poses the task get_task named."""
    cases = _task_route_cases()
    assert {name for name, _, _ in cases} == set(_TASK_ROUTE_ANSWERS)
    assert {case["http_status"] for _, _, case in cases} == {200, 400, 500}
    calls = [(name, args, {}) for name, args, _ in cases] + [("reset", (), {"split": "train", "index": 2})]
    results = _drive(hooks_url, client, calls)
    for (name, args, case), result in zip(cases, results):
        recorded = case["received"]
        if case["http_status"] == 200:
            member = _TASK_ROUTE_ANSWERS[name]
            answer = json.loads(recorded)
            assert result == (answer if member is None else answer[member]), (name, args)
        else:
            code = "VALIDATION_ERROR" if case["http_status"] < 500 else "EXECUTION_ERROR"
            detail = json.loads(recorded)["detail"] if case["http_status"] < 500 else recorded
            assert isinstance(result, chatenv.ChatEnvError) and result.code == code, (name, args, result)
            assert f"HTTP {case['http_status']}: {detail}" in result.message
    task = next(r for (name, args, _), r in zip(cases, results) if name == "get_task" and not isinstance(
        r, chatenv.ChatEnvError))
    posed = results[-1].observation
    assert posed.messages == [{"role": "user", "content": "Capital of France?"}]
    assert posed.metadata == {"split": "train", "index": 2, "task_id": "train-2", "turn": 0}
    assert task == {"id": "train-1", "prompt": "What is 3*3?"}


@pytest.mark.timeout(600)
def test_openenv_hooks_server_answers_as_recorded(tmp_path):
    """tools/record_openenv.py --hooks run now against a fresh OpenEnv 0.10.0 hooks server
    writes the committed recording, case for case."""
    out = tmp_path / "hooks.jsonl"
    done = subprocess.run([str(_require_venv("0.10.0")), str(HERE / "tools" / "record_openenv.py"), "--hooks", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = [json.loads(line) for line in out.read_text().splitlines()]
    recorded = _hooks_recording()
    assert [c["case"] for c in fresh] == [c["case"] for c in recorded]
    assert fresh[0]["version"] == "0.10.0"
    for mine, theirs in zip(fresh[1:], recorded[1:]):
        assert mine == theirs


# ------------------------------------------------------------------------------
# OpenEnv's clients (both releases) and chatenv's -> a chatenv server with tasks and a rubric
# (`chatenv serve --tasks SPLIT=PATH --rubric exact_match`, issue 20 item 3: these need
# the server side of that issue)
# ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chatenv_tasks_url(tmp_path_factory):
    """A chatenv server posing the hooks peer's tasks (support.HOOK_TASKS, each
    split a JSONL file), scored by exact_match; a test/1 copy with a scripted turn."""
    root = tmp_path_factory.mktemp("tasks")
    argv = [sys.executable, "-m", "chatenv", "serve", "--port", str(port := free_port()), "--log-level", "WARNING",
            "--rubric", "exact_match"]
    splits = dict(support.HOOK_TASKS, turns=[{"id": "turns-0", "prompt": "What is 1+1?", "answer": "2",
                                                      "turns": ["And 2+2?"]}])
    for split, tasks in splits.items():
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(task) + "\n" for task in tasks))
        argv += ["--tasks", f"{split}={path}"]
    proc = _server(argv, _clean_env())
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        yield url
    finally:
        _stop(proc)


def _names_the_task(metadata, split, index, task_id):
    """The reset observation's metadata names the task (chatenv's ``metadata["task"]``:
    split, index, id) and holds no answer."""
    task = metadata.get("task")
    return task == {"split": split, "index": index, "id": task_id} and "answer" not in json.dumps(metadata)


def test_openenv_clients_read_rewards_and_done_from_chatenv_tasks(chatenv_tasks_url, oe):
    """OpenEnv's own clients (sync and async, this release's) pick a task by split and
    index, and read exact_match's reward, done after the task's one answer, and the
    metadata, from a chatenv server; a step after done is an EXECUTION_ERROR."""
    for mode in ("sync", "async"):
        with oe.open(chatenv_tasks_url, mode) as theirs:
            first = theirs.reset(split="test", index=1)
            assert first["observation"]["messages"] == [{"role": "user", "content": "Say yes."}]
            assert (first["reward"], first["done"]) == (None, False)
            assert _names_the_task(first["observation"]["metadata"], "test", 1, "test-1")
            assert "yes" not in json.dumps(first["observation"]["metadata"])  # never the answer
            right = theirs.step(list(b" yes "))  # stripped, as exact_match compares
            assert (right["reward"], right["done"], right["observation"]["done"]) == (1.0, True, True)
            assert right["observation"]["metadata"]["rewards"] == {"exact_match": 1.0}
            with pytest.raises(RemoteError, match=r"\(code: EXECUTION_ERROR\)"):
                theirs.step(list(b"yes"))
            assert theirs.state()["history_messages"][-1] == {"role": "assistant", "content": " yes "}
            again = theirs.reset(split="train", index=0)  # reset starts anew
            assert again["observation"]["messages"] == [{"role": "user", "content": "What is 2+2?"}]
            wrong = theirs.step(list(b"5"))
            assert (wrong["reward"], wrong["done"]) == (0.0, True)
            assert wrong["observation"]["metadata"]["rewards"] == {"exact_match": 0.0}


def test_openenv_clients_follow_a_chatenv_task_s_scripted_turns(chatenv_tasks_url, oe):
    with oe.open(chatenv_tasks_url, "sync") as theirs:
        theirs.reset(split="turns", index=0)
        first = theirs.step(list(b"2"))
        assert (first["reward"], first["done"]) == (1.0, False)  # each turn scored against the task's answer
        assert first["observation"]["messages"][-2:] == [{"role": "assistant", "content": "2"},
                                                        {"role": "user", "content": "And 2+2?"}]
        last = theirs.step(list(b"4"))
        assert (last["reward"], last["done"]) == (0.0, True)


def test_openenv_client_reset_with_a_bad_task_is_a_validation_error(chatenv_tasks_url, oe):
    """OpenEnv's environment raised (EXECUTION_ERROR, recorded); chatenv names the bad
    split or index with VALIDATION_ERROR and keeps the session."""
    with oe.open(chatenv_tasks_url, "sync") as theirs:
        for kwargs, named in [({"split": "nope", "index": 0}, "nope"), ({"split": "train", "index": 3}, "3")]:
            with pytest.raises(RemoteError, match=r"\(code: VALIDATION_ERROR\)") as info:
                theirs.reset(**kwargs)
            assert named in info.value.message
        assert theirs.reset(split="hard", index=0)["observation"]["messages"][-1]["content"] == "What is 12*12?"


@pytest.mark.parametrize("client", ["sync", "async"])
def test_chatenv_task_methods_equal_on_chatenv_and_openenv(chatenv_tasks_url, hooks_url, client):
    """The same tasks served by chatenv and by OpenEnv 0.10.0: the five methods answer
    the same (answers left out on both), and reset(split=, index=) poses the same prompt."""
    calls = [("list_tasks", ("train",), {}), ("list_tasks", ("test",), {}), ("num_tasks", ("hard",), {}),
             ("get_task", ("train", 1), {}), ("get_task_range", ("train", 1, 5), {}),
             ("get_task_range", ("test", None, None), {}), ("get_task", ("train", 3), {}),
             ("reset", (), {"split": "test", "index": 0})]
    mine, theirs = _drive(chatenv_tasks_url, client, calls), _drive(hooks_url, client, calls)
    assert mine[:6] == theirs[:6]
    assert mine[6].code == theirs[6].code == "VALIDATION_ERROR" and "HTTP 400" in mine[6].message
    assert mine[7].observation.messages == theirs[7].observation.messages
    splits = _drive(chatenv_tasks_url, client, [("list_splits", (), {})])[0]
    assert splits == _drive(hooks_url, client, [("list_splits", (), {})])[0] + [{"name": "turns", "type": "validation"}]


def test_chatenv_task_routes_answer_as_openenv_recorded(chatenv_tasks_url):
    """The recorded OpenEnv 0.10.0 task routes, asked of chatenv serving the same tasks:
    the same statuses and bodies, but for an unknown split (OpenEnv: whatever the
    environment raised, a 500 here; chatenv: 400, a deliberate difference)."""
    rec = record_openenv.Recorder(chatenv_tasks_url, io.StringIO())
    for case in _hooks_recording():
        method, _, path = case["case"].partition(" ")[2].partition(" ")
        if not case["case"].startswith("HTTP ") or path in ("/reset", "/step"):
            continue
        body = case["sent"]
        status, data, content_type, _ = rec.http(method, path, body=body)
        if path == "/chat_env/splits" or path == "/CHAT_ENV/splits":
            assert json.loads(data)[:3] == json.loads(case["received"]), case["case"]
        elif (body or {}).get("split") == "nope":
            assert case["http_status"] == 500 and status == 400 and "nope" in data, (case["case"], body, data)
        elif case["http_status"] == 200:
            assert (status, json.loads(data)) == (200, json.loads(case["received"])), (case["case"], body)
        else:
            assert status == case["http_status"] and "detail" in json.loads(data), (case["case"], body, data)


def _with_metadata(frame, release):
    """A 0.3.0 observation frame as 0.10.0 writes it: ``"metadata":{}`` first in ``observation``."""
    return frame.replace('{"observation":{', '{"observation":{"metadata":{},') if release == "0.10.0" else frame


def test_openenv_peer_frames_match_recorded_transcripts(openenv_url, release):
    """The peer is OpenEnv's chat_env: its frames equal ones recorded from OpenEnv
    (the failed [300] step's tokens stay in the history, as chat_env stores them
    before decoding)."""
    recorded = [
        ('{"type":"reset","data":{}}',
         '{"type":"observation","data":{"observation":{"messages":[],"tokens":[]},"reward":null,"done":false}}'),
        ('{"type":"step","data":{"tokens":[72,105],"metadata":{}}}',
         '{"type":"observation","data":{"observation":{"messages":[{"role":"assistant","content":"Hi"}],'
         '"tokens":[72,105]},"reward":null,"done":false}}'),
        ('{"type":"step","data":{"tokens":[300]}}',
         '{"type":"error","data":{"message":"bytes must be in range(0, 256)","code":"EXECUTION_ERROR"}}'),
        ('{"type":"bogus"}',
         '{"type":"error","data":{"message":"Unknown message type: bogus","code":"UNKNOWN_TYPE"}}'),
        ('{"type":"step","data":{"tokens":[72.9,true,"105"]}}',
         '{"type":"observation","data":{"observation":{"messages":[{"role":"assistant","content":"Hi"},'
         '{"role":"assistant","content":"H\\u0001i"}],"tokens":[72,105,300,72,1,105]},"reward":null,"done":false}}'),
        ('{"type":"state"}',
         '{"type":"state","data":{"episode_id":null,"step_count":0,"history_messages":[{"role":"assistant",'
         '"content":"Hi"},{"role":"assistant","content":"H\\u0001i"}],"history_tokens":[[72,105],[300],[72,1,105]]}}'),
    ]
    with _raw(openenv_url, compression=None) as ws:
        for sent, received in recorded:
            ws.send(sent)
            assert ws.recv(timeout=10) == _with_metadata(received, release)


@pytest.mark.timeout(900)
def test_openenv_peer_answers_as_openenv_chat_env_recorded(release, tmp_path):
    """tools/record_openenv.py run against the peer gives the recording of OpenEnv's own
    chat_env, case for case, except /schema (its docstrings are OpenEnv's text)."""
    out = tmp_path / f"peer-{release}.jsonl"
    done = subprocess.run([str(_require_venv(release)), str(HERE / "tools" / "record_openenv.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peer = [json.loads(line) for line in out.read_text().splitlines()]
    real = _recording(release)
    assert [c["case"] for c in peer] == [c["case"] for c in real]
    assert peer[0]["version"] == real[0]["version"] == release
    for mine, theirs in zip(peer[1:], real[1:]):
        if mine["case"] == "HTTP GET /schema":
            assert json.loads(mine["received"]).keys() == json.loads(theirs["received"]).keys()
            continue
        assert mine == theirs


# ------------------------------------------------------------------------------
# A chatenv server's frames against the recorded frames of each release
# ------------------------------------------------------------------------------

# chatenv answers these exactly as OpenEnv 0.10.0 did, byte for byte
SAME_FRAMES = [
    "reset", "reset with seed and episode_id", "step tokens [72,105]", "step tokens [33] (second step)",
    "step UTF-8 [195,169] (third step)", "step with characters JSON escapes", "reset after steps",
    "close after a session", "invalid JSON text", "unknown type", "close message", "extra: type missing",
    "extra: type not a string", "extra: step tokens nested lists flattened", "extra: reset unknown kwarg",
    'new: step with metadata {"k":1}', "new: reset with chatenv_delta true, then probe state", "new: reset seed -1",
    "new: reset without data", "new: mcp tools/list", "new: mcp tools/call", "new: mcp openenv/session/create",
    "new: state then step before any reset", "new: /ws?session_id=does-not-exist", "second concurrent session",
    "first session after the refusal", "a third session after both closed", "step of 300000 tokens",
]
# ... and these the same but for the state, where chatenv fills episode_id and step_count
SAME_BUT_STATE = {"state after two steps": ("ep-1", 2), "state after four steps": ("ep-1", 4)}
# the same error code; chatenv's message is its own (no pydantic "errors" list); session kept
SAME_CODE = [
    "step with tokens missing", "step with empty tokens list", "extra: step data not an object",
    "extra: step unknown action field", "extra: message with extra top-level key", "new: step with metadata a list",
    "new: step with data null", "new: type call_tool as a step", "new: step with metadata null",
    "new: reset data null", "new: state with data {}", "new: close with data {}",
]
# OpenEnv answers SESSION_ERROR and closes; chatenv answers this error and keeps the session
KEEPS_SESSION = {
    'step with tokens ["a"]': "VALIDATION_ERROR",
    "binary frame (bytes of a valid state message)": "INVALID_JSON",
    "extra: JSON array frame": "VALIDATION_ERROR",
    "extra: JSON number frame": "VALIDATION_ERROR",
}
# OpenEnv coerces (or fails executing); chatenv's checks are strict: VALIDATION_ERROR, history unchanged
STRICT = [
    "extra: step tokens as a string", "extra: step tokens floats/bools/strings coerced", "extra: step tokens with null",
    "extra: step tokens negative", 'new: reset seed "x"', "new: reset episode_id 5",
]


@pytest.fixture(scope="module")
def chatenv_recording():
    """tools/record_openenv.py's cases, recorded from a chatenv server (one session at a
    time, as chat_env's app runs), keyed like the OpenEnv recordings."""
    out = io.StringIO()
    with chatenv.serve_in_thread(max_sessions=1) as url:
        rec = record_openenv.Recorder(url, out)
        record_openenv.record_http_routes(rec)
        record_openenv.record_normal_session(rec)
        record_openenv.record_errors(rec)
        record_openenv.record_big_messages(rec)
        record_openenv.record_sessions(rec)
        record_openenv.record_capacity(rec)
    cases = {}
    for line in out.getvalue().splitlines():
        case = json.loads(line)
        cases.setdefault(case["case"], case)
    return cases


def _history(state_frame):
    data = json.loads(state_frame)["data"]
    return data["history_messages"], data["history_tokens"]


def _strip_metadata(value):
    """0.10.0's frames as 0.3.0 wrote them: no ``"metadata":{}`` in observations."""
    if isinstance(value, str):
        return value.replace('"observation":{"metadata":{},', '"observation":{')
    if isinstance(value, list):
        return [_strip_metadata(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_metadata(v) for k, v in value.items()}
    return value


def _as_release(value, release):
    return value if release == "0.10.0" else _strip_metadata(value)


@pytest.mark.parametrize("name", SAME_FRAMES)
def test_chatenv_frames_equal_openenv_recorded(chatenv_recording, release, name):
    """0.10.0 byte for byte (observations with ``"metadata":{}`` first); 0.3.0 the
    same frames without it. Probes agree on the history."""
    if release == "0.3.0" and name == "new: /ws?session_id=does-not-exist":
        # 0.3.0 ignored session_id (a new session, recorded); chatenv answers as 0.10.0
        theirs = _cases("0.3.0")[name]
        assert (theirs["received"], theirs["close"]) == ([], {"still_open_after_s": 3.0})
        release = "0.10.0"
    theirs, mine = _cases(release)[name], chatenv_recording[name]
    received = _as_release(mine["received"], release)
    if name == "step of 300000 tokens" and release == "0.3.0":  # a size: less 0.10.0's metadata
        received = dict(received, bytes=received["bytes"] - len('"metadata":{},'))
    assert received == theirs["received"]
    assert mine.get("close") == theirs.get("close")
    if isinstance(theirs.get("probe"), str):
        assert _history(mine["probe"]) == _history(theirs["probe"])


@pytest.mark.parametrize("name", sorted(SAME_BUT_STATE))
def test_chatenv_state_frames_equal_openenv_recorded_but_episode_id_and_step_count(chatenv_recording, release, name):
    episode_id, steps = SAME_BUT_STATE[name]
    theirs = _cases(release)[name]["received"]
    assert '"episode_id":null,"step_count":0,' in theirs  # OpenEnv's chat_env leaves them empty
    expected = theirs.replace('"episode_id":null,"step_count":0,', f'"episode_id":"{episode_id}","step_count":{steps},')
    assert chatenv_recording[name]["received"] == expected


@pytest.mark.parametrize("name", SAME_CODE)
def test_chatenv_error_codes_equal_openenv_recorded(chatenv_recording, release, name):
    theirs, mine = _cases(release)[name], chatenv_recording[name]
    assert json.loads(mine["received"])["data"]["code"] == json.loads(theirs["received"])["data"]["code"]
    assert "close" not in theirs and "close" not in mine
    assert _history(mine["probe"]) == _history(theirs["probe"])


@pytest.mark.parametrize("name", sorted(KEEPS_SESSION))
def test_chatenv_keeps_the_session_where_openenv_closed_it(chatenv_recording, release, name):
    theirs, mine = _cases(release)[name], chatenv_recording[name]
    assert json.loads(theirs["received"])["data"]["code"] == "SESSION_ERROR"
    assert theirs["close"] == {"code": 1000, "reason": ""}
    assert json.loads(mine["received"])["data"]["code"] == KEEPS_SESSION[name]
    assert "close" not in mine
    assert _history(mine["probe"]) == ([{"role": "assistant", "content": "Hi"}], [[72, 105]])


@pytest.mark.parametrize("name", STRICT)
def test_chatenv_refuses_what_openenv_coerced(chatenv_recording, release, name):
    theirs, mine = _cases(release)[name], chatenv_recording[name]
    assert json.loads(theirs["received"])["type"] in ("observation", "error")
    if json.loads(theirs["received"])["type"] == "error":
        assert json.loads(theirs["received"])["data"]["code"] == "EXECUTION_ERROR"
    assert json.loads(mine["received"])["data"]["code"] == "VALIDATION_ERROR"
    assert _history(mine["probe"]) == ([{"role": "assistant", "content": "Hi"}], [[72, 105]])


def test_chatenv_failed_step_keeps_history_atomic_where_openenv_keeps_its_tokens(chatenv_recording, release):
    """The documented difference: OpenEnv stores a step's tokens before decoding them,
    so a step its tokenizer refuses leaves ``[300]`` in history_tokens with no message
    (history_tokens then outgrows history_messages); chatenv changes nothing."""
    name = "extra: token id out of byte range (byte tokenizer)"
    theirs, mine = _cases(release)[name], chatenv_recording[name]
    assert json.loads(theirs["received"])["data"] == {"message": "bytes must be in range(0, 256)",
                                                      "code": "EXECUTION_ERROR"}
    assert _history(theirs["probe"]) == ([{"role": "assistant", "content": "Hi"}], [[72, 105], [300]])
    assert json.loads(mine["received"])["data"]["code"] == "EXECUTION_ERROR"
    assert _history(mine["probe"]) == ([{"role": "assistant", "content": "Hi"}], [[72, 105]])


def test_chatenv_delta_reset_is_the_one_thing_openenv_ignores(chatenv_recording, release):
    """``chatenv_delta`` in reset data: OpenEnv ignores the key (full observations,
    recorded); chatenv sends deltas, whose first frame is the full reset."""
    theirs = _cases(release)["new: chatenv_delta reset then two steps"]["received"]
    mine = chatenv_recording["new: chatenv_delta reset then two steps"]["received"]
    assert _as_release(mine[0], release) == theirs[0]
    assert all('"delta":' not in frame for frame in theirs)
    assert all('"delta":' in frame for frame in mine[1:])


def test_chatenv_mcp_errors_equal_openenv_recorded(chatenv_recording, release):
    theirs = json.loads(_cases(release)["new: mcp bad request"]["received"])
    mine = json.loads(chatenv_recording["new: mcp bad request"]["received"])
    assert mine["type"] == theirs["type"] == "mcp"
    assert (mine["data"]["id"], mine["data"]["error"]["code"]) == (theirs["data"]["id"], theirs["data"]["error"]["code"])


def test_chatenv_http_mcp_session_attached_over_ws_as_openenv_0_10(chatenv_recording):
    name = "new: /ws?session_id=<HTTP MCP session>: reset, step, state; reattach, state"
    theirs, mine = _cases("0.10.0")[name]["received"], chatenv_recording[name]["received"]
    assert mine[:2] == theirs[:2]
    assert _history(mine[2]) == _history(theirs[2])
    assert list(mine[3]) == list(theirs[3]) == ["reattached_state"]
    assert _history(mine[3]["reattached_state"]) == _history(theirs[3]["reattached_state"])
    for case in ("new: HTTP POST /mcp openenv/session/create", "new: HTTP POST /mcp openenv/session/close"):
        assert chatenv_recording[case]["received"] == _cases("0.10.0")[case]["received"]


def test_chatenv_message_limit_is_openenv_s_16_mib(chatenv_recording, release):
    """A message of exactly 16 MiB is read (and refused for its unknown key); one byte
    more closes the session with 1009, on both."""
    theirs, mine = _cases(release)["message over 16 MiB"], chatenv_recording["message over 16 MiB"]
    assert theirs["received"]["closed"]["code"] == mine["received"]["closed"]["code"] == 1009
    theirs, mine = _cases(release)["message of exactly 16 MiB"], chatenv_recording["message of exactly 16 MiB"]
    assert theirs["sent"] == mine["sent"] == {"bytes": 16 * 2**20}
    assert theirs["received"] == mine["received"] == {"type": "error", "code": "VALIDATION_ERROR"}


# HTTP answers equal to 0.10.0's (status, body, content type); the Server header aside
SAME_HTTP = [
    ("GET", "/health", None), ("GET", "/health?probe=1", None), ("POST", "/health", {}), ("GET", "/web", None),
    ("GET", "/web/", None), ("GET", "/list_environments", None), ("GET", "/chat_env/splits", None),
    ("POST", "/chat_env/num_tasks", {"split": "test"}), ("GET", "/chat_env/tasks", None),
    ("POST", "/chat_env/tasks", {"split": "test"}), ("POST", "/chat_env/task", {"split": "test", "index": 0}),
    ("POST", "/chat_env/task_range", {"split": "test", "start": 0, "stop": 1}), ("GET", "/other_env/splits", None),
    ("POST", "/mcp", {"jsonrpc": "2.0", "method": "tools/list", "params": {}, "id": 1}),
    ("POST", "/mcp", {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "x", "arguments": {}}, "id": 2}),
    ("POST", "/mcp", "not json"), ("GET", "/mcp", None), ("GET", "/harness", None), ("GET", "/nonexistent", None),
    ("HEAD", "/nonexistent", None), ("GET", "/", None), ("POST", "/reset", {}),
    ("POST", "/reset", {"seed": 1, "episode_id": "ep-1"}), ("POST", "/step", {"action": {"tokens": [72, 105]}}),
]


def _http_cases(recording):
    return {(c["case"], json.dumps(c.get("sent"))): c for c in recording if c["case"].startswith("HTTP ")}


@pytest.mark.parametrize("method, path, body", SAME_HTTP, ids=lambda v: v if isinstance(v, str) else None)
def test_chatenv_http_routes_equal_openenv_0_10_recorded(chatenv_url, method, path, body):
    theirs = _http_cases(_recording("0.10.0"))[(f"HTTP {method} {path}", json.dumps(body))]
    rec = record_openenv.Recorder(chatenv_url, io.StringIO())
    raw = body if isinstance(body, str) else None
    status, data, content_type, _ = rec.http(method, path, body=None if raw else body, raw=raw)
    assert (status, data, content_type) == (theirs["http_status"], theirs["received"], theirs["content_type"])


def test_chatenv_http_routes_openenv_0_10_added(chatenv_url):
    """/openapi.json has every path 0.10.0 lists (same methods) and an info.version;
    /metadata has its keys; /schema its four schemas; POST /mcp {} is JSON-RPC."""
    rec = record_openenv.Recorder(chatenv_url, io.StringIO())
    theirs = {c["case"]: c for c in _recording("0.10.0")}
    status, data = rec.http("GET", "/openapi.json")[:2]
    openapi = record_openenv._openapi_summary(data)
    assert status == 200 and isinstance(openapi["info"]["version"], str)
    for path, methods in theirs["HTTP GET /openapi.json"]["received"]["paths"].items():
        assert openapi["paths"].get(path) == methods, path
    status, data = rec.http("GET", "/metadata")[:2]
    assert status == 200 and json.loads(data).keys() >= json.loads(theirs["HTTP GET /metadata"]["received"]).keys()
    status, data = rec.http("GET", "/schema")[:2]
    assert status == 200 and json.loads(data).keys() >= json.loads(theirs["HTTP GET /schema"]["received"]).keys()
    status, data = rec.http("POST", "/mcp", body={})[:2]
    expected = json.loads(_http_cases(_recording("0.10.0"))[("HTTP POST /mcp", "{}")]["received"])
    assert status == 200
    assert {k: v for k, v in json.loads(data).items() if k != "error"} == {"jsonrpc": "2.0", "id": None}
    assert json.loads(data)["error"]["code"] == expected["error"]["code"] == -32600


def test_chatenv_system_prompt_frames_equal_openenv_recorded(release):
    """SYSTEM_PROMPT with the recordings' tokenizer (bytes, no chat template: chat_env
    tokenizes ``"system: <prompt>\\n"``): the same frames, state aside."""
    theirs = _cases(release)["system prompt (SYSTEM_PROMPT=You are terse.): reset, step, state, reset"]["received"]
    with chatenv.serve_in_thread(support.ByteTokenizer(), system_prompt=PROMPT) as url, _raw(url) as ws:
        mine = [record_openenv.Recorder.ask(ws, frame) for frame in (
            '{"type":"reset","data":{}}', '{"type":"step","data":{"tokens":[72,105]}}', '{"type":"state"}',
            '{"type":"reset","data":{}}')]
    assert [_as_release(mine[i], release) for i in (0, 1, 3)] == [theirs[i] for i in (0, 1, 3)]
    assert _history(mine[2]) == _history(theirs[2])
    assert json.loads(theirs[0])["data"]["observation"]["tokens"] == list(f"system: {PROMPT}\n".encode())


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATENV_") and k not in ("SYSTEM_PROMPT", "TOKENIZER_NAME")}
    env.update(extra)
    return env


def _server(argv, env):
    """A server subprocess whose output goes to a file (a pipe nobody reads would fill)."""
    import tempfile

    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _output(proc):
    proc.log.seek(0)
    return proc.log.read()[-3000:]


def _wait_healthy(url, proc, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {_output(proc)}")
        try:
            with NO_PROXY.open(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url}/health did not answer within {timeout_s} s")


def _stop(proc, timeout_s=30):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"the server did not stop within {timeout_s} s of SIGTERM: {_output(proc)}")
    finally:
        proc.log.close()


@pytest.mark.parametrize("release_", RELEASES)
def test_chatenv_shutdown_close_code_equals_openenv_recorded(release_):
    """SIGTERM with a session open: the session sees the close code OpenEnv's sessions saw."""
    recorded = _cases(release_)["SIGTERM to the server with a session open"]
    port = free_port()
    proc = _server([sys.executable, "-m", "chatenv", "serve", "--port", str(port), "--log-level", "WARNING"],
                   _clean_env())
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        with _raw(url) as ws:
            ws.send('{"type":"reset","data":{}}')
            ws.recv(timeout=10)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
            assert {"code": ws.close_code, "reason": ""} == {"code": recorded["close"]["code"], "reason": ""}
        assert proc.wait(30) == recorded["server_exit_status"] == 0
    finally:
        _stop(proc)


# ------------------------------------------------------------------------------
# OpenEnv's validator (0.10.0): `openenv validate --url` and `openenv validate DIR`
# ------------------------------------------------------------------------------


def _openenv_cli():
    return str(_require_venv("0.10.0").parent / "openenv")


def _validate(*args, timeout_s=300):
    return subprocess.run([_openenv_cli(), "validate", *args], capture_output=True, text=True, timeout=timeout_s,
                          env=_clean_env(NO_PROXY="127.0.0.1,localhost"))


RUNTIME_CHECKS = {"openapi_version_available", "health_endpoint", "metadata_endpoint", "schema_endpoint",
                  "mcp_endpoint", "mode_endpoint_consistency"}


@pytest.mark.timeout(600)
def test_openenv_validate_url_json_passes_every_check(chatenv_url):
    done = _validate("--url", chatenv_url, "--json")
    report = json.loads(done.stdout)
    failed = [c for c in report["criteria"] if not c["passed"]]
    assert failed == [] and done.returncode == 0, json.dumps(failed, indent=1)
    assert {c["id"] for c in report["criteria"]} == RUNTIME_CHECKS
    assert report["passed"] is True
    assert report["standard_profile"] == "openenv-http/1.x"  # info.version 1.x, as OpenEnv's
    assert report["summary"]["passed_count"] == report["summary"]["total_count"] == len(RUNTIME_CHECKS)


@pytest.mark.timeout(600)
def test_openenv_validate_url_text_passes_every_check(chatenv_url):
    done = _validate("--url", chatenv_url)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "Verdict: PASS"
    assert {line.split()[1] for line in lines if line.strip().startswith("PASS")} == RUNTIME_CHECKS
    assert not any(line.strip().startswith("FAIL") for line in lines)


# The package as `openenv validate` sees it: the manifest and what it names
PACKAGE_FILES = ("openenv.yaml", "chatenv.py", "pyproject.toml", "Dockerfile", "README.md")


@pytest.fixture(params=["repository", "package files"])
def package_dir(request, tmp_path):
    """The repository itself (`openenv validate .`), and its package files alone."""
    if request.param == "repository":
        return HERE
    root = tmp_path / "chatenv"
    root.mkdir()
    for name in PACKAGE_FILES:
        shutil.copy2(HERE / name, root / name)
    return root


@pytest.mark.timeout(600)
def test_openenv_validate_package_static_passes(package_dir):
    done = _validate(str(package_dir), "--level", "static", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "pass"
    assert [(r["check_id"], r["status"]) for r in report["results"]] == [("static.manifest", "pass")]
    assert report["manifest"]["name"] == "chat_env"


@pytest.mark.timeout(600)
def test_openenv_validate_package_default_level_passes(package_dir):
    """The default (semantic) level: static.manifest passes; the runtime checks are
    skipped (no `execution:` declaration), which the validator grades WARN, exit 0."""
    done = _validate(str(package_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] in ("Verdict: PASS", "Verdict: WARN")
    assert any(line.split()[:2] == ["PASS", "static.manifest"] for line in lines)
    assert not any(line.strip().startswith(("FAIL", "ERROR")) for line in lines)


# ------------------------------------------------------------------------------
# OpenEnv's launchers: the exact commands its 0.10.0 providers run, read from the
# installed package at test time, run here against chatenv (loopback, a free port)
# ------------------------------------------------------------------------------

_SENTINEL_PORT = 54321  # the port asked of OpenEnv's code, replaced by a free one to run here


@pytest.fixture(scope="module")
def launchers():
    _require_venv("0.10.0")
    return support.launcher_commands(root=HERE, port=_SENTINEL_PORT, app="chatenv:app")


def _local_argv(words, port):
    """A launcher's argv, run here: OpenEnv's ``python`` is this interpreter (which
    has chatenv and uvicorn), 0.0.0.0 is loopback, the port a free one."""
    argv = []
    for word in words:
        word = {"python": sys.executable, "0.0.0.0": "127.0.0.1", str(_SENTINEL_PORT): str(port)}.get(word, word)
        argv.append(word)
    return argv


def _executable(name):
    """A console script: beside this interpreter (pip puts them there), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"no `{name}` executable: `pip install -e .` installs chatenv's console scripts"
    return found


@pytest.mark.timeout(600)
def test_launcher_commands_are_read_from_openenv(launchers):
    """What the helper read: Daytona's and Modal's uvicorn command for openenv.yaml's
    `app`, HF's `server`, uv's uvicorn, docker's `-p PORT:8000`."""
    for name in ("daytona", "modal"):
        assert launchers[name] == (f"cd /app/env && python -m uvicorn chatenv:app --host 0.0.0.0 "
                                   f"--port {_SENTINEL_PORT}")
    assert launchers["hf_sandbox"] == "server" and launchers["hf_sandbox_port"] == 8000
    assert launchers["uv"][launchers["uv"].index("--") + 1:][:2] == ["uvicorn", "chatenv:app"]
    assert launchers["docker_run"][:3] == ["docker", "run", "-d"]
    assert f"{_SENTINEL_PORT}:8000" in launchers["docker_run"]
    assert launchers["dockerfile_cmd"]  # Daytona/Modal's fallback: the Dockerfile's last CMD


def _launch_argv(launchers, name, port):
    if name in ("daytona", "modal"):
        cd, _, command = launchers[name].partition(" && ")
        assert shlex.split(cd) == ["cd", "/app/env"]  # /app/env holds the repo's files in the image
        return _local_argv(shlex.split(command), port), {}
    if name == "uv":  # `uv run --isolated --project P -- <command>`: the command uv runs
        words = launchers["uv"][launchers["uv"].index("--") + 1:]
        return [_executable(words[0])] + _local_argv(words[1:], port), {}
    # `server` from PATH (HF sandboxes), and the Dockerfile's CMD (the image's `server`):
    # port 8000 and all interfaces come from CHATENV_PORT/CHATENV_HOST in the image
    words = shlex.split(launchers["hf_sandbox" if name == "hf_sandbox" else "dockerfile_cmd"])
    return [_executable(words[0])] + words[1:], {"CHATENV_PORT": str(port), "CHATENV_HOST": "127.0.0.1"}


@pytest.mark.parametrize("name", ["daytona", "modal", "uv", "hf_sandbox", "dockerfile_cmd"])
def test_launcher_command_serves_a_working_session(launchers, name):
    port = free_port()
    argv, env = _launch_argv(launchers, name, port)
    proc = _server(argv, _clean_env(**env))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        with chatenv.ChatEnv(url) as env_:
            assert env_.reset(episode_id="launched").observation.messages == []
            assert env_.step(chatenv.ChatAction(tokens=[72, 105])).observation.messages == [
                {"role": "assistant", "content": "Hi"}]
            assert _state_of(env_.state()) == ("launched", 1, [{"role": "assistant", "content": "Hi"}], [[72, 105]])
    finally:
        _stop(proc)


@pytest.mark.timeout(600)
def test_launched_asgi_app_passes_openenv_validate(launchers):
    """Daytona's command (uvicorn serving chatenv:app) passes `openenv validate --url` too."""
    port = free_port()
    argv, env = _launch_argv(launchers, "daytona", port)
    proc = _server(argv, _clean_env(**env))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        report = json.loads(_validate("--url", url, "--json").stdout)
        assert [c["id"] for c in report["criteria"] if not c["passed"]] == []
        assert report["passed"] is True
    finally:
        _stop(proc)


# ------------------------------------------------------------------------------
# The split holds: this process never imported OpenEnv
# ------------------------------------------------------------------------------


def test_this_process_never_imported_openenv():
    assert not any(name == "openenv" or name.startswith("openenv.") for name in sys.modules)


# ------------------------------------------------------------------------------
# OpenEnv 0.10.0's own hook objects, passed to chatenv unchanged (in that release's venv)
# ------------------------------------------------------------------------------

_OPENENV_HOOKS_SCRIPT = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
import chatenv
from openenv.core.env_server.interfaces import Transform
from openenv.core.rubrics import Gate, Rubric, TrajectoryRubric, WeightedSum


class Said(Rubric):
    def __init__(self, word):
        super().__init__()
        self.word = word

    def forward(self, action, observation):
        return 1.0 if self.word in observation.messages[-1]["content"] else 0.0


class SlowHalf(Rubric):  # an async rubric: its call returns an awaitable
    async def forward(self, action, observation):
        await asyncio.sleep(0.01)
        return 0.5


class YesShare(TrajectoryRubric):  # scored once, when the episode is done
    def score_trajectory(self, trajectory):
        return sum("yes" in obs.messages[-1]["content"] for _, obs in trajectory) / len(trajectory)

    def compute_step_rewards(self):
        return [0.0] * len(self._trajectory)


class ByeEnds(Transform):
    def __call__(self, observation):
        observation.metadata["seen"] = len(observation.messages)
        observation.done = bool(observation.messages) and "bye" in observation.messages[-1]["content"]
        return observation


def rollout(replies, reset=None, **hooks):
    with chatenv.serve_in_thread(**hooks) as url, chatenv.ChatEnv(url) as env:
        out = [env.reset(**(reset or {}))]
        out += [env.step(chatenv.ChatAction(tokens=list(text.encode()))) for text in replies]
        return [[r.reward, r.done, r.observation.metadata] for r in out]


print(json.dumps({
    "weighted": rollout(["yes", "no"], rubric=WeightedSum([Said("yes"), SlowHalf()], [0.5, 0.5])),
    "gate": rollout(["no", "yes"], rubric=Gate(Said("yes"), threshold=1.0)),
    "trajectory": rollout(["yes", "no", "yes"], rubric=YesShare(), max_turns=3),
    "transform": rollout(["hi", "bye"], transform=ByeEnds()),
    "async": rollout(["x"], rubric=SlowHalf()),
}))
"""


def test_openenv_0_10_hook_objects_work_unchanged_in_chatenv():
    """WeightedSum (with an async child), Gate, TrajectoryRubric and a Transform subclass from the real
    openenv 0.10.0, served by chatenv and read by chatenv's client."""
    python = _require_venv("0.10.0")
    done = subprocess.run([str(python), "-c", _OPENENV_HOOKS_SCRIPT, str(HERE)], capture_output=True, text=True,
                          timeout=120, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    rewards = lambda case: [step[0] for step in got[case]]
    assert rewards("weighted") == [None, 0.75, 0.25]
    assert rewards("gate") == [None, 0.0, 1.0]
    assert rewards("trajectory") == [None, 0.0, 0.0, 2 / 3] and got["trajectory"][-1][1] is True
    assert [step[1] for step in got["transform"]] == [False, False, True]
    assert got["transform"][2][2]["seen"] == 2 and got["transform"][2][2]["done_reason"] == "a hook ended it"
    assert rewards("async") == [None, 0.5]
