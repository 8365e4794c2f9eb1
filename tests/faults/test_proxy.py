"""The fault-injection proxy itself, against the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import errors

from tests.conftest import fetch_all, server_address
from tests.faults.proxy import PROTOCOL_V3, Fault, FaultProxy, first_word

pytestmark = pytest.mark.timeout(60)

TEN_MB = 10 * 1024 * 1024


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(*server_address()) as running:
        yield running
        assert running.errors == []


@pytest.fixture
def items(dsn: str) -> str:
    """The test database, with an empty table `items (id int)`."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE items (id int)")
    return dsn


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def item_ids(dsn: str) -> list[int]:
    return [row[0] for row in fetch_all(dsn, "SELECT id FROM items ORDER BY id")]


# -- plain traffic --------------------------------------------------------------------------


def test_queries_prepared_statements_pipeline_and_a_large_result_pass(
    proxy: FaultProxy, dsn: str
) -> None:
    with psycopg.connect(proxy.dsn(dsn), autocommit=True) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
        for value in range(3):
            cursor = connection.execute("SELECT %s::int", [value], prepare=True)
            assert cursor.fetchone() == (value,)
        with connection.pipeline():
            first = connection.execute("SELECT 41")
            second = connection.execute("VALUES (42)")
        assert first.fetchone() == (41,)
        assert second.fetchone() == (42,)
        row = connection.execute("SELECT repeat('x', %s)", [TEN_MB]).fetchone()
        assert row is not None and len(row[0]) == TEN_MB
        assert connection.execute("SELECT 'still in step'").fetchone() == ("still in step",)

    assert proxy.kinds() == [
        "startup",
        "SELECT",
        "prepare:SELECT",  # psycopg prepares the statement: Parse/Sync...
        "SELECT",  # ... then executes it: Bind/Describe/Execute/Sync
        "SELECT",
        "SELECT",
        "SELECT",  # the pipeline is one request, of the kind of its first statement
        "SELECT",
        "SELECT",
    ]
    history = proxy.history
    assert {number for number, _, _ in history} == {1}
    assert history[2][2] == history[3][2] == "SELECT $1::int"
    assert history[6][2] == "SELECT 41"
    assert proxy.counts["SELECT"] == 7
    assert wait_until(lambda: proxy.connections == [])


def test_listen_notify_through_the_proxy(proxy: FaultProxy, dsn: str) -> None:
    with psycopg.connect(proxy.dsn(dsn), autocommit=True) as listener:
        listener.execute("LISTEN events")
        with psycopg.connect(dsn, autocommit=True) as sender:
            sender.execute("NOTIFY events, 'from outside'")
        received = list(listener.notifies(timeout=5, stop_after=1))
        assert [(n.channel, n.payload) for n in received] == [("events", "from outside")]
        # A notification to oneself arrives inside a reply, before its ReadyForQuery: it is
        # forwarded without upsetting the matching of replies to requests.
        listener.execute("NOTIFY events, 'to myself'")
        assert listener.execute("SELECT 2").fetchone() == (2,)
        received = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.payload for n in received] == ["to myself"]
    assert proxy.kinds() == ["startup", "LISTEN", "NOTIFY", "SELECT"]


def test_copy_in_and_out(proxy: FaultProxy, items: str) -> None:
    with psycopg.connect(proxy.dsn(items), autocommit=True) as connection:
        cursor = connection.cursor()
        with cursor.copy("COPY items FROM STDIN") as copy:
            for value in range(1000):
                copy.write_row((value,))
        with cursor.copy("COPY (SELECT id FROM items WHERE id < 3 ORDER BY id) TO STDOUT") as copy:
            assert [row for row in copy.rows()] == [("0",), ("1",), ("2",)]
        assert connection.execute("SELECT count(*) FROM items").fetchone() == (1000,)
    assert proxy.kinds() == ["startup", "COPY", "COPY", "SELECT"]


def test_custom_classification(dsn: str) -> None:
    def classify(sql: str) -> str | None:
        return "claim" if "FOR UPDATE" in sql else None

    with FaultProxy(*server_address(), classify=classify) as proxy:
        fault = proxy.add_fault(Fault(kind="claim", point="before_request", action="cut"))
        with psycopg.connect(proxy.dsn(dsn), autocommit=True) as connection:
            connection.execute("SELECT 1")
            connection.execute("SELECT %s::int", [1], prepare=True)
            with pytest.raises(psycopg.OperationalError):
                connection.execute("SELECT 1 FOR UPDATE")
        assert proxy.wait_fired(fault)
        assert proxy.kinds() == ["startup", "other", "prepare:other", "other", "claim"]


