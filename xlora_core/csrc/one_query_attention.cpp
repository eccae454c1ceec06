// Attention of one query per row, each (row, head) on its own keys: the kernel behind
// batch_invariant.one_query_attention (built by xlora_core/native.py).
//
// Why in C++: a decode step attends one query per row in every layer. Row by row through PyTorch's SDPA that
// is a Python loop of several calls per row (tens of microseconds each, and a trip from the compiled step back
// into Python). Here each (row, head) is one loop over its own keys, in their order, whatever else is in the
// batch: a row gets the same bits alone or among others (README "Batch invariance"). The query heads that share a
// kv head go together and the next keys are prefetched: at a batch of 8 the keys and values of a step come from
// memory, and reading them is most of the kernel's time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

// kLanes floats, held and added as one vector where the CPU has them (GCC's vector extension).
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load(const float* p) {
  Lanes x;
  std::memcpy(&x, p, sizeof(Lanes));
  return x;
}

// The sum of a vector's lanes in a fixed tree: lane i + lane i+8, then +4, +2, +1.
inline float sum_lanes(Lanes acc) {
  acc += __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
  acc += __builtin_shufflevector(acc, acc, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
  acc += __builtin_shufflevector(acc, acc, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
  acc += __builtin_shufflevector(acc, acc, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1);
  return acc[0];
}

// The sums of 16 vectors' lanes at once, lane j the sum of vector j, each in sum_lanes' tree: two vectors are
// folded together at each level, so 15 shuffle pairs and adds in all rather than 4 for every vector.
inline Lanes fold8(Lanes x, Lanes y) {  // [x0..7 + x8..15, y0..7 + y8..15]
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline Lanes fold4(Lanes x, Lanes y) {  // in each half: [x0..3 + x4..7, y0..3 + y4..7]
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline Lanes fold2(Lanes x, Lanes y) {  // in each quarter: [x0,1 + x2,3, y0,1 + y2,3]
  return __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline Lanes fold1(Lanes x, Lanes y) {  // in each eighth: [x0 + x1, y0 + y1]
  return __builtin_shufflevector(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
inline Lanes sum_lanes16(const Lanes* a) {
  Lanes b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j) b[j] = fold8(a[j], a[j + 8]);  // b[j]: vectors j, j+8
  for (int j = 0; j < 4; ++j) c[j] = fold4(b[j], b[j + 4]);  // c[j]: j, j+4, j+8, j+12
  for (int j = 0; j < 2; ++j) d[j] = fold2(c[j], c[j + 2]);  // d[j]: j, j+2, ..., j+14
  return fold1(d[0], d[1]);                                  // lane j: vector j
}

// a . b in kLanes partial sums (chunk after chunk), then summed in sum_lanes' tree: every key gets the same
// sequence of operations.
inline float dot(const float* a, const float* b, int64_t n) {
  Lanes acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(a + i) * load(b + i);
  for (; i < n; ++i) acc[i % kLanes] += a[i] * b[i];
  return sum_lanes(acc);
}

typedef int32_t IntLanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(x) for x <= 0 (a softmax's scores less their maximum), to a few ulp: x = k ln2 + r, exp(r) by its Taylor
// series to r^7 (|r| <= ln2 / 2), times 2^k put into the exponent bits. Below -87 it gives exp(-87) (about
// 1e-38), which changes no sum of these weights.
inline Lanes exp_lanes(Lanes x) {
  x = x < -87.f ? Lanes{} - 87.f : x;
  const Lanes scaled = x * 1.44269504088896341f + 0.5f;
  const IntLanes k = __builtin_convertvector(scaled, IntLanes) - (scaled < 0.f ? 1 : 0);  // floor(x / ln2 + 1/2)
  const Lanes kf = __builtin_convertvector(k, Lanes);
  const Lanes r = x - kf * 0.693145751953125f - kf * 1.428606765330187e-06f;
  Lanes p = Lanes{} + 1.f / 5040.f;
  p = 1.f / 720.f + r * p;
  p = 1.f / 120.f + r * p;
  p = 1.f / 24.f + r * p;
  p = 1.f / 6.f + r * p;
  p = 0.5f + r * p;
  p = 1.f + r * p;
  p = 1.f + r * p;
  const IntLanes bits = (k + 127) << 23;
  Lanes scale;
  std::memcpy(&scale, &bits, sizeof(Lanes));
  return p * scale;
}

constexpr int64_t kMaxGroup = 8;  // query heads of one kv head computed together
constexpr int64_t kAhead = 16;    // keys prefetched ahead: a decode step's keys come from memory, not cache
constexpr int64_t kLineFloats = 64 / sizeof(float);  // a cache line

// `group` query heads (qv[g] -> o[g]) over the keys of one span on one kv head (key and value: its first column).
// Each query head's scores, softmax and sum over values are the same operations in the same order whatever the
// other heads, spans and keys are.
void attend(const float* const* qv, float* const* o, int64_t group, const float* key, int64_t ks2,
            const float* value, int64_t vs2, const int64_t* p, int64_t dim, float scale, std::vector<float>& weights) {
  const int64_t n1 = p[4] - p[3], n = n1 + (p[6] - p[5]);
  if (n == 0) return;
  auto column = [&](int64_t i) { return i < n1 ? p[3] + i : p[5] + (i - n1); };
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  weights.resize(group * padded);
  float top[kMaxGroup], total[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) top[g] = -std::numeric_limits<float>::infinity();

  // scores, kLanes keys at a time
  const bool whole = dim % kLanes == 0;
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    const int64_t m = std::min(kLanes, n - i0);
    for (int64_t i = i0; i < i0 + m; ++i) {  // keys ahead, and these keys' values for the sum below
      for (int64_t d = 0; d < dim; d += kLineFloats) {
        if (i + kAhead < n) __builtin_prefetch(key + column(i + kAhead) * ks2 + d);
        __builtin_prefetch(value + column(i) * vs2 + d);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* w = weights.data() + g * padded + i0;
      if (whole) {
        Lanes partial[kLanes];
        for (int64_t j = 0; j < kLanes; ++j) {
          Lanes acc = {};
          const float* k = key + column(i0 + std::min(j, m - 1)) * ks2;
          for (int64_t d = 0; j < m && d < dim; d += kLanes) acc += load(qv[g] + d) * load(k + d);
          partial[j] = acc;
        }
        const Lanes scores = sum_lanes16(partial) * scale;
        std::memcpy(w, &scores, m * sizeof(float));
      } else {
        for (int64_t j = 0; j < m; ++j) w[j] = dot(qv[g], key + column(i0 + j) * ks2, dim) * scale;
      }
      for (int64_t j = 0; j < m; ++j) top[g] = std::max(top[g], w[j]);
    }
  }

  // softmax weights, unnormalized
  for (int64_t g = 0; g < group; ++g) {
    float* w = weights.data() + g * padded;
    for (int64_t i = n; i < padded; ++i) w[i] = top[g];  // padding: exp(0), never added
    for (int64_t i = 0; i < n; i += kLanes) {
      const Lanes x = exp_lanes(load(w + i) - top[g]);
      std::memcpy(w + i, &x, sizeof(Lanes));
    }
    float t = 0.f;
    for (int64_t i = 0; i < n; ++i) t += w[i];
    total[g] = t;
  }

  // out[d] = sum over keys of weight * value[d], key after key; 4 kLanes of d at a time in registers
  for (int64_t g = 0; g < group; ++g) {
    const float* w = weights.data() + g * padded;
    int64_t d = 0;
    for (; d + 4 * kLanes <= dim; d += 4 * kLanes) {
      Lanes a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t i = 0; i < n; ++i) {
        const float* x = value + column(i) * vs2 + d;
        a0 += w[i] * load(x);
        a1 += w[i] * load(x + kLanes);
        a2 += w[i] * load(x + 2 * kLanes);
        a3 += w[i] * load(x + 3 * kLanes);
      }
      const Lanes sums[4] = {a0, a1, a2, a3};
      for (int64_t c = 0; c < 4; ++c)
        for (int64_t e = 0; e < kLanes; ++e) o[g][d + c * kLanes + e] = sums[c][e] / total[g];
    }
    for (; d + kLanes <= dim; d += kLanes) {
      Lanes a = {};
      for (int64_t i = 0; i < n; ++i) a += w[i] * load(value + column(i) * vs2 + d);
      for (int64_t e = 0; e < kLanes; ++e) o[g][d + e] = a[e] / total[g];
    }
    for (; d < dim; ++d) {
      float a = 0.f;
      for (int64_t i = 0; i < n; ++i) a += w[i] * value[column(i) * vs2 + d];
      o[g][d] = a / total[g];
    }
  }
}

// query [batch, heads, queries, dim], key and value [cache rows, kv heads, columns, dim], all float32; spans
// [rows, 7] int64 (the cache row of its keys, its query, end of queries, key ranges 1 and 2 as start, end), one
// query each. With a query row per span (batch == rows), span r's query is query[r, :, its query] and its keys
// those of its cache row: a step that feeds a prompt's tokens as rows of their own points them all at the
// prompt's cache row (compiled_step.py). Otherwise the query's row is the cache row's (a ragged row's queries
// in one batch row). Returns [batch, queries, heads, dim]: each span's query over its keys (range 1, then range
// 2), zeros elsewhere.
at::Tensor one_query_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const at::Tensor& spans, double scale) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "query, key and value must be 4-D");
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat &&
                  value.scalar_type() == at::kFloat, "one_query_attention takes float32 tensors");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu() && spans.device().is_cpu(),
              "one_query_attention runs on the CPU");
  TORCH_CHECK(spans.dim() == 2 && spans.size(1) == 7 && spans.scalar_type() == at::kLong, "spans must be [rows, 7] int64");
  const int64_t batch = query.size(0), heads = query.size(1), queries = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key.size(1), columns = key.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && value.size(1) == kv_heads, "heads must be a multiple of kv heads");
  const int64_t cache_rows = key.size(0);
  TORCH_CHECK(value.size(0) == cache_rows && value.size(2) == columns && key.size(3) == dim && value.size(3) == dim,
              "key and value must match each other and the query's head dim");
  const at::Tensor q = query.contiguous(), k = key.stride(3) == 1 ? key : key.contiguous(),
                   v = value.stride(3) == 1 ? value : value.contiguous(), s = spans.contiguous();
  const int64_t rows = s.size(0);
  const bool row_per_span = rows == batch;
  const int64_t* span = s.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* p = span + 7 * r;
    TORCH_CHECK(p[0] >= 0 && p[0] < cache_rows && (row_per_span || p[0] < batch) && p[1] >= 0 && p[2] == p[1] + 1 &&
                    p[2] <= queries, "span ", r, " must hold one query and one cache row");
    TORCH_CHECK(0 <= p[3] && p[3] <= p[4] && p[4] <= columns && 0 <= p[5] && p[5] <= p[6] && p[6] <= columns,
                "span ", r, "'s key ranges must lie within the ", columns, " columns");
  }
  at::Tensor out = at::zeros({batch, queries, heads, dim}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t group = heads / kv_heads;
  const float fscale = static_cast<float>(scale);

  // Every (span, kv head) is computed by one thread alone, so how the work is split changes nothing; its query
  // heads (up to kMaxGroup at a time) go together, so that each key and value is read once for all of them.
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights;
    const float* qv[kMaxGroup];
    float* o[kMaxGroup];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t* p = span + 7 * (item / kv_heads);
      const int64_t b = p[0], r = row_per_span ? item / kv_heads : b, query_at = p[1], kv = item % kv_heads;
      for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
        const int64_t n = std::min(kMaxGroup, group - g0);
        for (int64_t g = 0; g < n; ++g) {
          const int64_t h = kv * group + g0 + g;
          qv[g] = qp + ((r * heads + h) * queries + query_at) * dim;
          o[g] = op + ((r * queries + query_at) * heads + h) * dim;
        }
        attend(qv, o, n, kp + b * ks0 + kv * ks1, ks2, vp + b * vs0 + kv * vs1, vs2, p, dim, fscale, weights);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(xlora_native, m) {
  m.def("one_query_attention(Tensor query, Tensor key, Tensor value, Tensor spans, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(xlora_native, CPU, m) { m.impl("one_query_attention", &one_query_attention); }
