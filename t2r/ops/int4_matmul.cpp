// t2r::int4_matmul: y = x @ w.T for a few rows of x (batch-1 to batch-16 decoding), with w stored as
// 4-bit blocks in ggml's Q4_1 layout. The spec is `int4_matmul_reference` in int4_matmul.py.
//
// blocks [N, K / 32, 20] uint8, one block per 32 inputs of an output row:
//   bytes 0-1  d  (fp16), bytes 2-3  m  (fp16), bytes 4-19: 32 codes q in 0..15, byte i holding
//   input i in its low nibble and input i + 16 in its high nibble;  w[i] = d * q[i] + m.
// The activations are rounded to int8 per block of 32 (scale = max|x| / 127), as llama.cpp does, so
// that the inner product runs on integer instructions (AVX2 maddubs: 32 products in two
// instructions): sum_i w[i] x[i] ~ d * dx * sum_i q[i] qx[i] + m * sum_i x[i].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlockBytes = 20;

inline float fp16_to_float(const uint8_t* bytes) {
  uint16_t half;
  std::memcpy(&half, bytes, sizeof(half));
  return _cvtsh_ss(half);
}

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum);
}

// x [M, K] fp32 -> codes [M, K] int8, scale [M, K / 32], sum [M, K / 32] (the sum of the fp32 inputs).
void quantise_rows(const float* x, int64_t rows, int64_t groups, int8_t* codes, float* scale, float* sum) {
  for (int64_t g = 0; g < rows * groups; ++g) {
    const float* in = x + g * kGroup;
    float peak = 0.f, total = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      peak = std::fmax(peak, std::fabs(in[i]));
      total += in[i];
    }
    const float step = peak / 127.f;
    const float inverse = step > 0.f ? 1.f / step : 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      codes[g * kGroup + i] = static_cast<int8_t>(std::nearbyint(in[i] * inverse));
    }
    scale[g] = step;
    sum[g] = total;
  }
}

// The product of one block of weights (20 bytes) with 32 int8 inputs: 8 int32 partial sums as floats.
inline __m256 block_dot(const uint8_t* block, const int8_t* x) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
  const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), _mm256_set1_epi16(1)));
}

// One output row against every row of the quantised input. Two accumulators (even and odd blocks)
// so that consecutive blocks do not wait on each other's fused multiply-add.
inline void row_dot(const uint8_t* row, int64_t groups, int64_t rows, const int8_t* codes, const float* scale,
                    const float* sum, float* out, int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* xq = codes + r * groups * kGroup;
    const float* xs = scale + r * groups;
    const float* xsum = sum + r * groups;
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    float offset_even = 0.f, offset_odd = 0.f;
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
      const uint8_t* a = row + g * kBlockBytes;
      const uint8_t* b = a + kBlockBytes;
      even = _mm256_fmadd_ps(_mm256_set1_ps(fp16_to_float(a) * xs[g]), block_dot(a, xq + g * kGroup), even);
      odd = _mm256_fmadd_ps(_mm256_set1_ps(fp16_to_float(b) * xs[g + 1]), block_dot(b, xq + (g + 1) * kGroup), odd);
      offset_even += fp16_to_float(a + 2) * xsum[g];
      offset_odd += fp16_to_float(b + 2) * xsum[g + 1];
    }
    if (g < groups) {
      const uint8_t* a = row + g * kBlockBytes;
      even = _mm256_fmadd_ps(_mm256_set1_ps(fp16_to_float(a) * xs[g]), block_dot(a, xq + g * kGroup), even);
      offset_even += fp16_to_float(a + 2) * xsum[g];
    }
    out[r * out_stride] = horizontal_sum(_mm256_add_ps(even, odd)) + offset_even + offset_odd;
  }
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x: [M, K] fp32 on the CPU");
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == kBlockBytes && blocks.scalar_type() == at::kByte,
              "blocks: [N, K / 32, 20] uint8");
  const int64_t rows = x.size(0), groups = blocks.size(1), outputs = blocks.size(0);
  TORCH_CHECK(x.size(1) == groups * kGroup, "x has ", x.size(1), " inputs, the weight ", groups * kGroup);
  const at::Tensor input = x.contiguous();
  const at::Tensor weight = blocks.contiguous();
  at::Tensor codes = at::empty({rows, groups * kGroup}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({rows, groups}, x.options());
  at::Tensor sum = at::empty({rows, groups}, x.options());
  quantise_rows(input.data_ptr<float>(), rows, groups, codes.data_ptr<int8_t>(), scale.data_ptr<float>(),
                sum.data_ptr<float>());
  at::Tensor out = at::empty({rows, outputs}, x.options());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int8_t* xq = codes.data_ptr<int8_t>();
  const float* xs = scale.data_ptr<float>();
  const float* xsum = sum.data_ptr<float>();
  float* y = out.data_ptr<float>();
  // Output rows split across threads; 16 rows (~5 KB of weights at K = 576) per task at least.
  at::parallel_for(0, outputs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      row_dot(w + n * groups * kBlockBytes, groups, rows, xq, xs, xsum, y + n, outputs);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(t2r_int4, m) { m.def("int4_matmul(Tensor x, Tensor blocks) -> Tensor"); }

TORCH_LIBRARY_IMPL(t2r_int4, CPU, m) { m.impl("int4_matmul", &int4_matmul); }
