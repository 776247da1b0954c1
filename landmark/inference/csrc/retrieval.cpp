// Landmark retrieval attention for one layer and one step (a prefill chunk or a decode step), fused
// (CPU, float32).
//
// The same computation as the eager path of landmark/inference/retrieval.py (the reference), for
// granularity "token_head": per (batch row, query head, query row) it
//   1. rotates the scaled query to the positions it needs (RoPE, the "stingy" mapping);
//   2. scans the landmark keys of the row's memory (the k_eff most recent at their own slots
//      1..k_eff, all older ones at slot 0) and keeps the top k_eff (ties: the more recent block), in
//      chronological order; or takes a selection computed elsewhere (other granularities, an index);
//   3. scores the selected blocks' stored keys (rotated by their in-block offsets) with the query
//      rotated to the block's attention slot, and the local context (tail + new positions);
//   4. applies the grouped softmax (own block directly, every other block through its landmark, split
//      inside the block by a softmax) and sums the values.
// Blocks are read where they are stored: nothing of size rows x heads x k x block x head_dim is
// gathered.
//
// Work is split in large pieces: one task is (batch row, kv head, tile of query rows), serving the
// tile's rows for all the query heads that share the kv head (GQA); consecutive tasks of one (row, kv
// head) share its landmark keys transposed and its local keys rotated (both key-major, made once).
// Block keys are stored key-major, so a query's scores against a block, the landmarks or the local
// context are vectorised loops over the keys, two or four queries at a time where they share the keys;
// the landmark scan runs in float and only its candidates are scored exactly; the exponentials are
// vectorised too (exp_v). The blocks the tile's queries selected are then visited one by one (keys,
// later values), each read once for all the queries that chose it.
//
// Shapes (contiguous): q (B, H, C, D); q_start, q_len, local_len, count, start (B,) int64; local_k,
// local_v (B, Hkv, T, D) un-rotated; landmark_keys (B, Hkv, cap, D) un-rotated; keys
// (B, Hkv, cap, D, bs) offset-rotated, key-major inside a block; values (B, Hkv, cap, bs - 1, D);
// selected_in: empty, or (B, H, C, K) int64 logical indices, valid entries first in ascending order,
// -1 for none; cos_table, sin_table (P, D / 2).
// Returns out (B, H, C, D) (padding rows zero) and the selection (B, H, C, K) (-1: none).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTile = 32;  // query rows per task
constexpr int64_t kLanes = 16;  // floats per vector below

// A vector of kLanes floats (GCC/Clang vector extension: AVX-512 or two AVX2 registers on x86, four
// NEON registers on ARM); loads and stores are unaligned.
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
// Half as many doubles, the same width in bytes (a double vector of kLanes lanes would be twice the
// widest register: GCC then keeps it in memory).
constexpr int64_t kHalf = kLanes / 2;
typedef double vdouble __attribute__((vector_size(kHalf * sizeof(double))));
typedef float vfloat_half __attribute__((vector_size(kHalf * sizeof(float))));
constexpr int64_t kPanel = 8 * kLanes;  // landmark keys per panel of the scan's copy (see scan_landmarks)
constexpr int64_t kScanQueries = 6;  // queries per float scan of the old landmark keys (see scan_landmarks)
constexpr int64_t kManyCandidates = 16;
constexpr int64_t kRowScanMin = 64;  // old blocks from which a decode step scans in float first (see row_scores)  // more scan candidates than this: exact scores by vectors

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline vdouble load_double(const float* p) {  // kHalf floats, as doubles
  vfloat_half v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, vdouble);
}
inline vfloat splat(float x) { return x - vfloat{}; }  // (x - 0 is x, -0 included: one broadcast)

