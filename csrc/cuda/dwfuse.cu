// CUDA binding of DWFuse (SPEC section 2): weights, loss and both backward ops.
// Multiclass labels are int64 [B]; multilabel labels are [B, C] in the logits' dtype.
#include "binding.h"
#include "dwfuse.cuh"

namespace omnifuse_fast {
namespace cuda_binding {
namespace dwfuse_impl {

namespace gk = omnifuse_fast::gpu::dwfuse;

struct Inputs {
  Tensor logits, labels;
  bool multilabel;
};

Inputs prepare(const Tensor& logits, const Tensor& labels, const char* op) {
  check_cuda(logits, op, "logits");
  check_cuda(labels, op, "labels");
  TORCH_CHECK(logits.dim() == 3, "omnifuse_fast::", op, " (CUDA): logits must be [B, M, C]");
  const int64_t M = logits.size(1);
  TORCH_CHECK(M >= 2 && M <= gk::kMaxM, "omnifuse_fast::", op, " (CUDA): M must be in 2..8, got ",
              M);
  TORCH_CHECK(logits.size(2) < (int64_t{1} << 31), "omnifuse_fast::", op,
              " (CUDA): C must fit in 32 bits");
  Inputs in{logits.contiguous(), Tensor(), labels.dim() == 2};
  if (in.multilabel) {
    TORCH_CHECK(labels.size(0) == logits.size(0) && labels.size(1) == logits.size(2),
                "omnifuse_fast::", op, " (CUDA): multilabel labels must be [B, C]");
    in.labels = labels.to(logits.scalar_type()).contiguous();
  } else {
    check_dtype(labels, at::kLong, op, "labels");
    TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "omnifuse_fast::", op,
                " (CUDA): labels must be int64 [B] or [B, C]");
    in.labels = labels.contiguous();
  }
  return in;
}

// The flag slot the labels are checked in: class ids, or 0/1 multilabel targets.
int label_slot(const Inputs& in) {
  return in.multilabel ? gpu::kFlagMultilabel : gpu::kFlagLabels;
}

template <typename scalar_t>
gk::Args<cuda_t<scalar_t>> args(const Inputs& in, double beta, bool detach,
                                int* flags = nullptr) {
  gk::Args<cuda_t<scalar_t>> a{};
  a.logits = in_ptr<scalar_t>(in.logits);
  a.labels_mc = in.multilabel ? nullptr : in.labels.const_data_ptr<int64_t>();
  a.labels_ml = in.multilabel ? in_ptr<scalar_t>(in.labels) : nullptr;
  a.B = in.logits.size(0);
  a.M = static_cast<int>(in.logits.size(1));
  a.C = static_cast<int>(in.logits.size(2));
  a.beta = beta;
  a.detach = detach;
  a.flags = flags;
  return a;
}

Tensor dwfuse_weights_cuda(const Tensor& logits, const Tensor& labels, double beta) {
  const Inputs in = prepare(logits, labels, "dwfuse_weights");
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor out = in.multilabel
                   ? at::empty_like(in.logits)
                   : at::empty({in.logits.size(0), in.logits.size(1)}, in.logits.options());
  DeviceFlags flags(in.logits);
  OMNIFUSE_DISPATCH_FLOATING(in.logits.scalar_type(), "dwfuse_weights", [&] {
    check_launch(gk::weights_forward(args<scalar_t>(in, beta, true, flags.ptr()),
                                     out_ptr<scalar_t>(out), at::cuda::getCurrentCUDAStream()),
                 "dwfuse_weights");
  });
  flags.raise_if("dwfuse_weights", label_slot(in));
  flags.raise_if("dwfuse_weights", gpu::kFlagLogits);
  return out;
}

Tensor dwfuse_weights_backward_cuda(const Tensor& grad_weights, const Tensor& logits,
                                    const Tensor& labels, double beta) {
  const Inputs in = prepare(logits, labels, "dwfuse_weights_backward");
  check_cuda(grad_weights, "dwfuse_weights_backward", "grad_weights");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor gw = grad_weights.to(in.logits.scalar_type()).contiguous();
  TORCH_CHECK(
      gw.numel() == (in.multilabel ? in.logits.numel() : in.logits.size(0) * in.logits.size(1)),
      "omnifuse_fast::dwfuse_weights_backward (CUDA): grad_weights must match omega");
  Tensor out = at::empty_like(in.logits);
  OMNIFUSE_DISPATCH_FLOATING(in.logits.scalar_type(), "dwfuse_weights_backward", [&] {
    check_launch(gk::weights_backward(args<scalar_t>(in, beta, true), in_ptr<scalar_t>(gw),
                                      out_ptr<scalar_t>(out), at::cuda::getCurrentCUDAStream()),
                 "dwfuse_weights_backward");
  });
  return out;
}

Tensor dwfuse_loss_cuda(const Tensor& logits, const Tensor& labels, double beta,
                        bool detach_weight) {
  const Inputs in = prepare(logits, labels, "dwfuse_loss");
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor out = at::empty({}, in.logits.options());
  DeviceFlags flags(in.logits);
  OMNIFUSE_DISPATCH_FLOATING(in.logits.scalar_type(), "dwfuse_loss", [&] {
    using A = gpu::acc_type<cuda_t<scalar_t>>;
    const auto a = args<scalar_t>(in, beta, detach_weight, flags.ptr());
    const int64_t np = gk::loss_num_partials(a);
    Tensor partials =
        at::empty({np > 0 ? np : 1}, in.logits.options().dtype(acc_dtype(in.logits.scalar_type())));
    check_launch(gk::loss_forward(a, partials.mutable_data_ptr<A>(), out_ptr<scalar_t>(out),
                                  at::cuda::getCurrentCUDAStream()),
                 "dwfuse_loss");
  });
  flags.raise_if("dwfuse_loss", label_slot(in));
  flags.raise_if("dwfuse_loss", gpu::kFlagLogits);
  return out;
}

Tensor dwfuse_loss_backward_cuda(const Tensor& grad, const Tensor& logits, const Tensor& labels,
                                 double beta, bool detach_weight) {
  const Inputs in = prepare(logits, labels, "dwfuse_loss_backward");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor g = grad_scalar(grad, in.logits);
  Tensor out = at::empty_like(in.logits);
  OMNIFUSE_DISPATCH_FLOATING(in.logits.scalar_type(), "dwfuse_loss_backward", [&] {
    using A = gpu::acc_type<cuda_t<scalar_t>>;
    check_launch(gk::loss_backward(args<scalar_t>(in, beta, detach_weight), g.const_data_ptr<A>(),
                                   out_ptr<scalar_t>(out), at::cuda::getCurrentCUDAStream()),
                 "dwfuse_loss_backward");
  });
  return out;
}

}  // namespace dwfuse_impl
}  // namespace cuda_binding
}  // namespace omnifuse_fast

TORCH_LIBRARY_IMPL(omnifuse_fast, CUDA, m) {
  namespace impl = omnifuse_fast::cuda_binding::dwfuse_impl;
  m.impl("dwfuse_weights", &impl::dwfuse_weights_cuda);
  m.impl("dwfuse_weights_backward", &impl::dwfuse_weights_backward_cuda);
  m.impl("dwfuse_loss", &impl::dwfuse_loss_cuda);
  m.impl("dwfuse_loss_backward", &impl::dwfuse_loss_backward_cuda);
}
