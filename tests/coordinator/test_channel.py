"""RequestChannel's routing of worker replies (coordinator/channel.py), on real WorkerClients
(ZeroMQ sockets left unconnected: the test feeds the replies the read loop would hand over), and
how a WorkerClient batches the commands of one loop turn (a real ROUTER socket in their place).

Found by the request fuzz test: a client may reuse a request_id as soon as its request ended,
while a verdict of that request is still on its way; routed by the client's id, it reached the new
request, whose schedule had no block in flight for it (IndexError, the request ended INTERNAL).
"""

from __future__ import annotations

import asyncio
import contextlib

import zmq
import zmq.asyncio

from specpipe import wire
from specpipe.coordinator.channel import RequestChannel
from specpipe.coordinator.workers import WorkerClient
from specpipe.proto.specpipe.worker.v1 import worker_pb2


def verdicts(*wire_ids: str) -> worker_pb2.Verdicts:
    return worker_pb2.Verdicts(
        verdicts=[worker_pb2.Verdict(request_id=wire_id, block_id=1, next_token_id=7) for wire_id in wire_ids]
    )


def test_a_late_reply_to_an_ended_request_never_reaches_a_new_request_of_the_same_id():
    context = zmq.asyncio.Context()
    draft, target = (WorkerClient(role, "", context, 0.5, 1.5) for role in ("draft", "target"))
    try:
        first = RequestChannel("reused", draft, target, use_draft=True)
        for worker in (target, draft):  # what release() does before it sends Release
            worker.detach(first.wire_id)
        second = RequestChannel("reused", draft, target, use_draft=True)
        assert first.wire_id != second.wire_id and first.request_id == second.request_id == "reused"

        target._on_verdicts(verdicts(first.wire_id), [])  # the first request's late verdict
        draft._on_draft_step(worker_pb2.DraftStep(tokens=[worker_pb2.DraftToken(request_id=first.wire_id)]))
        assert second.inbox.empty()

        target._on_verdicts(verdicts(second.wire_id), [])
        event = second.inbox.get_nowait()
        assert event.kind == "verdict" and event.payload.request_id == second.wire_id
    finally:
        for worker in (draft, target):
            worker.socket.close(0)
        context.term()


def test_the_commands_of_one_loop_turn_reach_the_worker_as_one_message_in_order():
    """Every command a turn of the coordinator's loop issues (any request's) goes in one message;
    one command alone goes as itself."""

    async def run() -> list[worker_pb2.Command]:
        context = zmq.asyncio.Context()
        worker = context.socket(zmq.ROUTER)
        port = worker.bind_to_random_port("tcp://127.0.0.1")
        draft = WorkerClient("draft", f"tcp://127.0.0.1:{port}", context, 0.5, 1.5)
        try:
            await draft.command(cancel=worker_pb2.Cancel(request_id="a#1", branch_ids=[2]))
            await draft.command(sync=worker_pb2.Sync(request_id="a#1", branch_id=1, keep_length=5))
            await draft.command(draft=worker_pb2.Draft(request_id="b#2", branch_ids=[1], max_tokens=4))
            await asyncio.sleep(0)  # the turn ends
            await draft.command(release=worker_pb2.Release(request_id="a#1"))
            received = []
            for _ in range(2):
                parts = await asyncio.wait_for(worker.recv_multipart(), 10)
                received.append(wire.decode(worker_pb2.Command, parts[1:])[0])
            assert not await worker.poll(200), "more messages than turns"
            return received
        finally:
            draft.socket.close(0)
            worker.close(0)
            context.term()

    first, second = asyncio.run(run())
    assert first.WhichOneof("kind") == "batch"
    assert [command.WhichOneof("kind") for command in first.batch.commands] == ["cancel", "sync", "draft"]
    assert first.batch.commands[1].sync.keep_length == 5 and first.batch.commands[2].draft.request_id == "b#2"
    assert second.WhichOneof("kind") == "release" and second.release.request_id == "a#1"


