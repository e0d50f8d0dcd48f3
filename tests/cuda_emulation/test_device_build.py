"""Static checks of the real device build (danet_ext._C compiled by nvcc), no GPU
needed: no kernel spills registers (cuobjdump -res-usage: no local memory, no
stack), and the tensor-core kernels' SASS contains tensor-core MMA (HMMA), for
every architecture compiled. Part of `make test-cuda-emulated`."""
import collections
import glob
import os
import re
import shutil
import subprocess

import pytest

import danet_ext
from danet_ext import _build

CUDA_EXPECTED = os.environ.get("DANET_EXT_EXPECT_CUDA") == "1"


def cuobjdump():
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:  # triton's wheel ships one
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.exists(c):
            return c
    return None


@pytest.fixture(scope="module")
def library():
    if not (danet_ext.HAVE_EXTENSION and _build.has_kernel("cuda")):
        if CUDA_EXPECTED:
            pytest.fail("DANET_EXT_EXPECT_CUDA=1 but danet_ext._C has no CUDA kernels")
        pytest.skip("danet_ext._C was built without CUDA kernels")
    tool = cuobjdump()
    if tool is None:
        pytest.fail("the CUDA kernels are built but no cuobjdump was found (set CUOBJDUMP)")
    so = danet_ext._C.__file__
    return tool, so


def per_function(text, header):
    """{(arch, function): body} from cuobjdump output."""
    out, arch, key = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch, key = m.group(1), None
        m = re.search(header, line)
        if m:
            key = (arch, m.group(1))
            out[key] = ""
            continue
        if key is not None:
            out[key] += line + "\n"
    return out


# Per compiled architecture: the CUDA-core position attention kernels (forward, row_dot,
# grad_qk, grad_v) for float32/float16/bfloat16, the tensor-core ones (stats, output) for
# float16/bfloat16, and channel attention's row softmax and its backward (its products
# run on cuBLAS).
KERNELS_PER_ARCH = 4 * 3 + 2 * 2 + 2


def test_no_register_spills(library):
    tool, so = library
    text = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=True).stdout
    usage = per_function(text, r"Function (\S+):")
    kernels = {k: v for k, v in usage.items() if "danet" in k[1]}
    assert kernels and all(a is not None for a, _ in kernels)
    per_arch = collections.Counter(a for a, _ in kernels)
    assert all(n >= KERNELS_PER_ARCH for n in per_arch.values()), \
        f"expected {KERNELS_PER_ARCH} danet kernels per architecture in {so}, found {dict(per_arch)}"
    spilling = []
    for (arch, fn), body in kernels.items():
        local = int(re.search(r"LOCAL:(\d+)", body).group(1))
        stack = int(re.search(r"STACK:(\d+)", body).group(1))
        if local or stack:
            spilling.append(f"{arch} {fn}: LOCAL {local} STACK {stack}")
    assert not spilling, "kernels spill registers:\n" + "\n".join(spilling)


# An FFMA whose three operands are all registers: a multiply-add of two computed
# values, the instruction of a CUDA-core product loop (80 to 157 of them in the
# CUDA-core PAM kernels' SASS). The softmax's FFMAs (expf's range reduction)
# take a constant operand.
REGISTER_FFMA = r"FFMA\S* R\d+, -?\|?R\d+\|?, -?\|?R\d+\|?, -?\|?R\d+\|? ;"


def sass_counts(body):
    n = {op: len(re.findall(r"\b" + op + r"\b", body)) for op in ("HMMA", "LDSM", "FFMA")}
    n["FFMA_RRR"] = len(re.findall(REGISTER_FFMA, body))
    return n


def test_tensor_core_kernels_use_hmma(library):
    """The tensor-core position-attention kernels (forward_kernel_tc,
    grad_v_kernel_tc, grad_qk_kernel_tc; float16/bfloat16 and TF32) run their
    products as HMMA, fed by LDSM (ldmatrix) for 16-bit operands, with no FFMA
    product loop: at most 32 register-only FFMAs (REGISTER_FFMA; 0 to 19 here)
    where the CUDA-core kernels have 80 or more."""
    tool, so = library
    text = subprocess.run([tool, "-sass", so], capture_output=True, text=True, check=True).stdout
    sass = per_function(text, r"Function : (\S+)")
    tc = {k: v for k, v in sass.items() if re.search(r"(forward|grad_v|grad_qk)_kernel_tc", k[1])}
    archs = {a for a, _ in sass}
    assert len(tc) >= 3 * 2 * len(archs), f"tensor-core kernels not found in {so}: {sorted(f for _, f in tc)}"
    bad = []
    for (arch, fn), body in tc.items():
        n = sass_counts(body)
        sixteen_bit = "MmaTf32" not in fn  # TF32 operands come from shared memory by plain loads
        if n["HMMA"] < 32 or (sixteen_bit and n["LDSM"] == 0) or n["FFMA_RRR"] > 32:
            bad.append(f"{arch} {fn}: {n}")
    assert not bad, "tensor-core kernels without HMMA/LDSM, or with an FFMA product loop:\n" + "\n".join(bad)
    cuda_core = [body for (a, f), body in sass.items() if re.search(r"\d+(forward|grad_v|grad_qk)_kernelI", f)]
    assert cuda_core and all(sass_counts(body)["HMMA"] == 0 and sass_counts(body)["FFMA_RRR"] >= 64
                             for body in cuda_core), "the CUDA-core kernels should be FFMA product loops"
