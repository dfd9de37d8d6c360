// CRA cascade (SPEC section 1) as one fully fused MLP (tiny-cuda-nn style):
//   s_0 = x,  a_k = W1_k s_{k-1} + b1_k,  c_k = act(a_k),  s_k = s_{k-1} + W2_k c_k + b2_k.
//
// One block owns a tile of kRows = 16 rows for the whole cascade: the running sum s stays in
// shared memory in fp32 across all K autoencoders (never rounded between them, as in the
// reference), the latent tile too; bias, activation and the residual add are applied to the
// tile in place, and only x, the weights (read through L1/L2), the latents and s_K touch
// global memory.
// Matrix products:
//   bf16 / fp16: tensor cores through WMMA (mma.h), 16x16x16 fragments with fp32 accumulation.
//     The A operand is a T copy of the fp32 tile (s or c rounded to T, the only extra rounding
//     against the fp32 reference); weight fragments load straight from global memory; the
//     residual add happens in the accumulator (loaded from, and stored back to, the fp32 s).
//     When H / 16 tiles cannot keep the 8 warps busy, the reduction dim of the latent GEMM is
//     split across warps and the partial tiles are summed, in a fixed order, in the epilogue.
//   fp32: SIMT FMAs (tensor cores would mean TF32, outside the fp32 tolerance): lane = output
//     column, each lane keeps up to 16 row accumulators, x read as float4 broadcasts.
// Shapes: F and H multiples of 16, F <= 1024, H <= 256 (the tile and its T copy must fit in
// shared memory), pointers 32-byte aligned. Anything else (and fp64) reports a reason and
// launches nothing, so the binding can fall back to its ATen composite.
// Backward: the forward is recomputed with s_{k-1} and a_k saved (fp32 workspaces); a second
// fused kernel carries g = dL/ds backward through the chain in shared memory
//   dc_k = W2_k^T g + dL/dc_k,  da_k = dc_k act'(a_k),  g <- g + W1_k^T da_k,
// saving g_k and da_k; the weight gradients are then four batched GEMMs in the binding
// (dW2_k = g_k^T c_k, dW1_k = da_k^T s_{k-1}, db = column sums), through cuBLAS.
#pragma once

#include <mma.h>

#include "common.cuh"

