"""Support for chatenv's tests, soak and benchmark: OpenEnv's releases, each in a venv,
and the raw sockets and server subprocesses the three share.

OpenEnv ships as ``openenv`` 0.10.0 (current) and ``openenv-core`` 0.3.0
(older); both install into the same ``openenv`` package, so each lives in its
own virtual environment under ``~/.cache/chatenv/venvs/`` (``CHATENV_VENVS``), and the test process
itself never imports OpenEnv. This module is both halves of that split:

* in the main process (stdlib only): ``venv_python(release)`` finds a release's
  interpreter, ``PeerProcess`` runs the OpenEnv peer in it, ``OpenEnvClients``
  drives OpenEnv's own clients in it, ``launcher_commands`` asks it for the
  commands OpenEnv's launchers run;
* in the main process too (stdlib; chatenv imported only by ``state_of``): WebSocket
  frames and handshakes written by hand (``frame``, ``open_session``,
  ``recv_frame``, ``answer_head``, churn and stuck clients), and ``ServerProcess``,
  a chatenv server in a subprocess of its own (its RSS, descriptors, log);
* in a venv's interpreter (the subcommands below): the OpenEnv peer, the chat
  environment written on OpenEnv's public API (``create_app`` and an
  ``Environment`` subclass) and served under uvicorn, since OpenEnv's own
  ``chat_env`` package is not on the package index; and an ``EnvClient``
  subclass for it.

Commands::

    python tests/support.py venvs [--release R]    # create the venvs (idempotent, fast when present)
    python tests/support.py where [--release R]    # print the interpreters
    VENV_PYTHON tests/support.py serve-peer --port 0 [--server JSON ...] [--chat-env PATH]
    VENV_PYTHON tests/support.py openenv-clients [--scenario FILE]
    VENV_PYTHON tests/support.py launcher-commands --root DIR --port P

``serve-peer`` prints one JSON line, ``{"urls": [...]}``, once every server
answers, and exits 0 on SIGTERM. ``openenv-clients`` reads one JSON request a
line (``{"client": "a", "op": "open", "url": ..., "mode": "sync"}``, then
``reset``/``step``/``state``/``close``) and answers each with one JSON line; with
``--scenario FILE`` it runs the file's requests and prints the list of answers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = [
    # OpenEnv's releases and their venvs
    "RELEASES",
    "VenvMissing",
    "venv_dir",
    "venv_python",
    "venv_ready",
    "require_venv",
    "create_venv",
    # The OpenEnv peer (run inside a venv)
    "ByteTokenizer",
    "openenv_chat_types",
    "openenv_chat_app",
    "openenv_chat_server",
    "openenv_hooks_app",
    "HOOK_TASKS",
    "HOOK_WEIGHTS",
    "make_openenv_chat_client_class",
    # Driving a venv from the main process
    "PeerProcess",
    "OpenEnvClients",
    "RemoteError",
    "launcher_commands",
    # Raw sockets (tests, soak, benchmark)
    "upgrade_request",
    "UPGRADE",
    "RECOVERABLE",
    "TYPES",
    "frame",
    "text",
    "connect",
    "open_session",
    "recv_frame",
    "read_all",
    "parse_server_frames",
    "answer_head",
    "stuck_reader",
    "legit_round_trip",
    "churn_batch",
    "churn_mode",
    "wait_until",
    # Servers in subprocesses
    "ServerProcess",
    "count_logged",
    "OVERSIZE_CLIENT",
    "state_of",
    # Test support
    "StallingTokenizer",
    "main",
]

HERE = Path(__file__).resolve().parent  # tests/
ROOT = HERE.parent  # the repository: chatenv.py
_COMPACT = (",", ":")


# ------------------------------------------------------------------------------
# Releases: OpenEnv's two, each in a virtual environment of its own
# ------------------------------------------------------------------------------

# release -> (distribution, venv directory name, what pip installs)
RELEASES = {
    "0.10.0": ("openenv", "openenv-0.10.0", ("openenv==0.10.0", "uvicorn")),
    "0.3.0": ("openenv-core", "openenv-core-0.3.0", ("openenv-core==0.3.0", "uvicorn")),
}


class VenvMissing(RuntimeError):
    """A release's venv is not built: the message says how to build it."""


def _venvs_root() -> Path:
    # Outside the repository: `openenv validate <repo>` digests every file of the package
    # and refuses the symbolic links a venv holds. CHATENV_VENVS points elsewhere.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("CHATENV_VENVS") or cache / "chatenv" / "venvs")


def venv_dir(release: str) -> Path:
    return _venvs_root() / RELEASES[release][1]


def venv_python(release: str) -> Path:
    """The interpreter of a release's venv (which may not exist yet)."""
    return venv_dir(release) / "bin" / "python"


def _dist_info(release: str) -> str:
    dist = RELEASES[release][0].replace("-", "_")
    return f"{dist}-{release}.dist-info"


def venv_ready(release: str) -> bool:
    """True when the venv has its interpreter and the release installed (no subprocess: fast)."""
    root = venv_dir(release)
    if not venv_python(release).exists():
        return False
    return any(p.is_dir() for p in root.glob(f"lib/python3*/site-packages/{_dist_info(release)}"))


def require_venv(release: str) -> Path:
    """The interpreter of a built venv, else VenvMissing saying how to build it."""
    if not venv_ready(release):
        raise VenvMissing(
            f"OpenEnv {release} is not installed in {venv_dir(release)}: build the venvs with "
            f"`python {HERE / 'support.py'} venvs` (the test suite builds them on first use)"
        )
    return venv_python(release)


def create_venv(release: str, python: str = sys.executable, log=print) -> Path:
    """Create (or repair) a release's venv; a no-op when it is already built."""
    if venv_ready(release):
        log(f"{release}: ready at {venv_dir(release)}")
        return venv_python(release)
    root = venv_dir(release)
    if not venv_python(release).exists():
        log(f"{release}: creating {root}")
        root.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "venv", str(root)], check=True)
    requirements = RELEASES[release][2]
    log(f"{release}: pip install {' '.join(requirements)}")
    subprocess.run(
        [str(venv_python(release)), "-m", "pip", "install", "--disable-pip-version-check", "-q", *requirements],
        check=True,
    )
    if not venv_ready(release):
        raise VenvMissing(f"pip finished but {_dist_info(release)} is not in {root}")
    return venv_python(release)


