// t2r_int4::int4_matmul: y = x @ w.T for a few rows of x (batch-1 to batch-16 decoding), with w in
// 4-bit blocks of 32 inputs. The spec is `int4_matmul_reference` in int4_matmul.py.
//
// codes [N, G, 16] uint8: block g of output row n, byte i holding input i (low nibble) and input
// i + 16 (high nibble), q in 0..15; steps, minimums [N, G] fp16: w[i] = d * q[i] + m (GGUF Q4_1's
// grid, the arrays apart so that two blocks' codes are one 32-byte load and eight steps one
// conversion).
// The activations are rounded to int8 per block of 32 (scale = max|x| / 127), as llama.cpp does, so
// that the inner product runs on integer instructions (AVX2 maddubs: 32 products in one):
//   sum_i w[i] x[i] ~ d * dx * sum_i q[i] qx[i] + m * sum_i x[i].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum);
}

// x [M, K] fp32 -> per row: int8 codes, step [G] and sum [G] (of the fp32 inputs). The codes of blocks
// 2p and 2p + 1 are laid out as the weights' nibbles come out of one 32-byte load: inputs 0..15 of
// both blocks, then inputs 16..31 of both; an odd last block keeps its 32 inputs in order.
void quantise_rows(const float* x, int64_t rows, int64_t groups, int8_t* codes, float* step, float* sum) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* in = x + (r * groups + g) * kGroup;
      float peak = 0.f, total = 0.f;
      for (int64_t i = 0; i < kGroup; ++i) {
        peak = std::fmax(peak, std::fabs(in[i]));
        total += in[i];
      }
      const float scale = peak / 127.f;
      const float inverse = scale > 0.f ? 1.f / scale : 0.f;
      int8_t* row = codes + r * groups * kGroup;
      const bool paired = g + 1 < groups || g % 2 == 1;
      for (int64_t i = 0; i < kGroup; ++i) {
        int64_t at = g * kGroup + i;
        if (paired) {  // pair base (g & ~1) * 32; halves of 32 bytes; within a half, 16 per block
          at = (g & ~int64_t{1}) * kGroup + (i / 16) * 32 + (g & 1) * 16 + i % 16;
        }
        row[at] = static_cast<int8_t>(std::nearbyint(in[i] * inverse));
      }
      step[r * groups + g] = scale;
      sum[r * groups + g] = total;
    }
  }
}

