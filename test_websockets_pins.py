"""The websockets internals chatenv relies on, pinned against the installed websockets.

chatenv's server and clients use websockets' documented Sans-I/O API and, where it
says nothing, only the internals named in one block at the start of chatenv's
Server section. Each test here drives a real ServerProtocol and ClientProtocol
through a real handshake (or a real asyncio connection on loopback) and checks
that the internal exists and means what chatenv uses it for; the last test checks
that the module reaches no internal except through that block. CI runs this file
on the oldest websockets pyproject allows as well as the newest.
"""

import asyncio
import enum
import importlib.metadata
import os
import re
from pathlib import Path

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

import chatenv

HERE = Path(__file__).resolve().parent


def masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client's frame, built by hand (RFC 6455 section 5.2), not by websockets."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        head = bytes((first, 0x80 | len(payload)))
    else:
        head = bytes((first, 0x80 | 126)) + len(payload).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def handshake(deflate: bool = False, max_size: int | None = 2**20) -> tuple[ServerProtocol, ClientProtocol]:
    """A server and a client protocol after a real opening handshake, bytes passed by hand."""
    server = ServerProtocol(max_size=max_size,
                            extensions=chatenv._deflate_extensions("server") if deflate else None)
    client = ClientProtocol(parse_uri("ws://127.0.0.1:1/ws"),
                            extensions=chatenv._deflate_extensions("client") if deflate else None)
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()))
    request, = server.events_received()
    response = server.accept(request)
    server.send_response(response)
    assert response.status_code == 101
    client.receive_data(b"".join(server.data_to_send()))
    assert client.events_received()[0].status_code == 101
    assert server.state == State.OPEN and client.state == State.OPEN
    return server, client


# States and opcodes: plain ints on chatenv's hot path


def test_the_state_ints_are_websockets_states():
    assert issubclass(State, enum.IntEnum)
    ours = (chatenv._CONNECTING, chatenv._OPEN, chatenv._CLOSING, chatenv._CLOSED)
    assert ours == (State.CONNECTING, State.OPEN, State.CLOSING, State.CLOSED)
    assert all(type(value) is int for value in ours)
    assert ServerProtocol().state == chatenv._CONNECTING  # what a new connection compares against
    server, client = handshake()
    assert server.state == chatenv._OPEN and client.state == chatenv._OPEN
    client.send_close(1000)
    server.receive_data(b"".join(client.data_to_send()))
    assert server.state == chatenv._CLOSING
    server.receive_eof()
    assert server.state == chatenv._CLOSED


def test_the_opcode_ints_are_websockets_opcodes():
    assert issubclass(Opcode, enum.IntEnum)
    ours = {"CONT": chatenv._OP_CONT, "TEXT": chatenv._OP_TEXT, "BINARY": chatenv._OP_BINARY,
            "CLOSE": chatenv._OP_CLOSE, "PING": chatenv._OP_PING, "PONG": chatenv._OP_PONG}
    assert ours == {name: Opcode[name].value for name in ours}
    assert all(type(value) is int for value in ours.values())
    server, _ = handshake()
    server.receive_data(masked_frame(0x1, b"text") + masked_frame(0x9, b"ping"))
    assert [event.opcode for event in server.events_received()] == [chatenv._OP_TEXT, chatenv._OP_PING]


# Frames: masking, whole frames in, events out at once