# ------------------------------------------------------------------------------
# The OpenEnv peer: chat_env on OpenEnv's public API (runs inside a venv)
# ------------------------------------------------------------------------------


class ByteTokenizer:
    """Token ids 0-255 are UTF-8 bytes ([72, 105] is "Hi"); no chat template.

    The tokenizer the recordings were made with: chat_env falls back to
    ``encode("role: content\\n")`` for a system prompt, and ``bytes()`` refuses
    an id past 255 with "bytes must be in range(0, 256)", an EXECUTION_ERROR.
    """

    def encode(self, text, **_kwargs):
        return list(text.encode("utf-8"))

    def decode(self, token_ids, skip_special_tokens=False, **_kwargs):
        return bytes(token_ids).decode("utf-8", errors="replace")


def _peer_tokenizer(name):
    """``bytes`` (ByteTokenizer above) or ``chatenv`` (chatenv's embedded one, with its chat template)."""
    if name in (None, "bytes"):
        return ByteTokenizer()
    if name == "chatenv":
        sys.path.insert(0, str(ROOT))
        import chatenv

        return chatenv.ByteTokenizer()
    raise ValueError(f"unknown peer tokenizer {name!r}: 'bytes' or 'chatenv'")


def _flatten_tokens(value):
    """Token coercion as chat_env's action model does it: ``.tolist()``, tuples
    and nested lists flattened, every leaf through ``int()`` (72.9 -> 72,
    True -> 1, "105" -> 105). ``int("a")`` raises ValueError, which pydantic
    wraps with the exception inside, so OpenEnv's error reply then fails to
    serialise: SESSION_ERROR and a closed socket, as recorded; a TypeError
    (``int(None)``) is not wrapped: EXECUTION_ERROR."""
    if callable(getattr(value, "tolist", None)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [token for item in value for token in _flatten_tokens(item)]
    return [int(value)]


_OPENENV_TYPES = None  # the pydantic models and the environment, built once
_OPENENV_CLIENT_CLASS = None  # the EnvClient subclass, built once


def openenv_chat_types():
    """Build (once) the chat models and environment on OpenEnv's API.

    Returns a namespace with ``ChatAction``, ``ChatObservation``, ``ChatState``
    (pydantic models on OpenEnv's Action/Observation/State, messages typed with
    OpenEnv's ``Message``) and ``ChatEnvironment`` (an OpenEnv ``Environment``).
    """
    global _OPENENV_TYPES
    if _OPENENV_TYPES is not None:
        return _OPENENV_TYPES
    from types import SimpleNamespace
    from typing import List

    from pydantic import Field, field_validator

    from openenv.core.env_server.interfaces import Environment, Message
    from openenv.core.env_server.types import Action, Observation, State

    class ChatAction(Action):
        """One message, as token ids."""

        tokens: List[int] = Field(..., min_length=1)

        @field_validator("tokens", mode="before")
        @classmethod
        def _coerce_tokens(cls, value):
            if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
                return _flatten_tokens(value)
            raise TypeError("tokens must be provided as a sequence of token ids")

    class ChatObservation(Observation):
        """The whole conversation: messages and flattened token ids."""

        messages: List[Message] = Field(default_factory=list)
        tokens: List[int] = Field(default_factory=list)

    class ChatState(State):
        """The history, one token list per step (and one for the system prompt)."""

        history_messages: List[Message] = Field(default_factory=list)
        history_tokens: List[List[int]] = Field(default_factory=list)

    class ChatEnvironment(Environment):
        """chat_env's behaviour, as observed on the wire and in its tests.

        It leaves ``episode_id`` None and ``step_count`` 0; ``reset()`` takes
        no arguments (so the server drops ``seed``/``episode_id``); a step
        stores its tokens before decoding them, so a step the tokenizer refuses
        leaves its tokens in ``history_tokens`` and adds no message. One
        deliberate difference: it declares concurrent sessions safe, so one
        server can hold several (chat_env's app runs with the default of one).
        """

        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self, tokenizer=None, system_prompt=None, system_role="system", transform=None):
            super().__init__(transform=transform)
            self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
            self.system_prompt = system_prompt
            self.system_role = system_role
            self._state = ChatState()
            self.reset()

        def _tokenize(self, messages):
            try:
                ids = self.tokenizer.apply_chat_template(conversation=messages, tokenize=True)
            except Exception:  # no chat template (or no method): "role: content\n"
                ids = self.tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))
            return _flatten_tokens(ids)

        def reset(self):
            self._state.history_messages = []
            self._state.history_tokens = []
            if self.system_prompt:
                message = {"role": self.system_role, "content": self.system_prompt}
                self._state.history_messages = [message]
                self._state.history_tokens = [self._tokenize([message])]
            return self._observation()

        def step(self, action):
            ids = [int(t) for t in action.tokens]
            self._state.history_tokens.append(ids)  # kept even if decoding fails below
            content = self.tokenizer.decode(ids, skip_special_tokens=True)
            self._state.history_messages.append({"role": "assistant", "content": content})
            return self._observation()

        @property
        def state(self):
            return self._state

        def message_to_action(self, message):
            for key in ("role", "content"):
                if key not in message:
                    raise ValueError(f"Message must contain a '{key}' key")
            if message["content"] is None:
                raise ValueError("Message content cannot be None")
            return ChatAction(tokens=self._tokenize([message]))

        def _observation(self):
            flat = [t for ids in self._state.history_tokens for t in ids]
            return self._apply_transform(ChatObservation(messages=list(self._state.history_messages), tokens=flat))

    _OPENENV_TYPES = SimpleNamespace(
        ChatAction=ChatAction,
        ChatObservation=ChatObservation,
        ChatState=ChatState,
        ChatEnvironment=ChatEnvironment,
    )
    return _OPENENV_TYPES


def openenv_chat_app(max_concurrent_envs=1, system_prompt=None, tokenizer=None):
    """The FastAPI app OpenEnv's ``create_app`` builds for the chat environment.

    ``tokenizer`` (an object, or ``"bytes"``/``"chatenv"``; default bytes) is
    shared by every session.
    """
    from openenv.core.env_server import create_app

    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = _peer_tokenizer(tokenizer)
    types = openenv_chat_types()
    factory = functools.partial(types.ChatEnvironment, tokenizer=tokenizer, system_prompt=system_prompt)
    return create_app(
        factory,
        types.ChatAction,
        types.ChatObservation,
        env_name="chat_env",
        max_concurrent_envs=max_concurrent_envs,
    )


