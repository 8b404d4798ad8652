"""Tests for chatenv's pure and in-process tiers, in the module's order: models,
tokenizers, environment, protocol (pure), server (real sockets), clients, the Docker
launcher's checks that need no engine, command line.

The slower tiers have files of their own: test_reliability.py (bad input, faults,
load, who gets in), test_clients.py (clients against scripted servers and in
subprocesses), test_limits.py (memory bounds by RSS, configuration errors),
test_openenv.py (OpenEnv interoperability), test_docker.py (a real engine) and
test_scaling.py (workers, nginx, Kubernetes). Shared helpers are in helpers.py, fixtures in conftest.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

import chatenv
from chatenv import (
    AsyncChatEnv,
    ByteTokenizer,
    ChatAction,
    ChatEnv,
    ChatEnvError,
    ChatEnvironment,
    ChatObservation,
    ChatServer,
    ChatState,
    EpisodeLostError,
    Session,
    StepResult,
    handle_frame,
    serve_in_thread,
    tokens_to_list,
)
from chatenv import _AWAIT_CLOSE, _CONNECT, _RETURN, _SEND, _Closed, _ClientCore, _Unsolicited
from helpers import (
    CHAT_TEMPLATE,
    HERE,
    SHUTDOWN_S,
    SLACK,
    EncodeOnlyTokenizer,
    ask,
    free_port,
    http_get,
    http_post,
    new_session,
    raw,
    reply,
    server_frame,
    wait_until,
)
from support import StallingTokenizer

# Frames recorded from OpenEnv 0.10.0's own chat_env by record_openenv.py (test_openenv.py reads both releases)
TRANSCRIPTS = HERE / "tests" / "recordings" / "openenv-0.10.0.jsonl"


# ------------------------------------------------------------------------------
# The module: __all__ is what docs/api.md documents
# ------------------------------------------------------------------------------


def _readme_api_names() -> set[str]:
    """The names docs/api.md's API section lists (the backticked identifiers of its bullets)."""
    readme = (HERE / "docs" / "api.md").read_text()
    section = readme.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    bullets = section.split("\n\n")[1]  # the paragraph of bullets after the lead-in
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", bullets))


def test_all_is_what_the_readme_documents():
    """__all__ holds exactly what docs/api.md's API section lists, and each name exists."""
    listed = _readme_api_names()
    for name in chatenv.__all__:
        assert hasattr(chatenv, name), name
    assert len(set(chatenv.__all__)) == len(chatenv.__all__)
    # Every exported name is documented ...
    assert set(chatenv.__all__) <= listed, set(chatenv.__all__) - listed
    # ... and every documented name of the module (CamelCase classes, CONSTANTS, functions) is exported
    public = {name for name in listed if not name.startswith("_") and hasattr(chatenv, name)
              and not isinstance(getattr(chatenv, name), type(chatenv))}
    assert public == set(chatenv.__all__), public ^ set(chatenv.__all__)
    # Names that look like the module's own (ChatX, ALL_CAPS codes) must exist: a README typo fails
    for name in listed:
        if re.fullmatch(r"[A-Z][A-Z_]+|Chat\w+|\w+Error", name):
            assert hasattr(chatenv, name), f"docs/api.md documents chatenv.{name}, which does not exist"


def test_readme_examples_import_only_exported_names():
    readme = (HERE / "README.md").read_text()
    imported = set()
    for names in re.findall(r"^\s*from chatenv import ([\w, ]+)$", readme, re.M):
        imported |= {n.strip() for n in names.split(",")}
    assert imported and imported <= set(chatenv.__all__), imported - set(chatenv.__all__)
    star: dict[str, object] = {}
    exec("from chatenv import *", star)
    assert set(star) - {"__builtins__"} == set(chatenv.__all__)
    assert "app" not in star  # building it reads the environment and makes a server


# ------------------------------------------------------------------------------
# Models: the wire's dataclasses, their dicts and token normalising
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
# Tokenizers: the byte tokenizer, duck typing, a real Hugging Face one offline
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