// exp(x) to about 2 ulp for x in [-87, 88] (Cephes' expf polynomial, range reduced by ln 2), lane by
// lane. Below -87 it returns about 1.6e-38 instead of a smaller number.
inline vfloat exp_v(vfloat x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vfloat t = x * 1.44269504088896341f + 0.5f;
  vint n = __builtin_convertvector(t, vint);  // truncation; floor for negative t below
  vfloat nf = __builtin_convertvector(n, vfloat);
  const vint above = nf > t;
  n += above;  // -1 where truncation rounded up
  nf = __builtin_convertvector(n, vfloat);
  vfloat r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint bits = (n + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// A row stride of at least n floats for key-major copies: whole vectors, and an odd number of them, so
// that the rows of a copy do not all map to the same few cache sets (a power-of-two stride of 1 KB or
// more would, and the scan reads every row).
inline int64_t row_stride(int64_t n) {
  const int64_t s = round_up(n);
  return (s / kLanes) % 2 ? s : s + kLanes;
}

// out_j[t] = sum_d q_j[d] * kt[d * stride + t] for t < NV * kLanes and the NQ queries q_j: one group
// of keys stored key-major, NQ * NV independent sums kept in registers.
template <int NQ, int NV>
inline void score_group(const float* const* q, const float* kt, int64_t stride, int64_t dim, float* const* out) {
  vfloat a[NQ][NV] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float* row = kt + d * stride;
    vfloat k[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) k[j] = load(row + j * kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < NQ; ++i) {
      const vfloat qd = splat(q[i][d]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) a[i][j] += qd * k[j];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) store(out[i] + j * kLanes, a[i][j]);
}

// out_i[t] = sum_d q_i[d] * kt[d * stride + t] for t < n: the scores of NQ queries (1 or 2) against
// keys stored key-major (kt is (D, stride)). Every score of the vector part is the same sequence of
// operations in its own lane (a sum over d in order; groups of up to eight vectors of keys at a time
// hide the latency), so equal keys get equal scores: the landmark scan relies on it for the top-k tie
// rule and pads its keys to a multiple of kLanes, so that no score comes from the scalar remainder.
template <int NQ>
inline void scores_key_major_n(const float* const* q, const float* kt, int64_t stride, int64_t n, int64_t dim,
                               float* const* out) {
  int64_t t0 = 0;
  auto at = [&](int64_t t, float** o) {
    for (int i = 0; i < NQ; ++i) o[i] = out[i] + t;
  };
  float* o[NQ];
  if (NQ == 1)
    for (; t0 + 8 * kLanes <= n; t0 += 8 * kLanes) at(t0, o), score_group<NQ, 8>(q, kt + t0, stride, dim, o);
  for (; t0 + 4 * kLanes <= n; t0 += 4 * kLanes) at(t0, o), score_group<NQ, 4>(q, kt + t0, stride, dim, o);
  for (; t0 + kLanes <= n; t0 += kLanes) at(t0, o), score_group<NQ, 1>(q, kt + t0, stride, dim, o);
  for (int64_t t = t0; t < n; ++t)
    for (int i = 0; i < NQ; ++i) {
      float acc = 0.f;
      for (int64_t d = 0; d < dim; ++d) acc += q[i][d] * kt[d * stride + t];
      out[i][t] = acc;
    }
}

inline void scores_key_major(const float* q, const float* kt, int64_t stride, int64_t n, int64_t dim, float* out) {
  scores_key_major_n<1>(&q, kt, stride, n, dim, &out);
}

// max |p[i]| over i < n (0 for n = 0).
inline float max_abs(const float* p, int64_t n) {
  vfloat mv{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat x = load(p + i);
    const vfloat a = x < 0.f ? -x : x;
    mv = a > mv ? a : mv;
  }
  float m = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) m = std::max(m, mv[l]);
  for (; i < n; ++i) m = std::max(m, std::fabs(p[i]));
  return m;
}

// Lanes l < n of a vector: true (n >= kLanes: all).
inline vint first_lanes(int64_t n) {
  vint lane;
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = static_cast<int32_t>(l);
  return lane < static_cast<int32_t>(std::min<int64_t>(n, kLanes));
}

// max of s[0..n), n >= 1. Reads whole vectors: s must be readable up to round_up(n).
inline float max_of(const float* s, int64_t n) {
  vfloat mv = splat(std::numeric_limits<float>::lowest());
  int64_t t0 = 0;
  for (; t0 + kLanes <= n; t0 += kLanes) {
    const vfloat x = load(s + t0);
    mv = x > mv ? x : mv;
  }
  if (t0 < n) {
    const vfloat x = first_lanes(n - t0) ? load(s + t0) : mv;
    mv = x > mv ? x : mv;
  }
  float m = mv[0];
  for (int64_t l = 1; l < kLanes; ++l) m = std::max(m, mv[l]);
  return m;
}

// e[t] = exp(s[t] - mx) for t < n; returns their sum. Reads and writes whole vectors (the lanes past n
// keep their values): s and e must be readable and writable up to round_up(n).
inline float exp_sum(const float* s, int64_t n, float mx, float* e) {
  vfloat z{};
  int64_t t0 = 0;
  for (; t0 + kLanes <= n; t0 += kLanes) {
    const vfloat x = exp_v(load(s + t0) - mx);
    store(e + t0, x);
    z += x;
  }
  if (t0 < n) {
    const vint keep = first_lanes(n - t0);
    const vfloat x = exp_v(load(s + t0) - mx);
    store(e + t0, keep ? x : load(e + t0));
    z += keep ? x : vfloat{};
  }
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += z[l];
  return sum;
}

// acc += w * sum_t e[t] * v[t] over n rows of v (n, dim): accumulators stay in registers, two vectors
// of dimensions and four rows at a time (eight independent sums).
inline void add_values(const float* e, float w, const float* v, int64_t n, int64_t dim, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 2 * kLanes <= dim; d0 += 2 * kLanes) {
    vfloat a[4][2] = {};
    const float* vd = v + d0;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const vfloat et = splat(e[t + j]);
        a[j][0] += et * load(vd + (t + j) * dim);
        a[j][1] += et * load(vd + (t + j) * dim + kLanes);
      }
    for (; t < n; ++t) {
      const vfloat et = splat(e[t]);
      a[0][0] += et * load(vd + t * dim);
      a[0][1] += et * load(vd + t * dim + kLanes);
    }
    store(acc + d0, load(acc + d0) + w * ((a[0][0] + a[1][0]) + (a[2][0] + a[3][0])));
    store(acc + d0 + kLanes, load(acc + d0 + kLanes) + w * ((a[0][1] + a[1][1]) + (a[2][1] + a[3][1])));
  }
  for (; d0 + kLanes <= dim; d0 += kLanes) {
    vfloat a0{}, a1{}, a2{}, a3{};
    const float* vd = v + d0;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      a0 += e[t] * load(vd + t * dim);
      a1 += e[t + 1] * load(vd + (t + 1) * dim);
      a2 += e[t + 2] * load(vd + (t + 2) * dim);
      a3 += e[t + 3] * load(vd + (t + 3) * dim);
    }
    for (; t < n; ++t) a0 += e[t] * load(vd + t * dim);
    store(acc + d0, load(acc + d0) + w * ((a0 + a1) + (a2 + a3)));
  }
  for (; d0 < dim; ++d0) {
    float a = 0.f;
    for (int64_t t = 0; t < n; ++t) a += e[t] * v[t * dim + d0];
    acc[d0] += w * a;
  }
}

// add_values for two weight rows (e0, w0), (e1, w1) over the same n rows of v (n, dim), each row of v
// read once for both: eight independent sums (two queries, two rows, two vectors of dimensions).
inline void add_values2(const float* e0, float w0, const float* e1, float w1, const float* v, int64_t n,
                        int64_t dim, float* acc0, float* acc1) {
  if (dim % (2 * kLanes) != 0) {
    add_values(e0, w0, v, n, dim, acc0);
    add_values(e1, w1, v, n, dim, acc1);
    return;
  }
  for (int64_t d0 = 0; d0 < dim; d0 += 2 * kLanes) {
    vfloat a[2][2][2] = {};  // [query][row parity][vector]
    const float* vd = v + d0;
    int64_t t = 0;
    for (; t + 2 <= n; t += 2)
#pragma GCC unroll 2
      for (int j = 0; j < 2; ++j) {
        const vfloat v0 = load(vd + (t + j) * dim), v1 = load(vd + (t + j) * dim + kLanes);
        const vfloat x0 = splat(e0[t + j]), x1 = splat(e1[t + j]);
        a[0][j][0] += x0 * v0;
        a[0][j][1] += x0 * v1;
        a[1][j][0] += x1 * v0;
        a[1][j][1] += x1 * v1;
      }
    for (; t < n; ++t) {
      const vfloat v0 = load(vd + t * dim), v1 = load(vd + t * dim + kLanes);
      const vfloat x0 = splat(e0[t]), x1 = splat(e1[t]);
      a[0][0][0] += x0 * v0;
      a[0][0][1] += x0 * v1;
      a[1][0][0] += x1 * v0;
      a[1][0][1] += x1 * v1;
    }
    store(acc0 + d0, load(acc0 + d0) + w0 * (a[0][0][0] + a[0][1][0]));
    store(acc0 + d0 + kLanes, load(acc0 + d0 + kLanes) + w0 * (a[0][0][1] + a[0][1][1]));
    store(acc1 + d0, load(acc1 + d0) + w1 * (a[1][0][0] + a[1][1][0]));
    store(acc1 + d0 + kLanes, load(acc1 + d0 + kLanes) + w1 * (a[1][0][1] + a[1][1][1]));
  }
}

