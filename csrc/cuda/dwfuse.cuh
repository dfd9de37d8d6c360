// DWFuse (SPEC section 2): weights from the OTHER modalities' exact log-space complements,
// the omega-weighted cross-entropy, and both backward passes (detach_weight both ways).
//
// Multiclass: one warp holds a group of samples; each sample gets Mp * G lanes (Mp = M rounded
// up to a power of two, G lanes per modality row), so small rows pack several samples per warp
// and long rows spread over up to 32 / Mp lanes. Rows are read with 16-byte vector loads when
// C and the pointers allow it (scalar fallback). log(1 - p) and CE come from the row's
// logsumexp over the wrong classes only (common.cuh: class_row), exact for every p.
// Multilabel: one thread per (sample, 2 labels): all M modalities of those labels in registers.
//
// Gradients (s = upstream gradient / B, k = beta / (M - 1)), per row m with true class y:
//   multiclass, c != y: dz_c = kappa * exp(z_c - lseo), and dz_y = -kappa, where
//     loss:    kappa = s * (omega_m * (1 - p_y) + [!detach] A_m * p_y),
//              A_m   = k * sum_{j != m} omega_j CE_j
//     weights: kappa = p_y * k * sum_{j != m} gomega_j omega_j
//   multilabel (u = z (2y - 1), p = sigmoid(u), s also divided by C):
//     loss:    dz = -s (2y - 1) (omega (1 - p) + [!detach] A p)
//     weights: dz = -(2y - 1) p k sum_{j != m} gomega_j omega_j
// Loss reductions are per-block partials summed by one block in a fixed order: deterministic.
#pragma once

#include "common.cuh"