def test_load_tokenizer_real_hf_folder_and_tokenizer_json(hf_tokenizer, hf_chat_tokenizer):
    import tokenizers
    import transformers

    from_folder = chatenv.load_tokenizer(str(hf_tokenizer))
    assert isinstance(from_folder, transformers.PreTrainedTokenizerBase)
    assert from_folder.chat_template is None  # none in its tokenizer_config.json
    from_file = chatenv.load_tokenizer(hf_tokenizer / "tokenizer.json")
    assert isinstance(from_file, tokenizers.Tokenizer)
    vocabulary = json.loads((hf_tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    assert from_file.get_vocab_size() == len(from_folder) == len(vocabulary)
    assert chatenv.load_tokenizer(str(hf_chat_tokenizer)).chat_template == CHAT_TEMPLATE


def test_metadata_names_a_loaded_tokenizer_as_a_user_would(hf_tokenizer, tmp_path):
    """/metadata's name: a path's last part, with the folder above a generic one, never a full
    path nor a class name (it named a tokenizer.json "Tokenizer", a folder called model "model")."""
    assert chatenv._tokenizer_name(chatenv.load_tokenizer(str(hf_tokenizer))) == "wordpiece"
    assert chatenv._tokenizer_name(chatenv.load_tokenizer(hf_tokenizer / "tokenizer.json")) == "wordpiece/tokenizer.json"
    renamed = tmp_path / "home" / "alice" / "my-org-model.json"
    renamed.parent.mkdir(parents=True)
    shutil.copy(hf_tokenizer / "tokenizer.json", renamed)
    assert chatenv._tokenizer_name(chatenv.load_tokenizer(renamed)) == "my-org-model.json"
    shutil.copytree(hf_tokenizer, tmp_path / "bert-tiny" / "model")
    assert chatenv._tokenizer_name(chatenv.load_tokenizer(str(tmp_path / "bert-tiny" / "model"))) == "bert-tiny/model"
    assert chatenv._tokenizer_name(chatenv.load_tokenizer("default")) == "chatenv/bytes"
    assert chatenv._tokenizer_name(EncodeOnlyTokenizer()) == "EncodeOnlyTokenizer"  # an object, nameless


def test_real_tokenizer_without_chat_template_falls_back_to_encode(hf_tokenizer):
    tok = chatenv.load_tokenizer(str(hf_tokenizer))
    message = {"role": "user", "content": "Hello World"}
    # transformers itself refuses the chat template path for this tokenizer
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(conversation=[message], tokenize=True)
    action = ChatEnv.message_to_action(message, tok)
    assert action.tokens == tok.encode("user: Hello World\n")
    assert tok.decode(action.tokens, skip_special_tokens=True) == "user : hello world"  # lower-cased, as BERT does
    assert ChatEnvironment(tok).message_to_action(message) == action

    tk = chatenv.load_tokenizer(hf_tokenizer / "tokenizer.json")  # tokenizers.Tokenizer: encode() -> Encoding
    action = AsyncChatEnv.message_to_action(message, tk)
    assert all(type(i) is int for i in action.tokens)
    assert tk.decode(action.tokens, skip_special_tokens=True) == "user : hello world"


def test_real_tokenizer_json_padding_and_truncation_do_not_leak_into_actions(hf_tokenizer):
    # the test tokenizer.json, like sentence-transformers' ones, pads every encoding to
    # 128 ids and cuts at 128: load_tokenizer turns both off, so an action holds the message's own ids
    tk = chatenv.load_tokenizer(hf_tokenizer / "tokenizer.json")
    pad_id = tk.token_to_id("[PAD]")
    action = ChatEnv.message_to_action({"role": "user", "content": "Hello World"}, tk)
    assert pad_id not in action.tokens
    same_vocab = chatenv.load_tokenizer(str(hf_tokenizer))  # transformers, which turns padding off
    assert action.tokens == same_vocab.encode("user: Hello World\n")
    long_text = " ".join(["hello"] * 200) + " goodbye"
    action = ChatEnv.message_to_action({"role": "user", "content": long_text}, tk)
    assert tk.decode(action.tokens, skip_special_tokens=True).endswith("hello goodbye")
    env = ChatEnvironment(tk, system_prompt="Be brief.")
    assert pad_id not in env.observation().tokens


def test_real_tokenizer_chat_template_batch_encoding_is_normalised(hf_chat_tokenizer):
    import numpy
    import transformers

    tok = chatenv.load_tokenizer(str(hf_chat_tokenizer))  # its template comes from tokenizer_config.json
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
def real_server(hf_chat_tokenizer):
    tok = chatenv.load_tokenizer(str(hf_chat_tokenizer))
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


def test_load_tokenizer_missing_library_is_a_clear_import_error(hf_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"'transformers' package.*pip install"):
        chatenv.load_tokenizer(str(hf_tokenizer))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"'tokenizers' package.*pip install"):
        chatenv.load_tokenizer(hf_tokenizer / "tokenizer.json")
    assert isinstance(chatenv.load_tokenizer("default"), ByteTokenizer)  # the embedded one needs neither


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
# Environment: reset, step, state, and the history's JSON
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
# Protocol: frames in, frames out, no sockets (pure)
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
    result = chatenv._capacity_reply(1, 1)
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
# Protocol: the wire history replies are sent from, and the environments sessions get
# ------------------------------------------------------------------------------

# The environment keeps its episode in a history it is given; the protocol's is JSON.
#
# ``ChatEnvironment`` writes its conversation into a history: its own Python lists
# (``_History``) by default, or, under a server's session, the ``_WireHistory`` the
# protocol sends its replies from. These tests pin that both give the same
# episode, that the wire history's bytes are exactly ``json.dumps`` of it, that
# its memory account is charged its exact size, and that a server makes each
# session's environment from explicit arguments (its system prompt tokenized once).


def _compact(value) -> bytes:
    """Compact JSON as UTF-8; text with no UTF-8 form (a lone surrogate) keeps its escapes."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


class TextTokenizer:
    """Ids are code points: decode() makes any text, quotes, controls and lone surrogates included."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))

    def encode(self, text):
        return [ord(c) for c in text]


_TRICKY = ['"', "\\", "\n\t\x00\x1f", "\u00e9\u2028\u2029", "\U0001f600", "\udc80", "</script>", "plain"]


def _episode(history=None, **options):
    """One episode stepped through the environment's public methods; its views."""
    env = ChatEnvironment(TextTokenizer(), history=history, **options)
    env.reset(episode_id="e")
    rng = random.Random(7)
    for text in _TRICKY + ["".join(rng.choice(_TRICKY) for _ in range(rng.randrange(1, 40))) for _ in range(20)]:
        env.append_tokens([[ord(c)] for c in text])  # nested: the public method normalises
    env.step(ChatAction([65, 66]))
    return env, (env.history_messages, env.history_tokens, env.observation(), env.state,
                 env.message_count, env.token_count, env.step_count)


@pytest.mark.parametrize("system_prompt", [None, 'Be "brief"\n\u00e9'])
def test_own_history_and_wire_history_hold_the_same_episode(system_prompt):
    _, plain = _episode(system_prompt=system_prompt)
    wire = chatenv._WireHistory()
    _, sent = _episode(wire, system_prompt=system_prompt)
    assert plain == sent
    messages, token_lists = plain[0], [list(ids) for ids in plain[1]]
    assert len(messages) == len(token_lists) == (23 if system_prompt else 22) + 7
    assert plain[3].history_tokens == token_lists and plain[6] == len(messages) - (1 if system_prompt else 0)


def test_wire_history_bytes_are_json_dumps_of_the_episode():
    wire = chatenv._WireHistory()
    env, (messages, token_lists, observation, *_) = _episode(wire, system_prompt="sys")
    assert bytes(wire.messages_json) == b",".join(map(_compact, messages))
    assert bytes(wire.tokens_json) == _compact(observation.tokens)[1:-1]
    assert wire.history_tokens_json() == _compact([list(ids) for ids in token_lists])[1:-1]
    assert wire.last() == (_compact(messages[-1]), b"65,66")
    assert (wire.messages(), wire.tokens(), wire.token_lists()) == (
        messages, observation.tokens, [list(ids) for ids in token_lists])
    assert b'"\\udc80"' in wire.messages_json  # a lone surrogate: no UTF-8 form, so its message keeps the escape
    assert wire.nbytes == len(wire.messages_json) + len(wire.tokens_json) + 16 * len(messages)


def test_protocol_replies_are_the_sessions_wire_history():
    session = Session(ChatEnvironment)  # made as make_env(history=session.history)
    reset = handle_frame(session, '{"type":"reset","data":{"episode_id":"e"}}').json()  # now: it holds live buffers
    assert isinstance(session.history, chatenv._WireHistory) and session.env.history_messages == []
    step = handle_frame(session, '{"type":"step","data":{"tokens":[72,105]}}')
    expected = {"messages": [{"role": "assistant", "content": "Hi"}], "tokens": [72, 105]}
    assert step.data == _compact({"type": "observation", "data": {"observation": {"metadata": {}, **expected},
                                                                   "reward": None, "done": False}})
    assert reset["data"]["observation"]["messages"] == []
    state = handle_frame(session, '{"type":"state"}')
    assert state.data == _compact({"type": "state", "data": {
        "episode_id": "e", "step_count": 1, "history_messages": expected["messages"], "history_tokens": [[72, 105]]}})


def test_append_ids_takes_flat_ids_and_failures_change_nothing():
    for history in (None, chatenv._WireHistory()):
        env = ChatEnvironment(max_episode_tokens=4, history=history)
        env.reset(episode_id="e")
        assert env.append_ids([72, 105]) == {"role": "assistant", "content": "Hi"}
        before = (env.state, env.observation(), env.message_count, env.token_count)
        for bad in ([72, 4000], [65, 65, 65]):  # the tokenizer refuses an id; the episode would pass 4 tokens
            with pytest.raises(ValueError):
                env.append_ids(bad)
            assert (env.state, env.observation(), env.message_count, env.token_count) == before
        with pytest.raises(ValueError):
            env.append_tokens([True])  # append_tokens checks; append_ids trusts its caller
        assert env.state == before[0]


def test_opening_message_json_is_right_for_every_server_and_role():
    """The wire history writes a server's system message once; servers, prompts and roles never mix."""
    servers = [ChatServer(system_prompt=p, system_role=r) for p, r in
               (("A", "system"), ("B", "system"), ("A", "developer"), ("A", "system"))]
    sessions = [server._new_session() for server in servers for _ in range(2)]
    for _ in range(2):
        for session in sessions:
            frame = handle_frame(session, '{"type":"reset"}').json()
            server = session.server
            message = {"role": server.system_role, "content": server.system_prompt}
            assert frame["data"]["observation"]["messages"] == [message]
            assert frame["data"]["observation"]["tokens"] == chatenv.message_to_action(message, server.tokenizer).tokens


def test_sessions_environments_come_from_the_servers_arguments_tokenized_once():
    class CountingTokenizer(chatenv.ByteTokenizer):
        calls = 0

        def apply_chat_template(self, conversation, tokenize=True, **kwargs):
            CountingTokenizer.calls += 1
            return super().apply_chat_template(conversation, tokenize=tokenize, **kwargs)

    tokenizer = CountingTokenizer()
    server = ChatServer(tokenizer, system_prompt="Be brief.", system_role="developer", max_episode_tokens=40)
    assert CountingTokenizer.calls == 1
    sessions = [server._new_session() for _ in range(3)]
    envs = [session.env for session in sessions]
    for session in sessions:
        handle_frame(session, '{"type":"reset"}')
    assert CountingTokenizer.calls == 1  # the prompt is tokenized once, for every session
    assert len({id(env) for env in envs}) == len({id(s.history) for s in sessions}) == 3
    for env in envs:
        assert env.tokenizer is tokenizer and (env.system_prompt, env.system_role) == ("Be brief.", "developer")
        assert env.max_episode_tokens == 40
    handle_frame(sessions[0], '{"type":"step","data":{"tokens":[72,105]}}')
    assert [env.message_count for env in envs] == [2, 1, 1]  # each its own episode


def test_wire_history_charges_its_account_exactly_and_a_refusal_changes_nothing():
    server = ChatServer(system_prompt="Be brief.", max_memory_bytes=chatenv._SESSION_OVERHEAD_BYTES + 600)
    session = server._new_session()
    overhead = chatenv._SESSION_OVERHEAD_BYTES
    assert server.memory_used == overhead + server._empty_episode_bytes  # reserved before the env exists
    handle_frame(session, '{"type":"reset"}')
    assert server.memory_used == overhead + session.history.nbytes == overhead + server._empty_episode_bytes
    steps = 0
    while True:
        reply = handle_frame(session, '{"type":"step","data":{"tokens":[72,105,33]}}').json()
        assert server.memory_used == overhead + session.history.nbytes <= server.max_memory_bytes
        if reply["type"] == "error":
            break
        steps += 1
    assert reply["data"]["code"] == "EXECUTION_ERROR" and "--max-memory-bytes" in reply["data"]["message"]
    assert steps > 5 and session.env.step_count == steps and session.history.message_count == steps + 1
    handle_frame(session, '{"type":"reset"}')
    assert server.memory_used == overhead + server._empty_episode_bytes
    server._free_session(session)
    server._free_session(session)  # twice: nothing given back twice
    assert server.memory_used == 0


def test_a_factory_that_takes_no_history_still_makes_sessions_replying_from_the_wire_history():
    """``Session(lambda: ChatEnvironment(...))``, as code written before ``history=`` has it."""
    for make, first in ((lambda: ChatEnvironment(), []),
                        (lambda: ChatEnvironment(system_prompt="Be brief."), [{"role": "system", "content": "Be brief."}])):
        session = Session(make)
        assert reply(session, {"type": "reset"})["data"]["observation"]["messages"] == first
        observation = reply(session, {"type": "step", "data": {"tokens": [72, 105]}})["data"]["observation"]
        assert observation["messages"] == first + [{"role": "assistant", "content": "Hi"}]
        assert isinstance(session.history, chatenv._WireHistory) and session.env._history is session.history
        assert json.loads(b"[" + session.history.messages_json + b"]") == observation["messages"]
        state = reply(session, {"type": "state"})["data"]
        assert state["step_count"] == 1 and state["history_messages"] == observation["messages"]


def test_a_session_that_cannot_make_its_environment_is_a_session_error_on_every_frame():
    def broken(history):
        raise RuntimeError("boom")

    for frame in ('{"type":"reset"}', '{"type":"step","data":{"tokens":[72]}}', '{"type":"state"}'):
        reply = handle_frame(Session(broken), frame)
        assert reply.close and reply.json()["data"]["code"] == "SESSION_ERROR", frame


def test_own_history_holds_any_id_a_tokenizer_decodes():
    """Its ids live in a 32-bit array; an id past that moves them to a list, nothing lost."""
    env = ChatEnvironment(TextTokenizer())
    env.reset()
    env.step(ChatAction([72, 105]))
    with pytest.raises(ValueError):  # chr() refuses it: the step fails, nothing changes
        env.step(ChatAction([0x110000]))
    assert (env.token_count, env.message_count, env.history_tokens) == (2, 1, [(72, 105)])

    class WideTokenizer(TextTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            return ",".join(map(str, ids))

    wide = ChatEnvironment(WideTokenizer())
    wide.reset()
    for ids in ([1, 2], [2**40, 3], [2**70], [4]):
        wide.step(ChatAction(ids))
    assert wide.history_tokens == [(1, 2), (2**40, 3), (2**70,), (4,)]
    assert wide.observation().tokens == [1, 2, 2**40, 3, 2**70, 4] and wide.token_count == 6
    assert wide.state.history_messages[-2] == {"role": "assistant", "content": str(2**70)}


# ------------------------------------------------------------------------------
# Server: websockets reached through its documented API only
# ------------------------------------------------------------------------------

# What chatenv may import from websockets: each documented in websockets' API reference
# (Sans-I/O server and client, asyncio client, data structures, extensions, exceptions)
WEBSOCKETS_IMPORTS = {
    "websockets.server.ServerProtocol",
    "websockets.client.ClientProtocol",
    "websockets.protocol.State",
    "websockets.frames.Opcode",
    "websockets.frames.Frame",
    "websockets.frames.Close",
    "websockets.datastructures.Headers",
    "websockets.http11.Request",
    "websockets.http11.Response",
    "websockets.uri.parse_uri",
    "websockets.exceptions.ConnectionClosed",
    "websockets.asyncio.client.connect",
    "websockets.extensions.permessage_deflate",
    "websockets.extensions.permessage_deflate.ServerPerMessageDeflateFactory",
    "websockets.extensions.permessage_deflate.ClientPerMessageDeflateFactory",
}

# The attributes chatenv may use on websockets' objects, each documented: the Sans-I/O
# protocols, the asyncio connection, Frame, Close, Request, Response, Headers (a mutable
# mapping), WebSocketURI, ConnectionClosed and InvalidStatus, the State and Opcode members
WEBSOCKETS_ATTRIBUTES = {
    # Sans-I/O protocol
    "receive_data", "receive_eof", "events_received", "data_to_send", "send_continuation", "send_text",
    "send_binary", "send_close", "send_ping", "send_pong", "fail", "close_expected", "accept", "reject",
    "send_response", "connect", "send_request", "state", "close_code", "close_reason", "close_exc",
    "handshake_exc", "id", "logger",
    # asyncio connection
    "recv", "recv_streaming", "send", "close", "wait_closed", "ping", "pong", "latency", "local_address",
    "remote_address", "request", "response", "subprotocol",
    # data structures and exceptions
    "opcode", "data", "fin", "rsv1", "rsv2", "rsv3", "code", "reason", "path", "headers", "status_code",
    "reason_phrase", "body", "get_all", "raw_items", "get", "items", "keys", "values", "host", "port",
    "secure", "resource_name", "user_info", "rcvd", "sent", "rcvd_then_sent",
    "CONNECTING", "OPEN", "CLOSING", "CLOSED", "CONT", "TEXT", "BINARY", "CLOSE", "PING", "PONG",
}

# Names chatenv gives the websockets objects it holds: an attribute of one that chatenv
# also defines on its own objects (``transport``, say) is checked on these
WEBSOCKETS_HOLDERS = {"proto", "protocol", "ws", "_ws", "request", "response", "event", "connection"}


def _websockets_attribute_names() -> set[str]:
    """Every attribute name websockets' modules, classes and instances define, documented or not."""
    import ast
    import importlib

    names: set[str] = set()
    for module_name in ("protocol", "server", "client", "frames", "http11", "datastructures", "uri", "exceptions",
                        "asyncio.connection", "asyncio.client", "asyncio.messages", "extensions.permessage_deflate"):
        module = importlib.import_module(f"websockets.{module_name}")
        names.update(name for name, value in vars(module).items()
                     if (getattr(value, "__module__", None) or "").startswith("websockets"))
        for value in vars(module).values():
            if isinstance(value, type) and (value.__module__ or "").startswith("websockets"):
                names.update(name for klass in value.__mro__ if (klass.__module__ or "").startswith("websockets")
                             for name in vars(klass))
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)  # self.x = ...: instance attributes
    return names


def test_the_module_reaches_websockets_only_through_documented_names():
    """chatenv's source, parsed: every import from websockets, every attribute of a websockets
    module or of an object chatenv holds from websockets, every getattr() and every subclass
    is in the documented lists above, so a new internal fails here before a release breaks it."""
    import ast

    tree = ast.parse((HERE / "chatenv.py").read_text())
    documented = WEBSOCKETS_ATTRIBUTES
    undocumented = _websockets_attribute_names() - documented
    own = {node.attr for node in ast.walk(tree)  # the attributes chatenv sets on its own objects
           if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)}
    own |= {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    generic = set().union(*map(dir, (dict, set, list, bytearray, str, Exception, asyncio.Future, logging.Logger,
                                     json, collections.deque)))  # names any object may have
    stdlib = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
              for alias in node.names if not alias.name.startswith("websockets")}  # other modules' names
    modules: set[str] = set()  # local names bound to websockets modules
    imported: set[str] = set()  # local names bound to anything from websockets
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {alias.name}" for alias in node.names if alias.name.startswith("websockets")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("websockets"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                imported.add(alias.asname or alias.name)
                if name not in WEBSOCKETS_IMPORTS:
                    found.append(f"from {node.module} import {alias.name}")
                if name == "websockets.extensions.permessage_deflate":
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver = node.value
            holder = getattr(receiver, "id", None)  # a name, or self's attribute
            if isinstance(receiver, ast.Attribute) and getattr(receiver.value, "id", None) == "self":
                holder = receiver.attr
            if node.attr.startswith("__"):
                continue
            if holder in modules:
                if f"websockets.extensions.permessage_deflate.{node.attr}" not in WEBSOCKETS_IMPORTS:
                    found.append(f"{holder}.{node.attr}")
            elif holder in WEBSOCKETS_HOLDERS | imported:  # a websockets object: documented names only
                if node.attr not in documented:
                    found.append(f"{ast.unparse(receiver)}.{node.attr}")
            elif node.attr in undocumented - generic and node.attr not in own and holder not in stdlib:
                found.append(f"{ast.unparse(receiver)}.{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            target = node.args[0] if node.args else None
            name = node.args[1] if len(node.args) > 1 else None
            holder = ast.unparse(target).removeprefix("self.")
            if holder in modules or (holder in WEBSOCKETS_HOLDERS and not isinstance(name, ast.Constant)):
                found.append(ast.unparse(node))
            elif not isinstance(name, ast.Constant) or str(name.value).startswith("__"):
                continue
            elif name.value in undocumented and (name.value not in own or holder in WEBSOCKETS_HOLDERS):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.ClassDef):
            found += [f"class {node.name}({ast.unparse(base)})" for base in node.bases
                      if getattr(base, "id", None) in imported]
    assert found == [], found
    # the lists say what they cover: each documented import is a name websockets has
    import importlib

    for name in WEBSOCKETS_IMPORTS:
        module, _, attribute = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attribute), name


