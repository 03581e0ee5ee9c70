// Batch-invariant paged attention for CPU decode and prefill rows.
//
// Every query row attends over its own list of KV slots (read in place from the paged pool,
// no gather). A row's result is computed by one task, in key order, with fixed-width lanes
// and a fixed reduction order, so its bits depend only on its query and its keys: not on the
// other rows in the call, the thread count, or whether the row is a decode token, part of a
// prefill chunk or follows a cached prefix. Hand-written because no library offers
// batch-invariant paged attention on CPU (see serve/invariant.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;

// q · k over d floats: kLanes independent partial sums, then summed in a fixed order.
inline float dot(const float* a, const float* b, int64_t d) {
  float lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  float tail = 0;
  for (; i < d; ++i) tail += a[i] * b[i];
  for (int w = kLanes / 2; w > 0; w /= 2)  // pairwise halving: fixed order, vector shuffles
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0] + tail;
}

// e^x for x <= 0 (scores minus their max): 2^n · 2^f with f in [-0.5, 0.5], degree-7 Taylor
// polynomial of 2^f (relative error < 1e-8 before rounding). Vectorizes, unlike expf.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.4426950408889634f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 · 2^23 trick)
  const float f = t - n;
  float p = 1.5252733804059840e-05f;
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#ifdef __AVX2__
// Scores of 8 keys for one query of 64 floats: per key an 8-lane FMA chain over the 8 chunks,
// then one fixed hadd tree. A key's bits depend only on its query and its own floats (the
// other keys sit in other lanes), so a short row's tail, padded to 8 keys, matches.
inline void dot8_64(const float* q, const float* const keys[8], float* out) {
  __m256 acc[8];
  for (int t = 0; t < 8; ++t) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(keys[t]));
    for (int c = 1; c < 8; ++c)
      a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(keys[t] + 8 * c), a);
    acc[t] = a;
  }
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  // lanes: [k0 k1 k2 k3 | k0 k1 k2 k3] low/high halves of 0123, same for 4567
  const __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
  _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
}
#endif

// Scaled scores of the `group` queries of KV head k (q: group × d floats) against the row's
// keys: out[g * len + j]. Keys are visited in groups of 8, each group once for all queries.
void scores(const float* q, int64_t group, const float* kvp, const int64_t* row_slots,
            int64_t len, int64_t kv2, int64_t k, int64_t d, float sc, float* out) {
#ifdef __AVX2__
  if (d == 64) {
    alignas(32) static thread_local float zeros[64] = {0};
    const float* keys[8];
    float tmp[8];
    for (int64_t j = 0; j < len; j += 8) {
      const int64_t m = std::min<int64_t>(8, len - j);
      for (int t = 0; t < 8; ++t) keys[t] = t < m ? kvp + (row_slots[j + t] * kv2 + k) * d : zeros;
      for (int64_t g = 0; g < group; ++g) {
        dot8_64(q + g * d, keys, tmp);
        for (int t = 0; t < m; ++t) out[g * len + j + t] = tmp[t] * sc;
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < len; ++j) {
    const float* key = kvp + (row_slots[j] * kv2 + k) * d;
    for (int64_t g = 0; g < group; ++g) out[g * len + j] = dot(q + g * d, key, d) * sc;
  }
}

#ifdef __AVX2__
// o[g] = inv[g] · Σ_j w[g * len + j] · v_j for the row's values of KV head k, j in order.
// Values are visited in blocks of 16, each block once for all queries; D / 8 register
// accumulators per query while it sweeps a block (one FMA per 8 floats of a value).
template <int D>
void weighted_sums(const float* w, int64_t group, const float* kvp, const int64_t* row_slots,
                   int64_t len, int64_t kv2, int64_t kv_heads, int64_t k, const float* inv,
                   float* acc, float* o) {
  constexpr int kBlock = 16;
  std::fill(acc, acc + group * D, 0.0f);
  const float* values[kBlock];
  for (int64_t j = 0; j < len; j += kBlock) {
    const int64_t m = std::min<int64_t>(kBlock, len - j);
    for (int64_t t = 0; t < m; ++t) values[t] = kvp + (row_slots[j + t] * kv2 + kv_heads + k) * D;
    for (int64_t g = 0; g < group; ++g) {
      const float* wg = w + g * len + j;
      float* ag = acc + g * D;
      __m256 r[D / 8];
      for (int c = 0; c < D / 8; ++c) r[c] = _mm256_loadu_ps(ag + 8 * c);
      for (int64_t t = 0; t < m; ++t) {
        const __m256 wt = _mm256_set1_ps(wg[t]);
        for (int c = 0; c < D / 8; ++c)
          r[c] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(values[t] + 8 * c), r[c]);
      }
      for (int c = 0; c < D / 8; ++c) _mm256_storeu_ps(ag + 8 * c, r[c]);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int i = 0; i < D; ++i) o[g * D + i] = acc[g * D + i] * inv[g];
}
#endif

// The same sums for any head size, without intrinsics.
void weighted_sums_any(const float* w, int64_t group, const float* kvp,
                       const int64_t* row_slots, int64_t len, int64_t kv2, int64_t kv_heads,
                       int64_t k, int64_t d, const float* inv, float* acc, float* o) {
  std::fill(acc, acc + group * d, 0.0f);
  for (int64_t j = 0; j < len; ++j) {
    const float* v = kvp + (row_slots[j] * kv2 + kv_heads + k) * d;
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < d; ++i) acc[g * d + i] += w[g * len + j] * v[i];
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < d; ++i) o[g * d + i] = acc[g * d + i] * inv[g];
}

}  // namespace

