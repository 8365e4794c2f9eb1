"""The statements fastworker's core sends, as the server receives them: a fastworker drain
of a few jobs through a small TCP relay that reads the protocol's Parse (named and unnamed
statements) and Query (session settings) messages on their way to the server.

The floor and ceiling rows run these texts themselves, so they always run the statements
of the build under test, whatever the core's SQL is at the time.
"""

from __future__ import annotations

import asyncio
import functools
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from benches import child
from benches.tables import reset_queue

SSL_REQUEST = 80877103
GSS_REQUEST = 80877104


@dataclass
class CoreStatements:
    """What the core's connections sent: statements parsed, and simple queries (its `SET`s)."""

    parsed: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)

    def one(self, *markers: str, without: tuple[str, ...] = ()) -> str:
        """The statement that holds every marker and none of `without`."""
        found = [
            text
            for text in dict.fromkeys(self.parsed)
            if all(marker in text for marker in markers)
            and not any(marker in text for marker in without)
        ]
        if len(found) != 1:
            raise RuntimeError(f"{len(found)} core statements hold {markers} (not {without})")
        return found[0]

    @property
    def claim(self) -> str:
        """The claim on its own (sql.rs `CLAIM`)."""
        return self.one("candidate AS", "SET status = 'doing'", without=("finished AS", "room("))

    @property
    def complete_and_claim(self) -> str:
        """The statement that ends a batch and claims (sql.rs `COMPLETE_AND_CLAIM`)."""
        return self.one("finished AS", "claimed AS", without=("room(",))

    @property
    def settings(self) -> list[tuple[str, str]]:
        """The session settings of the job connection (`SET name TO value`), in order."""
        pairs: dict[str, str] = {}
        for query in self.queries:
            for name, value in re.findall(r"SET\s+(\w+)\s+TO\s+([^;]+)", query):
                pairs[name] = value.strip()
        return list(pairs.items())


def _client_messages(buffer: bytearray, started: list[bool], seen: CoreStatements) -> None:
    """Consume the complete client messages at the head of `buffer`, noting statements."""
    while True:
        if not started[0]:
            if len(buffer) < 8:
                return
            (length,) = struct.unpack("!I", buffer[:4])
            if len(buffer) < length:
                return
            (code,) = struct.unpack("!I", buffer[4:8])
            del buffer[:length]
            if code not in (SSL_REQUEST, GSS_REQUEST):
                started[0] = True  # the startup message: typed messages follow
            continue
        if len(buffer) < 5:
            return
        kind = buffer[0:1]
        (length,) = struct.unpack("!I", buffer[1:5])
        if len(buffer) < 1 + length:
            return
        body = bytes(buffer[5 : 1 + length])
        del buffer[: 1 + length]
        if kind == b"P":  # Parse: name, query, parameter types
            name_end = body.index(b"\0")
            query_end = body.index(b"\0", name_end + 1)
            seen.parsed.append(body[name_end + 1 : query_end].decode())
        elif kind == b"Q":
            seen.queries.append(body.rstrip(b"\0").decode())


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream: tuple[str, int],
    seen: CoreStatements,
) -> None:
    server_reader, server_writer = await asyncio.open_connection(*upstream)
    buffer = bytearray()
    started = [False]

    async def client_to_server() -> None:
        while data := await reader.read(65536):
            if (
                not started[0]
                and len(data) == 8
                and struct.unpack("!II", data)[1]
                in (
                    SSL_REQUEST,
                    GSS_REQUEST,
                )
            ):
                writer.write(b"N")  # an encryption request: "no", answered in the clear
                await writer.drain()
                continue
            buffer.extend(data)
            _client_messages(buffer, started, seen)
            server_writer.write(data)
            await server_writer.drain()
        server_writer.close()

    async def server_to_client() -> None:
        while data := await server_reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    try:
        await asyncio.gather(client_to_server(), server_to_client())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        server_writer.close()


@functools.cache
def capture(dsn: str) -> CoreStatements:
    """A fastworker drain (C=10, 20 no-op jobs) through the relay: what its core sent
    (once per database and run; it empties the queue)."""
    params = conninfo_to_dict(dsn)
    upstream = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    seen = CoreStatements()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            server = await asyncio.start_server(
                lambda r, w: _relay(r, w, upstream, seen), "127.0.0.1", 0
            )
            holder["server"] = server
            holder["port"] = server.sockets[0].getsockname()[1]
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        reset_queue(dsn, 20, "noop")
        relayed = make_conninfo(dsn, host="127.0.0.1", port=str(holder["port"]), sslmode="disable")
        child.run(child.DrainChild("fastworker", relayed, 10))
    finally:
        loop.call_soon_threadsafe(holder["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("DELETE FROM procrastinate_jobs")
    return seen