# The hooks peer's tasks: three splits, one not named train/validation/test
HOOK_TASKS = {
    "train": [{"id": "train-0", "prompt": "What is 2+2?", "answer": "4"},
              {"id": "train-1", "prompt": "What is 3*3?", "answer": "9"},
              {"id": "train-2", "prompt": "Capital of France?", "answer": "Paris"}],
    "test": [{"id": "test-0", "prompt": "What is 10-7?", "answer": "3"},
             {"id": "test-1", "prompt": "Say yes.", "answer": "yes"}],
    "hard": [{"id": "hard-0", "prompt": "What is 12*12?", "answer": "144"}],
}
HOOK_WEIGHTS = (0.75, 0.25)  # WeightedSum: the exact answer, then brevity (at most 8 characters)


def openenv_hooks_app(max_concurrent_envs=8, tokenizer=None):
    """The chat environment with OpenEnv 0.10.0's hooks, served by its ``create_app``.

    On the peer's ChatEnvironment, with OpenEnv's real classes: a ``Transform``, a
    ``WeightedSum`` of two ``Rubric``s, and the task API (``list_splits`` ...
    ``get_task_range``; HOOK_TASKS). What each does, so tests can predict frames:

    - ``reset(split=, index=)`` poses that task (``seed`` alone: train[seed % 3];
      nothing: no task): the prompt as one user message; observation metadata
      ``{"split", "index", "task_id"}``. An unknown split raises ValueError, a bad
      index IndexError. The rubric's ``reset()`` runs.
    - a step: reward = 0.75 * (last assistant message stripped == the answer) +
      0.25 * (it has at most 8 characters), 0.0 without a task; then the transform.
    - the transform (reset and step): metadata gains ``"turn"`` (assistant
      messages so far); a last assistant message "pass" makes the reward ``True``
      (a JSON boolean); ``done`` when the reward is the float 1.0 or the message
      holds "bye".
    - task specs are ``{"id", "prompt"}`` (no answer), in route order.
    """
    from openenv.core.env_server import create_app
    from openenv.core.env_server.interfaces import Transform
    from openenv.core.rubrics import Rubric, WeightedSum

    types = openenv_chat_types()
    tokenizer = _peer_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str) else tokenizer

    def last_answer(observation):
        said = [m["content"] for m in observation.messages if m["role"] == "assistant"]
        return said[-1] if said else None

    class ExactAnswer(Rubric):
        def __init__(self, env):
            super().__init__()
            self.env = env

        def forward(self, action, observation):
            task = self.env.task
            return float(task is not None and (last_answer(observation) or "").strip() == task["answer"])

        def reset(self):
            self.last_score = None

    class Brevity(Rubric):
        def forward(self, action, observation):
            return float(len(last_answer(observation) or "") <= 8)

    class TurnTransform(Transform):
        def __call__(self, observation):
            said = last_answer(observation)
            observation.metadata = {**observation.metadata,
                                    "turn": sum(m["role"] == "assistant" for m in observation.messages)}
            if said == "pass":
                observation.reward = True
            if type(observation.reward) is float and observation.reward == 1.0 or "bye" in (said or ""):
                observation.done = True
            return observation

    class HooksChatEnvironment(types.ChatEnvironment):
        """The chat environment posing tasks, scored by a rubric, ended by a transform."""

        def __init__(self, tokenizer=None):
            self.task = None
            self.task_metadata = {}
            super().__init__(tokenizer=tokenizer, transform=TurnTransform())
            self.rubric = WeightedSum([ExactAnswer(self), Brevity()], list(HOOK_WEIGHTS))

        # The task API: discovery only
        def list_splits(self):
            return list(HOOK_TASKS)

        def _split(self, split):
            if split not in HOOK_TASKS:
                raise ValueError(f"unknown split {split!r}")
            return HOOK_TASKS[split]

        def list_tasks(self, split):
            return [{"id": t["id"], "prompt": t["prompt"]} for t in self._split(split)]

        def num_tasks(self, split):
            return len(self._split(split))

        def get_task(self, split, index):
            tasks = self.list_tasks(split)
            if not 0 <= index < len(tasks):
                raise IndexError(index)
            return tasks[index]

        def get_task_range(self, split, start=None, stop=None):
            return self.list_tasks(split)[start:stop]

        def reset(self, seed=None, episode_id=None, split=None, index=None, **kwargs):
            if getattr(self, "rubric", None) is not None:
                self._reset_rubric()
            self.task, self.task_metadata = None, {}
            if split is not None or seed is not None:
                split = "train" if split is None else split
                index = (seed % len(HOOK_TASKS["train"]) if split == "train" and index is None and seed is not None
                         else 0 if index is None else index)
                self.get_task(split, index)  # raises on an unknown split or a bad index
                self.task = HOOK_TASKS[split][index]
                self.task_metadata = {"split": split, "index": index, "task_id": self.task["id"]}
            self._state.history_messages, self._state.history_tokens = [], []
            if self.task is not None:
                message = {"role": "user", "content": self.task["prompt"]}
                self._state.history_messages = [message]
                self._state.history_tokens = [self._tokenize([message])]
            return self._apply_transform(self._plain_observation())

        def step(self, action):
            ids = [int(t) for t in action.tokens]
            content = self.tokenizer.decode(ids, skip_special_tokens=True)
            self._state.history_tokens.append(ids)
            self._state.history_messages.append({"role": "assistant", "content": content})
            observation = self._plain_observation()
            observation.reward = self._apply_rubric(action, observation)
            return self._apply_transform(observation)

        def _plain_observation(self):
            flat = [t for ids in self._state.history_tokens for t in ids]
            return types.ChatObservation(messages=list(self._state.history_messages), tokens=flat,
                                         metadata=dict(self.task_metadata))

    return create_app(functools.partial(HooksChatEnvironment, tokenizer=tokenizer), types.ChatAction,
                      types.ChatObservation, env_name="chat_env", max_concurrent_envs=max_concurrent_envs)


