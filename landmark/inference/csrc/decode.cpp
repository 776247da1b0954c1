// One decode step of landmark retrieval attention for one layer, fused (CPU, float32).
//
// The same computation as the eager path of landmark/inference/retrieval.py for a decode step where
// every batch row holds the same number n >= k of memory blocks in logical order (no ring-buffer
// wrap-around), granularity "token_head", exact landmark search. Per (batch row, query head, query
// row) it
//   1. rotates the scaled query to the positions it needs (RoPE);
//   2. scans the n landmark keys (the k most recent at their own slots 1..k, all older ones at slot 0)
//      and keeps the top k (ties: the more recent block), in chronological order;
//   3. scores the selected blocks' stored keys (rotated by their in-block offsets) with the query
//      rotated to the block's attention slot, and the local context (rotated here);
//   4. applies the grouped softmax (own block directly, other blocks through their landmark, split
//      inside the block by a softmax) and sums the values.
// Nothing of size heads x k x block x head_dim is materialised: blocks are read in place.
//
// Shapes (all contiguous): q (B, H, C, D); q_local (B, C) int64 local position of each query row;
// q_len (B,) real query rows; local_k, local_v (B, Hkv, T, D) un-rotated; local_len (B,) int64;
// landmark_keys (B, Hkv, cap, D); keys (B, Hkv, cap, bs, D); values (B, Hkv, cap, bs - 1, D);
// cos_table, sin_table (P, D / 2) RoPE angles of positions 0..P-1 (P > every position used). Returns (B, H, C, D); padding rows are zero.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t d) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float tail = 0.f;
  for (; i < d; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// A landmark score: accumulated in double and rounded to float, so that equal keys score exactly alike
// (retrieval._landmark_scores does the same), and ties are broken by the recency rule alone.
inline float landmark_dot(const float* a, const float* b, int64_t d) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= d; i += 4) {
    for (int l = 0; l < 4; ++l) acc[l] += static_cast<double>(a[i + l]) * static_cast<double>(b[i + l]);
  }
  double tail = 0.0;
  for (; i < d; ++i) tail += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return static_cast<float>((acc[0] + acc[2]) + (acc[1] + acc[3]) + tail);
}

inline void axpy(float w, const float* x, float* y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += w * x[i];
}

// out = x rotated by position pos: pairs (x[i], x[i + D/2]), as landmark.model.apply_rope, with the
// angles' cos and sin read from the same table as the eager path (bit-identical rotations; the file is
// compiled without floating-point contraction, so no fused multiply-add changes the rounding).
inline void rotate(const float* x, int64_t pos, const float* cos_table, const float* sin_table, int64_t half,
                   float* out) {
  const float* cs = cos_table + pos * half;
  const float* sn = sin_table + pos * half;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cs[i], s = sn[i];
    const float x1 = x[i], x2 = x[i + half];
    out[i] = x1 * c - x2 * s;
    out[i + half] = x1 * s + x2 * c;
  }
}

}  // namespace

