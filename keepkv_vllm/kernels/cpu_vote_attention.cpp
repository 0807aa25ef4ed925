// Vote-weighted paged decode attention for vLLM's CPU KV cache (Electoral Votes):
//   out = softmax(q . k_j * scale + log p_j) @ V   over a request's slots j < seq_len,
// one query token per request, reading the cache in place in vLLM's own packed layout.
//
// vLLM's CPU attention kernel cannot add a per-slot bias, so before this kernel the vote path
// copied every voted request's blocks out of the packed layout and ran torch's batched matmuls
// (about 5x the stock kernel's time per layer). Here the KV is read once, in a single pass
// with an online softmax, like the stock kernel does. Built at first use by cpu_vote_attention.py
// with the machine's C++ compiler (vLLM's compiled mode needs one anyway); no torch headers, so
// it compiles in about a second. OpenMP comes from the libgomp torch already loaded.
//
// Layout (described by the caller, probed from vLLM's own cache-write op): the cache is a list
// of pages; page b, kv-head h holds keys at  cache + b*block_stride + h*head_stride + key_start
// and values at ... + value_start; slot t, dim c of either is at  t*X_t + c*X_c  from there.
// Log-votes: votes + b*vote_block_stride + h*vote_head_stride + t.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" {

struct VoteDecodeArgs {
  int64_t num_reqs, num_kv_heads, group, head_dim, block_size, max_blocks;
  int64_t block_stride, head_stride, key_start, value_start, k_t, k_c, v_t, v_c;
  int64_t vote_block_stride, vote_head_stride;
  // the step's query and output rows: token row_index[r] of request r, each row
  // [num_kv_heads, group, head_dim] contiguous, rows `row_stride` elements apart
  int64_t query_row_stride, out_row_stride;
  int32_t kv_kind;     // 0 float32, 1 bfloat16, 2 float16, 3 one byte through `lut` (fp8)
  int32_t vote_kind;   // 0 float32, 1 float16
  int32_t query_kind;  // 0 float32, 1 bfloat16, 2 float16
  int32_t out_kind;    // 0 float32, 1 bfloat16
  float scale;         // softmax scale times the key scale
  float v_scale;
  const void* cache;
  const void* votes;
  const float* lut;            // 256 floats: what each fp8 byte means (kv_kind 3)
  const void* query;           // the step's queries
  const int64_t* row_index;    // [num_reqs]
  const int64_t* block_table;  // [num_reqs, max_blocks]
  const int32_t* seq_lens;     // [num_reqs]
  void* out;                   // the step's attention output
};

}  // extern "C"

namespace {

inline float bf16_to_float(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct F32 {
  using T = float;
  static float get(const T* p, int64_t i, const float*) { return p[i]; }
};
struct BF16 {
  using T = uint16_t;
  static float get(const T* p, int64_t i, const float*) { return bf16_to_float(p[i]); }
};
struct F16 {
  using T = uint16_t;
  static float get(const T* p, int64_t i, const float*) { return f16_to_float(p[i]); }
};
struct Byte {
  using T = uint8_t;
  static float get(const T* p, int64_t i, const float* lut) { return lut[p[i]]; }
};

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch converts
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float query_at(const VoteDecodeArgs& a, const void* row, int64_t i) {
  switch (a.query_kind) {
    case 0: return static_cast<const float*>(row)[i];
    case 1: return bf16_to_float(static_cast<const uint16_t*>(row)[i]);
    default: return f16_to_float(static_cast<const uint16_t*>(row)[i]);
  }
}

// the block's first n log-votes as floats (the kind is tested once, so the loops vectorise)
const float* read_votes(const VoteDecodeArgs& a, const void* base, float* buffer, int64_t n) {
  if (a.vote_kind == 0) return static_cast<const float*>(base);
  const auto* h = static_cast<const uint16_t*>(base);
  for (int64_t t = 0; t < n; ++t) buffer[t] = f16_to_float(h[t]);
  return buffer;
}

// e^x for the softmax's x <= 0 (logits minus their running max), in a form the compiler
// vectorises: std::exp is a scalar libm call per slot without -ffast-math, which we avoid (it
// would also assume no infinities, and -inf marks empty slots). Round x / ln 2 to n, then
// e^x = 2^n e^r with |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial (relative error
// < 2e-7, about one float ulp), 2^n written into the exponent bits. x below -87 (under float's
// normal range, e^x < 2e-38; -inf included) gives exactly 0.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, as written
  const float n = (clamped * 1.44269504088896341f + shifter) - shifter;
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2, hi + lo
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.0f ? 0.0f : p * scale;
}

// s[g][t] = q[g] . K[t] for the block's first n slots (q already scaled)
template <class E>
void block_logits(const VoteDecodeArgs& a, const typename E::T* key, const float* q, float* s, int64_t n) {
  const int64_t G = a.group, d = a.head_dim, bs = a.block_size;
  if (a.k_t == 1) {  // keys stored dim-major ([d][bs], vLLM's "vec"): vectorise over slots
    for (int64_t g = 0; g < G; ++g) std::fill(s + g * bs, s + g * bs + n, 0.0f);
    for (int64_t c = 0; c < d; ++c) {
      const typename E::T* row = key + c * a.k_c;
      for (int64_t g = 0; g < G; ++g) {
        const float qc = q[g * d + c];
        float* sg = s + g * bs;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) sg[t] += qc * E::get(row, t, a.lut);
      }
    }
  } else {  // slot-major (or any other 2D stride): a dot product per slot
    for (int64_t t = 0; t < n; ++t) {
      const typename E::T* k = key + t * a.k_t;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * d;
        float acc = 0.0f;
        if (a.k_c == 1) {
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < d; ++c) acc += qg[c] * E::get(k, c, a.lut);
        } else {
          for (int64_t c = 0; c < d; ++c) acc += qg[c] * E::get(k, c * a.k_c, a.lut);
        }
        s[g * bs + t] = acc;
      }
    }
  }
}