def test_the_names_check_catches_an_internal(tmp_path, monkeypatch):
    """The check above, on sources that each reach one internal: it fails on every one."""
    for line in ("x = proto.state", "x = ws.transport", "x = self.proto.parser_exc",
                 "from websockets.utils import apply_mask", "x = getattr(proto, 'reader')",
                 "class C(ClientConnection): pass\nfrom websockets.asyncio.client import ClientConnection",
                 "x = ws.recv_messages.frames", "from websockets.extensions import permessage_deflate\n"
                 "x = permessage_deflate.enable_server_permessage_deflate(None)"):
        (tmp_path / "chatenv.py").write_text(line + "\n")
        monkeypatch.setattr(sys.modules[__name__], "HERE", tmp_path)
        if line == "x = proto.state":
            test_the_module_reaches_websockets_only_through_documented_names()  # documented: passes
            continue
        with pytest.raises(AssertionError):
            test_the_module_reaches_websockets_only_through_documented_names()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))


# ------------------------------------------------------------------------------
# Server: a real server on a loopback port, raw websockets frames, ASGI, signals
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
    with serve_in_thread(max_sessions=2, max_named_sessions=2) as url:  # named ones may take every slot
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
    stall_s = 1.5  # the slow step: the fast ones must all be answered well before it ends

    class SlowTokenizer(EncodeOnlyTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            if ids[0] == 0:
                time.sleep(stall_s)
            return bytes(ids).decode("latin-1")

    with serve_in_thread(SlowTokenizer(), ping_interval_s=0.2, ping_timeout_s=0.5) as url:
        with raw(url) as slow, raw(url) as fast:
            slow.send(json.dumps({"type": "step", "data": {"tokens": [0]}}))
            started = time.monotonic()
            for _ in range(5):
                assert ask(fast, {"type": "step", "data": {"tokens": [72]}})["type"] == "observation"
            assert time.monotonic() - started < stall_s - 0.5  # answered while the slow step runs
            assert json.loads(slow.recv(timeout=5))["type"] == "observation"


def test_server_logs_one_line_per_session_and_no_traceback(server, caplog):
    caplog.set_level("INFO", logger="chatenv")
    ws = raw(server, ping_interval=None)
    ask(ws, {"type": "reset"})
    ws.socket.shutdown(socket.SHUT_RDWR)  # vanish without a close frame (before websockets 17, close()
    ws.socket.close()  # alone leaves the FIN to the reader thread blocked in recv())
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


def test_access_refusal_is_one_pure_decision_host_then_origin_then_token():
    """chatenv._access_refusal from plain values, no server: what every request on both
    transports is asked before it is read."""
    from websockets.datastructures import Headers

    def decide(method, path, upgrade=False, token="s3cret", **headers):
        return chatenv._access_refusal(method, path, upgrade, Headers(list(headers.items())), token=token,
                                       loopback=True, allow_origins=frozenset(), allow_hosts=frozenset())

    good = {"Authorization": "Bearer s3cret"}
    for method in ("GET", "HEAD"):  # the probes: open without the token
        assert decide(method, "/health", Host="127.0.0.1") is None
        assert decide(method, "/health?probe=1") is None
    for method, path, upgrade in (("POST", "/health", False), ("GET", "/metadata", False), ("POST", "/mcp", False),
                                  ("GET", "/ws", True), ("GET", "/ws?session_id=x", True), ("GET", "/health", True),
                                  ("GET", "/nope", False), ("OPTIONS", "/step", False)):
        assert decide(method, path, upgrade) == (
            401, "Unauthorized: a valid 'Authorization: Bearer' token is required\n", {"WWW-Authenticate": "Bearer"})
        assert decide(method, path, upgrade, **good) is None
        assert decide(method, path, upgrade, token=None) is None  # no token set: nothing to check
    # Host, then Origin, then the token: a page's request gets 403 whatever it sends
    rebound = decide("POST", "/step", Host="rebound.example", Origin="https://evil.example")
    assert rebound[0] == 403 and "--allow-host" in rebound[1] and rebound[2] == {}
    foreign = decide("POST", "/step", Origin="https://evil.example")
    assert foreign[0] == 403 and "--allow-origin" in foreign[1]
    assert decide("POST", "/step", Origin="https://evil.example", **good)[0] == 403
    assert decide("GET", "/metadata", Origin="https://evil.example", **good) is None  # a read: Origin is not asked
    assert decide("GET", "/ws", True, Origin="https://evil.example", **good)[0] == 403  # a session is


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


def _stop_cli(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=5)


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
        assert time.monotonic() - started < SHUTDOWN_S * SLACK
        for ws in sessions:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=2)
            assert ws.close_code == 1012  # OpenEnv 0.10's (uvicorn's) shutdown code
        output = proc.stdout.read()
        assert "Traceback" not in output and "session closed" in output
    finally:
        _stop_cli(proc)