namespace omnifuse_fast {
namespace gpu {
namespace dwfuse {

constexpr int kThreads = 256;
constexpr int kMaxM = 8;
// Multilabel labels per thread: all M modalities of them stay in registers (3 arrays of
// M * vec values), so a wider vector would cost occupancy in this bandwidth-bound kernel.
constexpr int kMultilabelVec = 2;

enum Mode : int { kWeights = 0, kLoss = 1, kWeightsBackward = 2, kLossBackward = 3 };

// Inputs shared by every DWFuse launcher. Exactly one of labels_mc (int64 [B]) and labels_ml
// ([B, C] in the logits' dtype, 0/1) is set. logits is contiguous [B, M, C]. flags (common.cuh,
// or nullptr): where the forward passes report labels outside [0, C) (multiclass) or other
// than 0/1 (multilabel), and NaN/inf logits; a bad class id is never dereferenced, in any pass.
template <typename T>
struct Args {
  const T* logits;
  const int64_t* labels_mc;
  const T* labels_ml;
  int64_t B;
  int M;
  int C;
  double beta;
  bool detach;
  int* flags;
};

// ------------------------------------------------------------------------- multiclass kernel
template <typename T, int VEC, int kMode, typename A = acc_type<T>>
__global__ void __launch_bounds__(kThreads)
    multiclass_kernel(const T* __restrict__ z, const int64_t* __restrict__ labels, int64_t B, int M,
                      int Mp, int G, int C, A coef, bool detach, const T* __restrict__ grad_w,
                      const A* __restrict__ grad, A inv_b, T* __restrict__ out,
                      A* __restrict__ partials, int* __restrict__ flags) {
  __shared__ A scratch[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int lanes_per_sample = Mp * G;
  const int spw = kWarp / lanes_per_sample;  // samples per warp
  const int slot = lane / lanes_per_sample;
  const int m = (lane % lanes_per_sample) / G;
  const int j = lane % G;
  const int first = slot * lanes_per_sample;  // lane of row 0 of this sample
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;

  A s = A(0);
  if (kMode == kLossBackward) s = grad[0] * inv_b;
  A local = A(0);  // loss partial of this lane

  for (int64_t base = warp * spw; base < B; base += nwarps * spw) {  // uniform per warp
    const int64_t b = base + slot;
    const bool valid = b < B && m < M;
    const int y = valid ? checked_label(labels[b], C, flags) : 0;  // -1 when bad
    const T* row = z + (b * M + m) * static_cast<int64_t>(C);
    const ClassRow<A> r = class_row<T, VEC, false>(row, C, y, j, G, valid, flags);
    const A d = r.zy - r.lseo;  // logit of p_y: p_y = sigmoid(d)
    const A ce = valid ? softplus(-d) : A(0);
    const A lc = valid ? -softplus(d) : A(0);  // log(1 - p_y), exact

    // omega_m from the other rows' complements (summed explicitly, never total - own)
    A others = A(0);
#pragma unroll
    for (int n = 0; n < kMaxM; ++n) {
      if (n < M) {
        const A v = __shfl_sync(kFullMask, lc, first + n * G);
        if (n != m) others += v;
      }
    }
    const A omega = exp_(coef * others);

    if (kMode == kWeights) {
      if (valid && j == 0) out[b * M + m] = from_acc<T>(omega);
    } else if (kMode == kLoss) {
      if (valid && j == 0) local += omega * ce;
    } else {
      A kappa;
      if (kMode == kLossBackward) {
        A a = A(0);
        if (!detach) {  // warp-uniform branch
          const A wce = omega * ce;
#pragma unroll
          for (int n = 0; n < kMaxM; ++n) {
            if (n < M) {
              const A v = __shfl_sync(kFullMask, wce, first + n * G);
              if (n != m) a += v;
            }
          }
          a *= coef;
        }
        kappa = s * (omega * sigmoid(-d) + a * sigmoid(d));
      } else {  // kWeightsBackward
        const A gw = valid ? to_acc<A>(grad_w[b * M + m]) * omega : A(0);
        A a = A(0);
#pragma unroll
        for (int n = 0; n < kMaxM; ++n) {
          if (n < M) {
            const A v = __shfl_sync(kFullMask, gw, first + n * G);
            if (n != m) a += v;
          }
        }
        kappa = coef * a * sigmoid(d);
      }
      if (valid) {
        T* grow = out + (b * M + m) * static_cast<int64_t>(C);
        for (int c0 = j * VEC; c0 < C; c0 += G * VEC) {
          A x[VEC];
          load_vec<T, VEC>(row + c0, x);
#pragma unroll
          for (int i = 0; i < VEC; ++i) x[i] = (c0 + i == y) ? -kappa : kappa * exp_(x[i] - r.lseo);
          store_vec<T, VEC>(grow + c0, x);
        }
      }
    }
  }
  if (kMode == kLoss) {
    const A total = block_sum(local, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
  }
}

// ------------------------------------------------------------------------- multilabel kernel
template <typename T, int VEC, int kMode, typename A = acc_type<T>>
__global__ void __launch_bounds__(kThreads)
    multilabel_kernel(const T* __restrict__ z, const T* __restrict__ labels, int64_t B, int M,
                      int C, A coef, bool detach, const T* __restrict__ grad_w,
                      const A* __restrict__ grad, A inv_bc, T* __restrict__ out,
                      A* __restrict__ partials, int* __restrict__ flags) {
  __shared__ A scratch[kWarp];
  const int64_t chunks_per_row = C / VEC;
  const int64_t total = B * chunks_per_row;
  A s = A(0);
  if (kMode == kLossBackward) s = grad[0] * inv_bc;
  A local = A(0);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / chunks_per_row;
    const int64_t l0 = (idx % chunks_per_row) * VEC;
    A sg[VEC];  // 2y - 1: +1 where the label is 1, -1 where it is 0
    load_vec<T, VEC>(labels + b * C + l0, sg);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (sg[i] != A(0) && sg[i] != A(1)) flag_bad(flags, kFlagMultilabel);
      sg[i] = A(2) * sg[i] - A(1);
    }

    A u[kMaxM][VEC], lc[kMaxM][VEC], omega[kMaxM][VEC];
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
        load_vec<T, VEC>(z + (b * M + m) * C + l0, u[m]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          check_finite(u[m][i], flags, kFlagLogits);
          u[m][i] *= sg[i];               // u > 0 when the prediction leans to the true value
          lc[m][i] = -softplus(u[m][i]);  // log(1 - p) = log sigmoid(-u)
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          A others = A(0);
#pragma unroll
          for (int n = 0; n < kMaxM; ++n)
            if (n < M && n != m) others += lc[n][i];
          omega[m][i] = exp_(coef * others);
        }
      }
    }

