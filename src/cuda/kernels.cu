// ftscript's own CUDA kernels, compiled at run time by NVRTC for the GPU at hand
// (src/cuda/kernels.rs, src/cuda/rtc.cpp, src/cuda/autograd.cpp). No headers: values are
// loaded into fp32, computed there, and stored rounding to nearest even, as torch's
// elementwise kernels do (`opmath`), rounding wherever torch's unfused op chain rounds.

// Round to nearest even. From sm_80 on, the hardware conversion torch's `BFloat16(float)` uses
// there (`__float2bfloat16`); before, the same rounding in integer arithmetic.
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
#if __CUDA_ARCH__ >= 800
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
#endif
}

__device__ __forceinline__ unsigned short f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

struct alignas(16) U4 {
  unsigned int x, y, z, w;
};

// Storage types: `T` in memory, `load` to fp32, `cvt` back (rounding to nearest even).
struct Bf16 {
  typedef unsigned short T;
  __device__ static float load(T v) { return __uint_as_float(((unsigned int)v) << 16); }
  __device__ static T cvt(float f) { return f32_to_bf16(f); }
};
struct F16 {
  typedef unsigned short T;
  __device__ static float load(T v) { return f16_to_f32(v); }
  __device__ static T cvt(float f) { return f32_to_f16(f); }
};
struct F32 {
  typedef float T;
  __device__ static float load(T v) { return v; }
  __device__ static T cvt(float f) { return f; }
};

// `x` rounded to the storage type and back, as an op's bf16/fp16 output is before the next op.
template <typename S>
__device__ __forceinline__ float rnd(float x) {
  return S::load(S::cvt(x));
}

// Eight consecutive elements, moved as 16-byte words when `vec` (all pointers 16-byte aligned
// and the eight in range), element by element otherwise.
template <typename S>
struct Chunk {
  alignas(16) typename S::T v[8];
  __device__ void load(const typename S::T* p, long long e, long long n, bool vec) {
    if (vec && e + 8 <= n) {
      const U4* src = reinterpret_cast<const U4*>(p + e);
      U4* dst = reinterpret_cast<U4*>(v);
#pragma unroll
      for (int k = 0; k < (int)(sizeof(v) / 16); k++) dst[k] = src[k];
    } else {
      for (int k = 0; k < 8; k++) v[k] = e + k < n ? p[e + k] : (typename S::T)0;
    }
  }
  __device__ void store(typename S::T* p, long long e, long long n, bool vec) const {
    if (vec && e + 8 <= n) {
      const U4* src = reinterpret_cast<const U4*>(v);
      U4* dst = reinterpret_cast<U4*>(p + e);
#pragma unroll
      for (int k = 0; k < (int)(sizeof(v) / 16); k++) dst[k] = src[k];
    } else {
      for (int k = 0; k < 8 && e + k < n; k++) p[e + k] = v[k];
    }
  }
};

// Eight elements at `p` (16-byte aligned, all eight in range) as 16-byte words, unconditionally
// (no element-by-element fallback for the compiler to branch to, so that loads can be batched).
template <typename S>
__device__ __forceinline__ Chunk<S> load8(const typename S::T* __restrict__ p) {
  Chunk<S> c;
  const U4* src = reinterpret_cast<const U4*>(p);
  U4* dst = reinterpret_cast<U4*>(c.v);
#pragma unroll
  for (int k = 0; k < (int)(sizeof(c.v) / 16); k++) dst[k] = src[k];
  return c;
}

// Programmatic dependent launch (sm_90 on; rtc.cpp launches the decoding step's kernels with it):
// such a kernel may start while the one before it in the stream still runs. `pdl_trigger` lets
// the kernel after this one start (once every block has called it); `pdl_wait` returns when the
// kernel before has finished and its writes are visible, so a kernel reads and writes global
// memory only after it. Without the launch attribute, or below sm_90, both do nothing.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// 4-bit dequantization (bitsandbytes' dequantize_4bit): element i = code[nibble i] ·
// absmax[i / blocksize] in fp32, then cast. Byte j holds element 2j in its high nibble and
// 2j+1 in its low one. One thread per 4 packed bytes (8 elements; a block of 64 never splits).
template <typename S>
__device__ void dequant4(const unsigned char* packed, const float* absmax, const float* code,
                         typename S::T* out, long long n, int blocksize) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long e = t * 8;
  if (e >= n) return;
  if (e + 8 <= n && blocksize % 8 == 0) {
    unsigned int w = *reinterpret_cast<const unsigned int*>(packed + t * 4);
    float a = absmax[e / blocksize];
    alignas(16) typename S::T r[8];
#pragma unroll
    for (int k = 0; k < 4; k++) {
      unsigned int b = (w >> (8 * k)) & 0xffu;
      r[2 * k] = S::cvt(__fmul_rn(lut[b >> 4], a));
      r[2 * k + 1] = S::cvt(__fmul_rn(lut[b & 15u], a));
    }
    const U4* src = reinterpret_cast<const U4*>(r);
    U4* dst = reinterpret_cast<U4*>(out + e);
#pragma unroll
    for (int k = 0; k < (int)(sizeof(r) / 16); k++) dst[k] = src[k];
  } else {
    for (long long i = e; i < n && i < e + 8; i++) {
      unsigned int b = packed[i >> 1];
      unsigned int nib = (i & 1) ? (b & 15u) : (b >> 4);
      out[i] = S::cvt(__fmul_rn(lut[nib], absmax[i / blocksize]));
    }
  }
}

extern "C" __global__ void dequant4_bf16(const unsigned char* p, const float* a, const float* c, unsigned short* o, long long n, int bs) {
  dequant4<Bf16>(p, a, c, o, n, bs);
}
extern "C" __global__ void dequant4_f16(const unsigned char* p, const float* a, const float* c, unsigned short* o, long long n, int bs) {
  dequant4<F16>(p, a, c, o, n, bs);
}
extern "C" __global__ void dequant4_f32(const unsigned char* p, const float* a, const float* c, float* o, long long n, int bs) {
  dequant4<F32>(p, a, c, o, n, bs);
}

// SwiGLU, `out = silu(g) · u` with `silu(g) = g / (1 + e^-g)`, rounding silu(g) to the storage
// type before the product as transformers' `act_fn(gate) * up` does, for 8 elements.
template <typename S>
__device__ __forceinline__ Chunk<S> silu_times(const Chunk<S>& g, const Chunk<S>& u) {
  Chunk<S> o;
#pragma unroll
  for (int k = 0; k < 8; k++) {
    float x = S::load(g.v[k]);
    o.v[k] = S::cvt(rnd<S>(x / (1.0f + expf(-x))) * S::load(u.v[k]));
  }
  return o;
}

// SwiGLU over n elements, one thread per 8.
template <typename S>
__device__ void swiglu_fwd(const typename S::T* g, const typename S::T* u, typename S::T* out, long long n, int vec) {
  long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (e >= n) return;
  Chunk<S> cg, cu;
  cg.load(g, e, n, vec);
  cu.load(u, e, n, vec);
  silu_times<S>(cg, cu).store(out, e, n, vec);
}