namespace omnifuse_fast {
namespace gpu {
namespace cra {

enum Act : int { kRelu = 0, kGelu = 1, kSilu = 2, kTanh = 3 };

constexpr int kRows = 16;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxF = 1024;
constexpr int kMaxH = 256;

__device__ __forceinline__ float act_forward(int act, float a) {
  switch (act) {
    case kRelu:
      return fmaxf(a, 0.f);
    case kGelu:  // exact (erf) GELU, as F.gelu's default
      return 0.5f * a * (1.f + erff(a * 0.70710678118654752f));
    case kSilu:
      return a / (1.f + expf(-a));
    default:
      return tanhf(a);
  }
}

__device__ __forceinline__ float act_grad(int act, float a) {
  switch (act) {
    case kRelu:
      return a > 0.f ? 1.f : 0.f;
    case kGelu: {
      const float cdf = 0.5f * (1.f + erff(a * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * a * a);
      return cdf + a * pdf;
    }
    case kSilu: {
      const float s = 1.f / (1.f + expf(-a));
      return s * (1.f + a * (1.f - s));
    }
    default: {
      const float t = tanhf(a);
      return 1.f - t * t;
    }
  }
}

// ------------------------------------------------------------------------ shared memory plan
struct Smem {
  int ld_s;    // fp32 row tile of width F (s forward, g backward)
  int ld_sh;   // its T copy (tensor-core path only)
  int ld_c;    // fp32 latent tile of width H (ksplit partial slices of it)
  int ld_ch;   // its T copy
  int ksplit;  // split of the latent GEMM's reduction dim across warps
  size_t off_s, off_sh, off_c, off_ch, bytes;
};

__host__ __device__ inline size_t round128(size_t x) {
  return (x + 127) & ~static_cast<size_t>(127);
}

inline Smem smem_plan(int F, int H, int elem_bytes, bool mma) {
  Smem p{};
  p.ld_s = F + 4;  // +4 floats: rows start 16 bytes apart in the banks; a multiple of 4 for WMMA
  p.ld_c = H + 4;
  p.ld_sh = mma ? F + 8 : 0;  // +8 halves (16 bytes): a multiple of 8 elements for WMMA
  p.ld_ch = mma ? H + 8 : 0;
  p.ksplit = 1;
  if (mma) {
    const int ntiles = H / 16, ktiles = F / 16;
    int ks = kWarps / ntiles;
    if (ks < 1) ks = 1;
    if (ks > ktiles) ks = ktiles;
    p.ksplit = ks;
  }
  size_t off = 0;
  p.off_s = off;
  off = round128(off + sizeof(float) * kRows * p.ld_s);
  p.off_sh = off;
  off = round128(off + static_cast<size_t>(elem_bytes) * kRows * p.ld_sh);
  p.off_c = off;
  off = round128(off + sizeof(float) * p.ksplit * kRows * p.ld_c);
  p.off_ch = off;
  off = round128(off + static_cast<size_t>(elem_bytes) * kRows * p.ld_ch);
  p.bytes = off;
  return p;
}

// ------------------------------------------------------------------------ tile GEMMs
// Y[16, N] (+)= X[16, Kd] * op(W), with op(W) = W^T for W stored [N][Kd] (kWT: nn.Linear's
// weight applied as x W^T) or W for W stored [Kd][N]. X: shared T tile; Y: shared fp32 tile.
// With ks > 1 (only when !accumulate) warp task (tile, part) covers a contiguous part of Kd
// and writes slice `part` of Y (slices y_slice floats apart); the caller sums the slices.
template <typename T, bool kWT>
__device__ __forceinline__ void mma_gemm(const T* X, int ldx, const T* __restrict__ W, int N,
                                         int Kd, float* Y, int ldy, bool accumulate, int ks,
                                         int y_slice) {
  using namespace nvcuda;
  const int warp = threadIdx.x / kWarp;
  const int ntiles = N / 16, ktiles = Kd / 16;
  const int kper = (ktiles + ks - 1) / ks;
  for (int task = warp; task < ntiles * ks; task += kWarps) {
    const int nt = task % ntiles, part = task / ntiles;
    const int k0 = part * kper;
    const int k1 = k0 + kper < ktiles ? k0 + kper : ktiles;
    float* y = Y + part * y_slice + nt * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate)
      wmma::load_matrix_sync(acc, y, ldy, wmma::mem_row_major);
    else
      wmma::fill_fragment(acc, 0.f);
    for (int kt = k0; kt < k1; ++kt) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, X + kt * 16, ldx);
      if constexpr (kWT) {  // B[k][n] = W[n][k]: column-major with ld Kd
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, W + static_cast<size_t>(nt) * 16 * Kd + kt * 16, Kd);
        wmma::mma_sync(acc, a, b, acc);
      } else {  // B[k][n] = W[k][n]: row-major with ld N
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, W + static_cast<size_t>(kt) * 16 * N + nt * 16, N);
        wmma::mma_sync(acc, a, b, acc);
      }
    }
    wmma::store_matrix_sync(y, acc, ldy, wmma::mem_row_major);
  }
}

// fp32 SIMT version: a warp task is 32 output columns (one per lane) times a group of rows; the
// row groups shrink (16, 8, 4, 2 rows) until the tasks cover the 8 warps.
template <bool kWT>
__device__ __forceinline__ void simt_gemm(const float* X, int ldx, const float* __restrict__ W,
                                          int N, int Kd, float* Y, int ldy, bool accumulate) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int nchunks = (N + kWarp - 1) / kWarp;
  int groups = 1;
  while (groups < 8 && nchunks * groups < kWarps) groups <<= 1;
  const int rpt = kRows / groups;
  for (int task = warp; task < nchunks * groups; task += kWarps) {
    const int n = (task % nchunks) * kWarp + lane;
    const int r0 = (task / nchunks) * rpt;
    if (n >= N) continue;
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
    for (int k = 0; k < Kd; k += 4) {
      float w[4];
      if constexpr (kWT) {
        const float4 t =
            __ldg(reinterpret_cast<const float4*>(W + static_cast<size_t>(n) * Kd + k));
        w[0] = t.x;
        w[1] = t.y;
        w[2] = t.z;
        w[3] = t.w;
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = __ldg(W + static_cast<size_t>(k + i) * N + n);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rpt) {
          const float4 xv = *reinterpret_cast<const float4*>(X + (r0 + r) * ldx + k);
          acc[r] = fmaf(xv.x, w[0], acc[r]);
          acc[r] = fmaf(xv.y, w[1], acc[r]);
          acc[r] = fmaf(xv.z, w[2], acc[r]);
          acc[r] = fmaf(xv.w, w[3], acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < rpt) {
        float* y = Y + (r0 + r) * ldy + n;
        *y = accumulate ? *y + acc[r] : acc[r];
      }
    }
  }
}