// out = x rotated by position pos (pairs (x[i], x[i + D/2]), as landmark.model.apply_rope), with the
// angles read from the same table as the eager path and without fused multiply-adds, so that the
// rotations are bit-identical to the eager path's: the landmark scan then resolves nearly tied
// landmarks (a first layer's) the same way.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void rotate(const float* x, int64_t pos, const float* cos_table, const float* sin_table, int64_t half,
            float* out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const float* cs = cos_table + pos * half;
  const float* sn = sin_table + pos * half;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cs[i], s = sn[i];
    const float x1 = x[i], x2 = x[i + half];
    out[i] = x1 * c - x2 * s;
    out[i + half] = x1 * s + x2 * c;
  }
}

// Whether any lane of a comparison's result is true (with AVX-512 one mask test; otherwise the lanes'
// words or-ed together).
inline bool any_lane(vint m) {
#if defined(__AVX512F__)
  static_assert(sizeof(vint) == sizeof(__m512i), "a vint is one AVX-512 register");
  __m512i v;
  std::memcpy(&v, &m, sizeof(v));
  return _mm512_test_epi32_mask(v, v) != 0;
#else
  uint64_t w[kLanes / 2];
  std::memcpy(w, &m, sizeof(w));
  uint64_t o = 0;
  for (int64_t l = 0; l < kLanes / 2; ++l) o |= w[l];
  return o != 0;
#endif
}

// Indices of the k largest scores (NaN counts as -inf), ties to the more recent (larger) index, in
// ascending order: retrieval.top_k_blocks's rule.
inline void top_k(const float* scores, int64_t n, int64_t k, float* best, int64_t* idx) {
  std::fill(best, best + k, -std::numeric_limits<float>::infinity());
  std::fill(idx, idx + k, int64_t(-1));
  auto offer = [&](int64_t i) {  // only a larger score displaces an entry
    float s = scores[i];
    if (std::isnan(s)) s = -std::numeric_limits<float>::infinity();
    if (idx[k - 1] >= 0 && !(s > best[k - 1])) return;
    int64_t p = k - 1;
    while (p > 0 && (idx[p - 1] < 0 || s > best[p - 1])) {
      best[p] = best[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    best[p] = s;
    idx[p] = i;
  };
  // from the most recent back; once k entries are held, a whole vector of scores none of which beats
  // the k-th best is skipped at once (NaN compares false, as it would one by one)
  int64_t i = n - 1;
  for (; i >= 0 && idx[k - 1] < 0; --i) offer(i);
  for (; i + 1 >= kLanes; i -= kLanes) {
    const vfloat x = load(scores + i + 1 - kLanes);
    if (!any_lane(x > best[k - 1])) continue;
    for (int64_t j = i; j > i - kLanes; --j) offer(j);
  }
  for (; i >= 0; --i) offer(i);
  std::sort(idx, idx + k);
}

// A landmark score in double, rounded to float (the eager path's definition, summed here in four
// partial sums): equal keys get equal scores. It may differ from the eager path's double sum only in the
// last bits of the double, i.e. where the score lies at a float rounding boundary.
inline float landmark_score4(const double* q, const float* key, int64_t dim) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 4 <= dim; d += 4)
    for (int64_t l = 0; l < 4; ++l) acc[l] += q[d + l] * static_cast<double>(key[d + l]);
  double tail = 0.0;
  for (; d < dim; ++d) tail += q[d] * static_cast<double>(key[d]);
  return static_cast<float>((acc[0] + acc[2]) + (acc[1] + acc[3]) + tail);
}

// Exact landmark scores (double sums over d in order, as landmark_score4 up to the last bits of the
// double) of the kHalf keys at lt[d * stride + 0..kHalf) (key-major floats): one vector of doubles.
inline void exact_scores8(const double* q64, const float* lt, int64_t stride, int64_t dim, double* out) {
  vdouble a0{}, a1{};  // two chains over alternate d
  int64_t d = 0;
  for (; d + 2 <= dim; d += 2) {
    a0 += (vdouble{} + q64[d]) * load_double(lt + d * stride);
    a1 += (vdouble{} + q64[d + 1]) * load_double(lt + (d + 1) * stride);
  }
  if (d < dim) a0 += (vdouble{} + q64[d]) * load_double(lt + d * stride);
  const vdouble a = a0 + a1;
  std::memcpy(out, &a, sizeof(a));
}

// The sum of a vector's lanes, pairwise: halves added as vectors (lanes l and l + kHalf, then l and
// l + kHalf / 2 of those), the last four lanes as scalars.
inline float lane_sum(vfloat a) {
  vfloat_half lo, hi;
  std::memcpy(&lo, &a, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof(lo), sizeof(hi));
  const vfloat_half h = lo + hi;
  typedef float vfloat_quarter __attribute__((vector_size(kHalf / 2 * sizeof(float))));
  vfloat_quarter l2, h2;
  std::memcpy(&l2, &h, sizeof(l2));
  std::memcpy(&h2, reinterpret_cast<const char*>(&h) + sizeof(l2), sizeof(h2));
  const vfloat_quarter q = l2 + h2;
  float x[kHalf / 2];
  std::memcpy(x, &q, sizeof(x));
  float sum = 0.f;
  for (int64_t w = kHalf / 4; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) x[l] += x[l + w];
  sum = x[0];
  return sum;
}

