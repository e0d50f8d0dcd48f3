"""Small PAM and CAM forward+backward calls on CUDA, for compute-sanitizer
(memcheck, racecheck): odd sizes that leave partial tiles in every dimension,
through the tensor-core kernels (float16/bfloat16 on compute capability 8.0
and newer, the default) and the CUDA-core kernels (DANET_EXT_TENSOR_CORES=0)."""
import os

import torch

import danet_ext


def run_cases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, Cq, C, H, W in [(2, 3, 5, 7, 9), (1, 64, 130, 9, 11), (1, 1, 1, 1, 1), (1, 33, 200, 13, 11)]:
            q, k = (torch.randn(B, Cq, H, W, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
            v = torch.randn(B, C, H, W, device="cuda", dtype=dtype, requires_grad=True)
            danet_ext.position_attention(q, k, v, backend="extension").float().square().sum().backward()
            x = torch.randn(B, C, H, W, device="cuda", dtype=dtype, requires_grad=True)
            danet_ext.channel_attention(x, backend="extension").float().square().sum().backward()
    torch.cuda.synchronize()


def main():
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.manual_seed(0)
    run_cases()
    os.environ["DANET_EXT_TENSOR_CORES"] = "0"
    run_cases()
    print("sanitizer cases done")


if __name__ == "__main__":
    main()