    if (kMode == kWeights) {
#pragma unroll
      for (int m = 0; m < kMaxM; ++m)
        if (m < M) store_vec<T, VEC>(out + (b * M + m) * C + l0, omega[m]);
    } else if (kMode == kLoss) {
#pragma unroll
      for (int m = 0; m < kMaxM; ++m)
        if (m < M) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) local += omega[m][i] * softplus(-u[m][i]);
        }
    } else if (kMode == kLossBackward) {
      A wce[kMaxM][VEC];
#pragma unroll
      for (int m = 0; m < kMaxM; ++m)
        if (m < M) {
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            wce[m][i] = detach ? A(0) : omega[m][i] * softplus(-u[m][i]);
        }
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
          A g[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            A a = A(0);
#pragma unroll
            for (int n = 0; n < kMaxM; ++n)
              if (n < M && n != m) a += wce[n][i];
            a *= coef;
            g[i] = -s * sg[i] * (omega[m][i] * sigmoid(-u[m][i]) + a * sigmoid(u[m][i]));
          }
          store_vec<T, VEC>(out + (b * M + m) * C + l0, g);
        }
      }
    } else {  // kWeightsBackward
      A gwo[kMaxM][VEC];
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
          load_vec<T, VEC>(grad_w + (b * M + m) * C + l0, gwo[m]);
#pragma unroll
          for (int i = 0; i < VEC; ++i) gwo[m][i] *= omega[m][i];
        }
      }
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
          A g[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            A a = A(0);
#pragma unroll
            for (int n = 0; n < kMaxM; ++n)
              if (n < M && n != m) a += gwo[n][i];
            g[i] = -sg[i] * coef * a * sigmoid(u[m][i]);
          }
          store_vec<T, VEC>(out + (b * M + m) * C + l0, g);
        }
      }
    }
  }
  if (kMode == kLoss) {
    const A t = block_sum(local, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = t;
  }
}

// ------------------------------------------------------------------------- host side
// Launch geometry: depends on the shapes (and the pointers' alignment) only.
struct Plan {
  int vec;   // elements per load: 1 or the 16-byte width (multiclass), 1 or 2 (multilabel)
  int mp;    // multiclass: M rounded up to a power of two
  int g;     // multiclass: lanes per modality row
  int grid;  // blocks
};

template <typename T>
inline Plan plan(const Args<T>& a, const void* out, const void* grad_w) {
  Plan p{};
  const bool multilabel = a.labels_ml != nullptr;
  if (multilabel) {
    const int vec = kMultilabelVec;
    const int bytes = vec * static_cast<int>(sizeof(T));
    const bool ok = a.C % vec == 0 && aligned_to(a.logits, bytes) &&
                    aligned_to(a.labels_ml, bytes) && (out == nullptr || aligned_to(out, bytes)) &&
                    (grad_w == nullptr || aligned_to(grad_w, bytes));
    p.vec = ok ? vec : 1;
    p.grid = grid_for(a.B * (a.C / p.vec), kThreads);
    return p;
  }
  const int vec = vec16<T>();
  const bool ok =
      a.C % vec == 0 && aligned_to(a.logits, 16) && (out == nullptr || aligned_to(out, 16));
  p.vec = ok ? vec : 1;
  p.mp = next_pow2(a.M);
  const int chunks = static_cast<int>(ceil_div(a.C, p.vec));
  p.g = next_pow2(chunks) < kWarp / p.mp ? next_pow2(chunks) : kWarp / p.mp;
  const int samples_per_block = (kThreads / kWarp) * (kWarp / (p.mp * p.g));
  p.grid = grid_for(a.B, samples_per_block);
  return p;
}

// Partial sums the loss needs (the binding allocates that many accumulation-type elements).
template <typename T>
inline int64_t loss_num_partials(const Args<T>& a) {
  return plan(a, nullptr, nullptr).grid;
}

