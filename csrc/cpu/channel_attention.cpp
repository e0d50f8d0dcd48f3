// Channel attention (CAM) on the CPU: forward and backward.
//
// With X = x[b] as C x N:  E = X X^T,  A = softmax(rowmax(E) - E) = a stable
// softmax(-E) (each row shifted by its minimum),  out = A X.
// The two products are BLAS GEMMs (blas.h); the softmax between them is one
// fused, vectorised pass per row. float16 is computed in float32 on every CPU
// (a float16 Gram matrix of post-ReLU features overflows 65504 long before
// bfloat16's range ends); so is bfloat16, except on CPUs with bfloat16 hardware
// (reduced_precision_gemm.h), where the products run in bfloat16 and E, A and
// the softmax stay float32 (forward_bf16 below): E = X X^T and dA = dO X^T with
// exact bfloat16 products and float32 sums (bf16_gram.h, AVX512-BF16), out = A X
// and the backward's dX products through oneDNN.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "bf16_gram.h"
#include "reduced_precision_gemm.h"
#include "blas.h"
#include "row_ops.h"

namespace danet {
namespace cpu {
namespace {

// E (C x C) = X X^T for one batch. E is symmetric: only the block rows' parts
// on and above the diagonal are multiplied (block row i: its rows against the
// columns from its own first row on, one GEMM) and the rest is mirrored. The
// block rows are paired, the widest with the narrowest (i with blocks-1-i), so
// that every task does the same work: with 2m blocks per thread this is
// (2mT + 1) / (4mT) of a full GEMM's work, in equal shares. When C is too small
// for two blocks of kMinBlock rows per thread, one full GEMM, threaded by the
// BLAS, does better than fewer tasks than threads.
template <typename scalar_t>
void gram_symmetric(const scalar_t* x, scalar_t* e, int64_t C, int64_t N) {
  constexpr int64_t kMinBlock = 64;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = std::min<int64_t>(2, C / (2 * kMinBlock * threads));  // pairs per thread
  if (per_thread < 1) {
    gemm<scalar_t>(false, true, C, C, N, 1, x, N, x, N, 0, e, C);
    return;
  }
  const int64_t blocks = 2 * per_thread * threads;
  const int64_t block = (C + blocks - 1) / blocks;
  auto block_row = [&](int64_t i) {
    const int64_t r0 = i * block, rows = std::min(block, C - r0);
    if (rows > 0)
      gemm<scalar_t>(false, true, rows, C - r0, N, 1, x + r0 * N, N, x + r0 * N, N, 0, e + r0 * C + r0, C);
  };
  at::parallel_for(0, blocks / 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      block_row(t);
      block_row(blocks - 1 - t);
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = (i / block) * block;  // columns left of row i's block row's diagonal
      for (int64_t j = 0; j < first; ++j) e[i * C + j] = e[j * C + i];
    }
  });
}

// In place: each row e of E (C x C) becomes softmax(-e), computed as
// exp(min(e) - e) / sum, which is softmax(rowmax(E) - E) of the reference.
template <typename scalar_t>
void negated_row_softmax(scalar_t* e, int64_t C) {
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = e + i * C;
      const scalar_t m = row_min(row, C);
      const scalar_t sum = exp_row_inplace(row, C, scalar_t(-1), -m);
      scale_row(row, C, scalar_t(1) / sum);
    }
  });
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, scalar_t* out, scalar_t* attn, int64_t B,
                    int64_t C, int64_t N) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* xb = x + b * C * N;
    scalar_t* ab = attn + b * C * C;
    gram_symmetric(xb, ab, C, N);
    negated_row_softmax(ab, C);
    gemm<scalar_t>(false, false, C, N, C, 1, ab, C, xb, N, 0, out + b * C * N, N);
  }
}

// dA = dO X^T;  dE = -A * (dA - rowsum(dA * A));  dX = A^T dO + (dE + dE^T) X.
template <typename scalar_t>
void backward_kernel(const scalar_t* dout, const scalar_t* x, const scalar_t* attn,
                     scalar_t* dx, int64_t B, int64_t C, int64_t N) {
  std::vector<scalar_t> grad_e(C * C), grad_sym(C * C);
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* xb = x + b * C * N;
    const scalar_t* dob = dout + b * C * N;
    const scalar_t* ab = attn + b * C * C;
    scalar_t* dxb = dx + b * C * N;
    scalar_t* de = grad_e.data();
    gemm<scalar_t>(false, true, C, C, N, 1, dob, N, xb, N, 0, de, C);
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = de + i * C;
        const scalar_t* arow = ab + i * C;
        const scalar_t d = dot(row, arow, C);
        for (int64_t j = 0; j < C; ++j) row[j] = -arow[j] * (row[j] - d);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < C; ++j) grad_sym[i * C + j] = de[i * C + j] + de[j * C + i];
    });
    gemm<scalar_t>(true, false, C, N, C, 1, ab, C, dob, N, 0, dxb, N);
    gemm<scalar_t>(false, false, C, N, C, 1, grad_sym.data(), C, xb, N, 1, dxb, N);
  }
}