torch::Tensor decode_step(torch::Tensor q, torch::Tensor q_local, torch::Tensor q_len, torch::Tensor local_k,
                          torch::Tensor local_v, torch::Tensor local_len, torch::Tensor landmark_keys,
                          torch::Tensor keys, torch::Tensor values, torch::Tensor cos_table, torch::Tensor sin_table, int64_t n_blocks,
                          int64_t k, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(), "q: (B, H, C, D) float32");
  TORCH_CHECK(keys.dim() == 5 && keys.is_contiguous() && values.is_contiguous(), "keys/values layout");
  TORCH_CHECK(local_k.is_contiguous() && local_v.is_contiguous() && landmark_keys.is_contiguous(), "layout");
  TORCH_CHECK(n_blocks >= k && k >= 1, "decode_step needs n_blocks >= k >= 1");
  const int64_t B = q.size(0), H = q.size(1), C = q.size(2), D = q.size(3), half = D / 2;
  const int64_t Hkv = local_k.size(1), T = local_k.size(2), G = H / Hkv;
  const int64_t cap = keys.size(2), bs = keys.size(3);
  TORCH_CHECK(n_blocks <= cap, "n_blocks exceeds the memory's capacity");
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const int64_t* qlocal = q_local.data_ptr<int64_t>();
  const int64_t* qlen = q_len.data_ptr<int64_t>();
  const float* lkp = local_k.data_ptr<float>();
  const float* lvp = local_v.data_ptr<float>();
  const int64_t* llen = local_len.data_ptr<int64_t>();
  const float* lmp = landmark_keys.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  TORCH_CHECK(cos_table.is_contiguous() && sin_table.is_contiguous() && cos_table.size(1) == D / 2, "tables");
  const float* cos_t = cos_table.data_ptr<float>();
  const float* sin_t = sin_table.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t base = (k + 1) * bs;  // position of local position 0
  const int64_t n_old = n_blocks - k;
  const float hidden = std::numeric_limits<float>::lowest();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lk_rot(T * D), qs(D), q_att((k + 1) * D), q_lm((k + 1) * D);
    std::vector<float> mem_scores(k * bs), local_scores(T);
    std::vector<float> best(k);
    std::vector<int64_t> best_idx(k), sel(k);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, kv = bh % Hkv;
      const int64_t n_local = llen[b];
      const float* lk = lkp + (b * Hkv + kv) * T * D;
      const float* lv = lvp + (b * Hkv + kv) * T * D;
      for (int64_t t = 0; t < n_local; ++t) rotate(lk + t * D, base + t, cos_t, sin_t, half, lk_rot.data() + t * D);
      const float* lm = lmp + (b * Hkv + kv) * cap * D;
      const float* kb = kp + (b * Hkv + kv) * cap * bs * D;
      const float* vb = vp + (b * Hkv + kv) * cap * (bs - 1) * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kv * G + g;
        for (int64_t c = 0; c < C; ++c) {
          if (c >= qlen[b]) continue;  // padding row: zero
          const int64_t ql = qlocal[b * C + c], q_pos = base + ql, q_block = ql / bs;
          const float* x = qp + ((b * H + h) * C + c) * D;
          for (int64_t i = 0; i < D; ++i) qs[i] = x[i] * static_cast<float>(scale);
          for (int64_t j = 0; j <= k; ++j) {
            rotate(qs.data(), q_pos - j * bs, cos_t, sin_t, half, q_att.data() + j * D);
            rotate(qs.data(), q_pos - j * bs - (bs - 1), cos_t, sin_t, half, q_lm.data() + j * D);
          }
          // 2. landmark scan, top k (best first), then chronological order
          std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
          std::fill(best_idx.begin(), best_idx.end(), int64_t(-1));
          // from the most recent block back, and only a strictly larger score displaces an entry: among
          // equal scores the more recent block wins (retrieval.top_k_blocks, the eager path's rule)
          for (int64_t i = n_blocks - 1; i >= 0; --i) {
            const int64_t slot = i < n_old ? 0 : i - n_old + 1;
            float s = landmark_dot(q_lm.data() + slot * D, lm + i * D, D);
            if (std::isnan(s)) s = -std::numeric_limits<float>::infinity();  // every slot still gets a block
            if (best_idx[k - 1] >= 0 && !(s > best[k - 1])) continue;
            int64_t p = k - 1;
            while (p > 0 && (best_idx[p - 1] < 0 || s > best[p - 1])) {
              best[p] = best[p - 1];
              best_idx[p] = best_idx[p - 1];
              --p;
            }
            best[p] = s;
            best_idx[p] = i;
          }
          std::copy(best_idx.begin(), best_idx.end(), sel.begin());
          std::sort(sel.begin(), sel.end());
          // 3. scores: the selected blocks at their slots, the local context at the query's position
          float m = hidden;
          for (int64_t r = 0; r < k; ++r) {
            const int64_t idx = sel[r], slot = r + (idx >= n_old ? 1 : 0);
            const float* kk = kb + idx * bs * D;
            for (int64_t t = 0; t < bs; ++t) mem_scores[r * bs + t] = dot(q_att.data() + slot * D, kk + t * D, D);
            m = std::max(m, mem_scores[r * bs + bs - 1]);
          }
          const int64_t visible = std::min(n_local, ql + 1);
          for (int64_t t = 0; t < visible; ++t) {
            local_scores[t] = dot(q_att.data(), lk_rot.data() + t * D, D);
            const bool landmark = t % bs == bs - 1;
            const bool own = t / bs == q_block;
            if ((own && !landmark) || (!own && landmark)) m = std::max(m, local_scores[t]);
          }
          // 4. grouped softmax: the group's normaliser, then each member's share
          float z = 0.f;
          for (int64_t r = 0; r < k; ++r) z += std::exp(mem_scores[r * bs + bs - 1] - m);
          for (int64_t t = 0; t < visible; ++t) {
            const bool landmark = t % bs == bs - 1, own = t / bs == q_block;
            if ((own && !landmark) || (!own && landmark)) z += std::exp(local_scores[t] - m);
          }
          float* o = op + ((b * H + h) * C + c) * D;
          auto split = [&](const float* s, float p_landmark, const float* v) {  // a block via its landmark
            float mi = hidden;
            for (int64_t t = 0; t < bs - 1; ++t) mi = std::max(mi, s[t]);
            float zi = 0.f;
            for (int64_t t = 0; t < bs - 1; ++t) zi += std::exp(s[t] - mi);
            for (int64_t t = 0; t < bs - 1; ++t) axpy(p_landmark * (std::exp(s[t] - mi) / zi), v + t * D, o, D);
          };
          for (int64_t r = 0; r < k; ++r) {
            const float p = std::exp(mem_scores[r * bs + bs - 1] - m) / z;
            split(mem_scores.data() + r * bs, p, vb + sel[r] * (bs - 1) * D);
          }
          for (int64_t t = 0; t < visible; ++t) {
            const bool landmark = t % bs == bs - 1, own = t / bs == q_block;
            if (own && !landmark) {
              axpy(std::exp(local_scores[t] - m) / z, lv + t * D, o, D);
            } else if (!own && landmark) {
              const int64_t start = t - (bs - 1);
              split(local_scores.data() + start, std::exp(local_scores[t] - m) / z, lv + start * D);
            }
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "Fused landmark retrieval attention for one decode step (CPU, float32)");
}
