// 3 x 3 convolution (stride 1, padding = dilation, one group) by Winograd's
// F(4x4, 3x3) algorithm (Lavin and Gray, 2016), float32, for CPU inference.
//
// Each 4 x 4 block of outputs comes from a 6 x 6 block of inputs with 36
// multiplications per input/output channel pair instead of 144: the input
// block d is transformed to V = Bᵀ d B, the 36 entries of V are multiplied with
// the 36 entries of the transformed filters U = G g Gᵀ (36 GEMMs over the
// channels, on the BLAS), and the 4 x 4 outputs are Aᵀ M A. A dilated
// convolution (dilation r) is the same on every r x r-th pixel: a tile's 6 x 6
// inputs and 4 x 4 outputs are r pixels apart, so no polyphase copy is made.
//
// Layout: input and output channels_last (B, H, W, C), so that every point of a
// tile is a contiguous vector of channels and the transforms vectorise over
// channels. Tiles are processed in chunks that bound the transformed buffers.
// The filters are transformed once, in Python (danet_ext/winograd.py), as a
// (36, C_in, C_out) tensor.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


namespace danet {
namespace cpu {
namespace {

constexpr int64_t kChannelBlock = 64;  // channels transformed at once (stack arrays)

struct Tile {
  int64_t y0, x0;  // the first output's row and column; the others are dilation apart
};

// The tiles of one image: for each residue (ry, rx) modulo the dilation, the
// outputs ry + r*i, rx + r*j in 4 x 4 groups (the last ones partly outside).
std::vector<Tile> make_tiles(int64_t H, int64_t W, int64_t r) {
  std::vector<Tile> tiles;
  for (int64_t ry = 0; ry < std::min(r, H); ++ry) {
    const int64_t ny = (H - ry + r - 1) / r;
    for (int64_t ty = 0; ty < (ny + 3) / 4; ++ty) {
      for (int64_t rx = 0; rx < std::min(r, W); ++rx) {
        const int64_t nx = (W - rx + r - 1) / r;
        for (int64_t tx = 0; tx < (nx + 3) / 4; ++tx) tiles.push_back({ry + 4 * r * ty, rx + 4 * r * tx});
      }
    }
  }
  return tiles;
}

// V = Bᵀ d B for channels [c0, c0 + n) of one tile; v[xi * ld + c] for the 36 points xi.
void input_transform(const float* x, int64_t H, int64_t W, int64_t C, int64_t r, const Tile& t, int64_t c0,
                     int64_t n, float* v, int64_t ld) {
  float d[6][6][kChannelBlock];
  for (int m = 0; m < 6; ++m) {
    const int64_t y = t.y0 + r * (m - 1);
    for (int k = 0; k < 6; ++k) {
      const int64_t xx = t.x0 + r * (k - 1);
      float* dst = d[m][k];
      if (y < 0 || y >= H || xx < 0 || xx >= W) {
        for (int64_t c = 0; c < n; ++c) dst[c] = 0.f;
      } else {
        const float* src = x + (y * W + xx) * C + c0;
        for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
      }
    }
  }
  float e[6][6][kChannelBlock];  // Bᵀ d: rows
  for (int k = 0; k < 6; ++k) {
    for (int64_t c = 0; c < n; ++c) {
      const float d0 = d[0][k][c], d1 = d[1][k][c], d2 = d[2][k][c], d3 = d[3][k][c], d4 = d[4][k][c],
                  d5 = d[5][k][c];
      e[0][k][c] = 4.f * d0 - 5.f * d2 + d4;
      e[1][k][c] = -4.f * (d1 + d2) + d3 + d4;
      e[2][k][c] = 4.f * (d1 - d2) - d3 + d4;
      e[3][k][c] = 2.f * (d3 - d1) - d2 + d4;
      e[4][k][c] = 2.f * (d1 - d3) - d2 + d4;
      e[5][k][c] = 4.f * d1 - 5.f * d3 + d5;
    }
  }
  for (int m = 0; m < 6; ++m) {  // (Bᵀ d) B: columns
    float* o = v + (m * 6) * ld;
    for (int64_t c = 0; c < n; ++c) {
      const float d0 = e[m][0][c], d1 = e[m][1][c], d2 = e[m][2][c], d3 = e[m][3][c], d4 = e[m][4][c],
                  d5 = e[m][5][c];
      o[0 * ld + c] = 4.f * d0 - 5.f * d2 + d4;
      o[1 * ld + c] = -4.f * (d1 + d2) + d3 + d4;
      o[2 * ld + c] = 4.f * (d1 - d2) - d3 + d4;
      o[3 * ld + c] = 2.f * (d3 - d1) - d2 + d4;
      o[4 * ld + c] = 2.f * (d1 - d3) - d2 + d4;
      o[5 * ld + c] = 4.f * d1 - 5.f * d3 + d5;
    }
  }
}

// Y = Aᵀ M A (+ bias) for channels [k0, k0 + n) of one tile, written where the
// outputs fall inside the image; m[xi * ld + k] holds the 36 points xi.
void output_transform(const float* m, int64_t ld, const float* bias, int64_t H, int64_t W, int64_t K, int64_t r,
                      const Tile& t, int64_t k0, int64_t n, float* y) {
  float e[4][6][kChannelBlock];  // Aᵀ M: rows
  for (int j = 0; j < 6; ++j) {
    const float* p = m + j * ld + k0;
    for (int64_t c = 0; c < n; ++c) {
      const float m0 = p[0 * 6 * ld + c], m1 = p[1 * 6 * ld + c], m2 = p[2 * 6 * ld + c], m3 = p[3 * 6 * ld + c],
                  m4 = p[4 * 6 * ld + c], m5 = p[5 * 6 * ld + c];
      e[0][j][c] = m0 + m1 + m2 + m3 + m4;
      e[1][j][c] = m1 - m2 + 2.f * (m3 - m4);
      e[2][j][c] = m1 + m2 + 4.f * (m3 + m4);
      e[3][j][c] = m1 - m2 + 8.f * (m3 - m4) + m5;
    }
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t yy = t.y0 + r * i;
    if (yy >= H) break;
    float out[4][kChannelBlock];
    for (int64_t c = 0; c < n; ++c) {
      const float m0 = e[i][0][c], m1 = e[i][1][c], m2 = e[i][2][c], m3 = e[i][3][c], m4 = e[i][4][c],
                  m5 = e[i][5][c];
      const float b = bias ? bias[k0 + c] : 0.f;
      out[0][c] = m0 + m1 + m2 + m3 + m4 + b;
      out[1][c] = m1 - m2 + 2.f * (m3 - m4) + b;
      out[2][c] = m1 + m2 + 4.f * (m3 + m4) + b;
      out[3][c] = m1 - m2 + 8.f * (m3 - m4) + m5 + b;
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t xx = t.x0 + r * j;
      if (xx >= W) break;
      float* dst = y + (yy * W + xx) * K + k0;
      for (int64_t c = 0; c < n; ++c) dst[c] = out[j][c];
    }
  }
}

}  // namespace

// input (B, C, H, W) float32; weight: (36, C, K), the transformed filters;
// bias: (K) or none. Returns (B, K, H, W) in channels_last.
at::Tensor winograd_conv3x3_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, int64_t dilation) {
  TORCH_CHECK(input.dim() == 4, "winograd_conv3x3: input must be (B, C, H, W), got ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat, "winograd_conv3x3: input must be float32, got ",
              input.scalar_type());
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == 36 && weight.size(1) == input.size(1),
              "winograd_conv3x3: weight must be the transformed filters (36, C_in = ", input.size(1),
              ", C_out), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "winograd_conv3x3: weight must be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(dilation >= 1, "winograd_conv3x3: dilation must be >= 1, got ", dilation);
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = weight.size(2);
  const float* bias_ptr = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K && bias->scalar_type() == at::kFloat,
                "winograd_conv3x3: bias must be float32 of shape (", K, "), got ", bias->scalar_type(), " ",
                bias->sizes());
    b = bias->contiguous();
    bias_ptr = b.data_ptr<float>();
  }
  auto y = at::empty({B, K, H, W}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (C == 0) {
    if (bias_ptr) y.copy_(b.view({1, K, 1, 1}).expand_as(y)); else y.zero_();
    return y;
  }
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.contiguous();
  // Past the image's size every tap but the centre falls in the padding: the same
  // convolution, and r * (m - 1) cannot overflow.
  const int64_t r = std::min(dilation, std::max(H, W));
  const std::vector<Tile> tiles = make_tiles(H, W, r);
  const int64_t T = static_cast<int64_t>(tiles.size());
  // Tiles per chunk: the transformed inputs (or products) of a chunk in about 8 MiB, so
  // that they are still in cache when the GEMMs and the output transform read them, but
  // at least 128, the GEMMs' rows, for the filters (36 C K floats) are read once a chunk.
  // Measured on a 2-core EPYC at 64x128 positions: 8 MiB ran C = 64 layers 10-40 %
  // faster than 32 MiB and larger chunks, 128 tiles ran C = 2048 as fast as 32 MiB.
  const int64_t chunk = std::min(T, std::max<int64_t>(128, (8 << 20) / (36 * 4 * std::max(C, K))));
  auto v = at::empty({36, chunk, C}, x.options());
  auto m = at::empty({36, chunk, K}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t bi = 0; bi < B; ++bi) {
    const float* xb = xp + bi * H * W * C;
    float* yb = yp + bi * H * W * K;
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
      const int64_t nt = std::min(chunk, T - t0);
      float* vp = v.data_ptr<float>();
      at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock)
            input_transform(xb, H, W, C, r, tiles[t0 + t], c0, std::min(kChannelBlock, C - c0),
                            vp + t * C + c0, chunk * C);
      });
      at::Tensor products = m.narrow(1, 0, nt);
      at::bmm_out(products, v.narrow(1, 0, nt), w);
      const float* mp = m.data_ptr<float>();
      at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          for (int64_t k0 = 0; k0 < K; k0 += kChannelBlock)
            output_transform(mp + t * K, chunk * K, bias_ptr, H, W, K, r, tiles[t0 + t], k0,
                             std::min(kChannelBlock, K - k0), yb);
      });
    }
  }
  return y;
}

}  // namespace cpu
}  // namespace danet

TORCH_LIBRARY_IMPL(danet_ext, CPU, m) {
  m.impl("winograd_conv3x3", &danet::cpu::winograd_conv3x3_cpu);
}
