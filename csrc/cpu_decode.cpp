// Decode attention over the live slots of paged requests, on vLLM's CPU KV cache as stored, its
// merge with the recurrent states, and the scores a compression ranks the cache by.
//
// Twin: retentivekv_vllm.engine.cpu_layout.DecodeBatch.attend (torch, the same blocks) and, on
// slots read out in token order, retentivekv_vllm.core.merge.local_attention. One query token
// per request: for request r, KV head h and each of its g query heads,
//   out = Σ_j softmax(scale·q·k_j) v_j,  lse = log Σ_j exp(scale·q·k_j)
// over the slots [starts[r], ends[r]) of its block-table row. The log-sum-exp is what the merge
// with the recurrent states needs and what vLLM's own CPU kernel does not return.
//
// The cache is [blocks, Hkv, 2·bs, d]: for each (block, head) the first bs·d elements are the
// keys, dimension-major ([d, bs], the layout vLLM's "vec" ISA writes), the next bs·d the
// values, token-major ([bs, d]). The caller checks that layout (it is measured, not assumed).
//
// One pass over a request's blocks with an online softmax, per (request, KV head) work item:
// every key and value is read once, for all g query heads of the KV head, straight from its
// block (no gather, no logits tensor), and the inner loops run over contiguous memory (keys
// over slots, values over dims) so the compiler vectorises them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace {

template <typename scalar_t>
void attend_one(const float* q,             // [g, d], pre-scaled
                const scalar_t* cache,      // the whole cache
                const int32_t* block_row,   // the request's block-table row
                int64_t start, int64_t end, int64_t head, int64_t num_heads, int64_t block_size,
                int64_t head_size, int64_t group, float* out,  // [g, d]
                float* lse,                                    // [g]
                float* logits) {                               // [g, bs] scratch
  std::vector<float> running_max(group, -FLT_MAX), running_sum(group, 0.0f);
  std::fill(out, out + group * head_size, 0.0f);
  const int64_t region = block_size * head_size;
  for (int64_t first = start - start % block_size; first < end; first += block_size) {
    const int64_t block = block_row[first / block_size];
    const scalar_t* keys = cache + (block * num_heads + head) * 2 * region;  // [d, bs]
    const scalar_t* values = keys + region;                                  // [bs, d]
    const int64_t t0 = std::max<int64_t>(start - first, 0);
    const int64_t t1 = std::min<int64_t>(end - first, block_size);
    for (int64_t j = 0; j < group; ++j) {
      float* s = logits + j * block_size;
      std::fill(s + t0, s + t1, 0.0f);
      for (int64_t dim = 0; dim < head_size; ++dim) {
        const float qd = q[j * head_size + dim];
        const scalar_t* k = keys + dim * block_size;
        for (int64_t t = t0; t < t1; ++t) s[t] += qd * static_cast<float>(k[t]);
      }
      float block_max = -FLT_MAX;
      for (int64_t t = t0; t < t1; ++t) block_max = std::max(block_max, s[t]);
      const float new_max = std::max(running_max[j], block_max);
      const float correction = std::exp(running_max[j] - new_max);
      float block_sum = 0.0f;
      for (int64_t t = t0; t < t1; ++t) {
        s[t] = std::exp(s[t] - new_max);
        block_sum += s[t];
      }
      running_sum[j] = running_sum[j] * correction + block_sum;
      running_max[j] = new_max;
      float* o = out + j * head_size;
      if (correction != 1.0f)
        for (int64_t dim = 0; dim < head_size; ++dim) o[dim] *= correction;
      for (int64_t t = t0; t < t1; ++t) {
        const float p = s[t];
        const scalar_t* v = values + t * head_size;
        for (int64_t dim = 0; dim < head_size; ++dim) o[dim] += p * static_cast<float>(v[dim]);
      }
    }
  }
  for (int64_t j = 0; j < group; ++j) {
    const float inverse = 1.0f / running_sum[j];
    for (int64_t dim = 0; dim < head_size; ++dim) out[j * head_size + dim] *= inverse;
    lse[j] = running_max[j] + std::log(running_sum[j]);
  }
}