// acc[g] += sum_t p[g][t] * V[t] for the block's first n slots
template <class E>
void block_values(const VoteDecodeArgs& a, const typename E::T* value, const float* p, float* acc, int64_t n) {
  const int64_t G = a.group, d = a.head_dim, bs = a.block_size;
  if (a.v_c == 1) {  // slot-major values ([bs][d], vLLM's "vec"): vectorise over dims
    for (int64_t t = 0; t < n; ++t) {
      const typename E::T* v = value + t * a.v_t;
      for (int64_t g = 0; g < G; ++g) {
        const float pt = p[g * bs + t];
        float* ag = acc + g * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) ag[c] += pt * E::get(v, c, a.lut);
      }
    }
  } else {
    for (int64_t g = 0; g < G; ++g) {
      const float* pg = p + g * bs;
      for (int64_t c = 0; c < d; ++c) {
        const typename E::T* col = value + c * a.v_c;
        float sum = 0.0f;
        if (a.v_t == 1) {
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n; ++t) sum += pg[t] * E::get(col, t, a.lut);
        } else {
          for (int64_t t = 0; t < n; ++t) sum += pg[t] * E::get(col, t * a.v_t, a.lut);
        }
        acc[g * d + c] += sum;
      }
    }
  }
}

// The fast path, for vLLM's "vec" pages (keys dim-major: slot stride 1; values slot-major: dim
// stride 1) and a GQA group G known at compile time. Written with GCC/Clang vector types of the
// machine's register width (16 floats with AVX-512, else 8: AVX2, or two NEON registers), so the
// tiles' accumulators stay in registers and each key or value row loaded serves all G query
// heads; left to the auto-vectoriser, the float32 loops kept their accumulators on the stack
// (about 5x slower). Wider types than the registers are lowered badly (30x slower on AVX2).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;  // floats per vfloat
constexpr int kRegisters = 32;  // vfloats the machine holds in registers
#else
constexpr int64_t kLanes = 8;
constexpr int kRegisters = 16;
#endif
typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vhalf __attribute__((vector_size(kLanes * 2)));
typedef uint32_t vword __attribute__((vector_size(kLanes * 4)));

// kLanes consecutive elements as floats
template <class E>
inline vfloat load_lanes(const typename E::T* p, const float* lut) {
  vfloat v;
  if constexpr (std::is_same_v<E, F32>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<E, BF16>) {  // bf16 is the top half of a float
    vhalf h;
    std::memcpy(&h, p, sizeof h);
    const vword w = __builtin_convertvector(h, vword) << 16;
    std::memcpy(&v, &w, sizeof v);
  } else {
    float x[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) x[j] = E::get(p, j, lut);
    std::memcpy(&v, x, sizeof v);
  }
  return v;
}

// vfloats per pass (slot tiles of the logits, dim tiles of the values): G x that many
// accumulators plus the loaded rows fit the registers, and each row loaded serves all G heads
template <int G>
constexpr int64_t vectors_per_pass() {
  return G * 4 + 4 <= kRegisters ? 4 : (G * 2 + 2 <= kRegisters ? 2 : 1);
}

