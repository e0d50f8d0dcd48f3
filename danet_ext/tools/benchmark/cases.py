"""The benchmark cases: PAM, CAM and whole modules, each implementation,
forward and forward+backward."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch.nn import functional as F

from ... import reference
from ...ops import channel_attention, position_attention
from .measure import peak_memory, time_call


@dataclass
class Result:
    op: str
    impl: str
    mode: str  # "forward" or "forward+backward"
    shape: str
    n: int
    seconds: Optional[float]
    peak_bytes: Optional[float]
    gflops: Optional[float] = None
    note: str = ""
    extra: Dict[str, object] = field(default_factory=dict)


def pam_flops(B: int, Cq: int, C: int, N: int) -> float:
    """Forward FLOPs of position attention: the two N x N products."""
    return 2.0 * B * N * N * (Cq + C)


def cam_flops(B: int, C: int, N: int) -> float:
    return 4.0 * B * C * C * N


# Set to "0", the CUDA kernels run float16/bfloat16 on CUDA cores instead of tensor cores.
TENSOR_CORES_ENV = "DANET_EXT_TENSOR_CORES"


def _pam_impls(device: str):
    def sdpa(q, k, v):
        # (B, 1, N, d) layout, scale 1 as DANet; layouts prepared outside the timing.
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)

    def cuda_cores(q, k, v):
        # float16/bfloat16 forced onto the CUDA-core kernels; read by the launcher at each call
        old = os.environ.get(TENSOR_CORES_ENV)
        os.environ[TENSOR_CORES_ENV] = "0"
        try:
            return position_attention(q, k, v, backend="extension")
        finally:
            if old is None:
                del os.environ[TENSOR_CORES_ENV]
            else:
                os.environ[TENSOR_CORES_ENV] = old

    return {
        "danet_ext": lambda q, k, v: position_attention(q, k, v, backend="extension"),
        "danet_ext_cuda_cores": cuda_cores,
        "reference": reference.position_attention,
        "reference_compiled": torch.compile(reference.position_attention, dynamic=False),
        "sdpa": sdpa,
        "sdpa_8head": sdpa,  # same call on the 8-head layout (_to_sdpa_8head_layout)
    }


def default_pam_impls(device: str, dtype: torch.dtype) -> tuple:
    """The implementations worth comparing; on CUDA in float16/bfloat16 also our CUDA-core kernels."""
    impls = ("danet_ext", "reference", "reference_compiled", "sdpa")
    if device == "cpu":
        impls += ("sdpa_8head",)  # the layout that lets PyTorch's CPU flash attention take PAM
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16):
        impls = ("danet_ext", "danet_ext_cuda_cores", "reference", "reference_compiled", "sdpa")
    return impls


def _to_sdpa_layout(t: torch.Tensor) -> torch.Tensor:
    B, C, H, W = t.shape
    return t.reshape(B, C, H * W).transpose(1, 2).unsqueeze(1).contiguous().requires_grad_(t.requires_grad)


def _to_sdpa_8head_layout(t: torch.Tensor, is_value: bool, heads: int = 8) -> torch.Tensor:
    """What a user does to run PAM on PyTorch's CPU flash attention, which needs equal
    head widths: query and key repeated over `heads` heads, the value split into
    `heads` heads of C / heads channels. (B, heads, N, d)."""
    B, C, H, W = t.shape
    x = t.reshape(B, C, H * W).transpose(1, 2)  # B x N x C
    if is_value:
        x = x.reshape(B, H * W, heads, C // heads).transpose(1, 2)
    else:
        x = x.unsqueeze(1).expand(B, heads, H * W, C)
    return x.contiguous().requires_grad_(t.requires_grad)


def reference_pam_bytes(B: int, N: int, backward: bool, itemsize: int = 4) -> float:
    """Rough memory of the reference: the N x N energy and attention (and their grads)."""
    return B * N * N * itemsize * (4 if backward else 2)


def bench_position_attention(sizes, B=1, Cq=64, C=512, device="cpu", dtype=torch.float32, repeats=3,
                             impls: Optional[tuple] = None, modes=("forward", "forward+backward"),
                             memory_limit: Optional[float] = None, progress=None) -> List[Result]:
    """PAM forward and forward+backward over (H, W) sizes."""
    fns = _pam_impls(device)
    impls = impls if impls is not None else default_pam_impls(device, dtype)
    limit = memory_limit if memory_limit is not None else _default_memory_limit(device)
    results = []
    for H, W in sizes:
        N = H * W
        for mode in modes:
            backward = mode != "forward"
            for impl in impls:
                if progress is not None:
                    progress.set_postfix_str(f"PAM {impl} {mode} {H}x{W}")
                shape = f"{B}x{C}x{H}x{W}"
                if impl.startswith(("reference", "sdpa")) and impl != "sdpa_8head" and \
                        reference_pam_bytes(B, N, backward) > limit:
                    results.append(Result("position_attention", impl, mode, shape, N, None, None,
                                          note=f"skipped: needs ~{reference_pam_bytes(B, N, backward) / 2**30:.0f} GiB"))
                    if progress is not None:
                        progress.update(1)
                    continue
                q = torch.randn(B, Cq, H, W, device=device, dtype=dtype, requires_grad=backward)
                k = torch.randn(B, Cq, H, W, device=device, dtype=dtype, requires_grad=backward)
                v = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=backward)
                args = (q, k, v)
                if impl == "sdpa":
                    args = tuple(_to_sdpa_layout(t.detach()).requires_grad_(backward) for t in args)
                elif impl == "sdpa_8head":
                    args = tuple(_to_sdpa_8head_layout(t.detach(), i == 2).requires_grad_(backward)
                                 for i, t in enumerate(args))
                fn = fns[impl]

                def run():
                    out = fn(*args)
                    if backward:
                        out.backward(torch.ones_like(out))
                        for t in args:
                            t.grad = None
                    return out if not backward else None

                try:
                    with torch.set_grad_enabled(backward):
                        seconds = time_call(run, device, repeats=repeats)
                        mem = peak_memory(run, device)  # after the warm-up: steady state
                    flops = pam_flops(B, Cq, C, N) * (3 if backward else 1)
                    results.append(Result("position_attention", impl, mode, shape, N, seconds, mem,
                                          gflops=flops / seconds / 1e9))
                except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. an SDPA backend refusing the shapes
                    results.append(Result("position_attention", impl, mode, shape, N, None, None,
                                          note=f"failed: {str(exc).splitlines()[0][:80]}"))
                del q, k, v, args
                if progress is not None:
                    progress.update(1)
    return results


def bench_channel_attention(sizes, channels=(256, 512), B=1, device="cpu", dtype=torch.float32, repeats=3,
                            impls=("danet_ext", "reference"), modes=("forward", "forward+backward"),
                            progress=None) -> List[Result]:
    fns = {"danet_ext": lambda x: channel_attention(x, backend="extension"), "reference": reference.channel_attention,
           "reference_compiled": torch.compile(reference.channel_attention, dynamic=False)}
    results = []
    for C in channels:
        for H, W in sizes:
            for mode in modes:
                backward = mode != "forward"
                for impl in impls:
                    if progress is not None:
                        progress.set_postfix_str(f"CAM {impl} {mode} C={C} {H}x{W}")
                    x = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=backward)
                    fn = fns[impl]

                    def run():
                        out = fn(x)
                        if backward:
                            out.backward(torch.ones_like(out))
                            x.grad = None
                            return None
                        return out

                    with torch.set_grad_enabled(backward):
                        seconds = time_call(run, device, repeats=repeats)
                        mem = peak_memory(run, device)  # after the warm-up: steady state
                    flops = cam_flops(B, C, H * W) * (3 if backward else 1)
                    results.append(Result("channel_attention", impl, mode, f"{B}x{C}x{H}x{W}", H * W, seconds, mem,
                                          gflops=flops / seconds / 1e9, extra={"C": C}))
                    if progress is not None:
                        progress.update(1)
    return results


def bench_module(name: str, make_module: Callable[[str], torch.nn.Module], make_input: Callable[[], torch.Tensor],
                 device="cpu", repeats=3, modes=("forward", "forward+backward"), progress=None) -> List[Result]:
    """A module (head, full model) with the extension backend against the reference backend."""
    results = []
    for mode in modes:
        backward = mode != "forward"
        for impl, backend in (("danet_ext", "extension"), ("reference", "reference")):
            if progress is not None:
                progress.set_postfix_str(f"{name} {impl} {mode}")
            module = make_module(backend).to(device)
            module.train(backward)
            x = make_input().to(device)

            def run():
                out = module(x)
                outs = out if isinstance(out, tuple) else (out,)
                if backward:
                    sum(o.float().mean() for o in outs).backward()
                    module.zero_grad(set_to_none=True)
                    return None
                return outs

            with torch.set_grad_enabled(backward):
                seconds = time_call(run, device, repeats=repeats)
                mem = peak_memory(run, device)
            results.append(Result(name, impl, mode, "x".join(map(str, x.shape)), x.shape[2] * x.shape[3],
                                  seconds, mem))
            if progress is not None:
                progress.update(1)
    return results


def _default_memory_limit(device: str) -> float:
    if device == "cuda" and torch.cuda.is_available():
        return 0.8 * torch.cuda.get_device_properties(0).total_memory
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return 0.5 * pages
    except (ValueError, OSError):
        return 8 * 2**30