def _real_chat_env_app(path, tokenizer=None):
    """OpenEnv's own chat_env app (``<path>/server/app.py``) with ``get_tokenizer``
    patched to return a byte-level tokenizer (it would load gpt2 otherwise).
    SYSTEM_PROMPT is read from the environment, as chat_env does."""
    import importlib

    path = Path(path).resolve()
    sys.path.insert(0, str(path.parent))
    module = importlib.import_module(f"{path.name}.server.app")
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    module.get_tokenizer = lambda: tokenizer
    return module.app


def _bound_socket(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _uvicorn_server(app, log_level="warning"):
    """A uvicorn server that leaves signals to its host process (uvicorn would
    re-raise SIGTERM after a graceful stop, so the process would die by it)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

        def install_signal_handlers(self):  # uvicorn before 0.29
            pass

    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
    return Server(config)


@contextlib.contextmanager
def openenv_chat_server(port=0, max_concurrent_envs=1, system_prompt=None, *, tokenizer=None, host="127.0.0.1",
                        log_level="warning"):
    """Run the OpenEnv peer under uvicorn in a background thread (in a venv).

    Yields its base URL ``"http://127.0.0.1:PORT"``; stops it on exit.
    """
    app = openenv_chat_app(max_concurrent_envs=max_concurrent_envs, system_prompt=system_prompt, tokenizer=tokenizer)
    sock = _bound_socket(host, port)
    server = _uvicorn_server(app, log_level)
    errors = []

    def run():
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"openenv-chat-{sock.getsockname()[1]}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"OpenEnv chat server did not start: {errors!r}")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
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


def _serve_peer_main(args):
    """``serve-peer``: one or more servers in one process (importing OpenEnv costs
    seconds), the first line of stdout their URLs; SIGTERM stops them, exit 0."""
    import asyncio

    configs = [json.loads(s) for s in args.server] or [{}]
    servers, sockets = [], []
    for i, config in enumerate(configs):
        if args.chat_env:
            app = _real_chat_env_app(args.chat_env, _peer_tokenizer(config.get("tokenizer")))
        elif config.get("hooks"):
            app = openenv_hooks_app(config.get("max_concurrent_envs", 8), config.get("tokenizer"))
        else:
            app = openenv_chat_app(
                max_concurrent_envs=config.get("max_concurrent_envs", 1),
                system_prompt=config.get("system_prompt", os.environ.get("SYSTEM_PROMPT")),  # as chat_env
                tokenizer=config.get("tokenizer"),
            )
        sockets.append(_bound_socket(args.host, args.port if i == 0 else 0))
        servers.append(_uvicorn_server(app, args.log_level))

    def stop(signum, frame):
        for server in servers:
            server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    async def run():
        tasks = [asyncio.ensure_future(s.serve(sockets=[sock])) for s, sock in zip(servers, sockets)]
        while not all(s.started for s in servers):
            done = [t for t in tasks if t.done()]
            if done:
                done[0].result()  # a server failed to start: raise its error
                raise RuntimeError("a server stopped before it started")
            await asyncio.sleep(0.01)
        urls = [f"http://{args.host}:{sock.getsockname()[1]}" for sock in sockets]
        print(json.dumps({"urls": urls, "pid": os.getpid()}), flush=True)
        await asyncio.gather(*tasks)

    asyncio.run(run())
    return 0


# ------------------------------------------------------------------------------
# OpenEnv's clients: driven by JSON requests, one a line (runs inside a venv)
# ------------------------------------------------------------------------------


def _error_json(exc):
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
    }


def _result_json(result):
    obs = result.observation
    return {
        "observation": {
            "messages": [dict(m) for m in obs.messages],
            "tokens": list(obs.tokens),
            "reward": obs.reward,
            "done": obs.done,
            "metadata": dict(obs.metadata or {}),
        },
        "reward": result.reward,
        "done": result.done,
        "observation_type": type(obs).__name__,
    }


def _state_json(state):
    return dict(state.model_dump(), state_type=type(state).__name__)


class _ClientHost:
    """OpenEnv clients by name: sync ones through ``.sync()``, async ones on one loop thread."""

    def __init__(self):
        import asyncio

        self.cls = make_openenv_chat_client_class()
        self.types = openenv_chat_types()
        self.clients = {}  # name -> (mode, client)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="openenv-clients", daemon=True).start()

    def _await(self, coro, timeout=120):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def handle(self, request):
        op, name = request["op"], request.get("client", "default")
        if op == "open":  # as `with Client(url).sync() as env` / `async with Client(url) as env`
            mode = request.get("mode", "sync")
            options = request.get("options") or {}
            if mode == "sync":
                client = self.cls(request["url"], **options).sync()
                self.clients[name] = (mode, client)
                client.__enter__()
            else:
                async def enter():
                    return await self.cls(request["url"], **options).__aenter__()

                self.clients[name] = (mode, self._await(enter()))
            return None
        mode, client = self.clients[name]
        if op == "close":
            del self.clients[name]
            if mode == "sync":
                client.__exit__(None, None, None)
            else:
                self._await(client.__aexit__(None, None, None))
            return None
        if op == "reset":
            call = lambda: client.reset(**(request.get("kwargs") or {}))  # noqa: E731
            wrap = _result_json
        elif op == "step":
            tokens, metadata = request["tokens"], request.get("metadata") or {}
            if request.get("construct"):  # unvalidated, as a client may send what its model would refuse
                action = self.types.ChatAction.model_construct(tokens=tokens, metadata=metadata)
            else:
                action = self.types.ChatAction(tokens=tokens, metadata=metadata)
            call = lambda: client.step(action)  # noqa: E731
            wrap = _result_json
        elif op == "state":
            call, wrap = client.state, _state_json
        else:
            raise ValueError(f"unknown op {op!r}")
        if mode == "sync":
            return wrap(call())

        async def run():
            return wrap(await call())

        return self._await(run())

    def answer(self, request):
        try:
            return {"id": request.get("id"), "ok": True, "value": self.handle(request)}
        except Exception as exc:  # reported to the driving process
            return {"id": request.get("id"), "ok": False, "error": _error_json(exc)}

    def close_all(self):
        for name in list(self.clients):
            with contextlib.suppress(Exception):
                self.handle({"op": "close", "client": name})


def _openenv_clients_main(args):
    host = _ClientHost()
    try:
        if args.scenario:
            with open(args.scenario) if args.scenario != "-" else contextlib.nullcontext(sys.stdin) as f:
                requests = [json.loads(line) for line in f if line.strip()]
            print(json.dumps([host.answer(r) for r in requests]), flush=True)
            return 0
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        for line in sys.stdin:
            if line.strip():
                print(json.dumps(host.answer(json.loads(line))), flush=True)
        return 0
    finally:
        host.close_all()


# ------------------------------------------------------------------------------
# Launchers: the commands OpenEnv's run, read from the installed package (in a venv)
# ------------------------------------------------------------------------------


class _DirSandbox:
    """A sandbox whose filesystem is a local directory standing in for the image's
    ``/app``: a provider's probing commands run for real, with ``/app`` mapped there."""

    def __init__(self, root):
        self.root = str(root)

    def run(self, command):
        done = subprocess.run(["bash", "-c", command.replace("/app", self.root)], capture_output=True, text=True)
        return done.stdout.replace(self.root, "/app")

    # Daytona's SDK shape: sandbox.process.exec(cmd, timeout=...).result
    @property
    def process(self):
        sandbox = self

        class Process:
            def exec(self, command, timeout=None):
                from types import SimpleNamespace

                return SimpleNamespace(result=sandbox.run(command))

        return Process()


def _launcher_commands_main(args):
    """Print, as JSON, the server commands OpenEnv 0.10.0's launchers run for a
    package laid out as ``/app/env`` = ``--root`` (its openenv.yaml, Dockerfile)."""
    import tempfile

    from openenv.core.containers.runtime import _server_config, daytona_provider, hf_sandbox_provider, modal_provider
    from openenv.core.containers.runtime import providers, uv_provider

    root = Path(args.root).resolve()
    out = {}
    with tempfile.TemporaryDirectory() as app_dir:
        os.symlink(root, os.path.join(app_dir, "env"))  # the modern layout: /app/env/openenv.yaml
        sandbox = _DirSandbox(app_dir)
        # Daytona: _discover_server_cmd(sandbox, port) reads openenv.yaml's `app` inside the sandbox
        daytona = daytona_provider.DaytonaProvider.__new__(daytona_provider.DaytonaProvider)
        out["daytona"] = daytona._discover_server_cmd(sandbox, port=args.port)
        # Modal: the same discovery through its adapter's exec(sandbox, command)
        modal = modal_provider.ModalProvider.__new__(modal_provider.ModalProvider)
        modal._sandbox = sandbox
        modal._adapter = type("Adapter", (), {"exec": staticmethod(lambda sb, cmd, timeout=10: sb.run(cmd))})()
        out["modal"] = modal._discover_server_cmd(port=args.port)
    # Both fall back to the Dockerfile's last CMD (for images built from it)
    dockerfile = root / "Dockerfile"
    out["dockerfile_cmd"] = (
        _server_config.parse_dockerfile_cmd(dockerfile.read_text()) if dockerfile.exists() else None
    )
    # Hugging Face sandboxes: a shell command that starts `server` from PATH
    out["hf_sandbox_shell"] = hf_sandbox_provider._SERVER_COMMAND
    words = shlex.split(hf_sandbox_provider._SERVER_COMMAND.rsplit(";", 1)[-1])
    out["hf_sandbox"] = words[words.index("nohup") + 1]
    out["hf_sandbox_port"] = hf_sandbox_provider._DEFAULT_PORT
    # uv: `uv run --isolated --project P -- uvicorn APP --host H --port P --workers N`
    out["uv"] = uv_provider._create_uv_command(
        host="127.0.0.1", port=args.port, reload=False, workers=1, app=args.app, project_path=str(root)
    )
    # Local Docker: the `docker run` argv, captured instead of run
    calls = []

    def fake_run(cmd, *a, **k):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0, stdout="0" * 64, stderr="")

    real_run, real_sleep = subprocess.run, time.sleep
    subprocess.run, time.sleep = fake_run, lambda s: None
    try:
        docker = providers.LocalDockerProvider.__new__(providers.LocalDockerProvider)
        docker._container_id = docker._container_name = None
        out["docker_url"] = docker.start_container("chat-env:latest", port=args.port, env_vars={"K": "V"})
    finally:
        subprocess.run, time.sleep = real_run, real_sleep
    out["docker_run"] = calls[0] if calls else None
    print(json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------
# Driving a venv: the peer and OpenEnv's clients from the main process (stdlib only)
# ------------------------------------------------------------------------------


def _read_json_line(proc, what, timeout_s):
    """The next stdout line of ``proc`` as JSON, within ``timeout_s``."""
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"{what} said nothing within {timeout_s} s") from None
    if not line:
        proc.wait(10)
        raise RuntimeError(f"{what} exited with {proc.returncode} before answering: {_stderr_tail(proc)}")
    return json.loads(line)


