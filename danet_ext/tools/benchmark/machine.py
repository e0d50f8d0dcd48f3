"""The machine a benchmark ran on: CPU, GPU, versions, matmul throughput."""
from __future__ import annotations

import os
import platform
from typing import Dict

import torch

from ... import hardware
from ..._build import build_info
from .measure import time_call


def machine_info(device: str = "cpu") -> Dict[str, object]:
    info = {
        "cpu": hardware.cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "danet_ext_backends": build_info().get("backends", []),
        "isa": hardware.describe_cpu()["isa"],
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def matmul_gflops(device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul speed, the yardstick for the kernels' GFLOP/s."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = time_call(lambda: a @ b, device, repeats=repeats)
    return 2 * n ** 3 / t / 1e9