// Loads a [rows, F] tile of src (T, row stride F) into the fp32 tile (and its T copy); the rows
// past the batch are zeros. F is a multiple of the 16-byte vector width.
template <typename T, bool kMma>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, int rows, int F, float* S,
                                          int ld_s, T* Sh, int ld_sh) {
  constexpr int V = vec16<T>();
  for (int i = threadIdx.x; i < kRows * F / V; i += blockDim.x) {
    const int r = (i * V) / F, f = (i * V) % F;
    float v[V];
    if (r < rows) {
      load_vec<T, V>(src + static_cast<size_t>(r) * F + f, v);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      S[r * ld_s + f + e] = v[e];
      if (kMma) Sh[r * ld_sh + f + e] = from_acc<T>(v[e]);
    }
  }
}

// ------------------------------------------------------------------------ forward kernel
// save_s [K, B, F] (s_{k-1}) and save_a [K, B, H] (a_k), fp32, are written when not null;
// out and lat may be null (the backward's recompute only needs the saved tensors).
template <typename T, bool kMma>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ b1,
                   const T* __restrict__ w2, const T* __restrict__ b2, T* __restrict__ out,
                   T* __restrict__ lat, float* __restrict__ save_s, float* __restrict__ save_a,
                   int64_t B, int F, int H, int K, int act, Smem L) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* S = reinterpret_cast<float*>(smem + L.off_s);
  T* Sh = reinterpret_cast<T*>(smem + L.off_sh);
  float* Cf = reinterpret_cast<float*>(smem + L.off_c);
  T* Ch = reinterpret_cast<T*>(smem + L.off_ch);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = B - row0 < kRows ? static_cast<int>(B - row0) : kRows;
  const int64_t KH = static_cast<int64_t>(K) * H;

  load_tile<T, kMma>(x + row0 * F, rows, F, S, L.ld_s, Sh, L.ld_sh);
  __syncthreads();

  for (int k = 0; k < K; ++k) {
    const T* W1 = w1 + static_cast<size_t>(k) * H * F;
    const T* W2 = w2 + static_cast<size_t>(k) * F * H;
    if (save_s != nullptr) {
      float* dst = save_s + (static_cast<int64_t>(k) * B + row0) * F;
      for (int i = threadIdx.x; i < rows * F; i += blockDim.x) dst[i] = S[(i / F) * L.ld_s + i % F];
    }
    // a = s W1^T (+ b1 below)
    if constexpr (kMma)
      mma_gemm<T, true>(Sh, L.ld_sh, W1, H, F, Cf, L.ld_c, false, L.ksplit, kRows * L.ld_c);
    else
      simt_gemm<true>(S, L.ld_s, reinterpret_cast<const float*>(W1), H, F, Cf, L.ld_c, false);
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * H; i += blockDim.x) {
      const int r = i / H, h = i % H;
      float a = Cf[r * L.ld_c + h];
      for (int p = 1; p < L.ksplit; ++p) a += Cf[p * kRows * L.ld_c + r * L.ld_c + h];
      a += to_acc<float>(b1[static_cast<size_t>(k) * H + h]);
      const float c = act_forward(act, a);
      Cf[r * L.ld_c + h] = c;
      if (kMma) Ch[r * L.ld_ch + h] = from_acc<T>(c);
      if (r < rows) {
        if (lat != nullptr) lat[(row0 + r) * KH + static_cast<int64_t>(k) * H + h] = from_acc<T>(c);
        if (save_a != nullptr) save_a[(static_cast<int64_t>(k) * B + row0 + r) * H + h] = a;
      }
    }
    __syncthreads();
    // s += c W2^T (+ b2 below): the residual add happens in the accumulator
    if constexpr (kMma)
      mma_gemm<T, true>(Ch, L.ld_ch, W2, F, H, S, L.ld_s, true, 1, 0);
    else
      simt_gemm<true>(Cf, L.ld_c, reinterpret_cast<const float*>(W2), F, H, S, L.ld_s, true);
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * F; i += blockDim.x) {
      const int r = i / F, f = i % F;
      const float v = S[r * L.ld_s + f] + to_acc<float>(b2[static_cast<size_t>(k) * F + f]);
      S[r * L.ld_s + f] = v;
      if (kMma) Sh[r * L.ld_sh + f] = from_acc<T>(v);
    }
    __syncthreads();
  }
  if (out != nullptr)
    for (int i = threadIdx.x; i < rows * F; i += blockDim.x)
      out[row0 * F + i] = from_acc<T>(S[(i / F) * L.ld_s + i % F]);
}