def _stderr_tail(proc):
    log = getattr(proc, "log", None)  # stderr goes to a file: an unread pipe would fill and block the child
    if log is None:
        return ""
    with contextlib.suppress(Exception):
        log.flush()
        log.seek(0)
        return log.read()[-3000:]
    return ""


def _popen(argv, **kwargs):
    import tempfile

    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, **kwargs)
    proc.log = log
    return proc


def _close_streams(proc):
    for stream in (proc.stdin, proc.stdout, getattr(proc, "log", None)):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


class _VenvProcess:
    """A process in a release's venv, started on entering ``with`` (unless ``start()``
    already ran, so several can start in parallel) and stopped on leaving: the
    value of ``with`` is ``wait_started()``'s."""

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self.wait_started()

    def __exit__(self, *exc_info):
        self.stop()


class PeerProcess(_VenvProcess):
    """The OpenEnv peer of a release in a subprocess: ``with PeerProcess("0.10.0",
    {"max_concurrent_envs": 8}, {...}) as urls``. Each dict is one server
    (``max_concurrent_envs``, ``system_prompt``, ``tokenizer``: bytes or chatenv;
    ``"hooks": true`` serves openenv_hooks_app instead: transform, rubric, tasks).
    Leaving sends SIGTERM; ``returncode`` then holds its exit status."""

    def __init__(self, release, *servers, chat_env=None, env=None, start_timeout_s=120):
        self.release = release
        self.servers = servers or ({},)
        self.chat_env = chat_env
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.proc = None
        self.urls = None
        self.returncode = None
        self.stderr_tail = ""

    def start(self):
        argv = [str(require_venv(self.release)), str(HERE / "support.py"), "serve-peer", "--port", "0"]
        for server in self.servers:
            argv += ["--server", json.dumps(server)]
        if self.chat_env:
            argv += ["--chat-env", str(self.chat_env)]
        self.proc = _popen(argv, stdin=subprocess.DEVNULL, env=self.env)
        return self

    def wait_started(self):
        if self.urls is None:
            try:
                self.urls = _read_json_line(self.proc, f"the OpenEnv {self.release} peer", self.start_timeout_s)["urls"]
            except BaseException:
                self.stop()
                raise
        return self.urls

    def stop(self, timeout_s=30):
        if self.proc is None or self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait(10)
        if self.returncode:
            self.stderr_tail = _stderr_tail(self.proc)
        _close_streams(self.proc)
        return self.returncode