def test_apply_mask_is_websockets_xor_mask_and_its_c_one_when_built():
    apply_mask = chatenv._apply_mask()
    data, mask = os.urandom(1000), os.urandom(4)
    assert apply_mask(data, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert apply_mask(bytearray(data[:7]), mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(data[:7]))
    try:
        from websockets.speedups import apply_mask as c_apply_mask
    except ImportError:
        from websockets.utils import apply_mask as python_apply_mask

        assert apply_mask is python_apply_mask
    else:
        assert apply_mask is c_apply_mask


def test_the_parser_fed_one_whole_frame_at_a_time_holds_nothing_back():
    """chatenv feeds the protocol whole frames only and reads the next frame's start
    itself, so the parser must turn each whole frame into its event at once."""
    server, _ = handshake()
    frame = masked_frame(0x1, b"x" * 300, fin=False)
    server.receive_data(frame[:-1])
    assert server.events_received() == []  # a partial frame is no event
    server.receive_data(frame[-1:])
    event, = server.events_received()
    assert isinstance(event, Frame)
    assert (event.opcode, event.fin, event.data) == (Opcode.TEXT, False, b"x" * 300)
    server.receive_data(masked_frame(0x0, b"yz"))
    event, = server.events_received()
    assert (event.opcode, event.fin, event.data) == (Opcode.CONT, True, b"yz")


# The negotiated extensions


def test_extensions_say_whether_data_frames_are_plain():
    server, client = handshake()
    assert chatenv._extensions(server) == [] and chatenv._extensions(client) == []
    server, client = handshake(deflate=True)
    assert [e.name for e in chatenv._extensions(server)] == ["permessage-deflate"]
    assert [e.name for e in chatenv._extensions(client)] == ["permessage-deflate"]
    # ... and with them, a data frame is not plain on the wire: the server cannot read it directly
    client.send_text(b"a" * 1000)
    wire = b"".join(client.data_to_send())
    assert wire[0] & 0x40 and len(wire) < 1000  # RSV1: compressed
    server.receive_data(wire)
    assert server.events_received()[0].data == b"a" * 1000


# Requests: what the protocol parses, and how


def request_head(method: str, extra: bytes = b"") -> bytes:
    return (f"{method} /health HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra + b"\r\n")


def test_the_protocol_parses_the_requests_chatenv_gives_it_and_their_method():
    server = ServerProtocol()
    server.receive_data(request_head("GET"))
    request, = server.events_received()
    assert chatenv._request_method(request) == "GET"
    server = ServerProtocol()
    server.receive_data(request_head("HEAD"))
    parsed = server.events_received()
    # chatenv hands a HEAD to the protocol exactly when the protocol parses one ...
    assert (b"H" in chatenv._protocol_request_starts()) == bool(parsed)
    if parsed:
        assert chatenv._request_method(parsed[0]) == "HEAD"
    else:  # ... since before 17.0 it closes on one without an answer
        assert server.handshake_exc is not None and server.data_to_send() == [SEND_EOF]
    assert b"G" in chatenv._protocol_request_starts()


def test_header_bytes_past_ascii_come_as_latin1_on_every_release():
    server = ServerProtocol()
    server.receive_data(request_head("GET", b"Authorization: Bearer \xff\xfetok\r\nX: a\r\nX: \xe9\r\n"))
    request, = server.events_received()
    chatenv._latin1_headers(request)
    assert request.headers.get_all("Authorization") == ["Bearer \xff\xfetok"]
    assert request.headers.get_all("X") == ["a", "\xe9"]
    assert request.headers["Authorization"].encode()  # what chatenv's token check does
    assert [name for name, _ in request.headers.raw_items()] == ["Host", "Authorization", "X", "X"]


# The end of stream and the close frames


def test_response_bytes_are_the_http_response_on_the_wire():
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    response = Response(404, "Not Found", Headers([("Content-Length", "2")]), b"{}")
    assert chatenv._response_bytes(response) == b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"


def test_eof_sent_is_set_once_a_refused_handshake_is_answered():
    server = ServerProtocol()
    assert chatenv._eof_sent(server) is False
    client = ClientProtocol(parse_uri("ws://127.0.0.1:1/ws"))
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()))
    server.events_received()
    server.send_response(server.reject(403, "no\n"))
    assert chatenv._eof_sent(server) is True
    assert server.state == chatenv._CONNECTING  # still: what chatenv's data_received checks besides
    assert server.data_to_send()[-1] == SEND_EOF == b""
    accepted, _ = handshake()
    assert chatenv._eof_sent(accepted) is False


def test_close_frames_received_sent_and_which_came_first():
    server, client = handshake()
    for proto in (server, client):
        assert chatenv._close_received(proto) is None and chatenv._close_sent(proto) is None
        assert chatenv._close_received_first(proto) is None
    client.send_close(4000, "bye")
    server.receive_data(b"".join(client.data_to_send()))
    assert chatenv._close_received(server) == Close(4000, "bye")
    assert chatenv._close_sent(server) == Close(4000, "bye")  # the server's echo
    assert chatenv._close_received_first(server) is True
    client.receive_data(b"".join(server.data_to_send()))
    assert chatenv._close_received(client) == Close(4000, "bye")
    assert chatenv._close_received_first(client) is False  # the client spoke first
    assert not chatenv._parser_failed(server) and not chatenv._parser_failed(client)


