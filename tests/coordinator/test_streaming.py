"""How a request's chunks reach its transport (coordinator/servicer.py): the run commits in a task
of its own and never waits on the client's stream; what piles up while a send waits goes as one
message, in order, the last one's finish and stats on it; a failure comes after the chunks before
it. The run is driven by the fake workers of the schedule tests (no processes)."""

from __future__ import annotations

import asyncio

import pytest

from specpipe.coordinator import servicer as servicer_module
from specpipe.coordinator.channel import RequestChannel
from specpipe.coordinator.policy import PolicyConfig
from specpipe.coordinator.servicer import Chunks, SpecPipeServicer
from specpipe.coordinator.validation import ServingLimits
from specpipe.coordinator.workers import WorkerDown
from specpipe.proto.specpipe.v1 import specpipe_pb2

from fake_workers import FakeInbox, FakeWorkers, greedy
from tiny import build_tokenizer

PROMPT = [3, 1, 4, 1, 5]


def response(tokens: list[int], text: str, finish: str = "") -> specpipe_pb2.GenerateResponse:
    message = specpipe_pb2.GenerateResponse(request_id="r", token_ids=tokens, text=text, finish_reason=finish)
    if finish:
        message.stats.generated_tokens = 9
    return message


def test_chunks_waiting_together_go_as_one_in_order_with_the_last_finish():
    async def main():
        chunks = Chunks()
        chunks.put(response([1, 2], "ab"))
        chunks.put(response([3], "c"))
        chunks.put(response([4], "d", finish="length"))
        merged = await chunks.take()
        assert (list(merged.token_ids), merged.text, merged.finish_reason) == ([1, 2, 3, 4], "abcd", "length")
        assert merged.stats.generated_tokens == 9

    asyncio.run(main())


def test_take_waits_for_a_chunk_and_raises_a_failure_or_ends_only_after_the_chunks_before_it():
    async def main():
        chunks = Chunks()
        waiter = asyncio.create_task(chunks.take())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        chunks.put(response([7], "x"))
        assert list((await waiter).token_ids) == [7]
        chunks.put(response([8], "y"))
        chunks.fail(WorkerDown("gone"))
        assert list((await chunks.take()).token_ids) == [8]
        with pytest.raises(WorkerDown):
            await chunks.take()
        ended = Chunks()
        ended.put(response([9], "z"))
        ended.end()
        assert list((await ended.take()).token_ids) == [9]
        assert await ended.take() is None  # (a run that ends without a last chunk leaves no sender waiting)

    asyncio.run(main())


class YieldingInbox(FakeInbox):
    """The fake's events, each after a turn of the event loop (as a socket's would come)."""

    async def get(self):
        await asyncio.sleep(0)
        return await super().get()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def fake_servicer(tokenizer, monkeypatch, workers: FakeWorkers, mode: str) -> SpecPipeServicer:
    """A servicer whose requests run against `workers` (each event after a turn of the loop)."""

    def channel(plan, draft, target):
        made = RequestChannel(plan.request_id, draft, target, use_draft=True)
        made.inbox = YieldingInbox(workers)
        return made

    monkeypatch.setattr(servicer_module, "open_channel", channel)
    policy = PolicyConfig(kind="fixed", num_draft_tokens=4, branch_confidence=0.5)
    limits = ServingLimits(len(tokenizer), context_length=512, max_new_tokens_cap=100, default_mode=mode, policy=policy)
    return SpecPipeServicer(tokenizer, limits, workers.draft, workers.target)


@pytest.mark.parametrize("mode", ["sequential", "specbranch"])
def test_a_client_that_does_not_read_does_not_stop_the_run(tokenizer, monkeypatch, mode):
    """The first send blocks until the run has committed every token and freed both workers: with
    the run waiting on the send (as it did) this never ends; now the rest arrives as one message,
    exactly the target's, and the workers were told to release it once."""
    workers = FakeWorkers(seed=1)
    servicer = fake_servicer(tokenizer, monkeypatch, workers, mode)
    request = specpipe_pb2.GenerateRequest(prompt_ids=PROMPT, max_new_tokens=40, request_id="r")
    sent = []

    async def main():
        async def send(message):
            sent.append(message)
            if len(sent) == 1:  # a client that reads nothing until the run is over
                while "draft:release" not in workers.commands:
                    await asyncio.sleep(0.001)

        await asyncio.wait_for(servicer.execute(request, send), timeout=10)

    asyncio.run(main())
    tokens = [token for message in sent for token in message.token_ids]
    expected = greedy(PROMPT, 40)
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
    assert tokens == expected
    assert len(sent) == 2 and sent[-1].finish_reason in ("length", "eos")
    assert sent[-1].stats.generated_tokens == len(expected)
    assert workers.commands.count("target:release") == workers.commands.count("draft:release") == 1


@pytest.mark.parametrize("cancels", [1, 2])
def test_a_request_cancelled_while_its_send_waits_is_released_on_both_workers(tokenizer, monkeypatch, cancels):
    """The client goes away while a send waits on it (cancelled once; or twice, as a transport may
    when a write fails under a cancel): the run stops and both workers are told to release it, with
    nothing sent after the release."""
    workers = FakeWorkers(seed=2)
    servicer = fake_servicer(tokenizer, monkeypatch, workers, "specbranch")
    request = specpipe_pb2.GenerateRequest(prompt_ids=PROMPT, max_new_tokens=100, request_id="r")
    stuck = asyncio.Event()

    async def main():
        async def send(message):
            stuck.set()
            await asyncio.Event().wait()  # a client that never reads

        task = asyncio.create_task(servicer.execute(request, send))
        await stuck.wait()
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)  # (the run's task ends too)

    asyncio.run(main())
    assert workers.commands[-2:] == ["target:release", "draft:release"]
    assert servicer.finished["cancelled"] == 1 and not servicer.live
