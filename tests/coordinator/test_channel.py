"""RequestChannel's routing of worker replies (coordinator/channel.py), on real WorkerClients
(ZeroMQ sockets left unconnected: the test feeds the replies the read loop would hand over).

Found by the request fuzz test: a client may reuse a request_id as soon as its request ended,
while a verdict of that request is still on its way; routed by the client's id, it reached the new
request, whose schedule had no block in flight for it (IndexError, the request ended INTERNAL).
"""

from __future__ import annotations

import zmq.asyncio

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