// The same for `gu` [N, 2·width], each row the gate then the up projection (one GEMM of a joint
// weight gave both): `out` [N, width] = silu(gate) · up (width a multiple of 8, rows 16-byte
// aligned when `vec`: the caller checks).
template <typename S>
__device__ void swiglu_halves(const typename S::T* gu, typename S::T* out, long long n, int width, int vec) {
  pdl_trigger();
  pdl_wait();
  long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (e >= n) return;
  const typename S::T* g = gu + e / width * 2 * width + e % width;
  Chunk<S> cg, cu;
  cg.load(g, 0, 8, vec);
  cu.load(g + width, 0, 8, vec);
  silu_times<S>(cg, cu).store(out, e, n, vec);
}

// Its backward from the saved inputs: `du = dy · silu(g)`, `dg = (dy · u) · σ(g)(1 + g(1 − σ(g)))`
// (σ the logistic function; `dy · u` rounded first, as autograd's product backward is).
template <typename S>
__device__ void swiglu_bwd(const typename S::T* dy, const typename S::T* g, const typename S::T* u,
                           typename S::T* dg, typename S::T* du, long long n, int vec) {
  long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (e >= n) return;
  Chunk<S> cd, cg, cu, og, ou;
  cd.load(dy, e, n, vec);
  cg.load(g, e, n, vec);
  cu.load(u, e, n, vec);
#pragma unroll
  for (int k = 0; k < 8; k++) {
    float d = S::load(cd.v[k]), x = S::load(cg.v[k]);
    float den = 1.0f + expf(-x), sig = 1.0f / den;
    ou.v[k] = S::cvt(d * rnd<S>(x / den));
    // torch's kernel computes `dy · σ · (1 + x(1 − σ))` with the multiply-add fused
    og.v[k] = S::cvt(rnd<S>(d * S::load(cu.v[k])) * sig * __fmaf_rn(x, 1.0f - sig, 1.0f));
  }
  og.store(dg, e, n, vec);
  ou.store(du, e, n, vec);
}

// Rotary embedding of `x` [B, T, heads, D] (contiguous) with `cos`, `sin` [B, T, D]:
// `out = x·cos + rotate_half(x)·sin`, `rotate_half([a, b]) = [−b, a]`, each product rounded
// before the sum as transformers' `q * cos + rotate_half(q) * sin` rounds. `sign` −1 gives the
// backward (the transposed rotation) from `dy`. Each thread takes `width` pairs (j, j + D/2) of
// `ROPE_HEADS` heads of one position, loading that position's cos/sin once: 8 pairs, moved as
// 16-byte words, when D/2 is a multiple of 8 and the rows are aligned (`vec`), else 1. Threads
// are numbered (position, head group, j) with j fastest.
#define ROPE_HEADS 4
template <typename S>
__device__ void rope(const typename S::T* __restrict__ x, const typename S::T* __restrict__ cos,
                     const typename S::T* __restrict__ sin, typename S::T* __restrict__ out, unsigned int threads,
                     int heads, int dim, float sign, int vec) {
  unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  const int half = dim / 2, width = vec ? 8 : 1;
  const unsigned int per_row = half / width, groups = (heads + ROPE_HEADS - 1) / ROPE_HEADS;
  const int j = (int)(t % per_row) * width;
  const unsigned int rest = t / per_row;
  const unsigned int pos = rest / groups;  // (b, t)
  const int h0 = (int)(rest % groups) * ROPE_HEADS;
  const int nh = min(ROPE_HEADS, heads - h0);
  Chunk<S> c1, c2, s1, s2, x1[ROPE_HEADS], x2[ROPE_HEADS];
  const typename S::T* c = cos + (size_t)pos * dim;
  const typename S::T* s = sin + (size_t)pos * dim;
  c1.load(c, j, j + width, vec);
  c2.load(c, j + half, j + half + width, vec);
  s1.load(s, j, j + width, vec);
  s2.load(s, j + half, j + half + width, vec);
  const size_t first = ((size_t)pos * heads + h0) * dim;
#pragma unroll
  for (int h = 0; h < ROPE_HEADS; h++) {
    if (h < nh) {
      x1[h].load(x + first + (size_t)h * dim, j, j + width, vec);
      x2[h].load(x + first + (size_t)h * dim, j + half, j + half + width, vec);
    }
  }
#pragma unroll
  for (int h = 0; h < ROPE_HEADS; h++) {
    if (h >= nh) continue;
    Chunk<S> o1, o2;
#pragma unroll
    for (int k = 0; k < 8; k++) {
      float a = S::load(x1[h].v[k]), b = S::load(x2[h].v[k]);
      float ca = S::load(c1.v[k]), cb = S::load(c2.v[k]), sa = S::load(s1.v[k]), sb = S::load(s2.v[k]);
      if (sign > 0) {
        o1.v[k] = S::cvt(rnd<S>(a * ca) + rnd<S>(-b * sa));
        o2.v[k] = S::cvt(rnd<S>(b * cb) + rnd<S>(a * sb));
      } else {
        o1.v[k] = S::cvt(rnd<S>(a * ca) + rnd<S>(b * sb));
        o2.v[k] = S::cvt(rnd<S>(b * cb) + rnd<S>(-a * sa));
      }
    }
    o1.store(out + first + (size_t)h * dim, j, j + width, vec);
    o2.store(out + first + (size_t)h * dim, j + half, j + half + width, vec);
  }
}

// dx's row chunk `d` += scale · mask ⊙ acc, rounded once and stored (rows past the end: nothing).
template <typename S>
__device__ __forceinline__ void lora_dx_store(Chunk<S>& d, unsigned long long mask, const float* acc, float scale,
                                              typename S::T* row, int j, int dim, bool in_range) {
  if (!in_range) return;
#pragma unroll
  for (int c = 0; c < 8; c++) {
    const float keep = (float)((mask >> (8 * c)) & 0xffull);
    d.v[c] = S::cvt(S::load(d.v[c]) + scale * keep * acc[c]);
  }
  d.store(row, j, dim, true);
}