// Float scores out[j][i] = q_j . key_i of nq <= kScanQueries queries and n keys stored one after another
// (dim floats each): a decode step's scan of the landmark keys where they are stored, every key read
// once for all the queries (at a million tokens the keys outgrow the caches: the scan is a pass over
// memory). Raises *max_key to the keys' largest magnitude. Every score is the same sequence of
// operations (vectors over d, then lane_sum), so equal keys get equal scores; the float scan's error
// bound (old_candidates) holds for any order of the sum.
inline void row_scores(const float* const* q, int64_t nq, const float* keys, int64_t n, int64_t dim,
                       float* const* out, float* max_key) {
  const int64_t dv = dim / kLanes * kLanes;
  vfloat mx{};
  float mx_tail = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float* key = keys + i * dim;
    vfloat a[kScanQueries] = {};
    for (int64_t d = 0; d < dv; d += kLanes) {
      const vfloat k = load(key + d);
      const vfloat ak = k < 0.f ? -k : k;
      mx = ak > mx ? ak : mx;
#pragma GCC unroll 8
      for (int64_t j = 0; j < kScanQueries; ++j)
        if (j < nq) a[j] += load(q[j] + d) * k;
    }
    for (int64_t j = 0; j < nq; ++j) {
      float sum = lane_sum(a[j]);
      for (int64_t d = dv; d < dim; ++d) sum += q[j][d] * key[d];
      out[j][i] = sum;
    }
    for (int64_t d = dv; d < dim; ++d) mx_tail = std::max(mx_tail, std::fabs(key[d]));
  }
  for (int64_t l = 0; l < kLanes; ++l) mx_tail = std::max(mx_tail, mx[l]);
  *max_key = std::max(*max_key, mx_tail);
}

// The scan's copy of the old landmark keys is a sequence of panels of kPanel keys, each key-major
// ((D, kPanel) floats, zero padding after the last key): the scan then reads one contiguous run of
// memory per panel, where a plain key-major copy (D, n) would read D rows n floats apart at once (as
// many streams as dimensions, and as many pages: slow once the keys outgrow the caches).
inline int64_t panel_length(int64_t n) { return (n + kPanel - 1) / kPanel * kPanel; }

// The first number of key i of a panel copy; its dimension d lies d * kPanel floats further.
inline const float* panel_key(const float* lt, int64_t i, int64_t dim) {
  return lt + (i / kPanel) * dim * kPanel + i % kPanel;
}

// The float scan of the old blocks' landmark keys for nq <= kScanQueries queries: scans[j][i] for i < n,
// a multiple of kPanel (lanes past the old blocks are unused). lt: the keys in panels (panel_key). Six
// queries against four vectors of keys keep 24 sums in registers (fewer loads per multiply-add than four
// queries: 1.3-1.8x faster on a Zen 4 core); fewer queries take smaller groups. Every score is the same
// sequence of operations in its own lane (a sum over d in order), so equal keys get equal scores.
inline void scan_landmarks(const float* const* q, int64_t nq, const float* lt, int64_t n, int64_t dim,
                           float* const* scans) {
  constexpr int64_t half = 4 * kLanes;  // keys per group of four vectors: two per panel
  for (int64_t t0 = 0; t0 < n; t0 += kPanel) {
    const float* panel = lt + t0 * dim;
    float* o[kScanQueries];
    float* o2[kScanQueries];
    for (int64_t j = 0; j < nq; ++j) o[j] = scans[j] + t0, o2[j] = o[j] + half;
    int64_t j = 0;
    if (nq == kScanQueries) {
      score_group<kScanQueries, 4>(q, panel, kPanel, dim, o);
      score_group<kScanQueries, 4>(q, panel + half, kPanel, dim, o2);
      continue;
    }
    for (; j + 4 <= nq; j += 4) {
      score_group<4, 4>(q + j, panel, kPanel, dim, o + j);
      score_group<4, 4>(q + j, panel + half, kPanel, dim, o2 + j);
    }
    for (; j + 2 <= nq; j += 2) score_group<2, 8>(q + j, panel, kPanel, dim, o + j);
    if (j < nq) score_group<1, 8>(q + j, panel, kPanel, dim, o + j);
  }
}

// Candidates without a float scan: every old block with its exact score (a decode step), or, where all
// the old landmark keys are the same (a first layer's, whose keys do not depend on the position), only
// the k most recent: they all have one exact score and ties go to the more recent block. Writes the
// candidates' indices (ascending) to cand and their scores to cand_score; returns their count.
template <typename KeyOf>
int64_t all_or_recent(const double* q64, int64_t n_old, int64_t k, int64_t dim, bool same_keys, KeyOf key,
                      int64_t* cand, float* cand_score) {
  if (!same_keys) {
    for (int64_t i = 0; i < n_old; ++i) {
      cand[i] = i;
      cand_score[i] = landmark_score4(q64, key(i), dim);
    }
    return n_old;
  }
  const int64_t kk = std::min(k, n_old);
  const float score = landmark_score4(q64, key(0), dim);
  for (int64_t j = 0; j < kk; ++j) {
    cand[j] = n_old - kk + j;
    cand_score[j] = score;
  }
  return kk;
}

