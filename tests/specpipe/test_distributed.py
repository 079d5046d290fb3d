"""torch.distributed set-up choices: the backend follows the device (NCCL on CUDA, gloo on CPU), and
the device follows LOCAL_RANK where CUDA is there. The NCCL path is the gloo path with the other
backend, so these choices are what a GPU run adds to what the CPU tests exercise."""

from __future__ import annotations

import torch

from specpipe.distributed import backend_for, device_for_local_rank


def test_backend_follows_the_device():
    assert backend_for(torch.device("cuda:0")) == "nccl"
    assert backend_for(torch.device("cuda:3")) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_device_for_local_rank_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_for_local_rank() == torch.device("cpu")
    assert device_for_local_rank(0) == torch.device("cpu")


def test_device_for_local_rank_here():
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert device_for_local_rank(0) == expected


def test_device_for_local_rank_with_cuda_is_that_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_for_local_rank() == torch.device("cuda:1")
    assert device_for_local_rank(3) == torch.device("cuda:3")