def test_first_word() -> None:
    assert first_word("select 1") == "SELECT"
    assert first_word("  -- a comment\n /* another */ (with x as (select 1) select 1)") == "WITH"
    assert first_word("\n\tListen events") == "LISTEN"
    assert first_word("") is None
    assert first_word("  ;") is None


# -- messages on the wire -------------------------------------------------------------------


class RawClient:
    """The frontend side of the protocol on a bare socket, to control every byte."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes, *, byte_by_byte: bool = False) -> None:
        if not byte_by_byte:
            self.socket.sendall(data)
            return
        for byte in data:
            self.socket.sendall(bytes([byte]))
            time.sleep(0.001)

    def receive_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.socket.recv(size - len(data))
            if not chunk:
                raise EOFError(f"EOF after {data!r}")
            data += chunk
        return data

    def message(self) -> tuple[str, bytes]:
        header = self.receive_exactly(5)
        length = struct.unpack("!I", header[1:])[0]
        return chr(header[0]), self.receive_exactly(length - 4)

    def reply(self) -> list[tuple[str, bytes]]:
        """Messages up to and including ReadyForQuery."""
        messages = [self.message()]
        while messages[-1][0] != "Z":
            messages.append(self.message())
        return messages

    def at_eof(self) -> bool:
        return self.socket.recv(1) == b""

    def close(self) -> None:
        self.socket.close()


def startup_message(database: str) -> bytes:
    params = b"user\0postgres\0database\0" + database.encode() + b"\0\0"
    return struct.pack("!ii", 8 + len(params), PROTOCOL_V3) + params


def query_message(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", 4 + len(body)) + body


def types(messages: list[tuple[str, bytes]]) -> str:
    return "".join(kind for kind, _ in messages)


@pytest.fixture
def raw(proxy: FaultProxy, database_name: str, dsn: str) -> Iterator[RawClient]:
    """A bare-socket client through the proxy, past the startup phase."""
    client = RawClient(proxy.port)
    client.send(startup_message(database_name))
    assert client.reply()[-1][0] == "Z"
    yield client
    client.close()


def test_messages_split_across_reads_or_packed_in_one(
    proxy: FaultProxy, database_name: str, dsn: str
) -> None:
    client = RawClient(proxy.port)
    try:
        client.send(struct.pack("!ii", 8, 80877103))  # SSLRequest: the proxy says no itself
        assert client.receive_exactly(1) == b"N"
        client.send(startup_message(database_name), byte_by_byte=True)
        assert client.reply()[-1][0] == "Z"
        client.send(query_message("SELECT 1"), byte_by_byte=True)
        assert types(client.reply()) == "TDCZ"
        # Two whole queries and the first half of a third in one write, then the rest.
        third = query_message("SELECT 3")
        client.send(query_message("SELECT 1") + query_message("VALUES (2)") + third[:7])
        time.sleep(0.05)
        client.send(third[7:])
        replies = [client.reply() for _ in range(3)]
        assert [types(reply) for reply in replies] == ["TDCZ"] * 3
        assert [reply[1][1][-1:] for reply in replies] == [b"1", b"2", b"3"]
        client.send(b"X\0\0\0\x04")
        assert client.at_eof()
    finally:
        client.close()
    assert proxy.kinds() == ["startup", "SELECT", "SELECT", "VALUES", "SELECT"]


def test_after_reply_message_counts_reply_messages_only(proxy: FaultProxy, raw: RawClient) -> None:
    # The reply of this DO block is NoticeResponse (asynchronous, not counted),
    # CommandComplete (index 0), ReadyForQuery (index 1).
    fault = proxy.add_fault(Fault(kind="DO", point="after_reply_message", index=0, action="cut"))
    raw.send(query_message("DO $$ BEGIN RAISE NOTICE 'hello'; END $$"))
    assert raw.message()[0] == "N"
    assert raw.message()[0] == "C"
    assert raw.at_eof()
    assert proxy.wait_fired(fault)


def test_after_reply_message_of_a_type(proxy: FaultProxy, raw: RawClient) -> None:
    fault = proxy.add_fault(
        Fault(kind="SELECT", point="after_reply_message", reply_type="D", action="cut")
    )
    raw.send(query_message("SELECT * FROM generate_series(1, 3)"))
    assert [raw.message()[0] for _ in range(2)] == ["T", "D"]
    assert raw.at_eof()
    assert proxy.wait_fired(fault)
    record = proxy.fired[0]
    assert (record.connection, record.kind) == (1, "SELECT")
    assert record.sql == "SELECT * FROM generate_series(1, 3)"


# -- faults ---------------------------------------------------------------------------------


def test_cut_after_commit_complete_loses_only_the_reply(proxy: FaultProxy, items: str) -> None:
    fault = proxy.add_fault(
        Fault(kind="COMMIT", point="after_reply_message", reply_type="C", action="cut")
    )
    connection = psycopg.connect(proxy.dsn(items))
    try:
        connection.execute("INSERT INTO items VALUES (1)")
        with pytest.raises(psycopg.OperationalError):
            connection.commit()
    finally:
        connection.close()
    assert proxy.wait_fired(fault)
    assert item_ids(items) == [1]  # committed: only the ReadyForQuery was lost
    assert proxy.kinds() == ["startup", "BEGIN", "INSERT", "COMMIT"]


def test_cut_before_insert(proxy: FaultProxy, items: str) -> None:
    fault = proxy.add_fault(Fault(kind="INSERT", point="before_request", action="cut"))
    with psycopg.connect(proxy.dsn(items), autocommit=True) as connection:
        with pytest.raises(psycopg.OperationalError):
            connection.execute("INSERT INTO items VALUES (1)")
    assert proxy.wait_fired(fault)
    assert item_ids(items) == []


def test_cut_mid_insert(proxy: FaultProxy, items: str) -> None:
    fault = proxy.add_fault(Fault(kind="INSERT", point="mid_request", action="cut"))
    with psycopg.connect(proxy.dsn(items), autocommit=True) as connection:
        with pytest.raises(psycopg.OperationalError):
            connection.execute("INSERT INTO items VALUES (1)")
    assert proxy.wait_fired(fault)
    assert item_ids(items) == []


def test_cut_after_insert_is_sent(proxy: FaultProxy, items: str) -> None:
    fault = proxy.add_fault(Fault(kind="INSERT", point="after_request", action="cut"))
    with psycopg.connect(proxy.dsn(items), autocommit=True) as connection:
        with pytest.raises(psycopg.OperationalError):
            connection.execute("INSERT INTO items VALUES (1)")
    assert proxy.wait_fired(fault)
    # The server had the whole request: it runs it, then notices the client is gone.
    assert wait_until(lambda: item_ids(items) == [1])


def test_cut_during_startup(proxy: FaultProxy, dsn: str) -> None:
    fault = proxy.add_fault(Fault(kind="startup", point="before_request", action="cut"))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(dsn))
    assert proxy.wait_fired(fault)
    with psycopg.connect(proxy.dsn(dsn)) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)


def test_blackhole_leaves_the_client_waiting_until_the_proxy_stops(
    proxy: FaultProxy, dsn: str
) -> None:
    fault = proxy.add_fault(Fault(kind="SELECT", point="before_request", action="blackhole"))
    connection = psycopg.connect(proxy.dsn(dsn), autocommit=True)
    outcome: list[object] = []

    def query() -> None:
        try:
            outcome.append(connection.execute("SELECT 1").fetchone())
        except psycopg.Error as exc:
            outcome.append(exc)

    thread = threading.Thread(target=query, daemon=True)
    thread.start()
    try:
        thread.join(timeout=1.0)
        assert thread.is_alive(), f"the query completed: {outcome}"
        assert proxy.wait_fired(fault)
        assert proxy.connections == [1]  # half-open: neither socket is closed
        proxy.stop()  # closes the black-holed connection too
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.OperationalError)
    finally:
        proxy.stop()
        thread.join(timeout=10)
        connection.close()


def test_blackhole_ends_after_blackhole_seconds(proxy: FaultProxy, dsn: str) -> None:
    fault = proxy.add_fault(
        Fault(kind="SELECT", point="after_request", action="blackhole", blackhole_seconds=0.3)
    )
    with psycopg.connect(proxy.dsn(dsn), autocommit=True) as connection:
        with pytest.raises(psycopg.OperationalError):
            connection.execute("SELECT 1")
    assert proxy.wait_fired(fault)
    assert wait_until(lambda: proxy.connections == [])


async def test_blackhole_with_an_asyncio_client(proxy: FaultProxy, dsn: str) -> None:
    fault = proxy.add_fault(Fault(kind="SELECT", point="after_request", action="blackhole"))
    connection = await psycopg.AsyncConnection.connect(proxy.dsn(dsn), autocommit=True)
    try:
        query = asyncio.ensure_future(connection.execute("SELECT 1"))
        done, _ = await asyncio.wait({query}, timeout=1.0)
        assert not done
        assert await asyncio.to_thread(proxy.wait_fired, fault)
        await asyncio.to_thread(proxy.cut_all)
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(query, timeout=10)
    finally:
        await connection.close()


@pytest.mark.parametrize(
    "fault",
    [
        Fault(kind="SELECT", point="before_request", action="delay", delay_seconds=0.5),
        Fault(kind="SELECT", point="mid_request", action="delay", delay_seconds=0.5),
        Fault(kind="SELECT", point="after_request", action="delay", delay_seconds=0.5),
        Fault(kind="SELECT", point="after_reply_message", action="delay", delay_seconds=0.5),
    ],
    ids=lambda fault: fault.point,
)
def test_delay_then_carry_on(proxy: FaultProxy, dsn: str, fault: Fault) -> None:
    proxy.add_fault(fault)
    with psycopg.connect(proxy.dsn(dsn), autocommit=True) as connection:
        assert connection.execute("SELECT 7").fetchone() == (7,)
        assert connection.execute("SELECT 8").fetchone() == (8,)
    assert [record.fault for record in proxy.fired] == [fault]
    assert proxy.fired[0].sql == "SELECT 7"


def test_occurrences_count_from_when_the_fault_is_added(proxy: FaultProxy, dsn: str) -> None:
    with (
        psycopg.connect(proxy.dsn(dsn), autocommit=True) as first,
        psycopg.connect(proxy.dsn(dsn), autocommit=True) as second,
    ):
        first.execute("SELECT 0")  # before the fault: not counted
        fault = proxy.add_fault(
            Fault(kind="SELECT", occurrence=3, point="before_request", action="cut")
        )
        first.execute("SELECT 1")
        first.execute("VALUES (1)")  # another kind: not counted
        second.execute("SELECT 2")  # counted over all connections
        assert not proxy.has_fired(fault)
        with pytest.raises(psycopg.OperationalError):
            first.execute("SELECT 3")
        assert proxy.wait_fired(fault)
        assert second.execute("SELECT 4").fetchone() == (4,)  # fired once only
    (record,) = proxy.fired
    assert (record.connection, record.sql) == (1, "SELECT 3")
    assert proxy.counts["SELECT"] == 5


def test_cut_all(proxy: FaultProxy, dsn: str) -> None:
    connections = [psycopg.connect(proxy.dsn(dsn), autocommit=True) for _ in range(2)]
    try:
        assert proxy.connections == [1, 2]
        proxy.cut_all()
        for connection in connections:
            with pytest.raises(psycopg.OperationalError):
                connection.execute("SELECT 1")
        assert wait_until(lambda: proxy.connections == [])
        with psycopg.connect(proxy.dsn(dsn)) as connection:
            assert connection.execute("SELECT 1").fetchone() == (1,)
    finally:
        for connection in connections:
            connection.close()


def test_cancel_request_passes_through(proxy: FaultProxy, dsn: str) -> None:
    with psycopg.connect(proxy.dsn(dsn), autocommit=True) as connection:
        outcome: list[object] = []

        def sleep() -> None:
            try:
                outcome.append(connection.execute("SELECT pg_sleep(10)").fetchone())
            except psycopg.Error as exc:
                outcome.append(exc)

        thread = threading.Thread(target=sleep, daemon=True)
        thread.start()
        sleeping = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND state = 'active'"
            " AND query = 'SELECT pg_sleep(10)'"
        )
        assert wait_until(lambda: fetch_all(dsn, sleeping) == [(1,)])
        connection.cancel()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], errors.QueryCanceled)
        assert connection.execute("SELECT 1").fetchone() == (1,)
    assert proxy.kinds() == ["startup", "SELECT", "cancel", "SELECT"]
