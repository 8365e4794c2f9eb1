"""A fault-injection TCP proxy that understands the PostgreSQL v3 wire protocol.

`FaultProxy` listens on 127.0.0.1 (a free port), forwards every connection to a PostgreSQL
server and runs its own asyncio event loop in a daemon thread, so synchronous tests and
tests with their own event loop can both use it::

    with FaultProxy(*server_address()) as proxy:
        fault = proxy.add_fault(
            Fault(kind="COMMIT", point="after_reply_message", reply_type="C", action="cut")
        )
        ...  # connect with proxy.dsn(dsn), run a transaction, commit fails
        assert proxy.wait_fired(fault, timeout=5)

Requests
    The frontend messages of a connection are grouped into *requests*: a request is the
    messages up to and including a Sync (extended protocol: Parse/Bind/Describe/Execute/Sync,
    Bind/Execute/Sync, a whole pipeline up to its Sync...), or a simple Query, or a
    FunctionCall. Terminate, CopyData/CopyDone/CopyFail, authentication messages and a Flush
    outside of a request belong to no request of their own. The startup message is the
    pseudo-request ``"startup"`` (its reply ends with the first ReadyForQuery) and a
    CancelRequest the pseudo-request ``"cancel"`` (forwarded to the server as-is on its own
    connection; it has no reply).

    The reply of a request ends with its ReadyForQuery ('Z'); replies are matched to
    requests in FIFO order. NotificationResponse ('A'), ParameterStatus ('S') and
    NoticeResponse ('N') are asynchronous: they are forwarded but are not reply messages.

Classification
    The SQL text of a request is the text of the prepared statement named by its first Bind
    (statement texts are remembered per connection from the Parse messages), else the text
    of its simple Query, else the text of its first Parse: a request with a Parse but no Bind
    is a *prepare*. ``classify(text)`` (default: `first_word`, the first word uppercased)
    gives the kind; None counts as ``"other"``, and a prepare gets ``"prepare:" + kind``.
    The kind is decided as soon as the request shows a Bind, Execute, Query, FunctionCall,
    Flush or Sync; until then its messages are held (libpq sends a request in one write, so
    this costs nothing in practice). A pipeline is one request up to its Sync, of the kind of
    its first statement (or a prepare, if a Flush comes before its first Bind).

Faults
    A `Fault` targets the `occurrence`-th request of `kind` *counted from when the fault was
    added*: the first request of that kind classified after `add_fault` returns is
    occurrence 1, on whichever connection it comes. Each fault fires at most once, at its
    `point`, with its `action`; `fired`, `wait_fired` tell whether and when it did. A fault
    whose request ends (or whose connection goes away) before its point is reached does not
    fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, get_args

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "Action",
    "Fault",
    "FaultProxy",
    "FiredFault",
    "Point",
    "first_word",
]

Point = Literal["before_request", "after_request", "after_reply_message", "mid_request"]
Action = Literal["cut", "blackhole", "delay"]

PROTOCOL_V3 = 196608  # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# Backend messages that may arrive at any time and are not part of a reply.
_ASYNC_BACKEND = frozenset(b"ASN")
# Frontend messages that do not start a request: CopyData, CopyDone, CopyFail and the
# authentication messages (PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse).
_NO_REQUEST = frozenset(b"dcfp")
# Frontend messages that end a request.
_ENDS_REQUEST = frozenset(b"SQF")
# Frontend messages once seen the kind of the request is decided.
_DECIDES_KIND = frozenset(b"BEQFHS")

_TERMINATE = ord("X")
_PARSE = ord("P")
_BIND = ord("B")
_QUERY = ord("Q")
_FLUSH = ord("H")
_READY_FOR_QUERY = ord("Z")

_READ_SIZE = 256 * 1024
_STREAM_LIMIT = 1024 * 1024
SQL_PREFIX = 200
"""How many characters of a request's SQL text `FaultProxy.history` keeps."""

_FIRST_WORD = re.compile(r"(?:\s+|\(|--[^\n]*(?:\n|$)|/\*.*?\*/)*([A-Za-z_]+)", re.DOTALL)


