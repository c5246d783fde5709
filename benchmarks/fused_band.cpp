// A prototype, not part of the package: aft_vit.layers.band.aft_conv2d_band (AFT-conv's banded product, inference on
// channel-major inputs) as one loop per head and image, with no intermediate tensors, so that benchmarks/fused_band.py
// can measure what a native kernel would gain over the package's pure-PyTorch path. Same sums as the banded product:
// every term a nonnegative weight times a nonnegative input. Built by torch.utils.cpp_extension with -march=native.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

constexpr int kLanes = 16;     // the query columns x of one grid row, padded: grids up to 16 wide
constexpr int kChannels = 8;   // accumulator rows held at once (numerator channels and the denominator)

// Sums of one query row y for channels [g0, g0 + kChannels) of the stacked inputs `stacked` (G, H, W): the rows of
// the window (y - r .. y + r) through the band weights `columns` ((s W + 1, kLanes), column dy W + x' holds the
// weights of key (y + dy - r, x') for every query x), and the rows outside it through the last column.
// Channels past the last (g0 + g >= groups) read a row of zeros, `zeros`.
inline __attribute__((always_inline)) void row_sums(
    const float* __restrict__ stacked, const float* __restrict__ far, const float* __restrict__ columns,
    const float* __restrict__ zeros, int64_t H, int64_t W, int64_t r, int64_t y, int64_t g0, int64_t groups,
    float (*__restrict__ out)[kLanes]) {
  const int64_t tokens = H * W, last = (2 * r + 1) * W;
  const float* channel[kChannels];
  float acc[kChannels][kLanes];
  for (int g = 0; g < kChannels; ++g) {
    const bool real = g0 + g < groups;
    channel[g] = real ? stacked + (g0 + g) * tokens : zeros;
    const float outside = real ? far[(g0 + g) * H + y] : 0.f;
#pragma omp simd
    for (int x = 0; x < kLanes; ++x) acc[g][x] = outside * columns[last * kLanes + x];
  }
  for (int64_t yy = std::max<int64_t>(0, y - r); yy <= std::min<int64_t>(H - 1, y + r); ++yy) {
    for (int64_t xx = 0; xx < W; ++xx) {
      const float* weight = columns + ((yy - y + r) * W + xx) * kLanes;
      const int64_t key = yy * W + xx;
#pragma GCC unroll 8
      for (int g = 0; g < kChannels; ++g) {
        const float value = channel[g][key];
#pragma omp simd
        for (int x = 0; x < kLanes; ++x) acc[g][x] += weight[x] * value;
      }
    }
  }
  for (int g = 0; g < kChannels; ++g)
    for (int x = 0; x < kLanes; ++x) out[g][x] = acc[g][x];
}

}  // namespace

// q, v: (C, B, H, W); k: (h, B, H, W); columns: (h, s W + 1, 16), the band weights of conv_band_weights transposed and
// zero-padded to 16 query columns. Returns (C, B, H, W): sigmoid(q) times numerator over denominator.
torch::Tensor band_fused(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor columns) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "band_fused: contiguous float32 inputs");
  const int64_t C = q.size(0), B = q.size(1), H = q.size(2), W = q.size(3), heads = k.size(0);
  TORCH_CHECK(W <= kLanes && columns.size(2) == kLanes, "band_fused: grids up to 16 wide");
  const int64_t d = C / heads, groups = d + 1, tokens = H * W;
  const int64_t r = (columns.size(1) - 1) / W / 2;
  auto out = torch::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* cp = columns.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, heads * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> stacked(groups * tokens), far(groups * H), rows(groups * H), zeros(tokens, 0.f);
    float acc[kChannels][kLanes], last[kChannels][kLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / B, b = task % B;
      // stacked inputs [exp(k - max) v, exp(k - max)], (d + 1, H, W)
      const float* key = kp + (i * B + b) * tokens;
      const float top = *std::max_element(key, key + tokens);
      float* exp_k = stacked.data() + d * tokens;
#pragma omp simd
      for (int64_t t = 0; t < tokens; ++t) exp_k[t] = std::exp(key[t] - top);
      for (int64_t g = 0; g < d; ++g) {
        const float* value = vp + ((i * d + g) * B + b) * tokens;
        float* dst = stacked.data() + g * tokens;
#pragma omp simd
        for (int64_t t = 0; t < tokens; ++t) dst[t] = exp_k[t] * value[t];
      }
      // per channel and query row: the sum of the key rows outside its window (|y' - y| > r), from row sums
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t y = 0; y < H; ++y)
          rows[g * H + y] = std::accumulate(stacked.begin() + g * tokens + y * W,
                                            stacked.begin() + g * tokens + (y + 1) * W, 0.f);
        for (int64_t y = 0; y < H; ++y) {
          float sum = 0.f;
          for (int64_t yy = 0; yy < H; ++yy)
            if (yy < y - r || yy > y + r) sum += rows[g * H + yy];
          far[g * H + y] = sum;
        }
      }
      const float* head_columns = cp + i * columns.size(1) * kLanes;
      const int64_t last_block = d / kChannels * kChannels;  // the block that holds the denominator, channel d
      for (int64_t y = 0; y < H; ++y) {
        row_sums(stacked.data(), far.data(), head_columns, zeros.data(), H, W, r, y, last_block, groups, last);
        const float* denominator = last[d - last_block];
        for (int64_t g0 = 0; g0 < d; g0 += kChannels) {
          if (g0 != last_block)
            row_sums(stacked.data(), far.data(), head_columns, zeros.data(), H, W, r, y, g0, groups, acc);
          float (*sums)[kLanes] = g0 == last_block ? last : acc;
          for (int64_t g = g0; g < std::min(d, g0 + kChannels); ++g) {
            const int64_t offset = (((i * d + g) * B + b) * H + y) * W;
#pragma omp simd
            for (int64_t x = 0; x < W; ++x)
              op[offset + x] = sums[g - g0][x] / (denominator[x] * (1.f + std::exp(-qp[offset + x])));
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("band_fused", &band_fused); }