// ------------------------------------------------------------------------ backward kernel
// g = dL/ds carried from s_K back to x; writes dx, save_g [K, B, F] (g_k, the gradient at the
// output of autoencoder k) and save_da [K, B, H] (dL/da_k), fp32.
template <typename T, bool kMma>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ grad_lat,
                    const T* __restrict__ w1, const T* __restrict__ w2,
                    const float* __restrict__ save_a, T* __restrict__ dx,
                    float* __restrict__ save_g, float* __restrict__ save_da, int64_t B, int F,
                    int H, int K, int act, Smem L) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* G = reinterpret_cast<float*>(smem + L.off_s);
  T* Gh = reinterpret_cast<T*>(smem + L.off_sh);
  float* Cf = reinterpret_cast<float*>(smem + L.off_c);
  T* Ch = reinterpret_cast<T*>(smem + L.off_ch);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = B - row0 < kRows ? static_cast<int>(B - row0) : kRows;
  const int64_t KH = static_cast<int64_t>(K) * H;

  load_tile<T, kMma>(grad_out + row0 * F, rows, F, G, L.ld_s, Gh, L.ld_sh);
  __syncthreads();

  for (int k = K - 1; k >= 0; --k) {
    const T* W1 = w1 + static_cast<size_t>(k) * H * F;
    const T* W2 = w2 + static_cast<size_t>(k) * F * H;
    {
      float* dst = save_g + (static_cast<int64_t>(k) * B + row0) * F;
      for (int i = threadIdx.x; i < rows * F; i += blockDim.x) dst[i] = G[(i / F) * L.ld_s + i % F];
    }
    // dc = g W2 (W2 stored [F][H])
    if constexpr (kMma)
      mma_gemm<T, false>(Gh, L.ld_sh, W2, H, F, Cf, L.ld_c, false, L.ksplit, kRows * L.ld_c);
    else
      simt_gemm<false>(G, L.ld_s, reinterpret_cast<const float*>(W2), H, F, Cf, L.ld_c, false);
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * H; i += blockDim.x) {
      const int r = i / H, h = i % H;
      float da = 0.f;
      if (r < rows) {
        float dc = Cf[r * L.ld_c + h];
        for (int p = 1; p < L.ksplit; ++p) dc += Cf[p * kRows * L.ld_c + r * L.ld_c + h];
        dc += to_acc<float>(grad_lat[(row0 + r) * KH + static_cast<int64_t>(k) * H + h]);
        const int64_t ia = (static_cast<int64_t>(k) * B + row0 + r) * H + h;
        da = dc * act_grad(act, save_a[ia]);
        save_da[ia] = da;
      }
      Cf[r * L.ld_c + h] = da;
      if (kMma) Ch[r * L.ld_ch + h] = from_acc<T>(da);
    }
    __syncthreads();
    // g += da W1 (W1 stored [H][F])
    if constexpr (kMma)
      mma_gemm<T, false>(Ch, L.ld_ch, W1, F, H, G, L.ld_s, true, 1, 0);
    else
      simt_gemm<false>(Cf, L.ld_c, reinterpret_cast<const float*>(W1), F, H, G, L.ld_s, true);
    __syncthreads();
    if (kMma) {
      for (int i = threadIdx.x; i < kRows * F; i += blockDim.x) {
        const int r = i / F, f = i % F;
        Gh[r * L.ld_sh + f] = from_acc<T>(G[r * L.ld_s + f]);
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < rows * F; i += blockDim.x)
    dx[row0 * F + i] = from_acc<T>(G[(i / F) * L.ld_s + i % F]);
}

// ------------------------------------------------------------------------ host side
template <typename T>
constexpr bool uses_mma() {
  return sizeof(T) == 2;
}

inline int act_from_name(const char* name) {
  const char c = name[0];
  if (c == 'g') return kGelu;
  if (c == 's') return kSilu;
  if (c == 't') return kTanh;
  return kRelu;
}