// s[g][t0 + t] = q[g] . K[t0 + t] for the NT x kLanes slots from t0
template <class E, int G, int64_t NT>
inline void logits_pass(const VoteDecodeArgs& a, const typename E::T* key, const float* q, float* s, int64_t t0) {
  const int64_t d = a.head_dim, bs = a.block_size, kc = a.k_c;
  vfloat acc[G][NT] = {};
  for (int64_t c = 0; c < d; ++c) {
    vfloat k[NT];
    for (int64_t j = 0; j < NT; ++j) k[j] = load_lanes<E>(key + c * kc + t0 + j * kLanes, a.lut);
    for (int g = 0; g < G; ++g) {
      const float qc = q[g * d + c];
      for (int64_t j = 0; j < NT; ++j) acc[g][j] += qc * k[j];
    }
  }
  for (int g = 0; g < G; ++g) std::memcpy(s + g * bs + t0, acc[g], sizeof acc[g]);
}

// s[g][t] = q[g] . K[t] for the block's first n slots, in whole tiles: the last one reads up to
// its edge (inside the block, as block_size % kLanes == 0), and those extra logits are never used
template <class E, int G>
void tile_logits(const VoteDecodeArgs& a, const typename E::T* key, const float* q, float* s, int64_t n) {
  constexpr int64_t NT = vectors_per_pass<G>();
  int64_t t0 = 0;
  for (; t0 + NT * kLanes <= n; t0 += NT * kLanes) logits_pass<E, G, NT>(a, key, q, s, t0);
  for (; t0 < n; t0 += kLanes) logits_pass<E, G, 1>(a, key, q, s, t0);
}

// acc[g] += sum_t p[g][t] * V[t] for the block's first n slots
// (head_dim % (kLanes * vectors_per_pass<G>()) == 0)
template <class E, int G>
void tile_values(const VoteDecodeArgs& a, const typename E::T* value, const float* p, float* acc, int64_t n) {
  constexpr int64_t NV = vectors_per_pass<G>(), C = NV * kLanes;
  const int64_t d = a.head_dim, bs = a.block_size, vt = a.v_t;
  for (int64_t c0 = 0; c0 < d; c0 += C) {
    vfloat sum[G][NV];
    for (int g = 0; g < G; ++g) std::memcpy(sum[g], acc + g * d + c0, sizeof sum[g]);
    for (int64_t t = 0; t < n; ++t) {
      vfloat x[NV];
      for (int64_t j = 0; j < NV; ++j) x[j] = load_lanes<E>(value + t * vt + c0 + j * kLanes, a.lut);
      for (int g = 0; g < G; ++g) {
        const float pt = p[g * bs + t];
        for (int64_t j = 0; j < NV; ++j) sum[g][j] += pt * x[j];
      }
    }
    for (int g = 0; g < G; ++g) std::memcpy(acc + g * d + c0, sum[g], sizeof sum[g]);
  }
}

