// Every schema of the omnifuse_fast custom ops, in one TORCH_LIBRARY block.
//
// The CPU kernels (csrc/cpu/*.cpp) and the CUDA kernels (csrc/cuda/*.cu) register
// implementations of these schemas under their dispatch keys; the fake (meta) impls
// and the autograd formulas are registered once, in Python (omnifuse_fast/compiled/*.py).
// Inputs reaching these ops are already validated by omnifuse_fast/_checks.py.
#include <Python.h>
#include <torch/library.h>

// An empty importable module: importing omnifuse_fast._C runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(omnifuse_fast, m) {
  // combination id of each sample: sum_m present[b, m] << m
  m.def("combination_ids(Tensor present) -> Tensor");

  // CRA cascade (SPEC section 1). cra_backward recomputes the chain from x (CPU, CUDA).
  m.def(
      "cra_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str activation)"
      " -> (Tensor, Tensor)");
  m.def(
      "cra_backward(Tensor grad_out, Tensor grad_latents, Tensor x, Tensor w1, Tensor b1,"
      " Tensor w2, Tensor b2, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Training pair (CPU): the forward also returns what the backward needs (acc dtype): the
  // layer inputs s_{k-1} [K, B, F], the activations [K, B, H] and, for gelu/silu, the
  // pre-activations [K, B, H] (else [0]). output_mask: which of (x, w1, b1, w2, b2) need a
  // gradient; the others come back as empty [0] tensors.
  m.def(
      "cra_forward_stash(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str activation)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cra_backward_stash(Tensor grad_out, Tensor grad_latents, Tensor w1, Tensor w2,"
      " Tensor states, Tensor post, Tensor pre, str activation, bool[5] output_mask)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // DWFuse (SPEC section 2). labels: int64 [B] multiclass, or floating [B, C] multilabel.
  m.def("dwfuse_weights(Tensor logits, Tensor labels, float beta) -> Tensor");
  m.def(
      "dwfuse_weights_backward(Tensor grad_weights, Tensor logits, Tensor labels, float beta)"
      " -> Tensor");
  m.def("dwfuse_loss(Tensor logits, Tensor labels, float beta, bool detach_weight) -> Tensor");
  m.def(
      "dwfuse_loss_backward(Tensor grad, Tensor logits, Tensor labels, float beta,"
      " bool detach_weight) -> Tensor");

  // TLA (SPEC section 3). distance: "ce" | "l1" | "l2".
  m.def(
      "tla_stats(Tensor logits, Tensor labels, Tensor comb, int num_modalities, str distance)"
      " -> (Tensor, Tensor)");
  m.def("tla_loss(Tensor logits, Tensor labels, Tensor comb, int lazy) -> Tensor");
  m.def(
      "tla_loss_backward(Tensor grad, Tensor logits, Tensor labels, Tensor comb, int lazy)"
      " -> Tensor");

  // MM learning (SPEC section 5).
  m.def(
      "modality_mix(Tensor v, Tensor labels, Tensor src, int num_classes, Tensor? weights)"
      " -> (Tensor, Tensor)");
  m.def("modality_mix_backward(Tensor grad_v_mix, Tensor src, int batch) -> Tensor");
  m.def("soft_cross_entropy(Tensor logits, Tensor soft_labels) -> Tensor");
  m.def(
      "soft_cross_entropy_backward(Tensor grad, Tensor logits, Tensor soft_labels)"
      " -> (Tensor, Tensor)");
  // the logits' gradient alone, when the soft labels need none (CPU kernel only)
  m.def(
      "soft_cross_entropy_backward_logits(Tensor grad, Tensor logits, Tensor soft_labels)"
      " -> Tensor");

  // training forward (CPU kernel only): the loss and its gradient d loss / d logits for an
  // upstream gradient of 1, from one read of the rows; the backward scales the second
  m.def("soft_cross_entropy_grad(Tensor logits, Tensor soft_labels) -> (Tensor, Tensor)");

  // MIMO (SPEC section 6): one pass for the 2x2 Gram, one pass for the direction.
  m.def("mimo_gram(Tensor[] g0, Tensor[] gw) -> Tensor");
  m.def("mimo_direction(Tensor[] g0, Tensor[] gw, Tensor lam) -> Tensor[]");
}