// LoRA's input gradient through dropout, accumulated: `dx[n, j] += scale · mask[n, j] ·
// Σ_k u[n, k] A[k, j]` for dx [N, D], mask [N, D] (bytes, 0/1), u [N, r], A [r, D], with the sum
// in fp32 and one rounding. One thread per 8 consecutive j of `ROWS` consecutive rows (each A
// chunk is read once for them; D a multiple of 8, all pointers 16-byte aligned: the caller
// checks); threads are numbered (group of rows, chunk) with the chunk fastest. `R` > 0 is the
// rank known at compile time: all of A's chunks and u's rows are then loaded up front, so the
// thread waits for memory once rather than once per k (R a multiple of 8; R = 0: the rank is
// `rank`).
template <typename S, int R, int ROWS>
__device__ void lora_dx(typename S::T* __restrict__ dx, const unsigned char* __restrict__ mask,
                        const typename S::T* __restrict__ u, const typename S::T* __restrict__ a, long long n_rows,
                        int dim, int rank, float scale) {
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int per_row = dim / 8;
  const long long row0 = t / per_row * ROWS;
  if (row0 >= n_rows) return;
  const int j = (int)(t % per_row) * 8, rows = (int)min((long long)ROWS, n_rows - row0);
  Chunk<S> d[ROWS];
  unsigned long long m[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; i++) {
    if (i >= rows) break;
    const size_t first = (size_t)(row0 + i) * dim;
    d[i].load(dx + first, j, dim, true);
    m[i] = *reinterpret_cast<const unsigned long long*>(mask + first + j);
  }
  float acc[ROWS][8];
  if (R > 0) {
    constexpr int RK = R > 0 ? R : 8;  // (8 only so that the R = 0 instance compiles)
    Chunk<S> ak[RK], uk[ROWS][RK / 8];
#pragma unroll
    for (int i = 0; i < ROWS; i++)
#pragma unroll
      for (int k = 0; k < RK / 8; k++)
        if (i < rows) uk[i][k].load(u + (row0 + i) * RK, k * 8, RK, true);
#pragma unroll
    for (int k = 0; k < RK; k++) ak[k].load(a + (size_t)k * dim, j, dim, true);
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
#pragma unroll
      for (int c = 0; c < 8; c++) acc[i][c] = 0.0f;
#pragma unroll
      for (int k = 0; k < RK; k++) {
        const float uik = S::load(uk[i][k / 8].v[k % 8]);
#pragma unroll
        for (int c = 0; c < 8; c++) acc[i][c] = __fmaf_rn(uik, S::load(ak[k].v[c]), acc[i][c]);
      }
      // stored row by row: finishing every row's sums before the first store took ~35 more
      // registers a thread (fewer warps in flight)
      lora_dx_store<S>(d[i], m[i], acc[i], scale, dx + (size_t)(row0 + i) * dim, j, dim, i < rows);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < ROWS; i++)
#pragma unroll
    for (int c = 0; c < 8; c++) acc[i][c] = 0.0f;
  for (int k = 0; k < rank; k++) {
    Chunk<S> ak;
    ak.load(a + (size_t)k * dim, j, dim, true);
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
      if (i >= rows) break;
      const float uk = S::load(u[(row0 + i) * rank + k]);
#pragma unroll
      for (int c = 0; c < 8; c++) acc[i][c] = __fmaf_rn(uk, S::load(ak.v[c]), acc[i][c]);
    }
  }
#pragma unroll
  for (int i = 0; i < ROWS; i++) lora_dx_store<S>(d[i], m[i], acc[i], scale, dx + (size_t)(row0 + i) * dim, j, dim, i < rows);
}

// Cross-entropy of logits z [n, V] (rows contiguous) against `target` [n] (−100: no loss), for
// a loss summed over rows and scaled by `weight`: row i's loss `valid · (lse_i − z[i, t_i])` goes
// to `loss[i]` (fp32; a target outside [0, V) gives NaN) and the gradient
// `weight · valid · (softmax(z_i) − onehot(t_i))` is written over z, computed in fp32 with one
// rounding, as `cross_entropy_with_grad`'s ops compute it. One block of CE_THREADS per row: a
// pass for the maximum and Σ e^(z − max) (merged chunk by chunk), then a pass for the gradient.
#define CE_THREADS 256
#define NEG_INF (-__int_as_float(0x7f800000))
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
  const float hi = fmaxf(m, m2);
  if (hi == NEG_INF) return;  // both empty
  s = s * expf(m - hi) + s2 * expf(m2 - hi);
  m = hi;
}
template <typename S>
__device__ void cross_entropy(typename S::T* __restrict__ z, const long long* __restrict__ target,
                              float* __restrict__ loss, int vocab, float weight, int vec) {
  __shared__ float red_m[CE_THREADS / 32], red_s[CE_THREADS / 32];
  typename S::T* zr = z + (long long)blockIdx.x * vocab;
  const long long t = target[blockIdx.x];
  const bool valid = t != -100, in_range = t >= 0 && t < vocab;
  const float zt = threadIdx.x == 0 && in_range ? S::load(zr[t]) : 0.0f;  // thread 0 writes the loss
  float m = NEG_INF, sum = 0.0f;
  for (int e = threadIdx.x * 8; e < vocab; e += CE_THREADS * 8) {
    Chunk<S> c;
    c.load(zr, e, vocab, vec);
    const int k_end = min(8, vocab - e);
    float cm = NEG_INF;
    for (int k = 0; k < k_end; k++) cm = fmaxf(cm, S::load(c.v[k]));
    float cs = 0.0f;
    for (int k = 0; k < k_end; k++) cs += expf(S::load(c.v[k]) - cm);
    merge_max_sum(m, sum, cm, cs);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, sum, off);
    merge_max_sum(m, sum, m2, s2);
  }
  if (threadIdx.x % 32 == 0) {
    red_m[threadIdx.x / 32] = m;
    red_s[threadIdx.x / 32] = sum;
  }
  __syncthreads();
  m = red_m[0];
  sum = red_s[0];
  for (int w = 1; w < CE_THREADS / 32; w++) merge_max_sum(m, sum, red_m[w], red_s[w]);
  const float lse = m + logf(sum), scale = valid ? weight : 0.0f;
  if (threadIdx.x == 0) loss[blockIdx.x] = !valid ? 0.0f : in_range ? lse - zt : __int_as_float(0x7fc00000);
  for (int e = threadIdx.x * 8; e < vocab; e += CE_THREADS * 8) {
    Chunk<S> c;
    c.load(zr, e, vocab, vec);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float p = expf(S::load(c.v[k]) - lse);
      c.v[k] = S::cvt(scale * (e + k == t ? p - 1.0f : p));
    }
    c.store(zr, e, vocab, vec);
  }
}