def test_commands_sent_before_the_worker_is_connected_go_once_it_is_and_its_replies_are_read():
    """`specpipe serve` makes its worker clients before it spawns the workers: a command issued
    before `connect` waits (in order) and goes once connected; the worker's replies, several at
    once, are all read from the plain socket the loop watches (a pong marks it up, verdicts reach
    the request's inbox)."""

    async def run() -> tuple[list[str], list[worker_pb2.Verdict], bool]:
        context = zmq.asyncio.Context()
        target = WorkerClient("target", "", context, 0.5, 1.5)
        worker = context.socket(zmq.ROUTER)
        try:
            target.start()
            inbox: asyncio.Queue = asyncio.Queue()
            target.attach("a#1", inbox)
            await target.command(release=worker_pb2.Release(request_id="x#1"))
            await asyncio.sleep(0)  # the turn ends: sent, or waiting for a peer
            await target.command(release=worker_pb2.Release(request_id="x#2"))
            await asyncio.sleep(0.05)
            port = worker.bind_to_random_port("tcp://127.0.0.1")
            target.connect(f"tcp://127.0.0.1:{port}")
            released: list[str] = []

            async def until_released() -> bytes:  # (pings come too, alone or batched with them)
                while len(released) < 2:
                    parts = await worker.recv_multipart()
                    command = wire.decode(worker_pb2.Command, parts[1:])[0]
                    batch = command.batch.commands if command.WhichOneof("kind") == "batch" else [command]
                    released.extend(one.release.request_id for one in batch if one.WhichOneof("kind") == "release")
                return parts[0]

            identity = await asyncio.wait_for(until_released(), 10)
            for reply in (worker_pb2.Reply(pong=worker_pb2.Pong(nonce=1, role="target")),) + tuple(
                worker_pb2.Reply(verdicts=verdicts("a#1")) for _ in range(3)
            ):
                await worker.send_multipart([identity, *wire.encode(reply, [])])
            got = [await asyncio.wait_for(inbox.get(), 10) for _ in range(3)]
            return released, [event.payload for event in got], target.healthy
        finally:
            await target.close()
            worker.close(0)
            context.term()

    released, got, healthy = asyncio.run(run())
    assert released == ["x#1", "x#2"]
    assert [verdict.block_id for verdict in got] == [1, 1, 1] and healthy


@contextlib.contextmanager
def two_requests():
    """(target, mine, other): the channels of two requests on real WorkerClients (unconnected)."""
    context = zmq.asyncio.Context()
    draft, target = (WorkerClient(role, "", context, 0.5, 1.5) for role in ("draft", "target"))
    try:
        yield (
            target,
            RequestChannel("mine", draft, target, use_draft=True),
            RequestChannel("other", draft, target, use_draft=True),
        )
    finally:
        for worker in (draft, target):
            worker.socket.close(0)
        context.term()


def test_a_requests_own_verifies_do_not_make_the_target_busy_for_it():
    """The pipelined schedule cuts a block for an idle target at once, and waits for a fuller one
    while the target is busy. Its own verifies are its schedule's to count (the live ones have their
    expected end): after a rejection, the blocks it queued behind the rejected one are answered
    stale with no forward, and until those answers come back the target looked busy, so the
    promoted branch's block waited for more tokens while the target sat idle."""

    async def run() -> None:
        with two_requests() as (target, mine, other):
            await mine.verify(worker_pb2.Verify(block_id=1))
            await mine.verify(worker_pb2.Verify(block_id=2))
            assert not mine.target_busy(), "only its own verifies are queued"
            assert other.target_busy(), "another request's verifies are work the target does first"
            target._on_verdicts(verdicts(mine.wire_id, mine.wire_id), [])
            assert not other.target_busy()
            await other.decode(max_length=20, until_block=True)
            assert mine.target_busy() and other.target_busy(), "a decode is a forward, whoever asked"

    asyncio.run(run())


