// Attention of one query per row, each (row, head) on its own keys: the kernel behind
// batch_invariant.one_query_attention (built by xlora_core/native.py).
//
// Why in C++: a decode step attends one query per row in every layer. Row by row through PyTorch's SDPA that
// is a Python loop of several calls per row (tens of microseconds each, and a trip from the compiled step back
// into Python). Here each (row, head) is one loop over its own keys, in their order, whatever else is in the
// batch: a row gets the same bits alone or among others (README "Batch invariance").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

// kLanes floats, held and added as one vector where the CPU has them (GCC's vector extension).
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

// a . b in kLanes partial sums, then those added in a fixed tree (halves, quarters, ...): every key gets the
// same sequence of operations.
inline float dot(const float* a, const float* b, int64_t n) {
  Lanes acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Lanes x, y;
    std::memcpy(&x, a + i, sizeof(Lanes));
    std::memcpy(&y, b + i, sizeof(Lanes));
    acc += x * y;
  }
  for (; i < n; ++i) acc[i % kLanes] += a[i] * b[i];
  acc += __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
  acc += __builtin_shufflevector(acc, acc, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
  acc += __builtin_shufflevector(acc, acc, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
  acc += __builtin_shufflevector(acc, acc, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1);
  return acc[0];
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

  // Every (span, head) is computed by one thread alone, so how the work is split changes nothing.
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights;
    std::vector<float> acc(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t* p = span + 7 * (item / heads);
      const int64_t b = p[0], r = row_per_span ? item / heads : b, query_at = p[1], h = item % heads, kv = h / group;
      const float* qv = qp + ((r * heads + h) * queries + query_at) * dim;
      const int64_t n1 = p[4] - p[3], n = n1 + (p[6] - p[5]);
      if (n == 0) continue;
      auto column = [&](int64_t i) { return i < n1 ? p[3] + i : p[5] + (i - n1); };
      weights.resize(n);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        weights[i] = dot(qv, kp + b * ks0 + kv * ks1 + column(i) * ks2, dim) * fscale;
        top = std::max(top, weights[i]);
      }
      weights.resize((n + kLanes - 1) / kLanes * kLanes, top);  // padding: exp(0), never added
      for (int64_t i = 0; i < n; i += kLanes) {
        Lanes x;
        std::memcpy(&x, weights.data() + i, sizeof(Lanes));
        x = exp_lanes(x - top);
        std::memcpy(weights.data() + i, &x, sizeof(Lanes));
      }
      float total = 0.f;
      for (int64_t i = 0; i < n; ++i) total += weights[i];
      // acc[d] = sum over keys of weight * value[d], key after key, kLanes values of d at a time in registers
      int64_t d = 0;
      for (; d + kLanes <= dim; d += kLanes) {
        Lanes a = {};
        for (int64_t i = 0; i < n; ++i) {
          Lanes x;
          std::memcpy(&x, vp + b * vs0 + kv * vs1 + column(i) * vs2 + d, sizeof(Lanes));
          a += weights[i] * x;
        }
        std::memcpy(acc.data() + d, &a, sizeof(Lanes));
      }
      for (; d < dim; ++d) {
        float a = 0.f;
        for (int64_t i = 0; i < n; ++i) a += weights[i] * vp[b * vs0 + kv * vs1 + column(i) * vs2 + d];
        acc[d] = a;
      }
      float* o = op + ((r * queries + query_at) * heads + h) * dim;
      for (int64_t e = 0; e < dim; ++e) o[e] = acc[e] / total;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(xlora_native, m) {
  m.def("one_query_attention(Tensor query, Tensor key, Tensor value, Tensor spans, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(xlora_native, CPU, m) { m.impl("one_query_attention", &one_query_attention); }