// q [R, Hkv, g, d] float32; kv_cache [blocks, Hkv, 2·bs, d]; block_rows [R, max_blocks] int32;
// starts, ends [R] int64 (each end > its start). Returns out [R, Hkv, g, d], lse [R, Hkv, g].
std::vector<at::Tensor> paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                                               const at::Tensor& block_rows, const at::Tensor& starts,
                                               const at::Tensor& ends, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat, "q must be [R, Hkv, g, d] float32");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(), "kv_cache must be a contiguous [blocks, Hkv, 2*bs, d]");
  TORCH_CHECK(block_rows.scalar_type() == at::kInt && block_rows.dim() == 2, "block_rows must be int32 [R, max_blocks]");
  TORCH_CHECK(starts.scalar_type() == at::kLong && ends.scalar_type() == at::kLong, "starts and ends must be int64");
  const int64_t requests = q.size(0), num_heads = q.size(1), group = q.size(2), head_size = q.size(3);
  TORCH_CHECK(kv_cache.size(1) == num_heads && kv_cache.size(3) == head_size, "q and kv_cache disagree on heads");
  TORCH_CHECK(starts.numel() == requests && ends.numel() == requests && block_rows.size(0) == requests,
              "one block row, start and end per request");
  TORCH_CHECK(at::all(ends > starts).item<bool>(), "every request needs a live slot (end > start)");
  const int64_t block_size = kv_cache.size(2) / 2;
  const at::Tensor scaled = (q * scale).contiguous();
  const at::Tensor rows = block_rows.contiguous(), start = starts.contiguous(), end = ends.contiguous();
  at::Tensor out = at::empty({requests, num_heads, group, head_size}, q.options());
  at::Tensor lse = at::empty({requests, num_heads, group}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_cache.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
    const float* q_ptr = scaled.data_ptr<float>();
    const int32_t* rows_ptr = rows.data_ptr<int32_t>();
    const int64_t* start_ptr = start.data_ptr<int64_t>();
    const int64_t* end_ptr = end.data_ptr<int64_t>();
    float* out_ptr = out.data_ptr<float>();
    float* lse_ptr = lse.data_ptr<float>();
    at::parallel_for(0, requests * num_heads, 1, [&](int64_t begin, int64_t finish) {
      std::vector<float> logits(group * block_size);
      for (int64_t item = begin; item < finish; ++item) {
        const int64_t r = item / num_heads, h = item % num_heads;
        attend_one<scalar_t>(q_ptr + item * group * head_size, cache, rows_ptr + r * rows.size(1),
                             start_ptr[r], end_ptr[r], h, num_heads, block_size, head_size, group,
                             out_ptr + item * group * head_size, lse_ptr + item * group, logits.data());
      }
    });
  });
  return {out, lse};
}

// The merge of a batch's decode rows with the readouts of their requests' recurrent states, in
// place. Twin: retentivekv_vllm.core.merge.merge_with_state_readouts (unit gains). For member m
// (a row of out, rows[m]), KV head h and query head j, with φ' = exp(log φ(q) − c), c = max log φ(q):
//   num = Σ_k φ'ᵀS_k [dv],  den = Σ_k φ'ᵀz_k
// and, where den > 0, out = (e^(lse−c)·out + num) / (e^(lse−c) + den), evaluated with the larger
// of lse − c and log den factored out; rows whose states hold no mass keep out unchanged. Every
// input is finite here (decode rows attend at least one live slot; log φ is finite for every
// feature map), which -ffast-math assumes.
//
// out [R, Hkv, g, dv] and lse [R, Hkv, g] float32; log_phi [M, Hkv, g, r] float32; rows [M] int64;
// states_S, states_z: M·K tensors, member-major, [Hkv, r, dv] and [Hkv, r] contiguous, all of one
// dtype (float32, or bfloat16 beside a 16-bit cache: core.state.storage_dtype), summed in float32.
template <typename state_t>
void merge_rows(float* out_ptr, const float* lse_ptr, const float* phi_ptr, const int64_t* row_ptr,
                const std::vector<const state_t*>& S, const std::vector<const state_t*>& z,
                int64_t members, int64_t per_member, int64_t heads, int64_t group, int64_t rank,
                int64_t dv) {
  at::parallel_for(0, members * heads, 1, [&](int64_t begin, int64_t finish) {
    std::vector<float> phi(rank), num(dv);
    for (int64_t item = begin; item < finish; ++item) {
      const int64_t m = item / heads, h = item % heads;
      const int64_t row_head = row_ptr[m] * heads + h;
      for (int64_t j = 0; j < group; ++j) {
        const float* log_features = phi_ptr + (item * group + j) * rank;
        const float shift = *std::max_element(log_features, log_features + rank);
        for (int64_t f = 0; f < rank; ++f) phi[f] = std::exp(log_features[f] - shift);
        std::fill(num.begin(), num.end(), 0.0f);
        float den = 0.0f;
        for (int64_t k = 0; k < per_member; ++k) {
          const state_t* state = S[m * per_member + k] + h * rank * dv;
          const state_t* norm = z[m * per_member + k] + h * rank;
          for (int64_t f = 0; f < rank; ++f) {
            den += phi[f] * static_cast<float>(norm[f]);
            const state_t* s = state + f * dv;
            for (int64_t e = 0; e < dv; ++e) num[e] += phi[f] * static_cast<float>(s[e]);
          }
        }
        if (!(den > 0.0f)) continue;
        const float lse_local = lse_ptr[row_head * group + j] - shift, lse_state = std::log(den);
        const float top = std::max(lse_local, lse_state);
        const float weight_local = std::exp(lse_local - top), weight_state = std::exp(lse_state - top);
        const float inverse = 1.0f / (weight_local + weight_state), state_scale = weight_state / den;
        float* o = out_ptr + (row_head * group + j) * dv;
        for (int64_t e = 0; e < dv; ++e) o[e] = (weight_local * o[e] + state_scale * num[e]) * inverse;
      }
    }
  });
}