// RMSNorm after a residual add, as `_fused_rms_norm(h + δ)` computes it: s = h + δ rounded to
// the storage type (written to `sum`; δ may be null, then s = h and nothing is written),
// rstd = 1/√(mean(s²) + eps) in fp32 (to `rstd`), out = (s · rstd) · w with one rounding. One
// block of RMS_THREADS per row; each thread keeps its RMS_CHUNKS 8-element chunks in registers
// (rows up to RMS_THREADS · 8 · RMS_CHUNKS elements, a multiple of 8, 16-byte aligned: the
// caller checks).
#define RMS_THREADS 256
#define RMS_CHUNKS 4
__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // `shared` may still be read from a previous call
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < (int)blockDim.x / 32; w++) total += shared[w];
  return total;
}
template <typename S>
__device__ void add_rms_norm(const typename S::T* __restrict__ h, const typename S::T* __restrict__ delta,
                             const typename S::T* __restrict__ w, typename S::T* __restrict__ sum,
                             typename S::T* __restrict__ out, float* __restrict__ rstd, int dim, float eps) {
  __shared__ float partial[32];
  pdl_trigger();
  pdl_wait();
  const size_t base = (size_t)blockIdx.x * dim;
  Chunk<S> sc[RMS_CHUNKS];
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < RMS_CHUNKS; i++) {
    const int e = (threadIdx.x + i * RMS_THREADS) * 8;
    if (e >= dim) break;
    sc[i].load(h + base, e, dim, true);
    if (delta) {
      Chunk<S> d;
      d.load(delta + base, e, dim, true);
#pragma unroll
      for (int k = 0; k < 8; k++) sc[i].v[k] = S::cvt(S::load(sc[i].v[k]) + S::load(d.v[k]));
      sc[i].store(sum + base, e, dim, true);
    }
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float v = S::load(sc[i].v[k]);
      sq = __fmaf_rn(v, v, sq);
    }
  }
  const float r = rsqrtf(block_sum(sq, partial) / dim + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
  for (int i = 0; i < RMS_CHUNKS; i++) {
    const int e = (threadIdx.x + i * RMS_THREADS) * 8;
    if (e >= dim) break;
    Chunk<S> wc, o;
    wc.load(w, e, dim, true);
#pragma unroll
    for (int k = 0; k < 8; k++) o.v[k] = S::cvt(S::load(sc[i].v[k]) * r * S::load(wc.v[k]));
    o.store(out + base, e, dim, true);
  }
}

// Its backward, with the residual's gradient added: `dx = dres + rstd · g − s · rstd³ · mean(g ⊙ s)`
// for g = w ⊙ dy, in fp32 with one rounding (`dres` may be null). A block per row, as the forward:
// `CHUNKS` = RMS_CHUNKS with RMS_THREADS threads, or 1 with D / 8 threads (D a multiple of 256),
// which holds a quarter of the registers, so twice as many rows are in flight.
template <typename S, int CHUNKS>
__device__ void rms_norm_bwd(const typename S::T* __restrict__ dy, const typename S::T* __restrict__ s,
                             const typename S::T* __restrict__ w, const float* __restrict__ rstd,
                             const typename S::T* __restrict__ dres, typename S::T* __restrict__ dx, int dim) {
  __shared__ float partial[32];
  const size_t base = (size_t)blockIdx.x * dim;
  Chunk<S> sc[CHUNKS], o[CHUNKS];
  float g[CHUNKS][8];
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < CHUNKS; i++) {
    const int e = (threadIdx.x + i * blockDim.x) * 8;
    if (e >= dim) break;
    Chunk<S> dc, wc;
    dc.load(dy + base, e, dim, true);
    wc.load(w, e, dim, true);
    sc[i].load(s + base, e, dim, true);
    if (dres) o[i].load(dres + base, e, dim, true);  // loaded early: it lands during the reduction
#pragma unroll
    for (int k = 0; k < 8; k++) {
      g[i][k] = S::load(dc.v[k]) * S::load(wc.v[k]);
      dot = __fmaf_rn(g[i][k], S::load(sc[i].v[k]), dot);
    }
  }
  const float r = rstd[blockIdx.x];
  const float c = block_sum(dot, partial) / dim * r * r * r;
#pragma unroll
  for (int i = 0; i < CHUNKS; i++) {
    const int e = (threadIdx.x + i * blockDim.x) * 8;
    if (e >= dim) break;
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float v = r * g[i][k] - S::load(sc[i].v[k]) * c;
      o[i].v[k] = S::cvt(dres ? S::load(o[i].v[k]) + v : v);
    }
    o[i].store(dx + base, e, dim, true);
  }
}

// The same two kernels for rows of at most 256 elements (each head's query or key in Qwen3's
// q/k norms): a warp per row, a lane per 8-element chunk, RMS_THREADS / 32 rows a block, the sums
// by warp shuffles alone (a block per row would leave most of its threads idle).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
template <typename S>
__device__ void add_rms_norm_rows(const typename S::T* __restrict__ h, const typename S::T* __restrict__ delta,
                                  const typename S::T* __restrict__ w, typename S::T* __restrict__ sum,
                                  typename S::T* __restrict__ out, float* __restrict__ rstd, int dim, float eps,
                                  long long rows) {
  const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  pdl_trigger();
  if (row >= rows) return;  // a whole warp: the shuffles below see all 32 lanes
  pdl_wait();
  const int e = (threadIdx.x % 32) * 8;
  const bool mine = e < dim;
  const size_t base = (size_t)row * dim;
  Chunk<S> sc;
  float sq = 0.0f;
  if (mine) {
    sc.load(h + base, e, dim, true);
    if (delta) {
      Chunk<S> d;
      d.load(delta + base, e, dim, true);
#pragma unroll
      for (int k = 0; k < 8; k++) sc.v[k] = S::cvt(S::load(sc.v[k]) + S::load(d.v[k]));
      sc.store(sum + base, e, dim, true);
    }
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float v = S::load(sc.v[k]);
      sq = __fmaf_rn(v, v, sq);
    }
  }
  const float r = rsqrtf(warp_sum(sq) / dim + eps);
  if (threadIdx.x % 32 == 0) rstd[row] = r;
  if (mine) {
    Chunk<S> wc, o;
    wc.load(w, e, dim, true);
#pragma unroll
    for (int k = 0; k < 8; k++) o.v[k] = S::cvt(S::load(sc.v[k]) * r * S::load(wc.v[k]));
    o.store(out + base, e, dim, true);
  }
}
template <typename S>
__device__ void rms_norm_bwd_rows(const typename S::T* __restrict__ dy, const typename S::T* __restrict__ s,
                                  const typename S::T* __restrict__ w, const float* __restrict__ rstd,
                                  const typename S::T* __restrict__ dres, typename S::T* __restrict__ dx, int dim,
                                  long long rows) {
  const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int e = (threadIdx.x % 32) * 8;
  const bool mine = e < dim;
  const size_t base = (size_t)row * dim;
  Chunk<S> sc, o;
  float g[8];
  float dot = 0.0f;
  if (mine) {
    Chunk<S> dc, wc;
    dc.load(dy + base, e, dim, true);
    wc.load(w, e, dim, true);
    sc.load(s + base, e, dim, true);
    if (dres) o.load(dres + base, e, dim, true);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      g[k] = S::load(dc.v[k]) * S::load(wc.v[k]);
      dot = __fmaf_rn(g[k], S::load(sc.v[k]), dot);
    }
  }
  const float r = rstd[row];
  const float c = warp_sum(dot) / dim * r * r * r;
  if (mine) {
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float v = r * g[k] - S::load(sc.v[k]) * c;
      o.v[k] = S::cvt(dres ? S::load(o.v[k]) + v : v);
    }
    o.store(dx + base, e, dim, true);
  }
}