def test_parser_failed_over_a_refused_frame_then_the_protocol_wants_tcp_closed():
    """What chatenv's server defers: the protocol fails the connection over a frame over
    max_size, queues its close frame and at once the end of stream, with no close received."""
    server, _ = handshake(max_size=100)
    server.receive_data(masked_frame(0x1, b"x" * 101))
    assert chatenv._parser_failed(server)
    assert server.state == chatenv._CLOSING and chatenv._close_received(server) is None
    assert chatenv._close_sent(server).code == 1009
    writes = server.data_to_send()
    assert writes[-1] == SEND_EOF and Close.parse(writes[0][2:]).code == 1009
    # The client's half: its parser fails on a frame over its own max_size the same way
    client = ClientProtocol(parse_uri("ws://127.0.0.1:1/ws"), max_size=10)
    client.send_request(client.connect())
    server = ServerProtocol()
    server.receive_data(b"".join(client.data_to_send()))
    server.send_response(server.accept(server.events_received()[0]))
    client.receive_data(b"".join(server.data_to_send()))
    server.send_text(b"y" * 11)
    client.receive_data(b"".join(server.data_to_send()))
    assert chatenv._parser_failed(client) and chatenv._close_received(client) is None
    assert client.state == chatenv._CLOSING and chatenv._close_sent(client).code == 1009


# The asyncio client's connection


def test_an_asyncio_connection_queues_frames_and_drops_at_once_on_its_transport():
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.asyncio.server import serve

    async def main():
        async def handler(ws):
            await ws.send("unasked")
            await ws.wait_closed()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            ws = await connect(f"ws://127.0.0.1:{port}", proxy=None, close_timeout=3.5,
                               create_connection=chatenv._failing_fast())
            assert isinstance(ws, ClientConnection) and isinstance(ws.protocol, ClientProtocol)
            assert ws.close_timeout == 3.5  # AsyncChatEnv.close() shortens it there
            for _ in range(200):
                if chatenv._queued_frames(ws):
                    break
                await asyncio.sleep(0.01)
            assert chatenv._queued_frames(ws) == 1  # received, not taken by any recv()
            assert await ws.recv() == "unasked"
            assert chatenv._queued_frames(ws) == 0
            transport = chatenv._transport(ws)
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            await asyncio.wait_for(ws.wait_closed(), 1.0)  # no closing handshake waited for
            assert chatenv._close_received(ws.protocol) is None and ws.protocol.state == State.CLOSED

    asyncio.run(main())


def test_failing_fast_overrides_the_connection_asyncio_calls_with_received_bytes():
    from websockets.asyncio.client import ClientConnection

    failing_fast = chatenv._failing_fast()
    assert issubclass(failing_fast, ClientConnection) and issubclass(ClientConnection, asyncio.Protocol)
    assert "data_received" in vars(failing_fast)
    assert ClientConnection.data_received is not asyncio.Protocol.data_received  # websockets' own, called by super()


# The version, and where the module reaches internals


def test_websockets_version_is_the_installed_release_and_at_least_pyproject_floor():
    installed = importlib.metadata.version("websockets")
    assert chatenv._websockets_version() == tuple(int(part) for part in installed.split(".")[:2])
    floor = re.search(r'"websockets>=([0-9.]+)"', (HERE / "pyproject.toml").read_text()).group(1)
    assert chatenv._websockets_version() >= tuple(int(part) for part in floor.split(".")[:2])


def test_the_module_reaches_websockets_internals_only_through_the_named_block():
    source = (HERE / "chatenv.py").read_text()
    start = source.index("# websockets internals chatenv relies on")
    end = source.index("\n_INBOX_LIMIT", start)
    block, rest = source[start:end], source[:start] + source[end:]
    internals = re.compile(
        r"\.(eof_sent|close_rcvd|close_sent|close_rcvd_then_sent|parser_exc|extensions|recv_messages"
        r"|current_size|reader)\b"
        r"|\bws\.transport\b|import apply_mask|permessage_deflate import enable_|\.serialize\(\)|\brequest\.method\b")
    assert sorted({m.group(0) for m in internals.finditer(rest)}) == []
    for used in ("eof_sent", "close_rcvd", "close_sent", "close_rcvd_then_sent", "parser_exc", "extensions",
                 "recv_messages", "transport", "apply_mask", "permessage_deflate", "serialize"):
        assert used in block
    assert "_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = " in block
    assert "_CONNECTING, _OPEN, _CLOSING, _CLOSED = " in block


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