# ------------------------------------------------------------------------------
# Clients: the core's decisions, pure (a shell's reports in, the plan's actions out)
# ------------------------------------------------------------------------------

# The client core's decisions, pure: no sockets, no server.
#
# Each test plays a shell: it starts a call, reports what a connection would have
# done (a reply, an error frame, a close, a timeout) and asserts the action the
# plan answers with, the error it raises and what the session becomes.


OBSERVATION = json.dumps({"type": "observation", "data": {
    "observation": {"messages": [{"role": "assistant", "content": "Hi"}], "tokens": [72, 105]},
    "reward": None, "done": False}}).encode()
STATE = json.dumps({"type": "state", "data": {
    "episode_id": "e", "step_count": 1, "history_messages": [], "history_tokens": []}})


def error_frame(code: str, message: str = "no") -> bytes:
    return json.dumps({"type": "error", "data": {"code": code, "message": message}}).encode()


def core_of(urls="http://h:1", **options) -> _ClientCore:
    return _ClientCore(urls, **options)


def reset_call(core, connected=True):
    call = core.call(core.parse_result, new_episode=True)
    return call, call.start(connected)


def step_call(core, connected=True):
    call = core.call(core.parse_result, new_episode=False)
    return call, call.start(connected)


def lose_session(core):
    """A step whose connection the server closed: the episode is lost."""
    call, _ = step_call(core)
    with pytest.raises(EpisodeLostError):
        call.on_failure(_Closed(1001, "bye"))


# Replies


def test_a_call_sends_on_the_connection_it_has_or_connects_first():
    core = core_of()
    assert step_call(core, connected=True)[1] is _SEND
    assert step_call(core, connected=False)[1] is _CONNECT


def test_a_reply_returns_parsed_and_a_reset_makes_a_lost_session_usable():
    core = core_of(delta=False)
    lose_session(core)
    call, action = reset_call(core)
    assert action is _SEND and call.on_reply(OBSERVATION) is _RETURN
    assert call.result.observation.tokens == [72, 105]
    assert core.lost is None
    call, _ = step_call(core)  # no longer refused before it starts
    state_call = core.call(core.parse_state, new_episode=False)
    assert state_call.start(True) is _SEND and state_call.on_reply(STATE) is _RETURN
    assert state_call.result.episode_id == "e"


def test_an_error_frame_the_server_keeps_the_session_after_is_raised_and_the_session_stays():
    core = core_of()
    call, _ = step_call(core)
    with pytest.raises(ChatEnvError) as info:
        call.on_reply(error_frame(chatenv.VALIDATION_ERROR, "tokens must be ints"))
    assert info.value.code == chatenv.VALIDATION_ERROR and info.value.message == "tokens must be ints"
    assert core.lost is None
    call, _ = step_call(core)
    with pytest.raises(ChatEnvError) as info:
        call.on_reply(b"not json")
    assert info.value.code == chatenv.PROTOCOL_ERROR and core.lost is None


def test_a_lost_session_refuses_steps_and_states_before_any_io_but_not_resets():
    core = core_of()
    lose_session(core)
    for parse in (core.parse_result, core.parse_state):
        with pytest.raises(EpisodeLostError, match="call reset"):
            core.call(parse, new_episode=False)
    assert reset_call(core)[1] is _SEND


def test_close_loses_the_session_with_no_close_code():
    core = core_of()
    core.close()
    with pytest.raises(EpisodeLostError, match=r"close\(\) ended it") as info:
        core.call(core.parse_result, new_episode=False)
    assert info.value.close_code is None


# Refusals: error frames the server closes after


