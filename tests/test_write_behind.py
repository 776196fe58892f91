"""The facts' writes behind the stage (streams/worker/write_behind.py): order, reads of unwritten records, failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streams.worker.write_behind import Records, WriteBehind


class _Table:
    """A table whose writes and changelog confirmations the test releases by hand."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.log: list[str] = []
        self.done: dict[int, int] = {}
        self.confirmations: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def write(self, records: Records) -> None:
        for key, value in records.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value
        self.log.append("write " + ",".join(sorted(key.decode() for key in records)))

    async def confirm(self) -> None:
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.confirmations.put(confirmed)
        await confirmed
        self.log.append("confirmed")

    def mark_done(self, positions: dict[int, int]) -> None:
        self.done.update(positions)
        self.log.append(f"done {positions}")

    async def release_confirmation(self) -> None:
        (await asyncio.wait_for(self.confirmations.get(), 5)).set_result(None)


def _writer(table: _Table, most: int = 3, most_events: int = 100) -> WriteBehind:
    return WriteBehind(table.write, table.confirm, table.mark_done, most=most, most_events=most_events)


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_records_wait_for_their_deltas_and_reads_see_them_meanwhile() -> None:
    """Nothing is written before the deltas' acknowledgement; until then reads answer from the batch's records."""
    table = _Table()
    table.data[b"a"] = b"old"
    writes = _writer(table)
    acks = _future()
    await writes.add([acks], {b"a": b"new", b"gone": None}, {0: 7}, 1)
    await _settle()
    assert table.log == [] and table.data == {b"a": b"old"}
    assert writes.get(b"a", table.data.get) == b"new"
    assert writes.get(b"gone", lambda key: b"in the table") is None
    assert writes.get_many([b"a", b"b"], lambda keys: [table.data.get(key) for key in keys]) == [b"new", None]
    acks.set_result(None)
    await _settle()
    assert table.log == ["write a,gone"] and table.data == {b"a": b"new"}
    assert table.done == {}  # the changelog is not confirmed yet
    await table.release_confirmation()
    await writes.drain()
    assert table.log == ["write a,gone", "confirmed", "done {0: 7}"]
    assert table.done == {0: 7} and writes.waiting == 0
    assert writes.get(b"a", lambda key: b"from the table") == b"from the table"


async def test_batches_are_written_in_order_whatever_order_their_deltas_are_acknowledged() -> None:
    """A later batch acknowledged first still waits for the earlier one; slices mark nothing done."""
    table = _Table()
    writes = _writer(table)
    first, second = _future(), _future()
    await writes.add([first], {b"a": b"1"}, None, 1)
    await writes.add([second], {b"b": b"2"}, {0: 9}, 1)
    second.set_result(None)
    await _settle()
    assert table.log == []
    first.set_result(None)
    await table.release_confirmation()
    await table.release_confirmation()
    await writes.drain()
    assert table.log == ["write a", "confirmed", "write b", "confirmed", "done {0: 9}"]


async def test_a_later_record_of_a_key_outlives_the_earlier_write() -> None:
    """A key written by two batches reads as the second's record after the first is written."""
    table = _Table()
    writes = _writer(table)
    first, second = _future(), _future()
    await writes.add([first], {b"a": b"1"}, {0: 1}, 1)
    await writes.add([second], {b"a": b"2"}, {0: 2}, 1)
    first.set_result(None)
    await table.release_confirmation()
    await _settle()
    assert table.data == {b"a": b"1"} and table.done == {0: 1}
    assert writes.get(b"a", table.data.get) == b"2"
    second.set_result(None)
    await table.release_confirmation()
    await writes.drain()
    assert table.data == {b"a": b"2"} and table.done == {0: 2}


async def test_a_stage_that_outruns_kafka_waits_for_the_oldest_batch() -> None:
    """With ``most`` batches unwritten, handing over another waits until the oldest is durable."""
    table = _Table()
    writes = _writer(table, most=2)
    acks = [_future() for _ in range(3)]
    await writes.add([acks[0]], {b"a": b"1"}, None, 1)
    await writes.add([acks[1]], {b"b": b"2"}, None, 1)
    third = asyncio.ensure_future(writes.add([acks[2]], {b"c": b"3"}, None, 1))
    await _settle()
    assert not third.done() and writes.waiting == 2
    acks[0].set_result(None)
    await table.release_confirmation()
    await asyncio.wait_for(third, 5)
    assert writes.waiting == 2 and table.log == ["write a", "confirmed"]


async def test_a_failed_acknowledgement_stops_the_writer_and_reaches_the_stage() -> None:
    """Deltas Kafka refused: their facts are never written, the stage gets the error, abandon starts afresh."""
    table = _Table()
    writes = _writer(table)
    acks = _future()
    await writes.add([acks], {b"a": b"1"}, {0: 5}, 1)
    acks.set_exception(RuntimeError("broker refused"))
    await _settle()
    with pytest.raises(RuntimeError, match="broker refused"):
        writes.check()
    with pytest.raises(RuntimeError, match="broker refused"):
        await writes.add([], {b"b": b"2"}, None, 1)
    with pytest.raises(RuntimeError, match="broker refused"):
        await asyncio.wait_for(writes.drain(), 5)  # raised, not waited for a writer that stopped
    assert table.log == [] and table.done == {}
    writes.abandon()
    assert writes.waiting == 0 and writes.get(b"a", table.data.get) is None
    writes.check()
    await writes.add([], {b"b": b"2"}, {0: 6}, 1)
    await table.release_confirmation()
    await writes.drain()
    assert table.data == {b"b": b"2"} and table.done == {0: 6}


async def test_unwritten_events_are_bounded() -> None:
    """Past ``most_events`` unwritten events the next batch waits for the oldest to be written."""
    table = _Table()
    writes = _writer(table, most=3, most_events=10)
    first, second = _future(), _future()
    await writes.add([first], {b"a": b"1"}, None, 9)
    waiting = asyncio.ensure_future(writes.add([second], {b"b": b"2"}, {0: 3}, 2))  # 9 + 2 events: over
    await _settle()
    assert not waiting.done() and writes.waiting == 1
    first.set_result(None)
    await table.release_confirmation()
    await asyncio.wait_for(waiting, 5)
    assert writes.waiting == 1
    third = asyncio.ensure_future(writes.add([], {b"c": b"3"}, None, 8))  # 2 + 8 events: within the bound
    await asyncio.wait_for(third, 5)
    assert writes.waiting == 2
    second.set_result(None)
    await table.release_confirmation()
    await table.release_confirmation()
    await writes.drain()
    assert table.done == {0: 3} and table.data == {b"a": b"1", b"b": b"2", b"c": b"3"}


async def test_a_backlog_slice_is_written_before_the_stage_goes_on() -> None:
    """A batch of ``most_events`` or more returns only once it is durable, as when the stage waited for each."""
    table = _Table()
    writes = _writer(table, most=3, most_events=10)
    acks = _future()
    slice_added = asyncio.ensure_future(writes.add([acks], {b"a": b"1"}, {0: 10}, 10))
    await _settle()
    assert not slice_added.done() and table.log == []
    acks.set_result(None)
    await table.release_confirmation()
    await asyncio.wait_for(slice_added, 5)
    assert writes.waiting == 0 and table.done == {0: 10}
