// ftscript's own CUDA kernels, compiled at run time by NVRTC for the GPU at hand
// (src/cuda/kernels.rs, src/cuda/rtc.cpp). No headers: the bf16/fp16 stores round to nearest
// even, as torch's casts do, so results equal the libtorch-op paths bit for bit.

__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

__device__ __forceinline__ unsigned short f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

struct alignas(16) U4 {
  unsigned int x, y, z, w;
};

struct StoreBf16 {
  typedef unsigned short T;
  __device__ static T cvt(float f) { return f32_to_bf16(f); }
};
struct StoreF16 {
  typedef unsigned short T;
  __device__ static T cvt(float f) { return f32_to_f16(f); }
};
struct StoreF32 {
  typedef float T;
  __device__ static T cvt(float f) { return f; }
};

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
  dequant4<StoreBf16>(p, a, c, o, n, bs);
}
extern "C" __global__ void dequant4_f16(const unsigned char* p, const float* a, const float* c, unsigned short* o, long long n, int bs) {
  dequant4<StoreF16>(p, a, c, o, n, bs);
}
extern "C" __global__ void dequant4_f32(const unsigned char* p, const float* a, const float* c, float* o, long long n, int bs) {
  dequant4<StoreF32>(p, a, c, o, n, bs);
}