def test_session_error_awaits_the_close_then_loses_the_session_naming_both():
    core = core_of()
    call, _ = step_call(core)
    assert call.on_reply(error_frame(chatenv.SESSION_ERROR, "broken")) is _AWAIT_CLOSE
    with pytest.raises(ChatEnvError) as info:
        call.on_refusal_close(_Closed(1008, "policy"))
    assert info.value.code == chatenv.SESSION_ERROR
    why, code = core.lost
    assert code == 1008 and "1008" in why and "after SESSION_ERROR: 'broken'" in why
    with pytest.raises(EpisodeLostError) as lost:
        core.call(core.parse_result, new_episode=False)
    assert lost.value.close_code == 1008


def test_a_refusal_whose_close_never_came_is_lost_without_a_code():
    core = core_of()
    call, _ = step_call(core)
    assert call.on_reply(error_frame(chatenv.SESSION_ERROR)) is _AWAIT_CLOSE
    with pytest.raises(ChatEnvError):
        call.on_refusal_close(None)
    why, code = core.lost
    assert code is None and why.startswith("the server sent SESSION_ERROR") and why.endswith("closed the session")


def test_capacity_on_a_step_is_raised_and_loses_the_session():
    core = core_of()
    call, _ = step_call(core)
    assert call.on_reply(error_frame(chatenv.CAPACITY_REACHED)) is _AWAIT_CLOSE
    with pytest.raises(ChatEnvError) as info:
        call.on_refusal_close(_Closed(1013, ""))
    assert info.value.code == chatenv.CAPACITY_REACHED and core.lost[1] == 1013


def test_a_reset_refused_for_room_tries_each_server_once_then_raises_capacity():
    urls = ["http://a:1", "http://b:1", "http://c:1"]
    core = core_of(urls)
    call, action = reset_call(core, connected=False)
    tried = []
    while True:
        assert action is _CONNECT
        try:
            ws_url, wait_s = call.next_server()
        except ChatEnvError as exc:  # a round with no room and no capacity_wait_s: no more rounds
            assert exc.code == chatenv.CAPACITY_REACHED and exc.message == ws_url
            break
        assert wait_s == 0.0
        tried.append(ws_url)
        assert core.ws_url == ws_url  # the server in use, for messages and base_url
        assert call.on_connect() is _SEND
        assert call.on_reply(error_frame(chatenv.CAPACITY_REACHED, ws_url)) is _AWAIT_CLOSE
        action = call.on_refusal_close(_Closed(1013, ""))
    assert sorted(tried) == sorted(chatenv._ws_url(u) for u in urls)
    assert core.lost is None  # a full server is no lost episode


def test_with_capacity_wait_a_full_round_is_followed_by_a_backed_off_one():
    core = core_of(["http://a:1", "http://b:1"], capacity_wait_s=30)
    call, _ = reset_call(core, connected=False)
    waits = []
    for _ in range(6):  # three rounds of two servers
        _, wait_s = call.next_server()
        waits.append(wait_s)
        call.on_connect()
        assert call.on_reply(error_frame(chatenv.CAPACITY_REACHED)) is _AWAIT_CLOSE
        assert call.on_refusal_close(_Closed(1013, "")) is _CONNECT
    first, second = chatenv._BACKOFF_S[0], 2 * chatenv._BACKOFF_S[0]
    assert waits[0] == waits[1] == waits[3] == waits[5] == 0.0  # within a round: no pause
    assert first / 2 <= waits[2] <= first and second / 2 <= waits[4] <= second  # jittered, doubling


def test_a_refusal_sent_before_the_reply_is_a_refusal_not_a_protocol_error():
    core = core_of()
    call, _ = step_call(core)
    with pytest.raises(ChatEnvError) as info:
        call.on_failure(_Unsolicited(error_frame(chatenv.SESSION_ERROR, "idle")))
    assert info.value.code == chatenv.SESSION_ERROR and core.lost[1] is None
    call, _ = step_call(core_of())
    closed = _Closed(1001, "going away", leftover=error_frame(chatenv.SESSION_ERROR, "idle"))
    with pytest.raises(ChatEnvError) as info:
        call.on_failure(closed)
    assert info.value.code == chatenv.SESSION_ERROR and call.core.lost[1] == 1001


def test_a_frame_no_request_asked_for_is_a_protocol_error_and_loses_the_session():
    core = core_of()
    call, _ = step_call(core)
    with pytest.raises(ChatEnvError, match="no request asked for") as info:
        call.on_failure(_Unsolicited(OBSERVATION))
    assert info.value.code == chatenv.PROTOCOL_ERROR
    assert core.lost == ("the server sent a frame no request asked for", None)


# Closes before the reply


def test_a_reset_on_a_reused_connection_the_server_closed_is_sent_again_once_anew():
    core = core_of()
    call, _ = reset_call(core, connected=True)
    assert call.on_failure(_Closed(1001, "idle")) is _CONNECT
    assert core.lost is None  # nothing is lost yet: the reset goes again
    call.next_server()
    assert call.on_connect() is _SEND
    assert call.on_failure(_Closed(1012, "restart")) is _CONNECT  # the new one closed too: the next server
    assert core.lost[1] == 1012
    with pytest.raises(EpisodeLostError, match="1012") as info:  # one server, and it closed: that error
        call.next_server()
    assert info.value.close_code == 1012


def test_a_step_whose_connection_the_server_closed_loses_the_episode():
    core = core_of()
    call, _ = step_call(core)
    with pytest.raises(EpisodeLostError, match=r"going away") as info:
        call.on_failure(_Closed(1001, ""))
    assert info.value.close_code == 1001 and core.lost[1] == 1001
    call, _ = step_call(core_of())
    with pytest.raises(EpisodeLostError, match="without a close frame") as info:
        call.on_failure(_Closed(1006))
    assert info.value.close_code == 1006


@pytest.mark.parametrize("code", sorted(chatenv._BROKEN_CODES))
def test_this_client_closing_for_a_broken_frame_is_a_protocol_error(code):
    core = core_of()
    call, _ = reset_call(core)  # even a reset is not retried: the server broke the protocol
    with pytest.raises(ChatEnvError, match="broke the WebSocket protocol: bad frame") as info:
        call.on_failure(_Closed(code, "bad frame", ours=True))
    assert info.value.code == chatenv.PROTOCOL_ERROR and core.lost[1] == code


def test_this_client_closing_for_a_limit_loses_the_episode_even_on_a_reset():
    core = core_of()
    call, _ = reset_call(core)
    with pytest.raises(EpisodeLostError, match="this client closed the connection with 1009") as info:
        call.on_failure(_Closed(1009, "too big", ours=True))
    assert info.value.close_code == 1009


# Timeouts and interruptions


def test_a_timeout_closes_and_loses_the_session_and_says_which_option():
    core = core_of(message_timeout_s=7)
    call, _ = step_call(core)
    with pytest.raises(TimeoutError, match="message_timeout_s=7 s"):
        call.on_failure(TimeoutError())
    assert core.lost == ("no reply within message_timeout_s=7 s", None)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interruption_is_raised_as_it_is_and_loses_the_session(interruption):
    core = core_of()
    call, _ = reset_call(core)
    exc = interruption("stop")
    with pytest.raises(interruption) as info:
        call.on_failure(exc)
    assert info.value is exc
    assert core.lost == (f"a call was interrupted by {interruption.__name__} between its request and its reply",
                         None)


# Connecting


def test_servers_that_refuse_connections_are_each_tried_once_then_named_together():
    core = core_of(["http://a:1", "http://b:1"])
    call, _ = reset_call(core, connected=False)
    for _ in range(2):
        ws_url, _ = call.next_server()
        assert call.on_connect_error(ConnectionError(f"cannot connect to {ws_url}")) is _CONNECT
    with pytest.raises(ConnectionError, match=r"ws://(a|b):1/ws; cannot connect to ws://(a|b):1/ws"):
        call.next_server()
    one = core_of("http://a:1")
    call, _ = reset_call(one, connected=False)
    call.next_server()
    error = ConnectionError("refused")
    call.on_connect_error(error)
    with pytest.raises(ConnectionError) as info:
        call.next_server()
    assert info.value is error  # one server: its own error, as it was


def test_new_sessions_rotate_over_the_servers():
    core = core_of(["http://a:1", "http://b:1", "http://c:1"])
    firsts = []
    for _ in range(3):
        call, _ = reset_call(core, connected=False)
        firsts.append(call.next_server()[0])
    assert sorted(firsts) == ["ws://a:1/ws", "ws://b:1/ws", "ws://c:1/ws"]


# How a close reads