template <typename T, int kMode>
inline cudaError_t launch(const Args<T>& a, const T* grad_w, const acc_type<T>* grad, T* out,
                          acc_type<T>* partials, cudaStream_t stream) {
  using A = acc_type<T>;
  if (a.B == 0) return cudaSuccess;
  const Plan p = plan(a, kMode == kLoss ? nullptr : out, grad_w);
  const A coef = static_cast<A>(a.beta / static_cast<double>(a.M - 1));
  // only the forward passes report (the backward reads the same labels again)
  int* flags = (kMode == kWeights || kMode == kLoss) ? a.flags : nullptr;
  if (a.labels_ml != nullptr) {
    const A inv = static_cast<A>(1.0 / (static_cast<double>(a.B) * a.C));
    if (p.vec == kMultilabelVec)
      multilabel_kernel<T, kMultilabelVec, kMode, A><<<p.grid, kThreads, 0, stream>>>(
          a.logits, a.labels_ml, a.B, a.M, a.C, coef, a.detach, grad_w, grad, inv, out, partials,
          flags);
    else
      multilabel_kernel<T, 1, kMode, A><<<p.grid, kThreads, 0, stream>>>(
          a.logits, a.labels_ml, a.B, a.M, a.C, coef, a.detach, grad_w, grad, inv, out, partials,
          flags);
  } else {
    const A inv = static_cast<A>(1.0 / static_cast<double>(a.B));
    constexpr int V = vec16<T>();
    if (p.vec == V)
      multiclass_kernel<T, V, kMode, A>
          <<<p.grid, kThreads, 0, stream>>>(a.logits, a.labels_mc, a.B, a.M, p.mp, p.g, a.C, coef,
                                            a.detach, grad_w, grad, inv, out, partials, flags);
    else
      multiclass_kernel<T, 1, kMode, A>
          <<<p.grid, kThreads, 0, stream>>>(a.logits, a.labels_mc, a.B, a.M, p.mp, p.g, a.C, coef,
                                            a.detach, grad_w, grad, inv, out, partials, flags);
  }
  return cudaGetLastError();
}

// omega [B, M] (multiclass) or [B, M, C] (multilabel), in T.
template <typename T>
cudaError_t weights_forward(const Args<T>& a, T* omega, cudaStream_t stream) {
  return launch<T, kWeights>(a, nullptr, nullptr, omega, nullptr, stream);
}

// d(sum omega * grad_omega)/d logits, [B, M, C]. grad_omega has omega's shape, contiguous.
template <typename T>
cudaError_t weights_backward(const Args<T>& a, const T* grad_omega, T* grad_logits,
                             cudaStream_t stream) {
  return launch<T, kWeightsBackward>(a, grad_omega, nullptr, grad_logits, nullptr, stream);
}

// L_enc as a 0-dim T: partials must hold loss_num_partials(a) elements (scratch).
template <typename T>
cudaError_t loss_forward(const Args<T>& a, acc_type<T>* partials, T* loss, cudaStream_t stream) {
  using A = acc_type<T>;
  cudaError_t err = launch<T, kLoss>(a, nullptr, nullptr, nullptr, partials, stream);
  if (err != cudaSuccess) return err;
  const double n =
      a.labels_ml != nullptr ? static_cast<double>(a.B) * a.C : static_cast<double>(a.B);
  const int64_t np = a.B == 0 ? 0 : loss_num_partials(a);
  finalize_scaled_sum_kernel<T, A><<<1, kFinalizeThreads, 0, stream>>>(
      partials, np, static_cast<A>(1.0 / (n > 0 ? n : 1.0)), loss);
  return cudaGetLastError();
}

// d L_enc / d logits given the upstream gradient (a device scalar in the accumulation type).
template <typename T>
cudaError_t loss_backward(const Args<T>& a, const acc_type<T>* grad, T* grad_logits,
                          cudaStream_t stream) {
  return launch<T, kLossBackward>(a, nullptr, grad, grad_logits, nullptr, stream);
}

}  // namespace dwfuse
}  // namespace gpu
}  // namespace omnifuse_fast

// Explicit instantiation of every host launcher for one element type (the compile check and
// the binding use it; the kernels are instantiated through the launchers).
#define OMNIFUSE_GPU_INSTANTIATE_DWFUSE(T)                                                    \
  template cudaError_t omnifuse_fast::gpu::dwfuse::weights_forward<T>(                        \
      const omnifuse_fast::gpu::dwfuse::Args<T>&, T*, cudaStream_t);                          \
  template cudaError_t omnifuse_fast::gpu::dwfuse::weights_backward<T>(                       \
      const omnifuse_fast::gpu::dwfuse::Args<T>&, const T*, T*, cudaStream_t);                \
  template cudaError_t omnifuse_fast::gpu::dwfuse::loss_forward<T>(                           \
      const omnifuse_fast::gpu::dwfuse::Args<T>&, omnifuse_fast::gpu::acc_type<T>*, T*,       \
      cudaStream_t);                                                                          \
  template cudaError_t omnifuse_fast::gpu::dwfuse::loss_backward<T>(                          \
      const omnifuse_fast::gpu::dwfuse::Args<T>&, const omnifuse_fast::gpu::acc_type<T>*, T*, \
      cudaStream_t);
