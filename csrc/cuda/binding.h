// Shared by the thin CUDA bindings (csrc/cuda/*.cu): ATen dtype -> CUDA element type, input
// checks, and the launch status check. Torch headers live here and in the .cu files only; the
// kernels (*.cuh) stay torch-free.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <string>

#include "common.cuh"

namespace omnifuse_fast {
namespace cuda_binding {

using at::Tensor;

// c10::Half / c10::BFloat16 share their bit layout with __half / __nv_bfloat16.
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using cuda_t = typename CudaType<scalar_t>::type;

template <typename scalar_t>
const cuda_t<scalar_t>* in_ptr(const Tensor& t) {
  return reinterpret_cast<const cuda_t<scalar_t>*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
cuda_t<scalar_t>* out_ptr(Tensor& t) {
  return reinterpret_cast<cuda_t<scalar_t>*>(t.mutable_data_ptr<scalar_t>());
}

inline void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "omnifuse_fast::", op, " (CUDA): ", name,
              " must be a CUDA tensor, got one on ", t.device());
}

inline void check_dtype(const Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "omnifuse_fast::", op, " (CUDA): ", name, " must be ",
              dtype, ", got ", t.scalar_type());
}

// Accumulation dtype of an input dtype: fp32, or fp64 for fp64 (never below the input).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The incoming gradient of a scalar loss as a one-element device tensor in the accumulation
// dtype (the kernels read it on the device: no host synchronization).
inline Tensor grad_scalar(const Tensor& grad, const Tensor& like) {
  return grad.reshape({1}).to(like.device(), acc_dtype(like.scalar_type())).contiguous();
}

// Turns a launcher's status into a Python RuntimeError, then the usual launch check.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "omnifuse_fast::", op, " (CUDA): ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn(scalar_t* tag) for fp32, fp16 and bf16 (a generic lambda: nothing is instantiated
// for other dtypes); false for the others (fp64), which the caller handles itself.
template <typename Fn>
bool dispatch_fused(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      return true;
    case at::kHalf:
      fn(static_cast<c10::Half*>(nullptr));
      return true;
    case at::kBFloat16:
      fn(static_cast<c10::BFloat16*>(nullptr));
      return true;
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Device value checks: the slots of common.cuh, the messages of omnifuse_fast/_device_checks.py
// (MESSAGES; tests/test_device_checks.py compares the two).
inline const char* flag_message(int slot) {
  switch (slot) {
    case gpu::kFlagLabels:
      return "labels must be class indices in [0, C)";
    case gpu::kFlagComb:
      return "comb must be combination ids in [1, 2**M)";
    case gpu::kFlagSrc:
      return "src must be source indices in [0, B)";
    case gpu::kFlagMultilabel:
      return "labels (multilabel) must hold only 0 and 1";
    case gpu::kFlagLogits:
      return "logits must be finite (no NaN or inf)";
    case gpu::kFlagSoftLabels:
      return "soft_labels must be finite (no NaN or inf)";
    case gpu::kFlagPresent:
      return "present has a sample with no present modality";
    case gpu::kFlagGrads:
      return "gradients must be finite (no NaN or inf)";
    case gpu::kFlagX:
      return "x must be finite (no NaN or inf)";
    default:
      return "weights must be on the simplex: >= 0 and summing to 1 over M";
  }
}

// The flag tensor of one op call. The kernels store 0 in the slot of a bad index; raise_if()
// queues at::_assert_async on a slot: a device-side assert, no host synchronization. The error
// surfaces at the next synchronizing point (the schemas stay unchanged: the CPU kernels share
// them, and the assert needs no output of its own).
class DeviceFlags {
 public:
  explicit DeviceFlags(const Tensor& like)
      : flags_(at::ones({gpu::kNumFlagSlots}, like.options().dtype(at::kInt))) {}

  int* ptr() { return flags_.mutable_data_ptr<int>(); }

  void raise_if(const char* op, int slot) const {
    at::_assert_async(flags_.select(0, slot), std::string("omnifuse_fast.") + op + ": " +
                                                  flag_message(slot) +
                                                  " (value check on the device)");
  }

 private:
  Tensor flags_;
};

#define OMNIFUSE_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace cuda_binding
}  // namespace omnifuse_fast