def decoded(wire_id: str, committed_length: int) -> worker_pb2.Verdicts:
    return worker_pb2.Verdicts(
        verdicts=[worker_pb2.Verdict(request_id=wire_id, committed_length=committed_length, decoded=True)]
    )


def test_a_fill_keeps_the_target_busy_only_until_its_tokens_are_decoded_or_a_block_comes():
    """A decode that fills a wait (Decode.until_block) is work of the target's until it decoded up to
    its length, or a block of the request reached it (the target verifies that instead). Before, the
    client counted it as work until the request's release: every later block of the request was cut
    for a target it thought busy (full, or just in time for a forward that never came) while the
    target sat idle, and every other request's too. A token decoded by itself answers no verify."""

    async def run() -> None:
        with two_requests() as (target, mine, other):
            await mine.decode(max_length=12, until_block=True)  # two tokens, from 10 committed
            assert mine.target_busy() and other.target_busy()
            target._on_verdicts(decoded(mine.wire_id, 10), [])
            assert mine.target_busy(), "one of its two tokens is still to decode"
            target._on_verdicts(decoded(mine.wire_id, 11), [])
            assert not mine.target_busy() and not other.target_busy(), "the fill is done"

            await mine.decode(max_length=16, until_block=True)
            await mine.verify(worker_pb2.Verify(block_id=3))
            assert not mine.target_busy(), "its block came: the target verifies it, its own to count"
            await other.verify(worker_pb2.Verify(block_id=1))
            target._on_verdicts(decoded(mine.wire_id, 12), [])  # (decoded before the block reached it)
            assert mine.target_busy(), "a decoded token answers no verify: the other's is still queued"

            await other.decode(max_length=99)  # to its end: work until it is released
            target._on_verdicts(verdicts(other.wire_id), [])
            target._on_verdicts(decoded(other.wire_id, 98), [])
            assert mine.target_busy()
            await other.release()
            assert not mine.target_busy()

    asyncio.run(run())


def test_commands_go_before_a_request_goes_on_and_woken_requests_still_share_one_message():
    """A schedule that committed tokens lets its commands leave (`commands_go`) before the servicer
    detokenises and writes the client's stream: when it returns, the worker can read them (its
    socket polled without giving the loop a turn); two requests woken in one turn, as by one
    Verdicts reply, still send theirs as one message."""

    async def run() -> list[worker_pb2.Command]:
        context = zmq.asyncio.Context()
        worker = zmq.Context.instance().socket(zmq.ROUTER)  # (blocking: polled without the loop)
        port = worker.bind_to_random_port("tcp://127.0.0.1")
        draft = WorkerClient("draft", f"tcp://127.0.0.1:{port}", context, 0.5, 1.5)
        try:
            await draft.command(ping=worker_pb2.Ping(nonce=1))  # connected: one message through
            await asyncio.sleep(0)
            assert worker.poll(10_000), "the ping never came"
            worker.recv_multipart()
            woken = asyncio.Event()
            readable = []

            async def request(name: str) -> None:
                await woken.wait()
                await draft.command(sync=worker_pb2.Sync(request_id=name, branch_id=0, keep_length=3))
                await RequestChannel.commands_go()
                readable.append(worker.poll(2000))  # (blocks the loop: nothing else runs meanwhile)

            tasks = [asyncio.create_task(request(name)) for name in ("a#1", "b#2")]
            await asyncio.sleep(0)
            woken.set()  # both wake in one turn
            await asyncio.gather(*tasks)
            assert readable == [True, True]
            received = [wire.decode(worker_pb2.Command, worker.recv_multipart()[1:])[0]]
            assert not worker.poll(200), "more messages than turns"
            return received
        finally:
            draft.socket.close(0)
            worker.close(0)
            context.term()

    (message,) = asyncio.run(run())
    assert message.WhichOneof("kind") == "batch"
    assert [command.sync.request_id for command in message.batch.commands] == ["a#1", "b#2"]