class RemoteError(Exception):
    """An exception raised by OpenEnv's client in the venv: ``.type``, ``.mro``, ``.message``."""

    def __init__(self, error):
        super().__init__(f"{error['type']}: {error['message']}")
        self.type, self.mro, self.message = error["type"], error["mro"], error["message"]

    def isa(self, name):
        return name in self.mro


class _RemoteClient:
    def __init__(self, host, name):
        self._host, self.name = host, name

    def reset(self, **kwargs):
        return self._host.request(self.name, "reset", kwargs=kwargs)

    def step(self, tokens, metadata=None, construct=False):
        return self._host.request(self.name, "step", tokens=list(tokens), metadata=metadata or {}, construct=construct)

    def state(self):
        return self._host.request(self.name, "state")

    def close(self):
        return self._host.request(self.name, "close")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with contextlib.suppress(RemoteError, KeyError):
            self.close()


class OpenEnvClients(_VenvProcess):
    """OpenEnv's own clients (a release's, in its venv), driven from this process.

    ``with OpenEnvClients("0.3.0") as oe, oe.open(url, "sync") as env:
    env.reset()`` returns what the client returned as plain JSON (observation
    fields, reward, done; state fields); an exception in the client raises
    RemoteError.
    """

    def __init__(self, release, start_timeout_s=120, call_timeout_s=180):
        self.release = release
        self.start_timeout_s = start_timeout_s
        self.call_timeout_s = call_timeout_s
        self.proc = None
        self._ready = False
        self._count = 0
        self._lock = threading.Lock()

    def start(self):
        argv = [str(require_venv(self.release)), str(HERE / "support.py"), "openenv-clients"]
        self.proc = _popen(argv, stdin=subprocess.PIPE, bufsize=1)
        return self

    def wait_started(self):
        if not self._ready:
            _read_json_line(self.proc, f"OpenEnv {self.release}'s clients", self.start_timeout_s)
            self._ready = True
        return self

    def request(self, client, op, **fields):
        with self._lock:
            self.wait_started()
            self._count += 1
            self.proc.stdin.write(json.dumps(dict(fields, id=self._count, client=client, op=op)) + "\n")
            self.proc.stdin.flush()
            try:
                answer = _read_json_line(self.proc, f"OpenEnv {self.release}'s clients", self.call_timeout_s)
            except TimeoutError:
                self.proc.kill()  # a late answer must never be read as the next one's
                raise
            if answer.get("id") != self._count:
                raise RuntimeError(f"OpenEnv {self.release}'s clients answered request {answer.get('id')}, "
                                   f"not {self._count}")
        if not answer["ok"]:
            raise RemoteError(answer["error"])
        return answer["value"]

    def open(self, url, mode="sync", **options):
        """A client on ``url`` (``mode`` sync or async), connected as ``with``/``async with`` would."""
        self._count += 1
        name = f"{mode}-{self._count}"
        self.request(name, "open", url=url, mode=mode, options=options)
        return _RemoteClient(self, name)

    def stop(self):
        if self.proc is None:
            return None
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        _close_streams(self.proc)
        self.proc = None
        return code


def launcher_commands(root=ROOT, port=8000, app="chatenv:app"):
    """The server commands OpenEnv 0.10.0's launchers run for ``root``, read from the
    installed package at call time (see ``_launcher_commands_main``)."""
    argv = [str(require_venv("0.10.0")), str(HERE / "support.py"), "launcher-commands",
            "--root", str(root), "--port", str(port), "--app", app]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    if done.returncode:
        raise RuntimeError(f"launcher-commands failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------
# Raw sockets: WebSocket frames and handshakes by hand, for tests, soak and benchmark
# ------------------------------------------------------------------------------


def upgrade_request(headers: bytes = b"", path: bytes = b"/ws") -> bytes:
    """A WebSocket upgrade request for ``path``, with extra header lines (each ending in CRLF)."""
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + headers + b"\r\n"
    )


UPGRADE = upgrade_request()  # the plain upgrade to /ws
# The error codes after which a session goes on, and the protocol's request types
RECOVERABLE = {"INVALID_JSON", "UNKNOWN_TYPE", "VALIDATION_ERROR", "EXECUTION_ERROR"}
TYPES = ("reset", "step", "state", "close")


def frame(payload: bytes, opcode=1, fin=True, rsv=0, mask=True, rng=random) -> bytes:
    """One client frame (RFC 6455 5.2), any bits, masked with a key from ``rng`` unless told otherwise."""
    first, bit, n = (0x80 if fin else 0) | (rsv << 4) | opcode, 0x80 if mask else 0, len(payload)
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not mask:
        return head + payload
    key = rng.randbytes(4)
    stream = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big") if n else b""
    return head + key + body


def text(message) -> bytes:
    """One masked text frame carrying ``message`` as JSON."""
    return frame(json.dumps(message).encode())