void merge_state_readouts(at::Tensor out, const at::Tensor& lse, const at::Tensor& log_phi,
                          const at::Tensor& rows, const std::vector<at::Tensor>& states_S,
                          const std::vector<at::Tensor>& states_z) {
  TORCH_CHECK(out.dim() == 4 && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "out must be a contiguous [R, Hkv, g, dv] float32");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "lse must be contiguous float32");
  TORCH_CHECK(log_phi.dim() == 4 && log_phi.is_contiguous() && log_phi.scalar_type() == at::kFloat,
              "log_phi must be a contiguous [M, Hkv, g, r] float32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.numel() == log_phi.size(0), "one row per member");
  const int64_t members = log_phi.size(0), heads = out.size(1), group = out.size(2), dv = out.size(3);
  const int64_t rank = log_phi.size(3);
  TORCH_CHECK(members > 0 && states_S.size() % members == 0 && states_S.size() == states_z.size(),
              "the same number of states for every member");
  const int64_t per_member = static_cast<int64_t>(states_S.size()) / members;
  const at::ScalarType dtype = states_S[0].scalar_type();
  for (size_t i = 0; i < states_S.size(); ++i) {
    TORCH_CHECK(states_S[i].is_contiguous() && states_S[i].scalar_type() == dtype &&
                    states_S[i].numel() == heads * rank * dv, "each S must be a contiguous [Hkv, r, dv] of one dtype");
    TORCH_CHECK(states_z[i].is_contiguous() && states_z[i].scalar_type() == dtype &&
                    states_z[i].numel() == heads * rank, "each z must be a contiguous [Hkv, r] of S's dtype");
  }
  const at::Tensor row_index = rows.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "merge_state_readouts", [&] {
    std::vector<const scalar_t*> S(states_S.size()), z(states_z.size());
    for (size_t i = 0; i < states_S.size(); ++i) {
      S[i] = states_S[i].data_ptr<scalar_t>();
      z[i] = states_z[i].data_ptr<scalar_t>();
    }
    merge_rows<scalar_t>(out.data_ptr<float>(), lse.data_ptr<float>(), log_phi.data_ptr<float>(),
                         row_index.data_ptr<int64_t>(), S, z, members, per_member, heads, group,
                         rank, dv);
  });
}