def first_word(sql: str) -> str | None:
    """The default classification: the first word of the SQL text, uppercased.

    Leading whitespace, comments and opening parentheses are skipped; None if there is no
    word (an empty request, e.g. a lone Sync).
    """
    match = _FIRST_WORD.match(sql)
    return match.group(1).upper() if match else None


@dataclass(eq=False, kw_only=True)
class Fault:
    """One fault to inject; see the module documentation for what a request is.

    - `kind`: the kind of request targeted (``"SELECT"``, ``"COMMIT"``, ``"prepare:SELECT"``,
      ``"startup"``, ``"cancel"``, ``"other"``...);
    - `occurrence`: which request of that kind, counting from when the fault was added
      (1 = the next one);
    - `point`:
        - ``"before_request"``: nothing of the request is forwarded;
        - ``"mid_request"``: the first half of the bytes of its first message is forwarded;
        - ``"after_request"``: the whole request is forwarded; the proxy acts once its last
          message is handed to the server, before any message of the reply is forwarded
          (``delay``: the reply is held until `delay_seconds` after the request was sent).
          The reply is held until then even if the server answers a Flush in the middle of
          the request;
        - ``"after_reply_message"``: reply messages are forwarded up to and including the
          `index`-th one (0-based, asynchronous messages not counted) or, if `reply_type` is
          given, the first one of that type byte (``"C"``: CommandComplete); then act;
    - `action`:
        - ``"cut"``: close the client and the server socket of the connection at once;
        - ``"blackhole"``: stop forwarding in both directions, keep both sockets open (the
          client waits for an answer that never comes); closed when the proxy stops or
          after `blackhole_seconds`;
        - ``"delay"``: wait `delay_seconds`, then carry on normally.

    Faults compare by identity.
    """

    kind: str
    occurrence: int = 1
    point: Point
    index: int = 0
    reply_type: str | None = None
    action: Action
    delay_seconds: float = 0.0
    blackhole_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.point not in get_args(Point):
            raise ValueError(f"unknown fault point {self.point!r}")
        if self.action not in get_args(Action):
            raise ValueError(f"unknown fault action {self.action!r}")
        if self.occurrence < 1:
            raise ValueError("occurrence counts from 1")
        if self.index < 0:
            raise ValueError("index counts from 0")
        if self.reply_type is not None and len(self.reply_type) != 1:
            raise ValueError("reply_type is a single message type byte, e.g. 'C'")
        if self.delay_seconds < 0 or self.blackhole_seconds < 0:
            raise ValueError("durations cannot be negative")


@dataclass(frozen=True)
class FiredFault:
    """A fault that fired: on which connection and request, and when (`time.monotonic()`)."""

    fault: Fault
    connection: int
    kind: str
    sql: str
    at: float


class _ProtocolError(Exception):
    """Bytes that are not the PostgreSQL protocol: the connection is dropped."""


class _Armed:
    """A fault added to the proxy and not yet attached to a request."""

    __slots__ = ("fault", "seen")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.seen = 0


class _Request:
    __slots__ = (
        "bind_text",
        "faults",
        "gate",
        "held",
        "kind",
        "parse_text",
        "query_text",
        "replies",
        "sql",
    )

    def __init__(self) -> None:
        self.kind: str | None = None
        self.sql = ""
        self.held: list[bytes] = []  # messages not forwarded until the kind is known
        self.parse_text: str | None = None
        self.bind_text: str | None = None
        self.query_text: str | None = None
        self.faults: list[Fault] = []  # attached, not yet fired
        self.gate: asyncio.Event | None = None  # holds the reply (after_request faults)
        self.replies = 0  # reply messages seen so far


class _Connection:
    def __init__(
        self, number: int, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.number = number
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.server_reader: asyncio.StreamReader | None = None
        self.server_writer: asyncio.StreamWriter | None = None
        self.statements: dict[str, str] = {}
        self.pending: deque[_Request] = deque()  # requests waiting for (the end of) a reply
        self.tasks: list[asyncio.Task[None]] = []
        self.done = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None

    def _writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client_writer, self.server_writer) if w is not None]

    def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    def abort(self) -> None:
        """Close both sockets now.

        Nothing that was forwarded is lost: the pumps wait after each write until the
        kernel has it all (see `_send`)."""
        for writer in self._writers():
            writer.transport.abort()
        self._cancel_tasks()
        if self.timer is not None:
            self.timer.cancel()
        self.done.set()

    def blackhole(self, seconds: float) -> None:
        self._cancel_tasks()
        self.timer = asyncio.get_running_loop().call_later(seconds, self.abort)