def connect(port: int, timeout=10) -> socket.socket:
    """A TCP connection to the loopback port; ``timeout`` for every blocking call."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def open_session(port: int, timeout=10) -> tuple[socket.socket, bytes]:
    """A raw socket past its 101, and any bytes read after it (frames follow the 101, RFC 6455 4.1)."""
    sock = connect(port, timeout)
    sock.sendall(UPGRADE)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head[:200])
    return sock, rest


def recv_frame(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """The next server frame (opcode, payload); ``buffer`` keeps bytes read past it."""
    def need(n):
        while len(buffer) < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed mid-frame")
            buffer.extend(chunk)

    need(2)
    n, start = buffer[1] & 0x7F, 2
    if n == 126:
        need(4)
        n, start = struct.unpack("!H", buffer[2:4])[0], 4
    elif n == 127:
        need(10)
        n, start = struct.unpack("!Q", buffer[2:10])[0], 10
    need(start + n)
    opcode, payload = buffer[0] & 0x0F, bytes(buffer[start:start + n])
    del buffer[:start + n]
    return opcode, payload


def read_all(sock: socket.socket, timeout=10) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection."""
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = sock.recv(1 << 18)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out


def parse_server_frames(data: bytes, strict=False) -> list[tuple[int, bytes]] | None:
    """A server's byte stream as (opcode, payload) pairs; None if anything is malformed
    (``strict``: an AssertionError saying what)."""

    def malformed(why: str) -> None:
        if strict:
            raise AssertionError(why)

    frames, i = [], 0
    while i < len(data):
        if len(data) - i < 2:
            return malformed(f"truncated frame header at {i}: {data[i:]!r}")
        if data[i] & 0x70 or data[i + 1] & 0x80:
            return malformed(f"server frame with RSV or mask bits: {data[i:i + 2]!r}")
        n, i, opcode = data[i + 1] & 0x7F, i + 2, data[i] & 0x0F
        if n == 126:
            n, i = struct.unpack("!H", data[i:i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack("!Q", data[i:i + 8])[0], i + 8
        if len(data) - i < n:
            return malformed("truncated frame payload")
        frames.append((opcode, data[i:i + n]))
        i += n
    return frames


def answer_head(port: int, request: bytes, *, body: bool = False, timeout=10) -> bytes:
    """The status line and headers a request gets; the connection is closed after them.
    With ``body``, a refusal (anything but a 101) is read to the end: head, CRLF CRLF, body."""
    with connect(port, timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if not body:
            return data.partition(b"\r\n\r\n")[0]
        if not data.startswith(b"HTTP/1.1 101"):
            data += read_all(sock, timeout)
    return data


def stuck_reader(port: int, sends=300, timeout=10) -> socket.socket:
    """A session that pipelines steps with growing replies and never reads one: buffers full."""
    sock, _ = open_session(port, timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    step = text({"type": "step", "data": {"tokens": [65] * 4000}})
    sock.setblocking(False)
    try:
        for _ in range(sends):
            sock.send(step)
    except BlockingIOError:
        pass
    return sock


def legit_round_trip(port: int, timeout=10.0) -> float:
    """Seconds for a new client to connect, reset and step (``timeout`` if it could not)."""
    started = time.monotonic()
    try:
        sock, rest = open_session(port, timeout)
        with sock:
            buffer = bytearray(rest)
            sock.sendall(text({"type": "reset"}))
            recv_frame(sock, buffer)
            sock.sendall(text({"type": "step", "data": {"tokens": [72, 105]}}))
            if json.loads(recv_frame(sock, buffer)[1])["type"] != "observation":
                return timeout
    except (OSError, ConnectionError, ValueError):
        return timeout
    return time.monotonic() - started


def churn_batch(port: int, mode: str, count: int, held: list, timeout=10) -> None:
    """Open ``count`` sessions (each answers a reset), then make each vanish by ``mode``.
    Sockets the server must let go of by itself are appended to ``held``."""
    socks = []
    try:
        for _ in range(count):
            sock = connect(port, timeout)
            socks.append(sock)
            sock.sendall(UPGRADE[:40] if mode == "mid-handshake" else UPGRADE)
        if mode == "mid-handshake":
            return
        reset = text({"type": "reset"})
        for sock in socks:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(head[:200])
            sock.sendall(reset)
            while b'"done":false}}' not in rest:
                chunk = sock.recv(65536)
                if not chunk or b"CAPACITY_REACHED" in rest:
                    raise ConnectionError(f"no reset reply: {rest[:200]!r}")
                rest += chunk
        for sock in socks:
            if mode == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == "half-open":
                sock.shutdown(socket.SHUT_WR)  # EOF without a close frame; we keep reading
            elif mode == "mid-frame":
                sock.sendall(text({"type": "state"})[:5])
            elif mode == "not-reading":  # pipeline steps whose replies grow, never read them
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                step = text({"type": "step", "data": {"tokens": [65] * 4000}})
                sock.setblocking(False)
                try:
                    for _ in range(200):
                        sock.send(step)
                except BlockingIOError:
                    pass
    finally:
        if mode in ("half-open", "silent", "not-reading"):
            held.extend(socks)
        else:
            for sock in socks:
                sock.close()


def churn_mode(server: ServerProcess, mode: str, count: int, batch: int, timeout=20, sock_timeout=10) -> bool:
    """Churn ``count`` sessions by ``mode``, ``batch`` at a time; True once the server
    holds no session (waiting up to ``timeout`` s) while the held sockets are still open."""
    held: list = []
    try:
        for done in range(0, count, batch):
            churn_batch(server.port, mode, min(batch, count - done), held, timeout=sock_timeout)
            if mode in ("silent", "not-reading"):  # the server must drop each batch itself
                if not wait_until(lambda: server.active() == 0, timeout=20):
                    break
                while held:
                    held.pop().close()
        # the server lets go of these by itself: EOF, keepalive, send timeout
        return wait_until(lambda: server.active() == 0, timeout=timeout)
    finally:
        for sock in held:
            sock.close()


def wait_until(predicate, timeout=10.0, interval=0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ------------------------------------------------------------------------------
# Servers in subprocesses: each with its own RSS, file descriptors and log
# ------------------------------------------------------------------------------


SERVE_SCRIPT = (  # argv: the serve() options as JSON, the log level
    "import inspect, json, logging, os, sys, chatenv\n"
    "logging.basicConfig(level=sys.argv[2], format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "options = json.loads(sys.argv[1])\n"
    "if os.environ.get('CHATENV_SOAK_BASELINE'):  # an older chatenv (--baseline): drop what it lacks\n"
    "    known = set(inspect.signature(chatenv.ChatServer).parameters) | set(inspect.signature(chatenv.serve).parameters)\n"
    "    if options.get('loop') == 'uvloop' and 'loop' not in known:\n"
    "        import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
    "    options = {k: v for k, v in options.items() if k in known}\n"
    "chatenv.serve(**options)\n"
)


class ServerProcess:
    """A chatenv server in its own process (its own RSS, file descriptors and log
    ``logdir/name.log``) on a free port, read from its "listening on" line.

    ``chatenv.serve(**options)`` (host 127.0.0.1 unless given), or with ``cli`` the
    command line ``python chatenv.py serve *cli`` (pass "--port", "0"). Stopped with
    ``stop()`` or as a context manager: SIGTERM, then SIGKILL.
    """

    # Where the servers' chatenv.py is: soak's --baseline points it at an older one.
    chatenv_dir = ROOT

    def __init__(self, logdir, name: str, cli=None, env=None, log_level="INFO", nofile=None, cpus=None,
                 **options):
        """``nofile``: the process's limit on open files (both, or (soft, hard)); ``cpus``: the CPUs it may use."""
        if cli is not None:
            argv = [sys.executable, str(self.chatenv_dir / "chatenv.py"), "serve", *cli]
        else:
            options.setdefault("host", "127.0.0.1")
            options.setdefault("port", 0)
            argv = [sys.executable, "-c", SERVE_SCRIPT, json.dumps(options), log_level]
        # The token it requires, if any, which active() sends (/metadata needs it then)
        cli_token = cli[cli.index("--auth-token") + 1] if cli and "--auth-token" in cli else None
        self.auth_token = options.get("auth_token") or cli_token or (os.environ if env is None else env).get(
            "CHATENV_AUTH_TOKEN") or None
        self.log_path = Path(logdir) / f"{name}.log"
        self._log = open(self.log_path, "w")
        def limit() -> None:  # in the child, before it runs Python
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, nofile if isinstance(nofile, tuple) else (nofile, nofile))
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        if self.chatenv_dir != ROOT:
            env = dict(os.environ if env is None else env, CHATENV_SOAK_BASELINE="1")
        self.proc = subprocess.Popen(argv, cwd=self.chatenv_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     preexec_fn=limit if nofile is not None or cpus is not None else None)
        deadline = time.monotonic() + 20
        while True:
            match = re.search(r"listening on http://(.+?):(\d+) ", self.output())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.output()}")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def cpu_s(self) -> float:
        """CPU seconds (user and system) the process has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def active(self) -> int:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(self.url + "/metadata")
        if self.auth_token:
            request.add_header("Authorization", f"Bearer {self.auth_token}")
        with opener.open(request, timeout=5) as response:
            return json.loads(response.read())["active_sessions"]

    def stop(self, signum=signal.SIGTERM, timeout=5.0) -> float | None:
        """Signal it and wait; seconds from signal to exit (None if it had to be killed)."""
        started = time.monotonic()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signum)
                self.proc.wait(timeout)
            return time.monotonic() - started
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def count_logged(log: str, what: str) -> int:
    """How many lines starting ``what`` a server logged, counting those it held back
    ("<what>: N more in the last 1.0 s, not logged one by one ...": a rate limit)."""
    held_back = [int(n) for n in re.findall(re.escape(what) + r": (\d+) more in the last ", log)]
    return log.count(what) - len(held_back) + sum(held_back)


OVERSIZE_CLIENT = """
import asyncio, sys
import websockets
from websockets.asyncio.client import connect

async def one(url):
    async with connect(url, max_size=None, open_timeout=10, close_timeout=10) as ws:
        try:
            await ws.send(b"x" * 20_000_000)
            await asyncio.wait_for(ws.recv(), 20)
            return "a reply"
        except websockets.ConnectionClosedError as exc:
            return f"ConnectionClosedError {exc.rcvd.code if exc.rcvd else None}"

for _ in range(int(sys.argv[2])):
    try:
        print(asyncio.run(one(sys.argv[1])), flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
"""


def state_of(session) -> dict:
    """A chatenv ``Session``'s state, as a "state" request answers it."""
    from chatenv import handle_frame  # the venvs' interpreters run this module without chatenv

    return handle_frame(session, '{"type":"state"}').json()["data"]


# ------------------------------------------------------------------------------
# Tokenizers for tests: slow on purpose
# ------------------------------------------------------------------------------


class StallingTokenizer:
    """Bytes in, bytes out; decoding an id 0 stalls (a server runs it in a worker thread)."""

    def __init__(self, stall_s):
        self.stall_s = stall_s

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        if 0 in ids:
            time.sleep(self.stall_s)
        return bytes(ids).decode("latin-1")


# ------------------------------------------------------------------------------
# Command line: venvs, where, serve-peer, openenv-clients, launcher-commands
# ------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tests/support.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("venvs", "where"):
        sub = commands.add_parser(name, help="create the venvs" if name == "venvs" else "print the interpreters")
        sub.add_argument("--release", choices=sorted(RELEASES), action="append")
    peer = commands.add_parser("serve-peer", help="serve the OpenEnv peer (in a venv)")
    peer.add_argument("--host", default="127.0.0.1")
    peer.add_argument("--port", type=int, default=0, help="port of the first server (others get free ones)")
    peer.add_argument("--server", action="append", default=[], help="JSON options of one more server")
    peer.add_argument("--chat-env", help="serve OpenEnv's own chat_env from this checkout directory instead")
    peer.add_argument("--log-level", default="warning")
    clients = commands.add_parser("openenv-clients", help="drive OpenEnv's clients by JSON lines (in a venv)")
    clients.add_argument("--scenario", help="a file of JSON requests (- for stdin); prints the answers as a list")
    launch = commands.add_parser("launcher-commands", help="print OpenEnv's launcher commands (in the 0.10.0 venv)")
    launch.add_argument("--root", default=str(ROOT))
    launch.add_argument("--port", type=int, default=8000)
    launch.add_argument("--app", default="chatenv:app")
    args = parser.parse_args(argv)

    if args.command == "venvs":
        for release in args.release or RELEASES:
            create_venv(release)
        return 0
    if args.command == "where":
        for release in args.release or RELEASES:
            print(f"{release} {venv_python(release)} {'ready' if venv_ready(release) else 'missing'}")
        return 0
    if args.command == "serve-peer":
        return _serve_peer_main(args)
    if args.command == "openenv-clients":
        return _openenv_clients_main(args)
    return _launcher_commands_main(args)


if __name__ == "__main__":
    sys.exit(main())