// One (request, kv-head): all its query heads over all its slots, online softmax over blocks.
// G > 0: the fast path's tiles for a group of G; G == 0: any layout and group (a.group).
template <class E, int G>
void decode_one(const VoteDecodeArgs& a, int64_t r, int64_t h, float* q, float* s, float* acc, float* m,
                float* l, float* vote_buffer) {
  const int64_t group = G > 0 ? G : a.group, d = a.head_dim, bs = a.block_size;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t row = a.row_index[r], first = h * group * d;
  const int64_t q_size = a.query_kind == 0 ? 4 : 2;
  const void* q_in = static_cast<const char*>(a.query) + (row * a.query_row_stride + first) * q_size;
  for (int64_t i = 0; i < group * d; ++i) q[i] = query_at(a, q_in, i) * a.scale;
  std::fill(acc, acc + group * d, 0.0f);
  std::fill(m, m + group, neg_inf);
  std::fill(l, l + group, 0.0f);
  const auto* cache = static_cast<const typename E::T*>(a.cache);
  const int64_t seq_len = a.seq_lens[r];
  const int64_t vote_size = a.vote_kind == 0 ? 4 : 2;
  for (int64_t blk = 0; blk * bs < seq_len; ++blk) {
    const int64_t n = seq_len - blk * bs < bs ? seq_len - blk * bs : bs;
    const int64_t b = a.block_table[r * a.max_blocks + blk];
    const typename E::T* region = cache + b * a.block_stride + h * a.head_stride;
    const float* votes = read_votes(
        a, static_cast<const char*>(a.votes) + (b * a.vote_block_stride + h * a.vote_head_stride) * vote_size,
        vote_buffer, n);
    if constexpr (G > 0) {
      tile_logits<E, G>(a, region + a.key_start, q, s, n);
    } else {
      block_logits<E>(a, region + a.key_start, q, s, n);
    }
    for (int64_t g = 0; g < group; ++g) {
      float* sg = s + g * bs;
      float block_max = neg_inf;
#pragma omp simd reduction(max : block_max)
      for (int64_t t = 0; t < n; ++t) {
        sg[t] += votes[t];
        block_max = sg[t] > block_max ? sg[t] : block_max;
      }
      const float m_new = block_max > m[g] ? block_max : m[g];
      if (m_new == neg_inf) {  // nothing visible yet (every log-vote -inf): keep zeros
        for (int64_t t = 0; t < n; ++t) sg[t] = 0.0f;
        continue;
      }
      const float alpha = exp_nonpositive(m[g] - m_new);  // 0 on the first block (m = -inf)
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        sg[t] = exp_nonpositive(sg[t] - m_new);
        sum += sg[t];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = m_new;
      float* ag = acc + g * d;
      for (int64_t c = 0; c < d; ++c) ag[c] *= alpha;
    }
    if constexpr (G > 0) {
      tile_values<E, G>(a, region + a.value_start, s, acc, n);
    } else {
      block_values<E>(a, region + a.value_start, s, acc, n);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float norm = l[g] > 0.0f ? a.v_scale / l[g] : 0.0f;
    for (int64_t c = 0; c < d; ++c) acc[g * d + c] *= norm;
  }
  const int64_t at = row * a.out_row_stride + first;
  if (a.out_kind == 0) {
    std::memcpy(static_cast<float*>(a.out) + at, acc, group * d * sizeof(float));
  } else {
    uint16_t* o = static_cast<uint16_t*>(a.out) + at;
    for (int64_t i = 0; i < group * d; ++i) o[i] = float_to_bf16(acc[i]);
  }
}

template <class E, int G>
void decode_all(const VoteDecodeArgs& a) {
  const int64_t tasks = a.num_reqs * a.num_kv_heads;
  int64_t slots = 0;
  for (int64_t r = 0; r < a.num_reqs; ++r) slots += a.seq_lens[r];
  // a fork and join (about 1 us with threads already spinning) costs more than a few hundred
  // slot-heads of work: tiny steps stay on this thread (measured: 512 is where two threads win)
  const bool parallel = tasks > 1 && slots * a.num_kv_heads > 512;
#pragma omp parallel if (parallel)
  {
    // per-thread workspace: scaled queries, accumulators, logits/probabilities of one block,
    // running maxima and sums, one block's log-votes
    std::vector<float> work(a.group * (a.head_dim * 2 + a.block_size + 2) + a.block_size);
    float* q = work.data();
    float* acc = q + a.group * a.head_dim;
    float* s = acc + a.group * a.head_dim;
    float* m = s + a.group * a.block_size;
    float* l = m + a.group;
    float* vote_buffer = l + a.group;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task)
      decode_one<E, G>(a, task / a.num_kv_heads, task % a.num_kv_heads, q, s, acc, m, l, vote_buffer);
  }
}

// the fast path where the pages are vLLM's "vec" tiles and the group has a compiled tile
template <class E, int G>
bool decode_tiled(const VoteDecodeArgs& a) {
  if (a.group != G || a.head_dim % (kLanes * vectors_per_pass<G>()) != 0) return false;
  decode_all<E, G>(a);
  return true;
}

template <class E>
void decode(const VoteDecodeArgs& a) {
  const bool vec_pages = a.k_t == 1 && a.v_c == 1 && a.block_size % kLanes == 0;
  if (vec_pages && (decode_tiled<E, 1>(a) || decode_tiled<E, 2>(a) || decode_tiled<E, 3>(a) ||
                    decode_tiled<E, 4>(a) || decode_tiled<E, 5>(a) || decode_tiled<E, 6>(a) ||
                    decode_tiled<E, 7>(a) || decode_tiled<E, 8>(a)))
    return;
  decode_all<E, 0>(a);
}

}  // namespace

extern "C" int keepkv_vote_decode(const VoteDecodeArgs* a) {
  if (a->vote_kind != 0 && a->vote_kind != 1) return 2;
  if (a->query_kind < 0 || a->query_kind > 2 || a->out_kind < 0 || a->out_kind > 1) return 3;
  switch (a->kv_kind) {
    case 0: decode<F32>(*a); return 0;
    case 1: decode<BF16>(*a); return 0;
    case 2: decode<F16>(*a); return 0;
    case 3: decode<Byte>(*a); return 0;
    default: return 1;
  }
}