// q [N, H, D]; kv [slots, 2K, D] (keys heads 0..K-1, values K..2K-1), both float32 contiguous;
// row n attends over slots slot_ids[row_start[n] : row_start[n] + row_len[n]] (int64).
// Query head h reads KV head h / (H / K). Returns [N, H, D].
torch::Tensor attend(torch::Tensor q, torch::Tensor kv, torch::Tensor slot_ids,
                     torch::Tensor row_start, torch::Tensor row_len, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 3, "attend: q [N, H, D] and kv [slots, 2K, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat,
              "attend: float32 q and kv");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous(), "attend: contiguous q and kv");
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong && row_start.scalar_type() == at::kLong &&
                  row_len.scalar_type() == at::kLong,
              "attend: int64 slot_ids, row_start, row_len");
  const int64_t n_rows = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kv2 = kv.size(1), kv_heads = kv2 / 2;
  TORCH_CHECK(kv.size(2) == d && kv2 % 2 == 0 && heads % kv_heads == 0, "attend: head layout");
  TORCH_CHECK(row_start.numel() == n_rows && row_len.numel() == n_rows, "attend: one range per row");
  const int64_t group = heads / kv_heads;
  auto slots_c = slot_ids.contiguous();
  auto start_c = row_start.contiguous();
  auto len_c = row_len.contiguous();
  const int64_t* slots = slots_c.data_ptr<int64_t>();
  const int64_t* starts = start_c.data_ptr<int64_t>();
  const int64_t* lens = len_c.data_ptr<int64_t>();
  const int64_t n_slots_total = slots_c.numel(), pool = kv.size(0);
  for (int64_t n = 0; n < n_rows; ++n)
    TORCH_CHECK(lens[n] > 0 && starts[n] >= 0 && starts[n] + lens[n] <= n_slots_total,
                "attend: row ", n, " has no keys or its range leaves slot_ids");
  for (int64_t i = 0; i < n_slots_total; ++i)
    TORCH_CHECK(slots[i] >= 0 && slots[i] < pool, "attend: slot ", slots[i], " outside the pool");
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // (row, KV head) tasks; each sees only its row's data.
  at::parallel_for(0, n_rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, acc(group * d), inv(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / kv_heads, k = task % kv_heads;
      const int64_t len = lens[n];
      const int64_t* row_slots = slots + starts[n];
      const int64_t h0 = n * heads + k * group;  // this KV head's first query head
      p.resize(group * len);
      scores(qp + h0 * d, group, kvp, row_slots, len, kv2, k, d, sc, p.data());
      for (int64_t g = 0; g < group; ++g) {
        float* __restrict pg = p.data() + g * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < len; ++j) m = std::max(m, pg[j]);
        for (int64_t j = 0; j < len; ++j) pg[j] = exp_nonpositive(pg[j] - m);
        float sum = 0;
        for (int64_t j = 0; j < len; ++j) sum += pg[j];
        inv[g] = 1.0f / sum;
      }
      float* o = op + h0 * d;
#ifdef __AVX2__
      if (d == 64) {
        weighted_sums<64>(p.data(), group, kvp, row_slots, len, kv2, kv_heads, k, inv.data(),
                          acc.data(), o);
        continue;
      }
      if (d == 128) {
        weighted_sums<128>(p.data(), group, kvp, row_slots, len, kv2, kv_heads, k, inv.data(),
                           acc.data(), o);
        continue;
      }
#endif
      weighted_sums_any(p.data(), group, kvp, row_slots, len, kv2, kv_heads, k, d, inv.data(),
                        acc.data(), o);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "batch-invariant paged attention (CPU, float32)");
}