// bfloat16 on CPUs with bfloat16 hardware. The Gram matrices E = X X^T and
// dA = dO X^T are reductions over all N positions whose entries reach thousands:
// on AVX512-BF16 they are float32 sums of exact products (bf16_gram.h); otherwise
// (DANET_EXT_CPU_BF16_SCORES=0, or AMX-BF16 without AVX512-BF16, which no CPU
// has) bfloat16 GEMMs (oneDNN, one rounding each) summed in float32 over slices
// of kBf16Slice positions, each slice rounded at its own, smaller magnitude.
// A X and the backward's two dX products are bfloat16 GEMMs (oneDNN), rounded
// once as the reference's bmm (the second accumulated onto the first). The
// softmax and its backward run in float32 on E and A, as in the float32 path.
constexpr int64_t kBf16Slice = 1024;

// sum over slices of N of a[:, :, n] b[:, :, n]^T, in float32: (B, C, C)
at::Tensor sliced_gram_bf16(const at::Tensor& a, const at::Tensor& b) {
  const int64_t N = a.size(2);
  at::Tensor acc = at::zeros({a.size(0), a.size(1), b.size(1)}, a.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < N; n0 += kBf16Slice) {
    const int64_t n = std::min(kBf16Slice, N - n0);
    acc.add_(at::bmm(a.narrow(2, n0, n), b.narrow(2, n0, n).transpose(1, 2)));
  }
  return acc;
}

// a[b] b[b]^T in float32 for contiguous (B, Ra, N) and (B, Rb, N); symmetric: b is a.
at::Tensor gram_bf16(const at::Tensor& a, const at::Tensor& b, bool symmetric) {
  if (!use_bf16_scores()) return sliced_gram_bf16(a, b);
  const int64_t B = a.size(0), Ra = a.size(1), Rb = b.size(1), N = a.size(2);
  at::Tensor g = at::empty({B, Ra, Rb}, a.options().dtype(at::kFloat));
  for (int64_t i = 0; i < B; ++i)
    bf16_gram(a.data_ptr<at::BFloat16>() + i * Ra * N, b.data_ptr<at::BFloat16>() + i * Rb * N, Ra, Rb, N,
              symmetric, g.data_ptr<float>() + i * Ra * Rb);
  return g;
}

std::tuple<at::Tensor, at::Tensor> forward_bf16(const at::Tensor& x_in) {
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  at::Tensor x = x_in.contiguous().view({B, C, N});
  at::Tensor attn = gram_bf16(x, x, /*symmetric=*/true);
  for (int64_t b = 0; b < B; ++b) negated_row_softmax(attn.data_ptr<float>() + b * C * C, C);
  at::Tensor out = at::bmm(attn.to(at::kBFloat16), x);
  return {out.view(x_in.sizes()), attn};
}

at::Tensor backward_bf16(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& attn_in) {
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  at::Tensor x = x_in.contiguous().view({B, C, N});
  at::Tensor go = grad_out.contiguous().view({B, C, N});
  at::Tensor attn = attn_in.contiguous();
  // dE = -A * (dA - rowsum(dA * A)), in float32, then symmetrised: dE + dE^T
  at::Tensor grad_a = gram_bf16(go, x, /*symmetric=*/false);
  at::Tensor grad_e = -attn * (grad_a - (grad_a * attn).sum(-1, true));
  at::Tensor grad_sym = (grad_e + grad_e.transpose(1, 2)).to(at::kBFloat16);
  // dX = A^T dO + (dE + dE^T) X: two bfloat16 products; the second accumulates onto the
  // first inside oneDNN's GEMM (float32 sums, one rounding), so no float32 C x N copy is held
  at::Tensor dx = at::bmm(attn.transpose(1, 2).to(at::kBFloat16), go);
  return at::baddbmm(dx, grad_sym, x).view(x_in.sizes());
}

std::tuple<at::Tensor, at::Tensor> channel_attention_forward_cpu(const at::Tensor& x_in) {
  check_channel_attention_inputs(x_in);
  if (x_in.scalar_type() == at::kBFloat16 && use_reduced_precision_gemm(at::kBFloat16) && x_in.numel() > 0) return forward_bf16(x_in);
  const auto ct = accumulate_type(x_in.scalar_type());
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  at::Tensor x = x_in.to(ct).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor attn = at::empty({B, C, C}, x.options());
  if (B * C > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "channel_attention_forward_cpu", [&] {
      forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                               attn.data_ptr<scalar_t>(), B, C, N);
    });
  }
  return {out.to(x_in.scalar_type()), attn};
}

at::Tensor channel_attention_backward_cpu(const at::Tensor& grad_out,
                                          const at::Tensor& x_in,
                                          const at::Tensor& attention) {
  check_channel_attention_backward_inputs(grad_out, x_in, attention);
  if (x_in.scalar_type() == at::kBFloat16 && use_reduced_precision_gemm(at::kBFloat16) && x_in.numel() > 0)
    return backward_bf16(grad_out, x_in, attention);
  const auto ct = accumulate_type(x_in.scalar_type());
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  at::Tensor x = x_in.to(ct).contiguous();
  at::Tensor go = grad_out.to(ct).contiguous();
  at::Tensor a = attention.to(ct).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (B * C > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "channel_attention_backward_cpu", [&] {
      backward_kernel<scalar_t>(go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                a.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), B, C, N);
    });
  }
  return dx.to(x_in.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace danet

TORCH_LIBRARY_IMPL(danet_ext, CPU, m) {
  m.impl("channel_attention_forward", &danet::cpu::channel_attention_forward_cpu);
  m.impl("channel_attention_backward", &danet::cpu::channel_attention_backward_cpu);
}