// Output row n (its codes, steps and minimums) against every row of the quantised input.
void output_row(const uint8_t* codes, const at::Half* steps, const at::Half* mins, int64_t groups, int64_t rows,
                const int8_t* x, const float* x_step, const float* x_sum, float* out, int64_t out_stride,
                float* scale) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint16_t* d16 = reinterpret_cast<const uint16_t*>(steps);
  const uint16_t* m16 = reinterpret_cast<const uint16_t*>(mins);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xs = x_step + r * groups;
    const float* xsum = x_sum + r * groups;
    // Each block's step times the input's, and the minimums' term, eight blocks at a time.
    __m256 offset8 = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d16 + g)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m16 + g)));
      _mm256_storeu_ps(scale + g, _mm256_mul_ps(d, _mm256_loadu_ps(xs + g)));
      offset8 = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum + g), offset8);
    }
    float offset = horizontal_sum(offset8);
    for (; g < groups; ++g) {
      scale[g] = _cvtsh_ss(d16[g]) * xs[g];
      offset += _cvtsh_ss(m16[g]) * xsum[g];
    }
    // Two blocks per step: one 32-byte load of codes, lanes 0-3 of the sums block 2p's, 4-7 2p + 1's.
    const int8_t* xq = x + r * groups * kGroup;
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    int64_t p = 0;
    for (; 2 * p + 1 < groups; ++p) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 2 * p * 16));
      const __m256i q_low = _mm256_and_si256(packed, low);
      const __m256i q_high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
      const __m256i x_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 2 * p * kGroup));
      const __m256i x_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 2 * p * kGroup + 32));
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(q_low, x_low), _mm256_maddubs_epi16(q_high, x_high));
      const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
      const __m256 s = _mm256_setr_m128(_mm_broadcast_ss(scale + 2 * p), _mm_broadcast_ss(scale + 2 * p + 1));
      if (p % 2 == 0) {
        even = _mm256_fmadd_ps(s, sums, even);
      } else {
        odd = _mm256_fmadd_ps(s, sums, odd);
      }
    }
    if (2 * p < groups) {  // an odd last block: its 16 bytes, inputs in order
      const int64_t last = groups - 1;
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + last * 16));
      const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + last * kGroup));
      const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xl), ones));
      even = _mm256_fmadd_ps(_mm256_set1_ps(scale[last]), sums, even);
    }
    out[r * out_stride] = horizontal_sum(_mm256_add_ps(even, odd)) + offset;
  }
}

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& steps,
                       const at::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x: [M, K] fp32 on the CPU");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == 16 && codes.scalar_type() == at::kByte, "codes: [N, G, 16] uint8");
  const int64_t rows = x.size(0), outputs = codes.size(0), groups = codes.size(1);
  TORCH_CHECK(steps.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf, "steps, minimums: fp16");
  TORCH_CHECK(steps.numel() == outputs * groups && mins.numel() == outputs * groups, "steps, minimums: [N, G]");
  TORCH_CHECK(x.size(1) == groups * kGroup, "x has ", x.size(1), " inputs, the weight ", groups * kGroup);
  const at::Tensor input = x.contiguous(), w = codes.contiguous(), d = steps.contiguous(), m = mins.contiguous();
  at::Tensor x_codes = at::empty({rows, groups * kGroup}, x.options().dtype(at::kChar));
  at::Tensor x_step = at::empty({rows, groups}, x.options());
  at::Tensor x_sum = at::empty({rows, groups}, x.options());
  quantise_rows(input.data_ptr<float>(), rows, groups, x_codes.data_ptr<int8_t>(), x_step.data_ptr<float>(),
                x_sum.data_ptr<float>());
  at::Tensor out = at::empty({rows, outputs}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  const int8_t* xq = x_codes.data_ptr<int8_t>();
  const float* xs = x_step.data_ptr<float>();
  const float* xsum = x_sum.data_ptr<float>();
  float* y = out.data_ptr<float>();
  // Output rows split across threads; 16 rows (~5 KB of weights at K = 576) per task at least.
  at::parallel_for(0, outputs, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scale(groups);
    for (int64_t n = begin; n < end; ++n) {
      output_row(wp + n * groups * 16, dp + n * groups, mp + n * groups, groups, rows, xq, xs, xsum, y + n, outputs,
                 scale.data());
    }
  });
  return out;
}

// t2r_int4::int4_linear_rows: t2r.ops.rows_matmul.int4_by_rows for a layer with a dense copy (its
// spec, tested equal), chosen here rather than in Python: a compiled step of many rows makes ~120
// of these calls, and a Python custom op's dispatch cost ~75 us each. From dense_from rows the
// dense copy (dense_from <= 17: the kernel takes every count below it), else the kernel.
at::Tensor int4_linear_rows(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& steps,
                            const at::Tensor& mins, const at::Tensor& dense, int64_t dense_from) {
  if (x.size(0) >= dense_from) {
    return at::matmul(x.to(dense.scalar_type()), dense.t()).to(at::kFloat);
  }
  return int4_matmul(x, codes, steps, mins);
}

}  // namespace

TORCH_LIBRARY(t2r_int4, m) {
  m.def("int4_matmul(Tensor x, Tensor codes, Tensor steps, Tensor minimums) -> Tensor");
  m.def("int4_linear_rows(Tensor x, Tensor codes, Tensor steps, Tensor minimums, Tensor dense, int dense_from) -> Tensor");
}

TORCH_LIBRARY_IMPL(t2r_int4, CPU, m) {
  m.impl("int4_matmul", &int4_matmul);
  m.impl("int4_linear_rows", &int4_linear_rows);
}
