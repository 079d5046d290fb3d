"""The CUDA path end to end: `specpipe serve` with both workers on a GPU (their models, KV stores,
packed forwards and the keyed draws on the device, the q of the data plane leaving it as raw
bytes), run where a CUDA device is (the device machine when one is lent; skipped elsewhere, so the
default CPU run never sees it). `pytest -m gpu` selects this module and the CUDA cases of the
batched-target tests (tests/target_worker/test_architectures.py).

Greedy output must equal Hugging Face greedy of the target on the same GPU in every mode, alone
and eight requests at once; a seeded drafter-invariant request must equal seeded target-only
sampling whatever the mode; the workers must say they run on CUDA.

Not covered with one GPU: the NCCL data plane (`--transport torch` between two CUDA ranks needs two
devices: NCCL refuses two ranks on one GPU); it is the same code as the gloo transport tested on
CPU (tests/e2e/test_transport.py), with the backend picked from the device
(specpipe/distributed.py backend_for).
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from transformers import AutoModelForCausalLM

from specpipe import Client
from specpipe.launch.local import ServerProcess

from checks import greedy_reference
from tiny import PROMPTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODES = ["autoregressive", "sequential", "pipelined", "specbranch"]
MAX_NEW = 40
SEEDED = dict(max_new_tokens=48, temperature=1.0, top_k=40, seed=4242, drafter_invariant=True)


@pytest.fixture(scope="module")
def gpu_server(tiny_models):
    server = ServerProcess(
        [
            "--target",
            str(tiny_models["target"]),
            "--draft",
            str(tiny_models["draft_close"]),
            "--target-device",
            "cuda:0",
            "--draft-device",
            "cuda:0",
        ]
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cuda_greedy(tiny_models):
    """The target's own greedy tokens on the GPU, each step's argmax clear (checks.greedy_reference)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"]).eval().to("cuda:0")
    return lambda prompt_ids, max_new_tokens: greedy_reference(model, prompt_ids, max_new_tokens)


def test_workers_run_on_cuda(gpu_server):
    summary = "\n".join(gpu_server.summary)
    assert summary.count("on cuda:0") == 2, summary  # the target's line and the draft's


@pytest.mark.parametrize("mode", MODES)
def test_greedy_on_cuda_equals_hf_greedy_on_cuda(gpu_server, cuda_greedy, mode):
    client = Client(gpu_server.addr)
    for prompt_ids in PROMPTS:
        token_ids, _, last = client.complete(prompt_ids=prompt_ids, max_new_tokens=MAX_NEW, mode=mode)
        assert token_ids == cuda_greedy(prompt_ids, MAX_NEW), f"prompt {prompt_ids}, {mode}"
        if mode != "autoregressive":
            assert last.stats.draft_tokens > 0, "the draft ran"


def test_eight_requests_at_once_on_cuda_each_equal_their_greedy(gpu_server, cuda_greedy):
    client = Client(gpu_server.addr)
    jobs = [(PROMPTS[i % len(PROMPTS)], MODES[i % len(MODES)]) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda job: client.complete(prompt_ids=job[0], max_new_tokens=MAX_NEW, mode=job[1])[0], jobs)
        )
    for (prompt_ids, mode), token_ids in zip(jobs, results):
        assert token_ids == cuda_greedy(prompt_ids, MAX_NEW), f"prompt {prompt_ids}, {mode}"
    target = {w.role: w for w in client.stats().workers}["target"]
    assert target.forward_rows > target.forwards, "requests shared the target's forwards"


def test_seeded_drafter_invariant_sampling_on_cuda_is_target_only_sampling(gpu_server):
    client = Client(gpu_server.addr)
    reference = client.complete(prompt_ids=PROMPTS[2], mode="autoregressive", **SEEDED)[0]
    assert len(reference) > 0
    for mode in MODES[1:]:
        token_ids, _, last = client.complete(prompt_ids=PROMPTS[2], mode=mode, **SEEDED)
        assert token_ids == reference, mode
        assert last.stats.draft_tokens > 0, mode