// What a compression scores its cache by, from the observation rows' logits, in one pass per row.
// Twin: retentivekv_vllm.core.scores.observation_statistics (attention_probs, then
// accumulated_attention and modality_entropy). Per KV head h, row i sees key j iff
// k_positions[h, j] <= q_positions[i]; with p the row's softmax over the keys it sees,
//   alpha[h, j]   = Σ_i p_i(j)
//   entropy[h, j] = Σ_i −p̃_i(j) log p̃_i(j) / log max(|S|, 2)
// where p̃ is the row restricted to key j's modality S (text or visual, `visual` [H, n]) and
// renormalised, and |S| counts the head's keys of that modality. log p̃ = logit − lse_S comes from
// the logits, so the entropy costs no logarithm per element, and neither the probabilities nor
// their restricted copies are ever stored: the torch definition makes about ten passes over
// [H, M, n], this three over each row (a maximum, the exponentials, the sums), from L1/L2.
// A head's keys are in position order (a compacted cache packs them so), so the keys a row sees
// are a prefix and the loops run branch-free over it, which the compiler vectorises.
//
// logits [H, M, n] float32 contiguous (scale·q·kᵀ, unmasked: finite, as -ffast-math assumes);
// q_positions [M] int64; k_positions [H, n] int64, non-decreasing per head; visual [H, n] bool, or
// empty when every key is text. Returns alpha and entropy, [H, n] float32.
std::vector<at::Tensor> observation_statistics(const at::Tensor& logits, const at::Tensor& q_positions,
                                               const at::Tensor& k_positions, const at::Tensor& visual) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "logits must be a contiguous [H, M, n] float32");
  const int64_t heads = logits.size(0), rows = logits.size(1), n = logits.size(2);
  TORCH_CHECK(q_positions.scalar_type() == at::kLong && q_positions.numel() == rows, "one position per row");
  TORCH_CHECK(k_positions.scalar_type() == at::kLong && k_positions.dim() == 2 && k_positions.size(0) == heads &&
                  k_positions.size(1) == n, "k_positions must be int64 [H, n]");
  const bool modal = visual.numel() > 0;
  TORCH_CHECK(!modal || (visual.scalar_type() == at::kBool && visual.size(0) == heads && visual.size(1) == n),
              "visual must be bool [H, n] or empty");
  const at::Tensor qp = q_positions.contiguous(), kp = k_positions.contiguous();
  const at::Tensor vis = modal ? visual.to(at::kFloat).contiguous() : visual;
  at::Tensor alpha = at::zeros({heads, n}, logits.options());
  at::Tensor entropy = at::zeros({heads, n}, logits.options());
  const float* logit_ptr = logits.data_ptr<float>();
  const int64_t* qp_ptr = qp.data_ptr<int64_t>();
  const int64_t* kp_ptr = kp.data_ptr<int64_t>();
  const float* vis_ptr = modal ? vis.data_ptr<float>() : nullptr;
  float* alpha_ptr = alpha.data_ptr<float>();
  float* entropy_ptr = entropy.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t finish) {
    std::vector<float> weight(n);  // exp(logit − row max) over the keys the row sees
    std::vector<float> text(n, 1.0f), image(n, 0.0f);  // 1 where key j is text / visual
    for (int64_t h = begin; h < finish; ++h) {
      const int64_t* key_position = kp_ptr + h * n;
      TORCH_CHECK(std::is_sorted(key_position, key_position + n), "k_positions must be non-decreasing per head");
      float count_image = 0.0f;
      if (modal) {
        for (int64_t j = 0; j < n; ++j) {
          image[j] = vis_ptr[h * n + j];
          text[j] = 1.0f - image[j];
          count_image += image[j];
        }
      }
      const float inverse_log_size[2] = {1.0f / std::log(std::max(static_cast<float>(n) - count_image, 2.0f)),
                                         1.0f / std::log(std::max(count_image, 2.0f))};
      float* a = alpha_ptr + h * n;
      float* e = entropy_ptr + h * n;
      float* w = weight.data();
      for (int64_t i = 0; i < rows; ++i) {
        const float* row = logit_ptr + (h * rows + i) * n;
        const int64_t seen = std::upper_bound(key_position, key_position + n, qp_ptr[i]) - key_position;
        if (seen == 0) continue;  // a query that sees no key: its probabilities are all zero
        float top = -FLT_MAX;
        for (int64_t j = 0; j < seen; ++j) top = std::max(top, row[j]);
        float total = 0.0f, total_image = 0.0f;
        for (int64_t j = 0; j < seen; ++j) {
          w[j] = std::exp(row[j] - top);
          total += w[j];
        }
        if (modal) {
          for (int64_t j = 0; j < seen; ++j) total_image += w[j] * image[j];
        }
        // Summed apart, not total − total_image: a modality with little mass would cancel away.
        float total_text = total;
        if (modal) {
          total_text = 0.0f;
          for (int64_t j = 0; j < seen; ++j) total_text += w[j] * text[j];
        }
        // Per modality: the factor of −p̃ log p̃ (1/Σ_S and 1/log|S|) and log Σ_S; 0 without mass.
        const float factor_text = total_text > 0.0f ? inverse_log_size[0] / total_text : 0.0f;
        const float factor_image = total_image > 0.0f ? inverse_log_size[1] / total_image : 0.0f;
        const float log_text = total_text > 0.0f ? std::log(total_text) : 0.0f;
        const float log_image = total_image > 0.0f ? std::log(total_image) : 0.0f;
        const float inverse_total = 1.0f / total;
        for (int64_t j = 0; j < seen; ++j) {
          const float factor = text[j] * factor_text + image[j] * factor_image;
          const float log_total = text[j] * log_text + image[j] * log_image;
          a[j] += w[j] * inverse_total;
          e[j] -= w[j] * factor * (row[j] - top - log_total);
        }
      }
    }
  });
  return {alpha, entropy};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Decode attention with log-sum-exp over live slots of paged requests (CPU)");
  m.def("merge_state_readouts", &merge_state_readouts,
        "In place: decode rows merged with the readouts of their requests' recurrent states (CPU)");
  m.def("observation_statistics", &observation_statistics,
        "Accumulated attention and modality entropy potential of observation rows' logits (CPU)");
}