// Gemma 2's attention probabilities from raw scores x [rows, tk] (rows = B·heads·tq):
// s = cap · tanh(x · scale / cap) where `allowed` [B, tq, tk] (bytes, shared by the heads) says
// so, −∞ elsewhere; p = softmax(s) in fp32, stored rounded. One block per row; the row is read
// three times (max, sum, write), from L2 after the first. Backward: dx = p · (dp − Σ p·dp) ·
// scale · (1 − tanh²(x · scale / cap)), zero where masked (p = 0).
#define SOFTCAP_THREADS 256
__device__ __forceinline__ float block_max(float v, float* shared) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  float m = __int_as_float(0xff800000);  // −∞
  for (int w = 0; w < (int)blockDim.x / 32; w++) m = fmaxf(m, shared[w]);
  return m;
}
template <typename S>
__device__ void softcap_softmax_fwd(const typename S::T* __restrict__ x, const unsigned char* __restrict__ allowed,
                                    typename S::T* __restrict__ p, int tk, int tq, int heads, float scale, float cap) {
  __shared__ float partial[32];
  const long long row = blockIdx.x;
  const long long b = row / ((long long)heads * tq), i = row % tq;
  const typename S::T* xr = x + row * tk;
  const unsigned char* ar = allowed + (b * tq + i) * tk;
  typename S::T* pr = p + row * tk;
  float m = __int_as_float(0xff800000);  // −∞
  for (int j = threadIdx.x; j < tk; j += blockDim.x)
    if (ar[j]) m = fmaxf(m, cap * tanhf(S::load(xr[j]) * scale / cap));
  m = block_max(m, partial);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < tk; j += blockDim.x)
    if (ar[j]) sum += expf(cap * tanhf(S::load(xr[j]) * scale / cap) - m);
  const float inv = 1.0f / block_sum(sum, partial);
  for (int j = threadIdx.x; j < tk; j += blockDim.x)
    pr[j] = S::cvt(ar[j] ? expf(cap * tanhf(S::load(xr[j]) * scale / cap) - m) * inv : 0.0f);
}
template <typename S>
__device__ void softcap_softmax_bwd(const typename S::T* __restrict__ x, const typename S::T* __restrict__ p,
                                    const typename S::T* __restrict__ dp, typename S::T* __restrict__ dx, int tk,
                                    float scale, float cap) {
  __shared__ float partial[32];
  const long long base = (long long)blockIdx.x * tk;
  float dot = 0.0f;
  for (int j = threadIdx.x; j < tk; j += blockDim.x) dot = __fmaf_rn(S::load(p[base + j]), S::load(dp[base + j]), dot);
  dot = block_sum(dot, partial);
  for (int j = threadIdx.x; j < tk; j += blockDim.x) {
    const float pj = S::load(p[base + j]), th = tanhf(S::load(x[base + j]) * scale / cap);
    dx[base + j] = S::cvt(pj * (S::load(dp[base + j]) - dot) * scale * (1.0f - th * th));
  }
}