// The old blocks that can be among the top k, from their float scan scores, and their landmark scores
// as the eager path defines them (retrieval._landmark_scores: summed in double, rounded to float):
// writes the candidates' indices (ascending) to cand and their exact scores to cand_score, returns
// their count; lt: the keys in panels, for exact scores eight at a time (nullptr: one by one). The float
// scan (a sum over d in any order of depth at most D + 1) errs by at most
// bound = 2 (D + 1) 2^-24 sum_d |q_d| max|key|. A lower bound of the k-th best float score is the k-th
// best of the lanes' maxima (k distinct scores); every block whose exact score reaches the k-th best
// exact score has a float score within 2 bound (+ the float rounding) of it, so only those candidates
// (typically k) are scored again in double, one by one; a NaN float score is a candidate too. The
// top-k of the candidates equals the top-k of all the exact scores, ties included (equal keys: equal
// float scores, all candidates or none).
template <typename KeyOf>
int64_t old_candidates(const float* q, const double* q64, const float* scan, const float* lt, int64_t n_old,
                       int64_t k, int64_t dim, float max_key, KeyOf key, int64_t* cand, float* cand_score) {
  const int64_t kk = std::min(k, n_old);
  const float minus_inf = -std::numeric_limits<float>::infinity();
  vfloat lane_max = splat(minus_inf);
  int64_t i0 = 0;
  for (; i0 + kLanes <= n_old; i0 += kLanes) {
    const vfloat x = load(scan + i0);
    lane_max = x > lane_max ? x : lane_max;
  }
  if (i0 < n_old) {  // the last lanes past the old blocks are not scores
    const vfloat x = load(scan + i0);
    lane_max = first_lanes(n_old - i0) & (x > lane_max) ? x : lane_max;
  }
  float maxima[kLanes];
  std::memcpy(maxima, &lane_max, sizeof(maxima));
  std::nth_element(maxima, maxima + kk - 1, maxima + kLanes, std::greater<float>());
  float threshold = maxima[kk - 1];
  if (!std::isfinite(threshold))  // infinite or NaN scores (or fewer than k finite): all exactly
    return all_or_recent(q64, n_old, k, dim, false, key, cand, cand_score);
  float q_abs = 0.f;
  for (int64_t d = 0; d < dim; ++d) q_abs += std::fabs(q[d]);
  const float bound = 2.f * static_cast<float>(dim + 1) * 5.9604645e-8f * q_abs * max_key;
  threshold -= 2.f * bound + 2.f * std::fabs(threshold) * 1.1920929e-7f;
  int64_t m = 0;
  for (int64_t i0 = 0; i0 < n_old; i0 += kLanes) {  // whole vectors without a candidate are skipped
    const vfloat x = load(scan + i0);
    if (!any_lane((x >= threshold) | (x != x))) continue;
    for (int64_t i = i0; i < std::min(i0 + kLanes, n_old); ++i)
      if (scan[i] >= threshold || std::isnan(scan[i])) cand[m++] = i;
  }
  // the exact scores: one by one for a few candidates; eight keys per vector for many (nearly tied
  // landmarks: a converted model's first layer, whose un-rotated keys differ by rounding). One method
  // for all the candidates of a query, so that equal keys keep equal scores.
  if (m <= kManyCandidates || lt == nullptr) {
    for (int64_t j = 0; j < m; ++j) cand_score[j] = landmark_score4(q64, key(cand[j]), dim);
  } else {
    double exact[kHalf];
    int64_t group = -1;
    for (int64_t j = 0; j < m; ++j) {
      if (cand[j] / kHalf != group) {
        group = cand[j] / kHalf;
        exact_scores8(q64, panel_key(lt, group * kHalf, dim), kPanel, dim, exact);
      }
      cand_score[j] = static_cast<float>(exact[cand[j] % kHalf]);
    }
  }
  return m;
}

void check(const torch::Tensor& t, int64_t dim, torch::ScalarType type, const char* name) {
  TORCH_CHECK(t.dim() == dim && t.scalar_type() == type && t.is_contiguous() && t.device().is_cpu(), name,
              ": expected a contiguous CPU tensor of ", dim, " dimensions and type ", type);
}

// Block contents as the memory stores them (float32, float16, bfloat16, or int8 with one float scale per
// block, kv head and keys|values): read(i, n, out) converts the n numbers of block i (a slot of the row
// and kv head the store points at) to float32 into out, a buffer of one block; float32 is read in place.
struct BlockStore {
  const void* data = nullptr;
  const float* scale = nullptr;  // int8: one per slot
  at::ScalarType type = at::kFloat;

  const float* read(int64_t i, int64_t n, float* out) const {
    switch (type) {
      case at::kFloat:
        return static_cast<const float*>(data) + i * n;
      case at::kBFloat16: {
        const uint16_t* x = static_cast<const uint16_t*>(data) + i * n;
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t bits = static_cast<uint32_t>(x[j]) << 16;
          std::memcpy(out + j, &bits, sizeof(float));
        }
        return out;
      }
      case at::kHalf: {
        const at::Half* x = static_cast<const at::Half*>(data) + i * n;
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(x[j]);
        return out;
      }
      default: {  // int8
        const int8_t* x = static_cast<const int8_t*>(data) + i * n;
        const float s = scale[i];
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(x[j]) * s;
        return out;
      }
    }
  }

  BlockStore at(int64_t offset, int64_t n) const {  // the store from slot `offset` on (n numbers a slot)
    BlockStore moved = *this;
    moved.data = static_cast<const char*>(data) + offset * n * c10::elementSize(type);
    if (scale) moved.scale = scale + offset;
    return moved;
  }
};

BlockStore block_store(const torch::Tensor& t, const torch::Tensor& scale, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 5, name, ": expected a contiguous CPU tensor of 5 dimensions");
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf || type == at::kChar, name,
              ": stored as float32, float16, bfloat16 or int8");
  BlockStore store{t.data_ptr(), nullptr, type};
  if (type == at::kChar) {
    TORCH_CHECK(scale.numel() == t.size(0) * t.size(1) * t.size(2) && scale.scalar_type() == at::kFloat &&
                    scale.is_contiguous(), name, ": int8 blocks need a float32 scale per block");
    store.scale = scale.data_ptr<float>();
  }
  return store;
}

}  // namespace

