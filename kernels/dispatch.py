"""Which implementation runs: Triton for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1
(the interpreter, for tests); the PyTorch reference otherwise, so the trainer runs on CPU."""
from __future__ import annotations

import os

import torch


def use_triton(tensor: torch.Tensor) -> bool:
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