class _MessageReader:
    """Complete protocol messages from a stream, whatever the read boundaries."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()
        self._position = 0

    async def fill(self) -> bool:
        """Read more bytes; False at end of stream."""
        if self._position:
            del self._buffer[: self._position]
            self._position = 0
        data = await self._reader.read(_READ_SIZE)
        if not data:
            return False
        self._buffer += data
        return True

    def take(self, *, typed: bool) -> bytes | None:
        """The next complete message, or None if it is not all there yet."""
        available = len(self._buffer) - self._position
        header = 5 if typed else 4
        if available < header:
            return None
        length = struct.unpack_from("!I", self._buffer, self._position + header - 4)[0]
        if length < (4 if typed else 8):
            raise _ProtocolError(f"message length {length}")
        total = length + header - 4
        if available < total:
            return None
        message = bytes(self._buffer[self._position : self._position + total])
        self._position += total
        return message

    async def message(self, *, typed: bool) -> bytes | None:
        """The next complete message, reading as needed; None at end of stream."""
        while (message := self.take(typed=typed)) is None:
            if not await self.fill():
                return None
        return message

    def rest(self) -> bytes:
        rest = bytes(self._buffer[self._position :])
        self._buffer.clear()
        self._position = 0
        return rest


def _cstrings(message: bytes, offset: int, count: int) -> list[str]:
    """`count` null-terminated strings starting at `offset` (empty ones if malformed)."""
    strings = []
    for _ in range(count):
        end = message.find(b"\0", offset)
        if end < 0:
            strings.append("")
            continue
        strings.append(message[offset:end].decode("utf-8", "replace"))
        offset = end + 1
    return strings


def _startup_summary(message: bytes) -> str:
    """``user=... database=...`` from a StartupMessage, for the history."""
    parts = message[8:].split(b"\0")
    params = dict(zip(parts[0::2], parts[1::2], strict=False))
    return " ".join(
        f"{key.decode(errors='replace')}={params[key].decode(errors='replace')}"
        for key in (b"user", b"database")
        if key in params
    )


async def _send(writer: asyncio.StreamWriter, data: bytes | bytearray) -> None:
    """Write and wait until it is all handed to the kernel (write buffer limit is 0)."""
    writer.write(data)
    await writer.drain()


class FaultProxy:
    """A PostgreSQL-aware TCP proxy on 127.0.0.1 that injects faults; see the module doc."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        classify: Callable[[str], str | None] = first_word,
        connect_timeout: float = 10.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.classify = classify
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._armed: list[_Armed] = []
        self._fired: list[FiredFault] = []
        self._history: list[tuple[int, str, str]] = []
        self._counts: Counter[str] = Counter()
        self._live: dict[int, _Connection] = {}
        self._errors: list[BaseException] = []
        self._next_number = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._started = False
        self._refusing = False

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen and serve in a background thread; returns once the port is bound."""
        if self._started:
            raise RuntimeError("a FaultProxy can only be started once")
        self._started = True
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="fault-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout=10):
            raise RuntimeError("the fault proxy did not start")
        if failure:
            raise RuntimeError("the fault proxy did not start") from failure[0]
        return self

    def stop(self) -> None:
        """Close every connection (black-holed ones too) and the listener. Idempotent."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the fault proxy is not started")
        return self._port

    def dsn(self, base_dsn: str) -> str:
        """`base_dsn` pointed at the proxy (host=127.0.0.1, its port, sslmode=disable)."""
        params = conninfo_to_dict(base_dsn)
        params.pop("hostaddr", None)
        params.update(host="127.0.0.1", port=str(self.port), sslmode="disable")
        return make_conninfo("", **params)

    # -- faults and observations (thread-safe) ------------------------------------------------

    def add_fault(self, fault: Fault) -> Fault:
        """Arm `fault`: its `occurrence` counts requests of its kind from now on."""
        with self._lock:
            self._armed.append(_Armed(fault))
        return fault

    def clear_faults(self) -> None:
        """Disarm the faults not yet attached to a request."""
        with self._lock:
            self._armed.clear()

    @property
    def fired(self) -> list[FiredFault]:
        with self._lock:
            return list(self._fired)

    def has_fired(self, fault: Fault) -> bool:
        with self._lock:
            return any(record.fault is fault for record in self._fired)

    def wait_fired(self, fault: Fault, timeout: float = 5.0) -> bool:
        """Wait until `fault` has fired; False if `timeout` seconds pass first."""
        with self._changed:
            return self._changed.wait_for(
                lambda: any(record.fault is fault for record in self._fired), timeout
            )

    @property
    def history(self) -> list[tuple[int, str, str]]:
        """(connection number, kind, SQL text prefix) of every request seen, in order."""
        with self._lock:
            return list(self._history)

    def kinds(self, connection: int | None = None) -> list[str]:
        """The kinds in `history`, optionally of one connection only."""
        return [kind for number, kind, _ in self.history if connection in (None, number)]

    @property
    def counts(self) -> dict[str, int]:
        """How many requests of each kind were seen since the start, over all connections."""
        with self._lock:
            return dict(self._counts)

    def wait_seen(self, kind: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until `count` requests of `kind` were seen in total."""
        with self._changed:
            return self._changed.wait_for(lambda: self._counts[kind] >= count, timeout)

    @property
    def connections(self) -> list[int]:
        """Numbers (1-based, in accept order) of the connections still open."""
        with self._lock:
            return sorted(self._live)

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions in the proxy (a bug, or a `classify` that raised)."""
        with self._lock:
            return list(self._errors)

    def unreachable(self, refusing: bool = True) -> None:
        """While refusing: cut every connection, and close each new one at once (the
        database looks unreachable). ``unreachable(False)`` ends it."""
        with self._lock:
            self._refusing = refusing
        if refusing:
            self.cut_all()

    def cut_all(self) -> None:
        """Close every current connection now (as a ``cut``)."""
        loop = self._loop
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._cut_all(), loop).result(timeout=10)

    # -- event loop thread ----------------------------------------------------------------------

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0, limit=_STREAM_LIMIT)
            )
            self._port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            failure.append(exc)
            loop.close()
            ready.set()
            return
        with self._lock:
            self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut_all()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)

    async def _cut_all(self) -> None:
        with self._lock:
            connections = list(self._live.values())
        for connection in connections:
            connection.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            refusing = self._refusing
        if refusing:
            writer.transport.abort()
            return
        with self._lock:
            self._next_number += 1
            conn = _Connection(self._next_number, reader, writer)
            self._live[conn.number] = conn
        try:
            try:
                server_reader, server_writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        self.target_host, self.target_port, limit=_STREAM_LIMIT
                    ),
                    timeout=self.connect_timeout,
                )
            except (OSError, TimeoutError):
                conn.abort()
                return
            conn.server_reader, conn.server_writer = server_reader, server_writer
            if conn.done.is_set():  # cut while connecting
                conn.abort()
                return
            # Writes count as done only once the kernel has them all: a fault that acts right
            # after a message was forwarded cannot lose that message.
            for stream in (conn.client_writer, server_writer):
                stream.transport.set_write_buffer_limits(high=0)
            conn.tasks = [
                asyncio.create_task(self._pump(conn, self._frontend)),
                asyncio.create_task(self._pump(conn, self._backend)),
            ]
            await conn.done.wait()
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            conn.abort()
            raise
        finally:
            with self._lock:
                self._live.pop(conn.number, None)

    async def _pump(
        self, conn: _Connection, pump: Callable[[_Connection], Awaitable[bool]]
    ) -> None:
        try:
            reached_eof = await pump(conn)
        except asyncio.CancelledError:
            raise
        except OSError:  # a socket error: as good as EOF
            conn.abort()
            return
        except Exception as exc:  # a _ProtocolError, a bug...
            with self._lock:
                self._errors.append(exc)
            conn.abort()
            return
        if reached_eof:  # one side is gone: so is the other
            conn.abort()

    # -- client to server -------------------------------------------------------------------

    async def _frontend(self, conn: _Connection) -> bool:
        """Forward the client's messages. True at EOF, False once a fault ended forwarding."""
        assert conn.server_writer is not None
        server = conn.server_writer
        reader = _MessageReader(conn.client_reader)
        while True:
            message = await reader.message(typed=False)
            if message is None:
                return True
            code = struct.unpack_from("!I", message, 4)[0]
            if code not in (SSL_REQUEST, GSSENC_REQUEST):
                break
            await _send(conn.client_writer, b"N")  # no TLS, no GSS encryption
        request = _Request()
        request.held.append(message)
        out = bytearray()
        if code == CANCEL_REQUEST:
            self._register(conn, request, "cancel", "")
        else:
            if code >> 16 != 3:
                raise _ProtocolError(f"unsupported protocol {code >> 16}.{code & 0xFFFF}")
            conn.pending.append(request)
            self._register(conn, request, "startup", _startup_summary(message))
        if not await self._release(conn, request, out):
            return False
        if not await self._end_request(conn, request, out):
            return False
        if out:
            await _send(server, bytes(out))
            out.clear()
        if code == CANCEL_REQUEST:  # nothing more is expected; pass anything on untouched
            while True:
                if rest := reader.rest():
                    await _send(server, rest)
                if not await reader.fill():
                    return True

        current: _Request | None = None
        while True:
            message = reader.take(typed=True)
            if message is None:
                if out:
                    await _send(server, bytes(out))
                    out.clear()
                if not await reader.fill():
                    return True
                continue
            kind = message[0]
            if kind == _TERMINATE or kind in _NO_REQUEST:
                if current is not None and current.kind is None:
                    if kind != _TERMINATE:
                        current.held.append(message)
                        continue
                    self._decide(conn, current)
                    if not await self._release(conn, current, out):
                        return False
                out += message
                continue
            if current is None:
                if kind == _FLUSH:  # a Flush between requests has no reply: not a request
                    out += message
                    continue
                current = _Request()
                conn.pending.append(current)
            if current.kind is None:
                current.held.append(message)
            else:
                out += message
            if kind == _PARSE:
                name, text = _cstrings(message, 5, 2)
                conn.statements[name] = text
                if current.parse_text is None:
                    current.parse_text = text
            elif kind == _BIND:
                if current.bind_text is None:
                    _portal, statement = _cstrings(message, 5, 2)
                    current.bind_text = conn.statements.get(statement, "")
            elif kind == _QUERY:
                if current.query_text is None:
                    current.query_text = _cstrings(message, 5, 1)[0]
            if current.kind is None and kind in _DECIDES_KIND:
                self._decide(conn, current)
                if not await self._release(conn, current, out):
                    return False
            if kind in _ENDS_REQUEST:
                if not await self._end_request(conn, current, out):
                    return False
                current = None

    def _decide(self, conn: _Connection, request: _Request) -> None:
        """Classify `request` from what it has shown so far."""
        prepare = False
        if request.bind_text is not None:
            text = request.bind_text
        elif request.query_text is not None:
            text = request.query_text
        elif request.parse_text is not None:
            text, prepare = request.parse_text, True
        else:
            text = ""
        try:
            kind = self.classify(text) or "other"
        except Exception as exc:
            with self._lock:
                self._errors.append(exc)
            kind = "other"
        self._register(conn, request, "prepare:" + kind if prepare else kind, text)

    def _register(self, conn: _Connection, request: _Request, kind: str, text: str) -> None:
        """Count the request, record it, and attach the faults it is the occurrence of."""
        request.kind = kind
        request.sql = text
        with self._changed:
            self._counts[kind] += 1
            self._history.append((conn.number, kind, text[:SQL_PREFIX]))
            for armed in list(self._armed):
                if armed.fault.kind == kind:
                    armed.seen += 1
                    if armed.seen == armed.fault.occurrence:
                        self._armed.remove(armed)
                        request.faults.append(armed.fault)
            self._changed.notify_all()
        if any(fault.point == "after_request" for fault in request.faults):
            request.gate = asyncio.Event()

    async def _release(self, conn: _Connection, request: _Request, out: bytearray) -> bool:
        """Forward the held messages, acting first for before_request and mid_request faults.

        False if a fault ended the forwarding on this connection."""
        assert conn.server_writer is not None
        for fault in [f for f in request.faults if f.point in ("before_request", "mid_request")]:
            request.faults.remove(fault)
            if out:
                await _send(conn.server_writer, bytes(out))
                out.clear()
            if fault.point == "mid_request":
                first = request.held[0]
                half = max(1, len(first) // 2)
                await _send(conn.server_writer, first[:half])
                request.held[0] = first[half:]
            if await self._act(conn, request, fault):
                return False
        for message in request.held:
            out += message
        request.held.clear()
        return True

    async def _end_request(self, conn: _Connection, request: _Request, out: bytearray) -> bool:
        """The last message of `request` is in `out`: act for after_request faults."""
        assert conn.server_writer is not None
        for fault in [f for f in request.faults if f.point == "after_request"]:
            request.faults.remove(fault)
            if out:
                await _send(conn.server_writer, bytes(out))
                out.clear()
            if fault.action == "delay":
                self._record(conn, request, fault)
                assert request.gate is not None
                asyncio.get_running_loop().call_later(fault.delay_seconds, request.gate.set)
            elif await self._act(conn, request, fault):
                return False
        return True

    # -- server to client -------------------------------------------------------------------

    async def _backend(self, conn: _Connection) -> bool:
        """Forward the server's messages. True at EOF, False once a fault ended forwarding."""
        assert conn.server_reader is not None
        reader, client = conn.server_reader, conn.client_writer
        buffer = bytearray()
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                return True
            buffer += data
            size = len(buffer)
            position = 0  # start of the next message to parse
            start = 0  # start of the bytes not yet forwarded
            while size - position >= 5:
                length = struct.unpack_from("!I", buffer, position + 1)[0]
                if length < 4:
                    raise _ProtocolError(f"message length {length}")
                end = position + 1 + length
                if end > size:
                    break
                kind = buffer[position]
                if kind not in _ASYNC_BACKEND and conn.pending:
                    request = conn.pending[0]
                    if request.gate is not None and not request.gate.is_set():
                        if position > start:
                            await _send(client, buffer[start:position])
                            start = position
                        await request.gate.wait()
                    index = request.replies
                    request.replies += 1
                    fault = _reply_fault(request, kind, index)
                    if fault is not None:
                        request.faults.remove(fault)
                        await _send(client, buffer[start:end])
                        start = end
                        if await self._act(conn, request, fault):
                            return False
                    if kind == _READY_FOR_QUERY:
                        conn.pending.popleft()
                position = end
            if position > start:
                await _send(client, buffer[start:position])
            del buffer[:position]

    # -- acting -----------------------------------------------------------------------------

    def _record(self, conn: _Connection, request: _Request, fault: Fault) -> None:
        record = FiredFault(fault, conn.number, request.kind or "", request.sql, time.monotonic())
        with self._changed:
            self._fired.append(record)
            self._changed.notify_all()

    async def _act(self, conn: _Connection, request: _Request, fault: Fault) -> bool:
        """Carry out `fault` now; True if forwarding on this connection is over."""
        self._record(conn, request, fault)
        if fault.action == "delay":
            await asyncio.sleep(fault.delay_seconds)
            return False
        if fault.action == "cut":
            conn.abort()
        else:
            conn.blackhole(fault.blackhole_seconds)
        return True


def _reply_fault(request: _Request, kind: int, index: int) -> Fault | None:
    """The after_reply_message fault of `request` that acts after this reply message."""
    for fault in request.faults:
        if fault.point != "after_reply_message":
            continue
        if fault.reply_type is not None:
            if ord(fault.reply_type) == kind:
                return fault
        elif fault.index == index:
            return fault
    return None
