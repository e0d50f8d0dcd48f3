"""A performance model of the CUDA kernels on an H100 (SXM, 132 SMs), written
before any GPU has run them: for each kernel, the FLOPs it executes, the bytes
it moves to and from HBM, its registers (read from the built library's SASS
with cuobjdump when it is there), shared memory, blocks per SM, waves, and the
time these imply; beside it the same for the official code (cuBLAS GEMMs and a
softmax over the N x N matrix). The predictions go into the README's GPU
section next to the measured numbers of `make gpu-suite`, where a GPU was lent.

    python benchmarks/gpu_perf_model.py [--out benchmarks/results/gpu_perf_model.md]

Assumptions (stated, not measured here):
  * float16/bfloat16 dense tensor-core peak 989 TFLOP/s, HBM 3.35 TB/s, of
    which 80 % is reachable.
  * mma.sync kernels of FlashAttention-2's structure reach about 35 % of that
    peak on an H100 (FlashAttention-2's published H100 forward rate, ~350
    TFLOP/s at head dimension 128; Hopper's full rate needs wgmma and TMA,
    which these kernels do not use). cuBLAS reaches 70 % on the products with
    a long reduction (P V, dO P) and 40 % on the ones whose reduction is
    Cq = 64 deep (Q^T K and its gradients). float32 softmax arithmetic is
    hidden under the memory traffic.
  * Tiles that every block re-reads (K and V for each query tile, Q and dO
    for each key tile) come from the L2 at 5.5 TB/s: the resident blocks walk
    the tiles in the same order, so they read the same few tiles at a time
    (the premise of FlashAttention's schedule; unverified here).
  * A kernel's time is max(FLOPs / rate, HBM bytes / bandwidth, L2 bytes /
    L2 bandwidth), stretched by the wave quantisation ceil(waves) / waves.
"""
import argparse
import math
import os
import re
import subprocess
import sys

SMS = 132
PEAK = 989e12
BANDWIDTH = 3.35e12 * 0.8
L2_BANDWIDTH = 5.5e12
MMA_SYNC_EFF = 0.35
CUBLAS_EFF_LONG, CUBLAS_EFF_SHORT = 0.70, 0.40
REGS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32
SMEM_PER_SM, SMEM_RESERVED_PER_BLOCK = 228 * 1024, 1024

# Tile constants of csrc/cuda/position_attention_tensor_cores_kernels.cuh.
TILE, TILE_C, CHUNK_C, ROW_BYTES, THREADS = 64, 128, 64, (64 + 8) * 2, 128
# Registers per thread measured on sm_90 (cuobjdump -res-usage, this build); refreshed by read_registers().
REGISTERS = {"forward_kernel_tc": 178, "grad_v_kernel_tc": 186, "grad_qk_kernel_tc": 194}


def round16(x):
    return (x + 15) // 16 * 16


def grad_qk_splits(B, N, sms=SMS):
    """The query-range splits of grad_qk_kernel_tc (grad_qk_tc_splits in the kernel header):
    the count with the fewest tile steps, ceil(blocks / slots) rounds of per + 1 steps, where it
    saves at least 5 % over one split; at most 16."""
    tiles = math.ceil(N / TILE)
    if tiles <= 1 or B <= 0:
        return 1

    def steps(s):
        per = math.ceil(tiles / s)
        used = math.ceil(tiles / per)
        return math.ceil(tiles * B * used / (2 * sms)) * (per + 1)

    best, best_steps = 1, steps(1)
    for s in range(2, min(tiles, 16) + 1):
        if steps(s) < best_steps:
            best, best_steps = math.ceil(tiles / math.ceil(tiles / s)), steps(s)
    return best if 20 * best_steps <= 19 * steps(1) else 1


def read_registers():
    """Registers of the sm_90 tensor-core kernels of the built library, if cuobjdump finds it."""
    try:
        import danet_ext
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "cuda_emulation"))
        from test_device_build import cuobjdump, per_function
        tool = cuobjdump()
        if tool is None or not danet_ext.HAVE_EXTENSION:
            return False
        text = subprocess.run([tool, "-res-usage", danet_ext._C.__file__], capture_output=True, text=True).stdout
    except Exception:  # noqa: BLE001  (no build, no tool: keep the recorded numbers)
        return False
    found = {}
    for (arch, fn), body in per_function(text, r"Function (\S+):").items():
        m = re.search(r"\d+((?:forward|grad_v|grad_qk)_kernel_tc)I", fn)
        regs = re.search(r"REG:(\d+)", body)
        if arch == "sm_90" and m and regs:
            found[m.group(1)] = max(found.get(m.group(1), 0), int(regs.group(1)))
    REGISTERS.update(found)
    return len(found) == 3


def blocks_per_sm(regs, smem):
    by_regs = REGS_PER_SM // (math.ceil(regs / 8) * 8 * THREADS)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_smem, MAX_THREADS_PER_SM // THREADS, MAX_BLOCKS_PER_SM))


def kernel(name, flops, hbm, l2, blocks, smem, rate):
    """hbm: bytes moved once; l2: tile re-reads (and atomics), served by the L2."""
    regs = REGISTERS[name]
    per_sm = blocks_per_sm(regs, smem)
    waves = blocks / (SMS * per_sm)
    t = max(flops / rate, hbm / BANDWIDTH, l2 / L2_BANDWIDTH) * (math.ceil(waves) / waves)
    return dict(name=name, flops=flops, hbm=hbm, l2=l2, regs=regs, smem=smem, per_sm=per_sm, blocks=blocks,
                waves=waves, seconds=t)