// nullptr when the fused kernels take this problem, else the reason they do not. ptrs: every
// tensor pointer the kernel reads or writes as vectors or fragments (x, w1, w2, out/dx, ...).
template <typename T>
const char* unsupported(int64_t B, int F, int H, int K, const void* const* ptrs, int nptrs) {
  if (sizeof(T) != 2 && sizeof(T) != 4)
    return "the fused CRA kernel takes fp32, bf16 and fp16 only";
  if (F % 16 != 0 || H % 16 != 0) return "F and H must be multiples of 16 for the fused CRA kernel";
  if (F > kMaxF || H > kMaxH) return "the fused CRA kernel takes F <= 1024 and H <= 256";
  if (K < 1 || B < 0) return "empty cascade";
  if (B > (static_cast<int64_t>(1) << 31) * kRows) return "batch too large for the fused CRA grid";
  for (int i = 0; i < nptrs; ++i)
    if (ptrs[i] != nullptr && !aligned_to(ptrs[i], 32))
      return "a CRA tensor is not 32-byte aligned (a storage offset?)";
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return "could not query the device's shared memory";
  const Smem L = smem_plan(F, H, static_cast<int>(sizeof(T)), uses_mma<T>());
  if (L.bytes > static_cast<size_t>(optin)) return "the row tile does not fit in shared memory";
  return nullptr;
}

// Forward (and, with save_s/save_a, the recompute of the backward). Returns the reason and
// launches nothing when unsupported; else the launch status.
template <typename T>
cudaError_t forward(const T* x, const T* w1, const T* b1, const T* w2, const T* b2, T* out, T* lat,
                    float* save_s, float* save_a, int64_t B, int F, int H, int K, int act,
                    cudaStream_t stream, const char** reason) {
  const void* ptrs[] = {x, w1, w2, out, save_s};
  *reason = unsupported<T>(B, F, H, K, ptrs, 5);
  if (*reason != nullptr || B == 0) return cudaSuccess;
  constexpr bool kMma = uses_mma<T>();
  const Smem L = smem_plan(F, H, static_cast<int>(sizeof(T)), kMma);
  auto kernel = forward_kernel<T, kMma>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(L.bytes));
  if (err != cudaSuccess) return err;
  const int64_t grid = ceil_div(B, kRows);
  kernel<<<static_cast<unsigned>(grid), kThreads, L.bytes, stream>>>(
      x, w1, b1, w2, b2, out, lat, save_s, save_a, B, F, H, K, act, L);
  return cudaGetLastError();
}

// dx and the workspaces for the weight gradients. save_a: from forward(..., save_a); save_g
// [K, B, F] and save_da [K, B, H] are written (fp32).
template <typename T>
cudaError_t backward_dx(const T* grad_out, const T* grad_lat, const T* w1, const T* w2,
                        const float* save_a, T* dx, float* save_g, float* save_da, int64_t B, int F,
                        int H, int K, int act, cudaStream_t stream, const char** reason) {
  const void* ptrs[] = {grad_out, w1, w2, dx, save_g};
  *reason = unsupported<T>(B, F, H, K, ptrs, 5);
  if (*reason != nullptr || B == 0) return cudaSuccess;
  constexpr bool kMma = uses_mma<T>();
  const Smem L = smem_plan(F, H, static_cast<int>(sizeof(T)), kMma);
  auto kernel = backward_kernel<T, kMma>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(L.bytes));
  if (err != cudaSuccess) return err;
  const int64_t grid = ceil_div(B, kRows);
  kernel<<<static_cast<unsigned>(grid), kThreads, L.bytes, stream>>>(
      grad_out, grad_lat, w1, w2, save_a, dx, save_g, save_da, B, F, H, K, act, L);
  return cudaGetLastError();
}

}  // namespace cra
}  // namespace gpu
}  // namespace omnifuse_fast

// fp32 (SIMT), fp16 and bf16 (tensor cores); fp64 goes to the binding's ATen composite.
#define OMNIFUSE_GPU_INSTANTIATE_CRA(T)                                                            \
  template cudaError_t omnifuse_fast::gpu::cra::forward<T>(                                        \
      const T*, const T*, const T*, const T*, const T*, T*, T*, float*, float*, int64_t, int, int, \
      int, int, cudaStream_t, const char**);                                                       \
  template cudaError_t omnifuse_fast::gpu::cra::backward_dx<T>(                                    \
      const T*, const T*, const T*, const T*, const float*, T*, float*, float*, int64_t, int, int, \
      int, int, cudaStream_t, const char**);