// One decoding step's attention, a query a row over a fixed-capacity KV cache: q [B, heads, d],
// k, v [B, kv_heads, cap, d] (query head h reads kv head h / (heads / kv_heads)), valid [B, cap]
// (bytes), `at` the step's slot; key j ≤ at is seen where valid and (window ≤ 0 or at − j <
// window). s_j = q·k_j · scale (Gemma 2: cap · tanh(s_j / cap) when softcap > 0), p = softmax(s)
// and out = Σ_j p_j v_j, all in fp32, stored rounded, [B, heads, d]. A block of DECODE_THREADS
// per (row, head): a thread per key for the scores (kept in shared memory), then each thread
// sums 8 output elements over its share of the keys, the shares added in shared memory. Rows of
// 8 elements are read at once (d a multiple of 8, 16-byte aligned: the caller checks).
#define DECODE_THREADS 256
#define DECODE_MAX_CAP 4096
#define DECODE_MAX_DIM 256
template <typename S>
__device__ void decode_attention(const typename S::T* __restrict__ q, const typename S::T* __restrict__ k,
                                 const typename S::T* __restrict__ v, const unsigned char* __restrict__ valid,
                                 const long long* __restrict__ at, typename S::T* __restrict__ out, int heads,
                                 int kv_heads, int cap, int dim, int window, float scale, float softcap) {
  __shared__ float qs[DECODE_MAX_DIM];
  __shared__ float p[DECODE_MAX_CAP];
  __shared__ float shares[DECODE_THREADS * 8];
  __shared__ float partial[32];
  const float minus_inf = __int_as_float(0xff800000);
  const int bh = blockIdx.x, b = bh / heads, h = bh % heads, g = h / (heads / kv_heads);
  pdl_trigger();
  pdl_wait();
  for (int i = threadIdx.x; i < dim; i += blockDim.x) qs[i] = S::load(q[(long long)bh * dim + i]);
  __syncthreads();
  const long long kv = ((long long)b * kv_heads + g) * cap * dim;
  const unsigned char* seen = valid + (long long)b * cap;
  const int last = (int)min((long long)cap - 1, *at);
  const int first = window > 0 ? max(0, last - window + 1) : 0;
  for (int j = first + threadIdx.x; j <= last; j += blockDim.x) {
    float s = minus_inf;
    if (seen[j]) {
      const typename S::T* kr = k + kv + (long long)j * dim;
      float dot = 0.0f;
      // eight of the row's 16-byte loads issued before any is used
      for (int e0 = 0; e0 < dim; e0 += 64) {
        Chunk<S> c[8];
#pragma unroll
        for (int t = 0; t < 8; t++) {
          if (e0 + 8 * t < dim) c[t] = load8<S>(kr + e0 + 8 * t);
        }
#pragma unroll
        for (int t = 0; t < 8; t++) {
          if (e0 + 8 * t < dim) {
#pragma unroll
            for (int u = 0; u < 8; u++) dot = __fmaf_rn(qs[e0 + 8 * t + u], S::load(c[t].v[u]), dot);
          }
        }
      }
      s = dot * scale;
      if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
    }
    p[j] = s;
  }
  __syncthreads();
  float m = minus_inf;
  for (int j = first + threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, p[j]);
  m = block_max(m, partial);
  float sum = 0.0f;
  for (int j = first + threadIdx.x; j <= last; j += blockDim.x) {
    const float e = p[j] == minus_inf ? 0.0f : expf(p[j] - m);
    p[j] = e;
    sum += e;
  }
  const float inv = 1.0f / block_sum(sum, partial);  // its barriers also publish p
  const int chunks = dim / 8, groups = blockDim.x / chunks, c = threadIdx.x % chunks, grp = threadIdx.x / chunks;
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  if (grp < groups) {
    // four keys' values loaded before any is used
    for (int j0 = first + grp; j0 <= last; j0 += 4 * groups) {
      Chunk<S> cv[4];
#pragma unroll
      for (int t = 0; t < 4; t++) {
        if (j0 + t * groups <= last) cv[t] = load8<S>(v + kv + (long long)(j0 + t * groups) * dim + 8 * c);
      }
#pragma unroll
      for (int t = 0; t < 4; t++) {
        if (j0 + t * groups <= last) {
          const float pj = p[j0 + t * groups];  // 0 for a key not seen (its value is finite: written, or the cache's zeros)
#pragma unroll
          for (int u = 0; u < 8; u++) acc[u] = __fmaf_rn(pj, S::load(cv[t].v[u]), acc[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 8; u++) shares[grp * dim + 8 * c + u] = acc[u];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float o = 0.0f;
    for (int r = 0; r < groups; r++) o += shares[r * dim + i];
    out[(long long)bh * dim + i] = S::cvt(o * inv);
  }
}

// A decoding step's query, key and value heads from the joint projection `qkv` [B, row] (each
// row `heads` query heads, then `kv_heads` key heads, then as many value heads, `dim` each), in
// one kernel: the query and key heads normalized over `dim` by `qw` / `kw` when given (Qwen3's
// q/k norms: `s · rstd · w` rounded once, as add_rms_norm_rows), then rotated by `cos`, `sin`
// [B, dim] as the rope kernel rotates (each product rounded before the sum); the queries go to
// `q` [B, heads, dim], the keys and values to slot `*at` of the caches `kc`, `vc` [B, kv_heads,
// cap, dim]. A warp per head, a lane per 8-element chunk (dim a multiple of 16, at most 256; rows
// 16-byte aligned: the caller checks); the lane holding element j + dim/2 of a pair hands it over
// by a shuffle.
template <typename S>
__device__ void decode_qkv(const typename S::T* __restrict__ qkv, long long row, const typename S::T* __restrict__ cos,
                           const typename S::T* __restrict__ sin, const typename S::T* __restrict__ qw,
                           const typename S::T* __restrict__ kw, float eps, typename S::T* __restrict__ q,
                           typename S::T* __restrict__ kc, typename S::T* __restrict__ vc, const long long* at,
                           int b, int heads, int kv_heads, int dim, int cap) {
  const int per_row = heads + 2 * kv_heads;
  const int head = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  pdl_trigger();
  if (head >= b * per_row) return;  // a whole warp: the shuffles below see all 32 lanes
  pdl_wait();
  const int r = head / per_row, hh = head % per_row, lane = threadIdx.x % 32, e = lane * 8;
  const bool mine = e < dim;
  Chunk<S> x;
  if (mine) x.load(qkv + r * row + (long long)hh * dim, e, dim, true);
  if (hh < heads + kv_heads) {
    const typename S::T* w = hh < heads ? qw : kw;
    if (w) {
      float sq = 0.0f;
#pragma unroll
      for (int k = 0; k < 8; k++) sq = mine ? __fmaf_rn(S::load(x.v[k]), S::load(x.v[k]), sq) : sq;
      const float rs = rsqrtf(warp_sum(sq) / dim + eps);
      if (mine) {
        Chunk<S> wc;
        wc.load(w, e, dim, true);
#pragma unroll
        for (int k = 0; k < 8; k++) x.v[k] = S::cvt(S::load(x.v[k]) * rs * S::load(wc.v[k]));
      }
    }
    const int half = dim / 2, first = e < half;
    const int partner = first ? lane + half / 8 : lane - half / 8;
    Chunk<S> c, s, o;
    if (mine) {
      c.load(cos + (long long)r * dim, e, dim, true);
      s.load(sin + (long long)r * dim, e, dim, true);
    }
#pragma unroll
    for (int k = 0; k < 8; k++) {
      const float own = S::load(x.v[k]);
      const float other = __shfl_sync(0xffffffffu, own, partner & 31);
      const float ck = S::load(c.v[k]), sk = S::load(s.v[k]);
      o.v[k] = S::cvt(first ? rnd<S>(own * ck) + rnd<S>(-other * sk) : rnd<S>(own * ck) + rnd<S>(other * sk));
    }
    if (!mine) return;
    if (hh < heads) {
      o.store(q + ((long long)r * heads + hh) * dim, e, dim, true);
    } else {
      o.store(kc + (((long long)r * kv_heads + hh - heads) * cap + *at) * dim, e, dim, true);
    }
  } else if (mine) {
    x.store(vc + (((long long)r * kv_heads + hh - heads - kv_heads) * cap + *at) * dim, e, dim, true);
  }
}

#define DECODE_ROWS 8
// The tuning knobs of `decode_linear` are defines that FTSCRIPT_NVRTC_DEFINES can set (rtc.cpp),
// for benchmarks to compare: DECODE_BULK, BULK_PIECE, BULK_STAGES (below), DECODE_BATCH.
#ifndef DECODE_BATCH
#define DECODE_BATCH 8
#endif
// The end of [`decode_linear_rows`] for output `o`: each lane's partial sums `acc` added across
// the warp, the bias added and rounded, the LoRA update's dot products over the rank (spread
// over the lanes as the main one is) added and rounded again; lane n writes row n.
template <typename S, int ROWS>
__device__ __forceinline__ void decode_linear_out(float (&acc)[ROWS], const typename S::T* __restrict__ bias,
                                                  const typename S::T* __restrict__ xa, const typename S::T* __restrict__ lb,
                                                  typename S::T* __restrict__ y, int o, int out, int rank, int lane) {
  float upd[ROWS];
#pragma unroll
  for (int n = 0; n < ROWS; n++) upd[n] = 0.0f;
  if (xa) {
    for (int k = lane; k < rank; k += 32) {
      const float bk = S::load(lb[(long long)o * rank + k]);
#pragma unroll
      for (int n = 0; n < ROWS; n++) upd[n] = __fmaf_rn(S::load(xa[(long long)n * rank + k]), bk, upd[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < ROWS; n++) {
    acc[n] = warp_sum(acc[n]);
    if (xa) upd[n] = warp_sum(upd[n]);
  }
  if (lane >= ROWS) return;
  float v = 0.0f, u = 0.0f;
#pragma unroll
  for (int n = 0; n < ROWS; n++) {
    v = n == lane ? acc[n] : v;
    u = n == lane ? upd[n] : u;
  }
  v = S::load(S::cvt(bias ? v + S::load(bias[o]) : v));
  if (xa) v += u;
  y[(long long)lane * out + o] = S::cvt(v);
}

// On sm_90 and later (DECODE_BULK 1, the default) [`decode_linear_rows`] has W's rows streamed
// by the copy engine (`cp.async.bulk`, completing on an mbarrier) into a ring of BULK_STAGES
// pieces of BULK_PIECE bytes a warp in shared memory, rather than by each lane's loads; the
// same products in the same order, so the same result. The first pieces are asked for before
// `pdl_wait` (W is no kernel's output). An H100 decoded a 7B 11-13% faster so (bench/README).
#ifndef DECODE_BULK
#define DECODE_BULK 1
#endif
#if DECODE_BULK && __CUDA_ARCH__ >= 900
#ifndef BULK_PIECE
#define BULK_PIECE 2048
#endif
#ifndef BULK_STAGES
#define BULK_STAGES 2
#endif
// a piece holds whole sweeps of the warp (256 elements; fp32: 1024 bytes), so each lane sums its
// elements in the order of i as the plain path does
static_assert(BULK_PIECE % 1024 == 0, "BULK_PIECE: a multiple of 1024 bytes");
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void bulk_piece(void* dst, const void* src, int bytes, unsigned long long* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void bulk_wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done)
                 : "r"(smem_addr(bar)), "r"(parity)
                 : "memory");
  }
}
// The ring and its mbarriers (a block is 8 warps: the launch's 256 threads), one allocation
// for every instantiation of the kernel below.
__device__ __forceinline__ unsigned char (*bulk_ring())[BULK_STAGES][BULK_PIECE] {
  __shared__ alignas(128) unsigned char ring[8][BULK_STAGES][BULK_PIECE];
  return ring;
}
__device__ __forceinline__ unsigned long long (*bulk_bars())[BULK_STAGES] {
  __shared__ alignas(8) unsigned long long bars[8][BULK_STAGES];
  return bars;
}
template <typename S, int ROWS>
__device__ void decode_linear_bulk(const typename S::T* __restrict__ x, const typename S::T* __restrict__ w,
                                   const typename S::T* __restrict__ bias, const typename S::T* __restrict__ xa,
                                   const typename S::T* __restrict__ lb, typename S::T* __restrict__ y, int in, int out,
                                   int rank) {
  typedef typename S::T T;
  unsigned char(*ring)[BULK_STAGES][BULK_PIECE] = bulk_ring();
  unsigned long long(*bars)[BULK_STAGES] = bulk_bars();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, o = blockIdx.x * 8 + warp;
  pdl_trigger();
  if (o >= out) return;
  const char* wr = reinterpret_cast<const char*>(w + (long long)o * in);
  const int bytes = in * (int)sizeof(T), pieces = (bytes + BULK_PIECE - 1) / BULK_PIECE;
  if (lane == 0) {
    for (int s = 0; s < BULK_STAGES; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&bars[warp][s])) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    // W is no kernel's output: its first pieces are asked for before the wait
    for (int p = 0; p < BULK_STAGES && p < pieces; p++)
      bulk_piece(ring[warp][p], wr + p * BULK_PIECE, min(BULK_PIECE, bytes - p * BULK_PIECE), &bars[warp][p]);
  }
  __syncwarp();
  pdl_wait();
  float acc[ROWS];
#pragma unroll
  for (int n = 0; n < ROWS; n++) acc[n] = 0.0f;
  for (int p = 0; p < pieces; p++) {
    const int s = p % BULK_STAGES, first = p * (BULK_PIECE / (int)sizeof(T));
    const int count = min(BULK_PIECE, bytes - p * BULK_PIECE) / (int)sizeof(T);
    bulk_wait(&bars[warp][s], (p / BULK_STAGES) & 1);
    const T* piece = reinterpret_cast<const T*>(ring[warp][s]);
    for (int e = lane * 8; e < count; e += 256) {
      const Chunk<S> wc = load8<S>(piece + e);
#pragma unroll
      for (int n = 0; n < ROWS; n++) {
        const Chunk<S> xc = load8<S>(x + (long long)n * in + first + e);
#pragma unroll
        for (int k = 0; k < 8; k++) acc[n] = __fmaf_rn(S::load(wc.v[k]), S::load(xc.v[k]), acc[n]);
      }
    }
    __syncwarp();
    if (lane == 0 && p + BULK_STAGES < pieces) {
      const int q = p + BULK_STAGES;
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      bulk_piece(ring[warp][s], wr + q * BULK_PIECE, min(BULK_PIECE, bytes - q * BULK_PIECE), &bars[warp][s]);
    }
  }
  decode_linear_out<S, ROWS>(acc, bias, xa, lb, y, o, out, rank, lane);
}
#endif

// A linear layer at decoding sizes (a GEMV for each of `ROWS` ≤ 8 rows): `y[n, o] =
// Σ_i x[n, i] W[o, i] (+ bias[o])`, rounded, then `+ Σ_k xa[n, k] B[o, k]` (a LoRA update from
// `xa` = s·x·Aᵀ [N, rank]; null for none), rounded again, as `linear` then `addmm_` round. A warp
// per output o; below sm_90 (or with DECODE_BULK 0) each lane reads 16 bytes of W's row at a
// time (in a multiple of 8, rows 16-byte aligned: the caller checks), DECODE_BATCH of them
// issued before any is used (the weights stream from memory once: what keeps the bandwidth
// busy is loads in flight), the products summed in fp32 in the order of i, then across the
// lanes by shuffles; the update's rank-long products likewise, a lane per rank index.
template <typename S, int ROWS>
__device__ void decode_linear_rows(const typename S::T* __restrict__ x, const typename S::T* __restrict__ w,
                                   const typename S::T* __restrict__ bias, const typename S::T* __restrict__ xa,
                                   const typename S::T* __restrict__ lb, typename S::T* __restrict__ y, int in, int out,
                                   int rank) {
#if DECODE_BULK && __CUDA_ARCH__ >= 900
  return decode_linear_bulk<S, ROWS>(x, w, bias, xa, lb, y, in, out, rank);
#endif
  const int o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  pdl_trigger();
  if (o >= out) return;
  const typename S::T* wr = w + (long long)o * in;
  pdl_wait();
  float acc[ROWS];
#pragma unroll
  for (int n = 0; n < ROWS; n++) acc[n] = 0.0f;
  for (int base = lane * 8; base < in; base += 256 * DECODE_BATCH) {
    Chunk<S> wc[DECODE_BATCH];
#pragma unroll
    for (int u = 0; u < DECODE_BATCH; u++) {
      if (base + u * 256 < in) wc[u] = load8<S>(wr + base + u * 256);
    }
#pragma unroll
    for (int u = 0; u < DECODE_BATCH; u++) {
      const int i = base + u * 256;
      if (i < in) {
#pragma unroll
        for (int n = 0; n < ROWS; n++) {
          const Chunk<S> xc = load8<S>(x + (long long)n * in + i);
#pragma unroll
          for (int k = 0; k < 8; k++) acc[n] = __fmaf_rn(S::load(wc[u].v[k]), S::load(xc.v[k]), acc[n]);
        }
      }
    }
  }
  decode_linear_out<S, ROWS>(acc, bias, xa, lb, y, o, out, rank, lane);
}

// [`decode_linear_rows`] for `rows` (1 to DECODE_ROWS) known at run time.
template <typename S>
__device__ void decode_linear(const typename S::T* x, const typename S::T* w, const typename S::T* bias,
                              const typename S::T* xa, const typename S::T* lb, typename S::T* y, int rows, int in,
                              int out, int rank) {
  switch (rows) {
    case 1: decode_linear_rows<S, 1>(x, w, bias, xa, lb, y, in, out, rank); break;
    case 2: decode_linear_rows<S, 2>(x, w, bias, xa, lb, y, in, out, rank); break;
    case 3: decode_linear_rows<S, 3>(x, w, bias, xa, lb, y, in, out, rank); break;
    case 4: decode_linear_rows<S, 4>(x, w, bias, xa, lb, y, in, out, rank); break;
    case 5: decode_linear_rows<S, 5>(x, w, bias, xa, lb, y, in, out, rank); break;
    case 6: decode_linear_rows<S, 6>(x, w, bias, xa, lb, y, in, out, rank); break;
    case 7: decode_linear_rows<S, 7>(x, w, bias, xa, lb, y, in, out, rank); break;
    default: decode_linear_rows<S, DECODE_ROWS>(x, w, bias, xa, lb, y, in, out, rank); break;
  }
}

#define FTSCRIPT_TYPED(S, suffix)                                                                                  \
  extern "C" __global__ void swiglu_fwd_##suffix(const S::T* g, const S::T* u, S::T* o, long long n, int vec) {    \
    swiglu_fwd<S>(g, u, o, n, vec);                                                                                \
  }                                                                                                                \
  extern "C" __global__ void swiglu_halves_##suffix(const S::T* gu, S::T* o, long long n, int width, int vec) {   \
    swiglu_halves<S>(gu, o, n, width, vec);                                                                        \
  }                                                                                                                \
  extern "C" __global__ void decode_qkv_##suffix(const S::T* qkv, long long row, const S::T* c, const S::T* s,     \
                                                const S::T* qw, const S::T* kw, float eps, S::T* q, S::T* kc,      \
                                                S::T* vc, const long long* at, int b, int heads, int kv_heads,     \
                                                int dim, int cap) {                                                \
    decode_qkv<S>(qkv, row, c, s, qw, kw, eps, q, kc, vc, at, b, heads, kv_heads, dim, cap);                       \
  }                                                                                                                \
  extern "C" __global__ void decode_linear_##suffix(const S::T* x, const S::T* w, const S::T* b, const S::T* xa,   \
                                                   const S::T* lb, S::T* y, int rows, int in, int out, int rank) { \
    decode_linear<S>(x, w, b, xa, lb, y, rows, in, out, rank);                                                     \
  }                                                                                                                \
  extern "C" __global__ void swiglu_bwd_##suffix(const S::T* dy, const S::T* g, const S::T* u, S::T* dg, S::T* du, \
                                                 long long n, int vec) {                                          \
    swiglu_bwd<S>(dy, g, u, dg, du, n, vec);                                                                       \
  }                                                                                                                \
  extern "C" __global__ void rope_##suffix(const S::T* x, const S::T* c, const S::T* s, S::T* o,                  \
                                           unsigned int threads, int heads, int dim, float sign, int vec) {       \
    rope<S>(x, c, s, o, threads, heads, dim, sign, vec);                                                            \
  }                                                                                                                \
  extern "C" __global__ void lora_dx_##suffix(S::T* dx, const unsigned char* m, const S::T* u, const S::T* a,     \
                                              long long rows, int dim, int rank, float scale) {                   \
    lora_dx<S, 0, 4>(dx, m, u, a, rows, dim, rank, scale);                                                         \
  }                                                                                                                \
  extern "C" __global__ void lora_dx_r8_##suffix(S::T* dx, const unsigned char* m, const S::T* u, const S::T* a,  \
                                                 long long rows, int dim, int rank, float scale) {                \
    lora_dx<S, 8, 4>(dx, m, u, a, rows, dim, rank, scale);                                                         \
  }                                                                                                                \
  extern "C" __global__ void lora_dx_r16_##suffix(S::T* dx, const unsigned char* m, const S::T* u, const S::T* a, \
                                                  long long rows, int dim, int rank, float scale) {               \
    lora_dx<S, 16, 2>(dx, m, u, a, rows, dim, rank, scale);                                                        \
  }                                                                                                                \
  extern "C" __global__ void cross_entropy_##suffix(S::T* z, const long long* t, float* loss, int vocab, float w,  \
                                                    int vec) {                                                    \
    cross_entropy<S>(z, t, loss, vocab, w, vec);                                                                   \
  }                                                                                                                \
  extern "C" __global__ void decode_attention_##suffix(const S::T* q, const S::T* k, const S::T* v,             \
                                                      const unsigned char* valid, const long long* at, S::T* o,    \
                                                      int heads, int kv_heads, int cap, int dim, int window,       \
                                                      float scale, float softcap) {                                \
    decode_attention<S>(q, k, v, valid, at, o, heads, kv_heads, cap, dim, window, scale, softcap);              \
  }                                                                                                                \
  extern "C" __global__ void add_rms_norm_##suffix(const S::T* h, const S::T* d, const S::T* w, S::T* sum,         \
                                                   S::T* out, float* rstd, int dim, float eps) {                  \
    add_rms_norm<S>(h, d, w, sum, out, rstd, dim, eps);                                                            \
  }                                                                                                                \
  extern "C" __global__ void rms_norm_bwd_##suffix(const S::T* dy, const S::T* s, const S::T* w, const float* rstd, \
                                                   const S::T* dres, S::T* dx, int dim) {                         \
    rms_norm_bwd<S, RMS_CHUNKS>(dy, s, w, rstd, dres, dx, dim);                                                    \
  }                                                                                                                \
  extern "C" __global__ void rms_norm_bwd1_##suffix(const S::T* dy, const S::T* s, const S::T* w, const float* rstd, \
                                                    const S::T* dres, S::T* dx, int dim) {                        \
    rms_norm_bwd<S, 1>(dy, s, w, rstd, dres, dx, dim);                                                             \
  }                                                                                                                \
  extern "C" __global__ void add_rms_norm_rows_##suffix(const S::T* h, const S::T* d, const S::T* w, S::T* sum,    \
                                                        S::T* out, float* rstd, int dim, float eps, long long rows) { \
    add_rms_norm_rows<S>(h, d, w, sum, out, rstd, dim, eps, rows);                                                 \
  }                                                                                                                \
  extern "C" __global__ void rms_norm_bwd_rows_##suffix(const S::T* dy, const S::T* s, const S::T* w,              \
                                                        const float* rstd, const S::T* dres, S::T* dx, int dim,    \
                                                        long long rows) {                                          \
    rms_norm_bwd_rows<S>(dy, s, w, rstd, dres, dx, dim, rows);                                                     \
  }                                                                                                                \
  extern "C" __global__ void softcap_softmax_fwd_##suffix(const S::T* x, const unsigned char* allowed, S::T* p,    \
                                                          int tk, int tq, int heads, float scale, float cap) {    \
    softcap_softmax_fwd<S>(x, allowed, p, tk, tq, heads, scale, cap);                                              \
  }                                                                                                                \
  extern "C" __global__ void softcap_softmax_bwd_##suffix(const S::T* x, const S::T* p, const S::T* dp, S::T* dx, \
                                                          int tk, float scale, float cap) {                        \
    softcap_softmax_bwd<S>(x, p, dp, dx, tk, scale, cap);                                                          \
  }
FTSCRIPT_TYPED(Bf16, bf16)
FTSCRIPT_TYPED(F16, f16)
FTSCRIPT_TYPED(F32, f32)
