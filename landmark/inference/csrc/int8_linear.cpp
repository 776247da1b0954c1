// A linear layer whose weights are stored in int8 with a float32 scale per group of input features
// (CPU, float32 activations): y = x @ W^T + bias with W[o, i] = scale[o, i / group] * q[o, i].
//
// Decoding a small model on a CPU streams every weight once per token, so its time is the weights'
// bytes over the memory bandwidth: int8 weights with a scale per group of 32 are 28% of float32's
// bytes. The weights are read where they are stored (no dequantized copy): per output feature and
// group, the int8 values are widened to float and multiplied with the input (16 lanes), and the group's
// sum is scaled once. Output features are split over the threads (at::parallel_for).
//
// Shapes (contiguous): x (N, in) float32; q (out, in) int8; scale (out, in / group) float32; bias
// (out,) float32 or empty. Returns y (N, out) float32.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;  // floats per vector register (AVX-512); the scalar path keeps 16 sums

#if defined(__AVX512F__)
// sum_g scale[g] * sum_{i in group g} q[i] * x[i], for one output feature.
inline float int8_dot(const int8_t* q, const float* x, const float* scale, int64_t groups, int64_t group) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part = _mm512_setzero_ps();
    const int8_t* qg = q + g * group;
    const float* xg = x + g * group;
    for (int64_t j = 0; j < group; j += kLanes) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + j));
      part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), _mm512_loadu_ps(xg + j), part);
    }
    acc = _mm512_fmadd_ps(part, _mm512_set1_ps(scale[g]), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#else
inline float int8_dot(const int8_t* q, const float* x, const float* scale, int64_t groups, int64_t group) {
  float acc[kLanes] = {0.f};
  for (int64_t g = 0; g < groups; ++g) {
    float part[kLanes] = {0.f};
    for (int64_t j = 0; j < group; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        part[l] += static_cast<float>(q[g * group + j + l]) * x[g * group + j + l];
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += part[l] * scale[g];
  }
  float total = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}
#endif

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 2, "int8_linear: x, q, scale must be 2-D");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && scale.scalar_type() == torch::kFloat32 &&
                  q.scalar_type() == torch::kInt8,
              "int8_linear: x and scale float32, q int8");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous() && bias.is_contiguous(),
              "int8_linear: contiguous tensors");
  const int64_t n = x.size(0), in = x.size(1), out = q.size(0), groups = scale.size(1);
  TORCH_CHECK(q.size(1) == in && scale.size(0) == out && groups > 0 && in % groups == 0,
              "int8_linear: shapes disagree");
  const int64_t group = in / groups;
  TORCH_CHECK(group % kLanes == 0, "int8_linear: the group must be a multiple of 16");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == out, "int8_linear: bias of out features or empty");
  auto y = torch::empty({n, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t r = 0; r < n; ++r) {
        const float dot = int8_dot(qp + o * in, xp + r * in, sp + o * groups, groups, group);
        yp[r * out + o] = bp ? dot + bp[o] : dot;
      }
    }
  });
  return y;
}