def test_the_core_reads_a_close_from_websockets_close_frames():
    core = core_of(max_message_bytes=100, ping_timeout_s=3)
    theirs = core.closed(Close(1001, "bye"), Close(1001, "bye"), True, b"x")
    assert (theirs.code, theirs.reason, theirs.ours, theirs.leftover) == (1001, "bye", False, b"x")
    ours_first = core.closed(Close(1000, ""), Close(1002, "bad"), False, None)
    assert (ours_first.code, ours_first.ours) == (1002, True)
    too_big = core.closed(None, Close(1009, "over"), None, None)
    assert too_big.ours and too_big.reason == "the server's reply is over this client's max_message_bytes=100 (over)"
    keepalive = core.closed(None, Close(1011, "keepalive ping timeout"), None, None)
    assert keepalive.reason == "keepalive: no pong within ping_timeout_s=3 s"
    other = core.closed(None, Close(1011, "internal"), None, None)
    assert other.reason == "internal"
    neither = core.closed(None, None, None, None)
    assert (neither.code, neither.ours) == (1006, False)


# The options, listed once


def test_the_options_are_the_cores_keyword_only_ones_shown_on_both_clients():
    core_params = list(inspect.signature(_ClientCore).parameters.values())
    names = [p.name for p in core_params[1:]]
    assert len(names) == 9 and all(p.kind is p.KEYWORD_ONLY for p in core_params[1:])
    for client in (chatenv.ChatEnv, chatenv.AsyncChatEnv):
        assert list(inspect.signature(client).parameters.values()) == core_params
        entries = dict(re.findall(r"^    (\w+): (.*?)(?=^    \w+: |\Z)", inspect.cleandoc(client.__init__.__doc__),
                                  re.M | re.S))
        assert list(entries) == ["base_url"] + names  # each option documented, in the signature's order
        for name in names:
            if name.endswith("_s"):  # the timeouts (and capacity_wait_s, ping_interval_s)
                assert "None disables" in " ".join(entries[name].split()), name
        with pytest.raises(TypeError, match="not_an_option"):
            client("http://h:1", not_an_option=1)


# ------------------------------------------------------------------------------
# Clients: ChatEnv and AsyncChatEnv, on chatenv's server and scripted ones, under faults
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
                        conn.sendall(server_frame(json.dumps(reply).encode()))
                proto.data_to_send()  # pongs are generated here: withhold them

    def close(self) -> None:
        self.listener.close()


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
        env.pause(stall_s)  # the stalled reply is now sent: a kept socket would hold it
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
    connect_timeout_s = 2
    try:
        env = make_client(url, connect_timeout_s=connect_timeout_s)
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
    assert time.monotonic() - started < connect_timeout_s  # nothing hung: no connect timeout waited out
    with serve_in_thread(port=port) as again:
        result = env.reset()
        assert result.observation.messages == [] and again.server.active_sessions == 1
        assert env.step([72, 105]).observation.messages == [{"role": "assistant", "content": "Hi"}]
        assert env.state().step_count == 1


def test_client_cli_server_killed_mid_episode_then_back_on_its_port(make_client):
    proc, url = _start_cli("--system-prompt", "Be brief.")
    port = int(url.rsplit(":", 1)[1])
    connect_timeout_s = 2
    try:
        env = make_client(url, connect_timeout_s=connect_timeout_s)
        env.reset()
        env.step([72, 105])
        proc.kill()  # no close frame: the process is gone
        proc.wait(5)
        started = time.monotonic()
        with pytest.raises(EpisodeLostError):
            env.step([33])
        with pytest.raises(EpisodeLostError):
            env.state()
        assert time.monotonic() - started < connect_timeout_s  # lost at once, no connect timeout waited out
        _stop_cli(proc)
        proc, url = _start_cli("--system-prompt", "Be brief.", port=port)
        result = env.reset()
        assert result.observation.messages == [{"role": "system", "content": "Be brief."}]
        assert env.step([72, 105]).observation.messages[-1] == {"role": "assistant", "content": "Hi"}
    finally:
        _stop_cli(proc)


def test_client_connection_refused_is_a_clear_connection_error(make_client):
    port = free_port()  # nothing listens there
    connect_timeout_s = 2
    env = make_client(f"http://127.0.0.1:{port}", connect_timeout_s=connect_timeout_s)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot connect to ws://127.0.0.1:{port}/ws") as info:
        env.reset()
    assert time.monotonic() - started < connect_timeout_s  # refused at once, not timed out
    assert not isinstance(info.value, EpisodeLostError)
    with pytest.raises(ConnectionError):
        with make_client(f"127.0.0.1:{port}", connect_timeout_s=2):
            pass


def test_client_handshake_never_answered_is_a_connection_error_within_the_connect_timeout(make_client):
    with socket.create_server(("127.0.0.1", 0)) as listener:  # TCP accepted by the kernel, then silence
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        connect_timeout_s = 0.5
        env = make_client(url, connect_timeout_s=connect_timeout_s)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="handshake"):
            env.reset()
        assert connect_timeout_s - 0.1 <= time.monotonic() - started < SLACK * connect_timeout_s


def test_client_keepalive_can_be_switched_off(make_client):
    # pings on, against a server that never answers them: the client drops the session
    on = PonglessServer()
    try:
        env = make_client(on.url, ping_interval_s=0.1, ping_timeout_s=0.2)
        env.reset()
        env.pause(1.0)
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
        env.pause(1.0)
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
            refused.pause(0.2)  # the refusal and the close have both arrived
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


# ------------------------------------------------------------------------------
# Docker: the launcher's errors that need no engine (the rest: test_docker.py)
# ------------------------------------------------------------------------------


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


def test_docker_bad_volume_gives_clear_error(tmp_path):
    """A volume is checked before `docker run` (here a stand-in that would fail otherwise)."""
    for volumes, match in (({str(tmp_path / "missing"): "/hooks"}, "does not exist on this host"),
                           ({str(tmp_path): "hooks"}, "container path must be absolute"),
                           ({str(tmp_path): "/hooks:rw"}, "neither may hold ':'")):
        with pytest.raises(chatenv.DockerError, match=match):
            chatenv._start_container("chatenv-test:latest", volumes=volumes, docker=sys.executable)


# ------------------------------------------------------------------------------
# Command line: chatenv serve, its environment fallbacks and its errors
# ------------------------------------------------------------------------------


def test_cli_environment_fallbacks_openenv_names():
    env = dict(os.environ, SYSTEM_PROMPT="From OpenEnv", TOKENIZER_NAME="default")
    proc, url = _start_cli(env=env)
    try:
        with ChatEnv(url) as client:
            assert client.reset().observation.messages == [{"role": "system", "content": "From OpenEnv"}]
    finally:
        _stop_cli(proc)


def test_cli_console_script_and_module_forms():
    # installed by `pip install -e .` beside this interpreter: found there, the venv need not be active
    script = Path(sys.executable).parent / ("chatenv.exe" if os.name == "nt" else "chatenv")
    assert script.is_file(), f"the chatenv console script is not installed beside {sys.executable}"
    for argv in ([script, "--version"], [sys.executable, "-m", "chatenv", "--version"],
                 [sys.executable, str(HERE / "chatenv.py"), "--version"]):
        out = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, timeout=30)
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
    assert out.returncode == 2 and "error" in out.stderr and "Traceback" not in out.stderr


def test_cli_serves_a_real_tokenizer_folder(hf_tokenizer):
    tok = chatenv.load_tokenizer(str(hf_tokenizer))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc, url = _start_cli("--tokenizer", str(hf_tokenizer), "--system-prompt", "Be brief.", env=env, ready_s=60)
    try:
        assert http_get(url + "/metadata")[1]["tokenizer"] == hf_tokenizer.name  # no filesystem path
        with ChatEnv(url) as client:
            result = client.reset()
            assert result.observation.messages == [{"role": "system", "content": "Be brief."}]
            assert result.observation.tokens == tok.encode("system: Be brief.\n")  # no template: encode
            result = client.step(tok.encode("hello world"))
            assert result.observation.messages[-1] == {"role": "assistant", "content": "hello world"}
    finally:
        _stop_cli(proc)


# ------------------------------------------------------------------------------
# Rewards, episode ends and tasks: the environment decides, the protocol encodes
# ------------------------------------------------------------------------------

_TEXT = ByteTokenizer()


