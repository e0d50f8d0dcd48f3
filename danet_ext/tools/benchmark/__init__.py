"""Speed and peak-memory measurements of the kernels against the reference
(the official bmm/softmax/bmm code) and scaled_dot_product_attention.

Used by `danet-ext bench`, the demo and the scripts in benchmarks/. Timings are medians
over repeats after a warm-up; memory is the peak extra memory of one further call
(steady state: one-time buffers of BLAS libraries are not counted) above
what its inputs already hold: on CUDA from the caching allocator's statistics,
on the CPU from the process's peak resident set (Linux: VmHWM, reset through
/proc/self/clear_refs, with glibc told to return large blocks to the system).
"""
from .cases import (TENSOR_CORES_ENV, Result, bench_channel_attention, bench_module, bench_position_attention,
                    cam_flops, default_pam_impls, pam_flops, reference_pam_bytes)
from .machine import machine_info, matmul_gflops
from .measure import cpu_peak_tracking_available, peak_memory, time_call
from .report import format_table, plot_results, write_results

__all__ = ["TENSOR_CORES_ENV", "Result", "bench_channel_attention", "bench_module", "bench_position_attention",
           "cam_flops", "cpu_peak_tracking_available", "default_pam_impls", "format_table", "machine_info",
           "matmul_gflops", "pam_flops", "peak_memory", "plot_results", "reference_pam_bytes", "time_call",
           "write_results"]
