// CUDA binding of MIMO (SPEC section 6): mimo_gram (fp64 [3]: <g0,g0>, <g0,gw>, <gw,gw>) and
// mimo_direction, each one multi-tensor pass per dtype present in the lists.
#include <algorithm>
#include <vector>

#include "binding.h"
#include "mimo.cuh"

namespace omnifuse_fast {
namespace cuda_binding {
namespace mimo_impl {

namespace gk = omnifuse_fast::gpu::mimo;

struct Lists {
  std::vector<Tensor> g0, gw;
};

Lists prepare(at::TensorList g0_in, at::TensorList gw_in, const char* op) {
  TORCH_CHECK(g0_in.size() == gw_in.size() && !g0_in.empty(), "omnifuse_fast::", op,
              " (CUDA): g0 and gw must be non-empty lists of the same length");
  Lists l;
  l.g0.reserve(g0_in.size());
  l.gw.reserve(gw_in.size());
  for (size_t i = 0; i < g0_in.size(); ++i) {
    check_cuda(g0_in[i], op, "g0[i]");
    check_cuda(gw_in[i], op, "gw[i]");
    TORCH_CHECK(
        g0_in[i].numel() == gw_in[i].numel() && g0_in[i].scalar_type() == gw_in[i].scalar_type() &&
            g0_in[i].device() == g0_in[0].device() && gw_in[i].device() == g0_in[0].device(),
        "omnifuse_fast::", op, " (CUDA): g0[", i, "] and gw[", i,
        "] must match in size, dtype and device");
    l.g0.push_back(g0_in[i].contiguous());
    l.gw.push_back(gw_in[i].contiguous());
  }
  return l;
}

// Indices of the tensors of each dtype, in list order (one multi-tensor pass per dtype).
std::vector<std::pair<at::ScalarType, std::vector<size_t>>> by_dtype(const std::vector<Tensor>& g) {
  std::vector<std::pair<at::ScalarType, std::vector<size_t>>> groups;
  for (size_t i = 0; i < g.size(); ++i) {
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& p) { return p.first == g[i].scalar_type(); });
    if (it == groups.end()) {
      groups.push_back({g[i].scalar_type(), {i}});
    } else {
      it->second.push_back(i);
    }
  }
  return groups;
}

Tensor mimo_gram_cuda(at::TensorList g0_in, at::TensorList gw_in) {
  const Lists l = prepare(g0_in, gw_in, "mimo_gram");
  const c10::cuda::CUDAGuard guard(l.g0[0].device());
  const auto opts = l.g0[0].options().dtype(at::kDouble);
  const auto groups = by_dtype(l.g0);
  int64_t nslots = 0;
  for (const auto& t : l.g0) nslots += gk::num_chunks(t.numel());
  Tensor partials = at::empty({3 * (nslots > 0 ? nslots : 1)}, opts);
  Tensor gram = at::empty({3}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  int64_t first = 0;
  for (const auto& group : groups) {
    const std::vector<size_t>& idx = group.second;  // (lambdas cannot capture bindings in C++17)
    OMNIFUSE_DISPATCH_FLOATING(group.first, "mimo_gram", [&] {
      using T = cuda_t<scalar_t>;
      std::vector<const T*> a, b;
      std::vector<int64_t> n;
      for (size_t i : idx) {
        a.push_back(in_ptr<scalar_t>(l.g0[i]));
        b.push_back(in_ptr<scalar_t>(l.gw[i]));
        n.push_back(l.g0[i].numel());
      }
      check_launch(gk::gram_partials<T>(a.data(), b.data(), n.data(), static_cast<int>(n.size()),
                                        first, partials.mutable_data_ptr<double>(), stream),
                   "mimo_gram");
      first += gk::gram_num_slots(n.data(), static_cast<int>(n.size()));
    });
  }
  check_launch(gk::gram_finalize(partials.const_data_ptr<double>(), nslots,
                                 gram.mutable_data_ptr<double>(), stream),
               "mimo_gram");
  return gram;
}

std::vector<Tensor> mimo_direction_cuda(at::TensorList g0_in, at::TensorList gw_in,
                                        const Tensor& lam_in) {
  const Lists l = prepare(g0_in, gw_in, "mimo_direction");
  const c10::cuda::CUDAGuard guard(l.g0[0].device());
  const Tensor lam = lam_in.reshape({1}).to(l.g0[0].device(), at::kFloat).contiguous();
  std::vector<Tensor> out;
  out.reserve(l.g0.size());
  for (size_t i = 0; i < l.g0.size(); ++i)
    out.push_back(at::empty(g0_in[i].sizes(), l.g0[i].options()));
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (const auto& group : by_dtype(l.g0)) {
    const std::vector<size_t>& idx = group.second;
    OMNIFUSE_DISPATCH_FLOATING(group.first, "mimo_direction", [&] {
      using T = cuda_t<scalar_t>;
      std::vector<const T*> a, b;
      std::vector<T*> o;
      std::vector<int64_t> n;
      for (size_t i : idx) {
        a.push_back(in_ptr<scalar_t>(l.g0[i]));
        b.push_back(in_ptr<scalar_t>(l.gw[i]));
        o.push_back(out_ptr<scalar_t>(out[i]));
        n.push_back(l.g0[i].numel());
      }
      check_launch(
          gk::direction<T>(a.data(), b.data(), o.data(), n.data(), static_cast<int>(n.size()),
                           lam.const_data_ptr<float>(), stream),
          "mimo_direction");
    });
  }
  return out;
}

}  // namespace mimo_impl
}  // namespace cuda_binding
}  // namespace omnifuse_fast

TORCH_LIBRARY_IMPL(omnifuse_fast, CUDA, m) {
  namespace impl = omnifuse_fast::cuda_binding::mimo_impl;
  m.impl("mimo_gram", &impl::mimo_gram_cuda);
  m.impl("mimo_direction", &impl::mimo_direction_cuda);
}