def _task_file(tmp_path, *tasks, name="tasks.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(task) + "\n" for task in tasks))
    return str(path)


def _said(text):
    """What a policy says: the text's byte ids (the embedded tokenizer decodes them back to it)."""
    return {"type": "step", "data": {"tokens": _TEXT.encode(text)}}


def _reply_to(session, message):
    return json.loads(handle_frame(session, json.dumps(message)).data)


def test_built_in_rewards_compare_collapsed_text_exactly():
    def obs(reply, **task):
        o = ChatObservation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}])
        o.task = task or None
        return o

    action = ChatAction(tokens=[1, 2, 3])
    assert chatenv.exact_match(action, obs("  the\n answer  ", answer="the answer")) == 1.0
    assert chatenv.exact_match(action, obs("42", answer=["41", 42])) == 1.0  # a number is its JSON text
    assert chatenv.exact_match(action, obs("42", answer=42.0)) == 0.0  # "42.0" is not "42": exact
    assert chatenv.exact_match(action, obs("42")) is None  # no task: no reward
    assert chatenv.exact_match(action, obs("42", prompt="p")) is None  # a task without an answer
    assert chatenv.boxed_match(action, obs(r"so \boxed{1} then \boxed{\frac{1}{2}}", answer=r"\frac{1}{2}")) == 1.0
    assert chatenv.boxed_match(action, obs(r"\boxed{7} and \boxed{8", answer="7")) == 1.0  # unclosed last: the one before
    assert chatenv.boxed_match(action, obs("work... #### 12 ", answer="12")) == 1.0
    assert chatenv.boxed_match(action, obs("12", answer="12")) == 0.0  # neither a box nor ####
    assert chatenv.format_match(action, obs("<think>x</think>\n7", format=r"<think>.*</think>\s*\d+")) == 1.0
    assert chatenv.format_match(action, obs("7", format=r"<think>.*</think>\s*\d+")) == 0.0
    assert chatenv.format_match(action, obs("7", answer="7")) is None
    assert chatenv.overlong_penalty(action, obs("x", max_tokens=3)) == 0.0
    assert chatenv.overlong_penalty(action, obs("x", max_tokens=2)) == -1.0
    assert chatenv.overlong_penalty(action, obs("x")) is None


def test_no_hook_frames_are_byte_for_byte_what_they_were():
    """Without hooks the outcome is None and the ready-made bytes are sent: full, delta and HTTP."""
    assert chatenv._OBS_HEAD == b'{"type":"observation","data":{"observation":{"metadata":{},"messages":['
    assert chatenv._OBS_TAIL == b']},"reward":null,"done":false}}'
    assert chatenv._DELTA_TAIL == b'}},"reward":null,"done":false}}'
    session = Session(ChatEnvironment)
    assert handle_frame(session, '{"type":"reset"}').data == (
        b'{"type":"observation","data":{"observation":{"metadata":{},"messages":[],"tokens":[]},'
        b'"reward":null,"done":false}}')
    assert handle_frame(session, json.dumps(_said("Hi"))).data == (
        b'{"type":"observation","data":{"observation":{"metadata":{},"messages":[{"role":"assistant",'
        b'"content":"Hi"}],"tokens":[72,105]},"reward":null,"done":false}}')
    assert session.env.step_outcome([72]) is None
    history = chatenv._WireHistory()
    ChatEnvironment(history=history).reset()
    assert chatenv._http_observation(history) == (
        b'{"observation":{"metadata":{},"messages":[],"tokens":[]},"reward":null,"done":false,"metadata":null}')


def test_rubric_reward_done_and_metadata_go_where_openenv_0_10_puts_them(tmp_path):
    tasks = _task_file(tmp_path, {"id": "q1", "prompt": "1+1?", "answer": "secret-two"})
    session = Session(functools.partial(ChatEnvironment, tasks=tasks, rubric=chatenv.exact_match))
    reset = _reply_to(session, {"type": "reset", "data": {"chatenv_delta": True}})["data"]
    task = {"task": {"split": "train", "index": 0, "id": "q1"}}
    assert reset["observation"]["metadata"] == task and reset["metadata"] == task
    assert reset["reward"] is None and reset["done"] is False
    assert reset["observation"]["messages"] == [{"role": "user", "content": "1+1?"}]
    assert "secret" not in json.dumps(reset)  # never the answer
    step = _reply_to(session, _said("secret-two"))["data"]
    assert list(step) == ["observation", "reward", "done", "metadata"]  # metadata beside reward: not empty
    assert list(step["observation"]) == ["metadata", "messages", "tokens", "delta"]
    assert step["reward"] == 1.0 and step["done"] is True
    assert step["metadata"] == step["observation"]["metadata"]
    assert step["metadata"]["done_reason"].startswith("task")
    # a bool reward is sent as a JSON bool, as OpenEnv's WebSocket does; over HTTP a number, as its model makes it
    session = Session(functools.partial(ChatEnvironment, rubric=lambda action, obs: True))
    handle_frame(session, '{"type":"reset"}')
    step = _reply_to(session, _said("x"))["data"]
    assert step["reward"] is True and "metadata" not in step and step["observation"]["metadata"] == {}
    history = chatenv._WireHistory()
    env = ChatEnvironment(rubric=lambda action, obs: True, history=history)
    env.reset_outcome()
    body = json.loads(chatenv._http_observation(history, env.step_outcome([72])))
    assert body["reward"] == 1.0 and type(body["reward"]) is float and body["metadata"] is None


def test_episode_ends_max_turns_stop_task_turns_and_hooks(tmp_path):
    env = ChatEnvironment(max_turns=2)
    env.reset()
    assert env.step(_TEXT.encode("a")).done is False
    obs = env.step(_TEXT.encode("b"))
    assert obs.done is True and obs.metadata["done_reason"].startswith("max_turns")
    with pytest.raises(ValueError, match="episode is done .max_turns"):
        env.step(_TEXT.encode("c"))
    assert env.state.step_count == 2 and env.reset().done is False  # state answers; reset starts anew
    env = ChatEnvironment(stop=["</answer>"])
    env.reset()
    assert env.step(_TEXT.encode("thinking")).done is False
    assert env.step(_TEXT.encode("<answer>4</answer>")).metadata["done_reason"] == "stop: the assistant wrote '</answer>'"
    # a task's scripted turns: appended one at a time, a reward on every turn
    tasks = _task_file(tmp_path, {"prompt": "Name a colour.", "answer": "blue", "turns": ["Another?", "One more?"]})
    env = ChatEnvironment(tasks=tasks, rubric=chatenv.exact_match)
    env.reset()
    rewards = []
    for reply, done in (("red", False), ("blue", False), ("blue", True)):
        obs = env.step(_TEXT.encode(reply))
        rewards.append(obs.reward)
        assert obs.done is done
    assert rewards == [0.0, 1.0, 1.0]
    assert [m["content"] for m in env.history_messages] == [
        "Name a colour.", "red", "Another?", "blue", "One more?", "blue"]
    # a hook ends it
    def transform(obs):
        obs.done = "stop" in obs.messages[-1]["content"] if obs.messages else False
        return obs

    env = ChatEnvironment(transform=transform)
    env.reset()
    assert env.step(_TEXT.encode("go")).done is False
    assert env.step(_TEXT.encode("stop now")).metadata["done_reason"] == "a hook ended it"
    # without any of these, episodes never end
    env = ChatEnvironment()
    env.reset()
    assert not any(env.step([72]).done for _ in range(50))


def test_a_step_after_done_is_an_execution_error_naming_why_and_the_session_lives_on():
    session = Session(functools.partial(ChatEnvironment, max_turns=1))
    handle_frame(session, '{"type":"reset"}')
    assert _reply_to(session, _said("a"))["data"]["done"] is True
    error = _reply_to(session, _said("b"))["data"]
    assert error["code"] == "EXECUTION_ERROR" and "max_turns" in error["message"]
    assert _reply_to(session, {"type": "state"})["data"]["step_count"] == 1
    assert _reply_to(session, {"type": "reset"})["data"]["done"] is False
    assert _reply_to(session, _said("c"))["type"] == "observation"


def test_scripted_turns_reach_delta_and_full_frames_alike(tmp_path):
    tasks = _task_file(tmp_path, {"prompt": "p", "turns": ["t1", {"role": "user", "content": "t2"}]})
    full, delta = (Session(functools.partial(ChatEnvironment, tasks=tasks, system_prompt="sys")) for _ in "ab")
    handle_frame(full, '{"type":"reset"}')
    _reply_to(delta, {"type": "reset", "data": {"chatenv_delta": True}})
    held = list(_reply_to(full, {"type": "state"})["data"]["history_messages"])
    held_tokens = [t for ts in _reply_to(full, {"type": "state"})["data"]["history_tokens"] for t in ts]
    for reply in ("r1", "r2", "r3"):
        whole = _reply_to(full, _said(reply))["data"]
        part = _reply_to(delta, _said(reply))["data"]
        held += part["observation"]["messages"]
        held_tokens += part["observation"]["tokens"]
        assert held == whole["observation"]["messages"] and held_tokens == whole["observation"]["tokens"]
        assert part["observation"]["delta"] == {"messages": len(held), "tokens": len(held_tokens)}
        assert part["done"] == whole["done"]
    assert whole["done"] is True and [m["content"] for m in held][-2:] == ["t2", "r3"]