std::vector<torch::Tensor> retrieval_step(torch::Tensor q, torch::Tensor q_start, torch::Tensor q_len,
                                          torch::Tensor local_k, torch::Tensor local_v, torch::Tensor local_len,
                                          torch::Tensor landmark_keys, torch::Tensor keys, torch::Tensor values,
                                          torch::Tensor count, torch::Tensor start, torch::Tensor selected_in,
                                          torch::Tensor cos_table, torch::Tensor sin_table, int64_t k,
                                          double scale, torch::Tensor key_scale, torch::Tensor value_scale) {
  check(q, 4, torch::kFloat32, "q");
  check(local_k, 4, torch::kFloat32, "local_k");
  check(local_v, 4, torch::kFloat32, "local_v");
  check(landmark_keys, 4, torch::kFloat32, "landmark_keys");
  const BlockStore key_store = block_store(keys, key_scale, "keys");
  const BlockStore value_store = block_store(values, value_scale, "values");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "keys and values: one storage type");
  for (auto* t : {&q_start, &q_len, &local_len, &count, &start}) check(*t, 1, torch::kInt64, "row vector");
  check(cos_table, 2, torch::kFloat32, "cos_table");
  check(sin_table, 2, torch::kFloat32, "sin_table");
  TORCH_CHECK(k >= 1, "k must be >= 1");
  const int64_t B = q.size(0), H = q.size(1), C = q.size(2), D = q.size(3), half = D / 2;
  const int64_t Hkv = local_k.size(1), T = local_k.size(2), G = H / Hkv;
  const int64_t cap = keys.size(2), bs = keys.size(4);
  TORCH_CHECK(H % Hkv == 0 && local_v.sizes() == local_k.sizes() && local_k.size(3) == D, "local_k/local_v shapes");
  TORCH_CHECK(landmark_keys.size(2) == cap && values.size(3) == bs - 1 && keys.size(3) == D, "memory shapes");
  TORCH_CHECK(cos_table.size(1) == half && sin_table.sizes() == cos_table.sizes(), "angle tables");
  const int64_t* qstart = q_start.data_ptr<int64_t>();
  const int64_t* qlen = q_len.data_ptr<int64_t>();
  const int64_t* llen = local_len.data_ptr<int64_t>();
  const int64_t* cnt = count.data_ptr<int64_t>();
  const int64_t* first = start.data_ptr<int64_t>();
  int64_t n_max = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cnt[b] >= 0 && cnt[b] <= cap && llen[b] <= T && qstart[b] + std::min(qlen[b], C) <= llen[b],
                "row ", b, ": inconsistent count, local_len or q_start");
    n_max = std::max(n_max, cnt[b]);
  }
  const bool given = selected_in.numel() > 0;
  int64_t K = std::min(k, n_max);
  if (given) {
    check(selected_in, 4, torch::kInt64, "selected_in");
    TORCH_CHECK(selected_in.size(0) == B && selected_in.size(1) == H && selected_in.size(2) == C, "selected_in shape");
    K = selected_in.size(3);
    TORCH_CHECK(K <= k, "selected_in holds more than k blocks per query");
  }
  const int64_t P = cos_table.size(0);
  TORCH_CHECK(P >= (std::min(k, n_max) + 2) * bs + T, "angle table too short");
  auto out = torch::zeros_like(q);
  auto selected = torch::full({B, H, C, K}, -1, q_start.options());
  const float* qp = q.data_ptr<float>();
  const float* lkp = local_k.data_ptr<float>();
  const float* lvp = local_v.data_ptr<float>();
  const float* lmp = landmark_keys.data_ptr<float>();
  const int64_t* sel_in = given ? selected_in.data_ptr<int64_t>() : nullptr;
  const float* cos_t = cos_table.data_ptr<float>();
  const float* sin_t = sin_table.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t* sp = selected.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  const int64_t n_tiles = (C + kTile - 1) / kTile;

  at::parallel_for(0, B * Hkv * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> q_lm64(D);
    std::vector<float> lt, scan, row_scan, qs(D), lkt, q_lm, q_att, lm_scores, mem, loc_scores, acc, groups, weight;
    std::vector<float> best(std::max<int64_t>(K, 1));
    std::vector<int64_t> sel, n_sel, cand;
    std::vector<std::pair<int64_t, int64_t>> uses;  // (block, query * K + rank), sorted by block
    std::vector<float> rot(D), block_buf(D * bs);  // one block's keys or values, converted to float32
    // whose keys lt, lkt, same_keys and max_key describe (b * Hkv + kv); lkt's count
    int64_t lt_of = -1, lkt_of = -1, keys_of = -1, rotated = 0;
    float max_key = 0.f;
    bool same_keys = false;  // all old landmark keys bitwise equal
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hkv * n_tiles), kv = (task / n_tiles) % Hkv, tile = task % n_tiles;
      const int64_t c0 = tile * kTile, c1 = std::min({C, c0 + kTile, qlen[b]});
      if (c0 >= c1) continue;
      const int64_t rows = c1 - c0, Q = G * rows;  // the task's queries: (head g, row c) -> g * rows + c - c0
      const int64_t n = cnt[b], ke = std::min(k, n), n_old = n - ke, base = (ke + 1) * bs;
      auto phys = [&](int64_t i) { return (first[b] + i) % cap; };
      const int64_t bk = b * Hkv + kv;
      const float* lm = lmp + bk * cap * D;
      const BlockStore kb = key_store.at(bk * cap, bs * D);  // this row and kv head's slots
      const BlockStore vb = value_store.at(bk * cap, (bs - 1) * D);
      // whether the old blocks' landmark keys are all equal, and their largest magnitude (for the float
      // scan's error bound): once for consecutive tasks of one (row, kv head). The old keys are at most
      // two runs of slots (the ring buffer may wrap around): `run` keys from phys(0), then from slot 0.
      const int64_t lt_len = panel_length(n_old);
      const bool direct = rows <= 2;  // a decode step: score the landmarks where they are stored
      const int64_t run = std::min(n_old, cap - first[b] % cap);
      if (!given && n_old > 0 && keys_of != bk) {
        keys_of = bk;
        const float* first_key = lm + phys(0) * D;
        same_keys = true;
        for (int64_t i = 1; i < n_old && same_keys; ++i)
          same_keys = std::memcmp(lm + phys(i) * D, first_key, D * sizeof(float)) == 0;
        if (!direct)  // (a decode step's scan finds it as it goes)
          max_key = std::max(max_abs(lm + phys(0) * D, run * D), max_abs(lm, (n_old - run) * D));
      }
      // their key-major copy in panels (the scan of every query of the tile reads it)
      if (!given && n_old > 0 && !direct && !same_keys && lt_of != bk) {
        lt_of = bk;
        lt.assign(D * lt_len, 0.f);
        for (int64_t i = 0; i < n_old; ++i) {
          const float* src = lm + phys(i) * D;
          float* dst = lt.data() + (panel_key(lt.data(), i, D) - lt.data());
          for (int64_t d = 0; d < D; ++d) dst[d * kPanel] = src[d];
        }
      }
      // the local keys any query of the tile sees, rotated to their positions, key-major; consecutive
      // tasks of one (row, kv head) extend them
      const int64_t n_local = llen[b], seen = std::min(n_local, qstart[b] + c1);
      const float* lk = lkp + bk * T * D;
      const float* lv = lvp + bk * T * D;
      const int64_t lkt_stride = row_stride(n_local);
      if (lkt_of != bk) {
        lkt_of = bk;
        lkt.assign(D * lkt_stride, 0.f);
        rotated = 0;
      }
      for (; rotated < seen; ++rotated) {
        rotate(lk + rotated * D, base + rotated, cos_t, sin_t, half, rot.data());
        for (int64_t d = 0; d < D; ++d) lkt[d * lkt_stride + rotated] = rot[d];
      }
      q_att.resize(Q * (ke + 1) * D);
      q_lm.resize(Q * (ke + 1) * D);
      lm_scores.resize(std::max<int64_t>(lt_len + ke, 1));
      cand.resize(std::max<int64_t>(n, 1));
      sel.assign(Q * std::max<int64_t>(K, 1), -1);
      n_sel.assign(Q, 0);
      mem.resize(Q * std::max<int64_t>(K, 1) * bs + kLanes);  // + kLanes: max_of, exp_sum read whole vectors
      loc_scores.resize(2 * (lkt_stride + kLanes));  // two queries' local scores
      acc.assign(Q * D, 0.f);
      weight.resize(Q * std::max<int64_t>(K, 1));
      uses.clear();
      // 1. per query: the rotations (to the attention slots; to the landmark slots when selecting)
      const bool selects = !given && ke > 0;
      const bool scans = selects && n_old > 0 && !direct && !same_keys;  // the float scan of old landmarks
      scan.resize(std::max<int64_t>(scans ? kScanQueries * lt_len : 1, 1));
      for (int64_t qi = 0; qi < Q; ++qi) {
        const int64_t g = qi / rows, c = c0 + qi % rows, row = (b * H + kv * G + g) * C + c;
        const int64_t q_pos = base + qstart[b] + c;
        const float* x = qp + row * D;
        for (int64_t d = 0; d < D; ++d) qs[d] = x[d] * sc;
        float* qa = q_att.data() + qi * (ke + 1) * D;
        for (int64_t j = 0; j <= ke; ++j) rotate(qs.data(), q_pos - j * bs, cos_t, sin_t, half, qa + j * D);
        if (selects)
          for (int64_t j = 0; j <= ke; ++j)
            rotate(qs.data(), q_pos - j * bs - (bs - 1), cos_t, sin_t, half, q_lm.data() + (qi * (ke + 1) + j) * D);
      }
      // a decode step's float scan of many old blocks, every query's, each key read once for up to
      // kScanQueries queries (the rows of row_scan: whole vectors, as old_candidates reads them)
      const bool row_scans = selects && direct && !same_keys && n_old >= kRowScanMin;
      const int64_t row_len = round_up(n_old);
      row_scan.resize(row_scans ? Q * row_len : 1);
      if (row_scans) {
        max_key = 0.f;
        for (int64_t q0 = 0; q0 < Q; q0 += kScanQueries) {
          const int64_t nq = std::min(kScanQueries, Q - q0);
          const float* qq[kScanQueries];
          float* oo[kScanQueries];
          float* oo2[kScanQueries];
          for (int64_t j = 0; j < nq; ++j) {
            qq[j] = q_lm.data() + (q0 + j) * (ke + 1) * D;
            oo[j] = row_scan.data() + (q0 + j) * row_len;
            oo2[j] = oo[j] + run;
          }
          row_scores(qq, nq, lm + phys(0) * D, run, D, oo, &max_key);
          row_scores(qq, nq, lm, n_old - run, D, oo2, &max_key);
        }
      }
      // 2. the selection, kScanQueries queries at a time (one float scan of the landmark keys for them)
      for (int64_t q0 = 0; q0 < Q; q0 += kScanQueries) {
        const int64_t nq = std::min<int64_t>(kScanQueries, Q - q0);
        float* scans_of[kScanQueries];
        const float* lm_query[kScanQueries];
        for (int64_t j = 0; j < nq; ++j) {
          scans_of[j] = scan.data() + j * lt_len;
          lm_query[j] = q_lm.data() + (q0 + j) * (ke + 1) * D;
        }
        if (scans) scan_landmarks(lm_query, nq, lt.data(), lt_len, D, scans_of);
        for (int64_t qi = q0; qi < q0 + nq; ++qi) {
          const int64_t row = (b * H + kv * G + qi / rows) * C + c0 + qi % rows;
          int64_t* qsel = sel.data() + qi * K;
          int64_t v = 0;
          if (given) {
            const int64_t* s_in = sel_in + row * K;
            while (v < K && s_in[v] >= 0) {
              qsel[v] = s_in[v];
              ++v;
            }
          } else if (selects) {
            const float* ql = q_lm.data() + qi * (ke + 1) * D;
            std::copy(ql, ql + D, q_lm64.begin());
            // the candidates (old blocks that can win, then the recent ones) and their exact scores
            int64_t m = 0;
            const auto key = [&](int64_t i) { return lm + phys(i) * D; };
            if (n_old > 0 && (same_keys || (direct && n_old < kRowScanMin))) {
              m = all_or_recent(q_lm64.data(), n_old, ke, D, same_keys, key, cand.data(), lm_scores.data());
            } else if (n_old > 0 && direct) {  // many old blocks: the float scan where they are stored
              m = old_candidates(ql, q_lm64.data(), row_scan.data() + qi * row_len, nullptr, n_old, ke, D,
                                 max_key, key, cand.data(), lm_scores.data());
            } else if (n_old > 0) {
              m = old_candidates(ql, q_lm64.data(), scan.data() + (qi - q0) * lt_len, lt.data(), n_old,
                                 ke, D, max_key, [&](int64_t i) { return lm + phys(i) * D; }, cand.data(),
                                 lm_scores.data());
            }
            for (int64_t i = n_old; i < n; ++i, ++m) {
              const float* slot_q = ql + (i - n_old + 1) * D;
              std::copy(slot_q, slot_q + D, q_lm64.begin());
              cand[m] = i;
              lm_scores[m] = landmark_score4(q_lm64.data(), lm + phys(i) * D, D);
            }
            top_k(lm_scores.data(), m, ke, best.data(), qsel);  // positions in the candidate list
            for (int64_t r = 0; r < ke; ++r) qsel[r] = cand[qsel[r]];
            v = ke;
          }
          n_sel[qi] = v;
          for (int64_t r = 0; r < v; ++r) {
            sp[row * K + r] = qsel[r];
            uses.emplace_back(qsel[r], qi * K + r);
          }
        }
      }
      // 3. block by block (each block's keys read once for all the queries of the tile that chose it):
      //    the scores of the selected blocks, each query rotated to the block's attention slot
      std::sort(uses.begin(), uses.end());
      auto slot_query = [&](int64_t block, int64_t use) {  // the query of a use, rotated to its slot
        const int64_t qi = use / K, r = use % K, slot = r + (block >= n_old ? 1 : 0);
        return q_att.data() + (qi * (ke + 1) + slot) * D;
      };
      for (size_t u = 0; u < uses.size();) {  // two uses of one block at a time where they exist
        const int64_t block = uses[u].first;
        const float* keys_of = kb.read(phys(block), D * bs, block_buf.data());
        if (u + 1 < uses.size() && uses[u + 1].first == block) {
          const float* qq[2] = {slot_query(block, uses[u].second), slot_query(block, uses[u + 1].second)};
          float* oo[2] = {mem.data() + uses[u].second * bs, mem.data() + uses[u + 1].second * bs};
          scores_key_major_n<2>(qq, keys_of, bs, bs, D, oo);
          u += 2;
        } else {
          scores_key_major(slot_query(block, uses[u].second), keys_of, bs, bs, D, mem.data() + uses[u].second * bs);
          u += 1;
        }
      }
      // 4. per query: the local context's scores, the grouped softmax, the local values; each memory
      //    block's weight (its landmark's probability over its in-block softmax's sum) for step 5
      auto visible_of = [&](int64_t qi) { return std::min(n_local, qstart[b] + c0 + qi % rows + 1); };
      auto local_query = [&](int64_t qi) { return q_att.data() + qi * (ke + 1) * D; };
      // one query's grouped softmax and local values, from its local scores
      auto finish = [&](int64_t qi, float* scores) {
        const int64_t ql = qstart[b] + c0 + qi % rows, own = (ql / bs) * bs, v = n_sel[qi];
        const int64_t n_earlier = own / bs;  // complete local blocks before the own block
        float* m_s = mem.data() + qi * K * bs;
        const int64_t own_end = std::min(visible_of(qi), own + bs - 1);  // the own block's visible tokens
        // the landmark scores of the memory blocks, then of the earlier local blocks: one per group
        const int64_t n_groups = v + n_earlier;
        groups.resize(round_up(n_groups) + kLanes);
        for (int64_t r = 0; r < v; ++r) groups[r] = m_s[r * bs + bs - 1];
        for (int64_t j = 0; j < n_earlier; ++j) groups[v + j] = scores[j * bs + bs - 1];
        float mx = max_of(scores + own, own_end - own);
        if (n_groups > 0) mx = std::max(mx, max_of(groups.data(), n_groups));
        float* e_own = scores + own;  // exponentials in place
        float z = exp_sum(e_own, own_end - own, mx, e_own);
        if (n_groups > 0) z += exp_sum(groups.data(), n_groups, mx, groups.data());
        float* a = acc.data() + qi * D;
        for (int64_t j = 0; j < n_earlier; ++j) {  // earlier local blocks, through their landmarks
          float* e = scores + j * bs;
          const float zi = exp_sum(e, bs - 1, max_of(e, bs - 1), e);
          add_values(e, groups[v + j] / z / zi, lv + j * bs * D, bs - 1, D, a);
        }
        add_values(e_own, 1.f / z, lv + own * D, own_end - own, D, a);
        for (int64_t r = 0; r < v; ++r) {  // memory blocks: in-block exponentials in place, and weights
          float* e = m_s + r * bs;
          const float zi = exp_sum(e, bs - 1, max_of(e, bs - 1), e);
          weight[qi * K + r] = groups[r] / z / zi;
        }
      };
      // the local scores of two queries of one head at a time (the second sees one key more); whole
      // vectors: the keys past `visible` are zero padding or not yet visible, never used
      float* const pair[2] = {loc_scores.data(), loc_scores.data() + lkt_stride + kLanes};
      for (int64_t g = 0; g < G; ++g)
        for (int64_t qi = g * rows; qi < (g + 1) * rows; qi += 2) {
          if (qi + 1 < (g + 1) * rows) {
            const float* qq[2] = {local_query(qi), local_query(qi + 1)};
            scores_key_major_n<2>(qq, lkt.data(), lkt_stride, round_up(visible_of(qi + 1)), D, pair);
            finish(qi, pair[0]);
            finish(qi + 1, pair[1]);
          } else {
            scores_key_major(local_query(qi), lkt.data(), lkt_stride, round_up(visible_of(qi)), D, pair[0]);
            finish(qi, pair[0]);
          }
        }
      // 5. block by block again: the values (each block's values read once for the tile)
      for (size_t u = 0; u < uses.size();) {  // two uses of one block at a time where they exist
        const int64_t block = uses[u].first, use = uses[u].second;
        const float* values_of = vb.read(phys(block), (bs - 1) * D, block_buf.data());
        if (u + 1 < uses.size() && uses[u + 1].first == block) {
          const int64_t use2 = uses[u + 1].second;
          add_values2(mem.data() + use * bs, weight[use], mem.data() + use2 * bs, weight[use2], values_of, bs - 1, D,
                      acc.data() + (use / K) * D, acc.data() + (use2 / K) * D);
          u += 2;
        } else {
          add_values(mem.data() + use * bs, weight[use], values_of, bs - 1, D, acc.data() + (use / K) * D);
          u += 1;
        }
      }
      for (int64_t qi = 0; qi < Q; ++qi) {
        const int64_t g = qi / rows, c = c0 + qi % rows;
        std::copy(acc.begin() + qi * D, acc.begin() + (qi + 1) * D, op + ((b * H + kv * G + g) * C + c) * D);
      }
    }
  });
  return {out, selected};
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor bias);  // int8_linear.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("retrieval_step", &retrieval_step,
        "Fused landmark retrieval attention of one layer for a prefill chunk or a decode step (CPU, float32)");
  m.def("int8_linear", &int8_linear, "A linear layer with int8 weights and a scale per group (CPU, float32)");
}
