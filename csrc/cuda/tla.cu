// CUDA binding of TLA (SPEC section 3) and combination_ids: statistics, masked loss, backward.
#include "binding.h"
#include "tla.cuh"

namespace omnifuse_fast {
namespace cuda_binding {
namespace tla_impl {

namespace gk = omnifuse_fast::gpu::tla;

Tensor combination_ids_cuda(const Tensor& present_in) {
  check_cuda(present_in, "combination_ids", "present");
  check_dtype(present_in, at::kBool, "combination_ids", "present");
  TORCH_CHECK(present_in.dim() == 2 && present_in.size(1) <= 62,
              "omnifuse_fast::combination_ids (CUDA): present must be bool [B, M]");
  const c10::cuda::CUDAGuard guard(present_in.device());
  const Tensor present = present_in.contiguous();
  Tensor comb = at::empty({present.size(0)}, present.options().dtype(at::kLong));
  DeviceFlags flags(comb);
  check_launch(
      gk::combination_ids(reinterpret_cast<const uint8_t*>(present.const_data_ptr<bool>()),
                          present.size(0), static_cast<int>(present.size(1)),
                          comb.mutable_data_ptr<int64_t>(), flags.ptr(),
                          at::cuda::getCurrentCUDAStream()),
      "combination_ids");
  flags.raise_if("combination_ids", gpu::kFlagPresent);
  return comb;
}

struct Inputs {
  Tensor logits, labels, comb;
};

Inputs prepare(const Tensor& logits, const Tensor& labels, const Tensor& comb, const char* op) {
  check_cuda(logits, op, "logits");
  check_cuda(labels, op, "labels");
  check_cuda(comb, op, "comb");
  check_dtype(labels, at::kLong, op, "labels");
  TORCH_CHECK(logits.dim() == 2 && labels.dim() == 1 && comb.dim() == 1 &&
                  labels.size(0) == logits.size(0) && comb.size(0) == logits.size(0),
              "omnifuse_fast::", op, " (CUDA): expected logits [B, C], labels [B], comb [B]");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31), "omnifuse_fast::", op,
              " (CUDA): C must fit in 32 bits");
  return {logits.contiguous(), labels.contiguous(), comb.to(at::kLong).contiguous()};
}

int distance_kind(c10::string_view d) {
  if (d == "l1") return gk::kL1;
  if (d == "l2") return gk::kL2;
  TORCH_CHECK(d == "ce", "omnifuse_fast::tla_stats (CUDA): distance must be ce, l1 or l2");
  return gk::kCE;
}

std::tuple<Tensor, Tensor> tla_stats_cuda(const Tensor& logits, const Tensor& labels,
                                          const Tensor& comb, int64_t num_modalities,
                                          c10::string_view distance) {
  const Inputs in = prepare(logits, labels, comb, "tla_stats");
  TORCH_CHECK(num_modalities >= 1 && num_modalities <= 8,
              "omnifuse_fast::tla_stats (CUDA): num_modalities must be in 1..8");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t bins = int64_t{1} << num_modalities;
  Tensor sums = at::zeros({bins}, in.logits.options().dtype(at::kFloat));
  Tensor counts = at::zeros({bins}, in.logits.options().dtype(at::kLong));
  const int kind = distance_kind(distance);
  DeviceFlags flags(in.logits);
  OMNIFUSE_DISPATCH_FLOATING(in.logits.scalar_type(), "tla_stats", [&] {
    check_launch(
        gk::stats(in_ptr<scalar_t>(in.logits), in.labels.const_data_ptr<int64_t>(),
                  in.comb.const_data_ptr<int64_t>(), in.logits.size(0),
                  static_cast<int>(in.logits.size(1)), static_cast<int>(num_modalities), kind,
                  sums.mutable_data_ptr<float>(),
                  reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()),
                  flags.ptr(), at::cuda::getCurrentCUDAStream()),
        "tla_stats");
  });
  flags.raise_if("tla_stats", gpu::kFlagLabels);
  flags.raise_if("tla_stats", gpu::kFlagComb);
  flags.raise_if("tla_stats", gpu::kFlagLogits);
  return {sums, counts};
}

Tensor tla_loss_cuda(const Tensor& logits, const Tensor& labels, const Tensor& comb, int64_t lazy) {
  const Inputs in = prepare(logits, labels, comb, "tla_loss");
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor out = at::empty({}, in.logits.options());
  DeviceFlags flags(in.logits);
  OMNIFUSE_DISPATCH_FLOATING(in.logits.scalar_type(), "tla_loss", [&] {
    using T = cuda_t<scalar_t>;
    using A = gpu::acc_type<T>;
    const int64_t B = in.logits.size(0);
    const int C = static_cast<int>(in.logits.size(1));
    const T* z = in_ptr<scalar_t>(in.logits);
    const int64_t np = B > 0 ? gk::loss_num_partials(z, B, C) : 1;
    Tensor partials =
        at::empty({np}, in.logits.options().dtype(acc_dtype(in.logits.scalar_type())));
    check_launch(
        gk::loss_forward(z, in.labels.const_data_ptr<int64_t>(), in.comb.const_data_ptr<int64_t>(),
                         B, C, lazy, partials.mutable_data_ptr<A>(), out_ptr<scalar_t>(out),
                         flags.ptr(), at::cuda::getCurrentCUDAStream()),
        "tla_loss");
  });
  flags.raise_if("tla_loss", gpu::kFlagLabels);
  flags.raise_if("tla_loss", gpu::kFlagComb);
  flags.raise_if("tla_loss", gpu::kFlagLogits);
  return out;
}

Tensor tla_loss_backward_cuda(const Tensor& grad, const Tensor& logits, const Tensor& labels,
                              const Tensor& comb, int64_t lazy) {
  const Inputs in = prepare(logits, labels, comb, "tla_loss_backward");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor g = grad_scalar(grad, in.logits);
  Tensor out = at::empty_like(in.logits);
  Tensor count_partials = at::empty({gk::kCountGrid}, in.logits.options().dtype(at::kLong));
  OMNIFUSE_DISPATCH_FLOATING(in.logits.scalar_type(), "tla_loss_backward", [&] {
    using A = gpu::acc_type<cuda_t<scalar_t>>;
    check_launch(
        gk::loss_backward(
            g.const_data_ptr<A>(), in_ptr<scalar_t>(in.logits), in.labels.const_data_ptr<int64_t>(),
            in.comb.const_data_ptr<int64_t>(), in.logits.size(0),
            static_cast<int>(in.logits.size(1)), lazy,
            reinterpret_cast<unsigned long long*>(count_partials.mutable_data_ptr<int64_t>()),
            out_ptr<scalar_t>(out), at::cuda::getCurrentCUDAStream()),
        "tla_loss_backward");
  });
  return out;
}

}  // namespace tla_impl
}  // namespace cuda_binding
}  // namespace omnifuse_fast

TORCH_LIBRARY_IMPL(omnifuse_fast, CUDA, m) {
  namespace impl = omnifuse_fast::cuda_binding::tla_impl;
  m.impl("combination_ids", &impl::combination_ids_cuda);
  m.impl("tla_stats", &impl::tla_stats_cuda);
  m.impl("tla_loss", &impl::tla_loss_cuda);
  m.impl("tla_loss_backward", &impl::tla_loss_backward_cuda);
}