def ours(B, N, C, Cq, elem=2):
    tiles = math.ceil(N / TILE)
    cblocks = math.ceil(C / TILE_C)
    splits = grad_qk_splits(B, N)
    mma = PEAK * MMA_SYNC_EFF
    resident_smem = (2 * round16(Cq) + round16(C) + CHUNK_C + TILE) * ROW_BYTES + 3 * TILE * 4
    v_resident = 2 * (resident_smem + SMEM_RESERVED_PER_BLOCK) <= SMEM_PER_SM  # grad_qk_tc_v_resident
    qk_smem = resident_smem if v_resident else (2 * round16(Cq) + 2 * CHUNK_C + TILE) * ROW_BYTES + 3 * TILE * 4
    operands = B * (2 * Cq + 2 * C) * N * elem  # three inputs and one output (or dO), once
    fwd = [kernel("forward_kernel_tc", 2 * B * N * N * (Cq * cblocks + C), operands + B * 2 * N * 4,
                  B * tiles * cblocks * (Cq + TILE_C) * N * elem,
                  tiles * cblocks * B, (2 * round16(Cq) + TILE_C) * ROW_BYTES, mma)]
    bwd = [kernel("grad_qk_kernel_tc", 2 * B * N * N * (3 * Cq + C),
                  operands + B * N * 4 * (3 + 2 * Cq * (1 + splits)),
                  # Q and dO for each key tile (V's tile resident on an H100 at C <= 512), the dQ atomics
                  B * tiles * (Cq + C + (0 if v_resident else C)) * N * elem + B * tiles * Cq * N * 4,
                  tiles * splits * B, qk_smem, mma),
           kernel("grad_v_kernel_tc", 2 * B * N * N * (Cq * cblocks + C), operands,
                  B * tiles * cblocks * (Cq + TILE_C) * N * elem,
                  tiles * cblocks * B, (2 * round16(Cq) + TILE_C) * ROW_BYTES + 2 * TILE * 4, mma)]
    return fwd, bwd


def reference(B, N, C, Cq, elem=2):
    """bmm(Q^T, K) -> softmax -> bmm(V, P^T) in cuBLAS, N x N in HBM (float16/bfloat16)."""
    nn = B * N * N
    short, long_ = PEAK * CUBLAS_EFF_SHORT, PEAK * CUBLAS_EFF_LONG
    fwd = 2 * nn * Cq / short + 2 * nn * C / long_ + (nn * elem * 2 + nn * elem * 2) / BANDWIDTH
    # backward: dP = dO^T V, dV = dO P (long); softmax backward (reads P, dP, writes dS); dQ, dK (short)
    bwd = 2 * 2 * nn * C / long_ + 2 * 2 * nn * Cq / short + (nn * elem * 5) / BANDWIDTH
    return fwd, bwd, nn * elem * 2  # the energy and attention matrices held


def table(cases, C=512, Cq=64):
    lines = ["| B | N | kernel | GFLOP (min) | HBM MB | L2 MB | regs | smem KiB | blocks/SM | waves | predicted ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = ["| B | N | ours fwd ms | reference fwd ms | ours fwd+bwd ms | reference fwd+bwd ms | "
               "reference N x N memory |", "|---|---|---|---|---|---|---|"]
    for B, N in cases:
        fwd, bwd = ours(B, N, C, Cq)
        minimum = {"forward_kernel_tc": 2 * B * N * N * (Cq + C), "grad_qk_kernel_tc": 2 * B * N * N * (3 * Cq + C),
                   "grad_v_kernel_tc": 2 * B * N * N * C}
        for k in fwd + bwd:
            lines.append(f"| {B} | {N} | {k['name']} | {k['flops'] / 1e9:,.1f} ({minimum[k['name']] / 1e9:,.1f}) | "
                         f"{k['hbm'] / 1e6:,.0f} | {k['l2'] / 1e6:,.0f} | {k['regs']} | {k['smem'] / 1024:.1f} | {k['per_sm']} | "
                         f"{k['waves']:.2f} | {k['seconds'] * 1e3:.3f} |")
        rf, rb, held = reference(B, N, C, Cq)
        of = sum(k["seconds"] for k in fwd)
        ob = of + sum(k["seconds"] for k in bwd)
        summary.append(f"| {B} | {N} | {of * 1e3:.3f} | {rf * 1e3:.3f} | {ob * 1e3:.3f} | {(rf + rb) * 1e3:.3f} | "
                       f"{held / 2**30:.2f} GiB |")
    return lines, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the tables as Markdown here")
    args = ap.parse_args()
    measured = read_registers()
    cases = [(B, N) for B in (1, 8) for N in (4096, 9216, 32768)]
    lines, summary = table(cases)
    text = "\n".join([
        f"Registers: {'read from this build (sm_90)' if measured else 'recorded from the sm_90 build'}; "
        f"C = 512, Cq = 64, float16/bfloat16, H100 SXM (132 SMs).", "", *lines, "", *summary, ""])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