def test_tasks_are_picked_by_split_index_id_seed_or_at_random_and_bad_picks_are_validation_errors(tmp_path):
    train = _task_file(tmp_path, *({"id": f"t{i}", "prompt": f"q{i}", "answer": str(i)} for i in range(50)))
    test = _task_file(tmp_path, {"id": "x", "prompt": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"},
                                                      {"role": "user", "content": "c"}]}, name="test.jsonl")
    make = functools.partial(ChatEnvironment, tasks={"train": train, "test": test})
    session = Session(make)
    picked = lambda data: _reply_to(session, {"type": "reset", "data": data})["data"]["metadata"]["task"]
    assert picked({"split": "train", "index": 7}) == {"split": "train", "index": 7, "id": "t7"}
    assert picked({"task_id": "t31"}) == {"split": "train", "index": 31, "id": "t31"}
    assert picked({"task_id": "x"})["split"] == "test"
    assert [picked({"seed": 5}) for _ in range(3)] == [picked({"seed": 5})] * 3  # the same seed, the same task
    assert len({picked({})["index"] for _ in range(40)}) > 5  # at random otherwise
    obs = _reply_to(session, {"type": "reset", "data": {"split": "test", "index": 0}})["data"]["observation"]
    assert [m["role"] for m in obs["messages"]] == ["user", "assistant", "user"]
    for data, named in (({"split": "dev"}, "dev"), ({"split": "train", "index": 50}, "50"),
                        ({"task_id": "nope"}, "nope"), ({"index": "1"}, "index")):
        error = _reply_to(session, {"type": "reset", "data": data})["data"]
        assert error["code"] == "VALIDATION_ERROR" and named in error["message"], (data, error)
    assert _reply_to(session, _said("still here"))["type"] == "observation"
    no_tasks = Session(ChatEnvironment)
    assert _reply_to(no_tasks, {"type": "reset", "data": {"task_id": "t1"}})["data"]["code"] == "VALIDATION_ERROR"


def test_task_file_index_checks_every_line_and_parses_only_what_is_asked(tmp_path):
    path = _task_file(tmp_path, {"id": "a", "prompt": "p"}, {"prompt": "q", "answer": [1, 2]})
    with open(path, "a") as f:
        f.write("\n   \n" + json.dumps({"id": "c", "prompt": "r"}))  # blank lines, no final newline
    file = chatenv._TaskFile(path)
    assert len(file) == 3 and file.task(2)["id"] == "c" and file.find("c") == 2 and file.find("b") is None
    with pytest.raises(IndexError):
        file.task(3)
    for body, problem in (('{"prompt": "p"}\n{"id": 3, "prompt": "p"}\n', ":2: 'id' must be a string"),
                          ('{"prompt": "p"}\n\n[1]\n', ":3: a task is a JSON object"),
                          ('{"prompt": "p", "turns": [5]}\n', ":1: 'turns'"),
                          ('{"prompt": []}\n', ":1: 'prompt'"),
                          ('{"prompt": "p"}\n{"prompt": "p"\n', ":2: not a JSON object"),
                          ('{"id": "a", "prompt": "p"}\n{"id": "a", "prompt": "q"}\n', "given twice"),
                          ("\n", "has no tasks")):
        (tmp_path / "bad.jsonl").write_text(body)
        with pytest.raises(ValueError, match=re.escape(problem)):
            chatenv._TaskFile(str(tmp_path / "bad.jsonl"))
    tasks = chatenv.Tasks(path)
    assert tasks.get_task("train", 1) == {"prompt": "q"}  # no answer unless asked
    assert chatenv.Tasks(path, show_answers=True).get_task("train", 1)["answer"] == [1, 2]
    assert [t["prompt"] for t in tasks.get_task_range("train", 1)] == ["q", "r"]


def test_weighted_rubrics_sum_the_scores_given_and_name_each_one():
    def half(action, obs):
        return 0.5

    async def judged(action, obs):  # an async rubric: awaited on a private loop off a server
        await asyncio.sleep(0)
        return 1

    rubric = chatenv._WeightedRubrics([("half", half, 2.0), ("judge", judged, -1.0), ("none", lambda a, o: None, 5.0)])
    env = ChatEnvironment(rubric=rubric)
    env.reset()
    obs = env.step([72])
    assert obs.reward == 0.0 and obs.metadata["rewards"] == {"half": 0.5, "judge": 1, "none": None}
    env = ChatEnvironment(rubric=chatenv._WeightedRubrics([("none", lambda a, o: None, 1.0)]))
    env.reset()
    assert env.step([72]).reward is None
    env = ChatEnvironment(rubric=lambda a, o: float("nan"))
    env.reset()
    with pytest.raises(RuntimeError, match="rubric failed"):
        env.step([72])


def test_task_routes_answer_as_openenv_0_10s(tmp_path):
    path = _task_file(tmp_path, *({"id": f"t{i}", "prompt": f"q{i}", "answer": str(i)} for i in range(5)))
    server = ChatServer(tasks={"train": path, "hard": path})
    post = lambda route, body: chatenv.http_reply(server, "POST", f"/chat_env/{route}", json.dumps(body).encode())
    assert chatenv.http_reply(server, "GET", "/chat_env/splits") == (
        200, [{"name": "train", "type": "train"}, {"name": "hard", "type": "validation"}])
    assert post("num_tasks", {"split": "hard"}) == (200, {"num_tasks": 5})
    assert post("task", {"split": "train", "index": 2}) == (200, {"task": {"id": "t2", "prompt": "q2"}})
    assert post("task", {"split": "train", "index": 5}) == (400, {"detail": "Invalid task index"})
    assert post("task_range", {"split": "train", "start": 3}) == (
        200, {"tasks": [{"id": "t3", "prompt": "q3"}, {"id": "t4", "prompt": "q4"}]})
    status, body = post("tasks", {"split": "train"})
    assert status == 200 and body["env_name"] == "chat_env" and len(body["tasks"]) == 5
    assert post("tasks", {"split": "dev"})[0] == 400
    assert post("task", {"split": "train"})[0] == 422
    assert chatenv.http_reply(ChatServer(), "POST", "/chat_env/num_tasks", b'{"split":"train"}')[0] == 501
    shown = ChatServer(tasks=path, show_answers=True)
    assert chatenv.http_reply(shown, "POST", "/chat_env/task", b'{"split":"train","index":1}')[1]["task"]["answer"] == "1"


def test_schema_titles_and_describes_what_is_sent():
    status, schema = chatenv.http_reply(ChatServer(), "GET", "/schema")
    for name, title in (("action", "ChatAction"), ("observation", "ChatObservation"),
                        ("reset_observation", "ChatObservation")):
        assert schema[name]["title"] == title and schema[name]["description"]
    properties = schema["observation"]["properties"]
    assert "boolean" in properties["reward"]["type"] and "null" in properties["reward"]["type"]
    assert all(properties[key]["description"] for key in ("reward", "done", "metadata"))


def test_asgi_app_with_hooks_answers_as_the_native_server(tmp_path):
    """The same hooks under uvicorn: tasks, a plain and an async rubric (run off the loop), the same frames."""
    tasks = _task_file(tmp_path, {"id": "q", "prompt": "1+1?", "answer": "2", "turns": ["Sure?"]})

    async def judged(action, observation):
        await asyncio.sleep(0.001)
        return chatenv.exact_match(action, observation)

    options = dict(tasks=tasks, rubric=judged, max_turns=5)
    messages = [{"type": "reset", "data": {"task_id": "q"}}, _said("3"), _said("2"), _said("2"),
                {"type": "reset", "data": {"split": "nope"}}]
    with asgi_server(chatenv.ASGIApp(**options)) as asgi_url, serve_in_thread(**options) as native_url:
        answers = []
        for url in (asgi_url, native_url):
            with raw(url) as ws:
                answers.append([ask(ws, message)["data"] for message in messages])
            answers[-1].append(http_post(url + "/chat_env/task", {"split": "train", "index": 0}))
        assert answers[0] == answers[1]
    rewards = [frame.get("reward") for frame in answers[0][:3]]
    assert rewards == [None, 0.0, 1.0] and answers[0][3]["code"] == "EXECUTION_ERROR"
    assert answers[0][4]["code"] == "VALIDATION_ERROR" and answers[0][5][1] == {"task": {"id": "q", "prompt": "1+1?",
                                                                                       "turns": ["Sure?"]}}
