"""Runs the emulated kernels built with a sanitizer; started by
test_cuda_emulation.py with the sanitizer runtime preloaded (build.sanitizer_env).

    sanitized_run.py asan|tsan grid             a small grid of shapes, every kernel
    sanitized_run.py asan|tsan selftest NAME    one broken kernel of broken_kernels.cuh

A sanitizer report ends the process with a non-zero status."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build  # noqa: E402
from danet_ext import reference  # noqa: E402

torch.set_num_threads(1)


def close(out, truth, tol):
    err = (out.double() - truth).abs().max().item() if out.numel() else 0.0
    assert err <= tol * max(1.0, truth.abs().max().item()), err


def grid(emu):
    torch.manual_seed(0)
    # shapes with partial tiles everywhere, kept small: the sanitizers slow the threads 5-20x
    for dtype, tol in [(torch.float32, 1e-4), (torch.float16, 3e-2), (torch.bfloat16, 1e-1)]:
        for B, Cq, C, H, W in [(2, 5, 7, 3, 5), (1, 17, 130, 5, 14), (1, 8, 24, 4, 4)]:
            q, k, v = (torch.randn(B, c, H, W).to(dtype) for c in (Cq, Cq, C))
            out, stats = emu.pam_forward(q, k, v)
            close(out, reference.position_attention(q.double(), k.double(), v.double()), tol)
            grads = emu.pam_backward(torch.randn_like(v), q, k, v, out, stats)
            assert all(torch.isfinite(g).all() for g in grads)
            if dtype != torch.float32:
                out_tc, stats_tc = emu.pam_forward(q, k, v, tensor_cores=True)
                close(out_tc, reference.position_attention(q.double(), k.double(), v.double()), tol)
                grads = emu.pam_backward(torch.randn_like(v), q, k, v, out_tc, stats_tc, tensor_cores=True)
                assert all(torch.isfinite(g).all() for g in grads)
        x = torch.randn(2, 19, 3, 7).to(dtype)
        out, attn = emu.cam_forward(x)
        close(out, reference.channel_attention(x.double()), tol)
        assert torch.isfinite(emu.cam_backward(torch.randn_like(x), x, attn)).all()
    print("grid passed")


def main():
    variant, what = sys.argv[1], sys.argv[2]
    emu = build.import_built(variant)
    if what == "grid":
        grid(emu)
    else:
        name = sys.argv[3]
        x = torch.randn(64 * 256 if name == "missing_barrier" else 256)
        emu.selftest(name, x, x)
        print("selftest ran without a sanitizer report:", name)


if __name__ == "__main__":
    main()
