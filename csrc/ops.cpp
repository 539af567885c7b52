// The operator schemas of attenuation._C, the way pytorch/extension-cpp registers them: schemas
// here, CPU and CUDA implementations per dispatch key next to their code, fake (meta) and autograd
// kernels from Python (attenuation/ops/native.py). Semantics: attenuation/ops/reference.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import attenuation._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(attenuation, m) {
  m.def("filter_norms(Tensor[] weights, str ord) -> Tensor");
  m.def("select_weak(Tensor scores, Tensor removed, int[] counts, Tensor ks) -> Tensor");
  // The per-filter vectors next to the weights (bias, BN gamma, beta, running mean, running var)
  // come as one flat list of those present, vector j belonging to layer slots[j] / 5 as kind
  // slots[j] % 5 (attenuation::VectorKind). A flat list instead of five lists of optional tensors:
  // torch.compile's functionalization does not take mutable lists with None entries.
  m.def(
      "attenuate_(Tensor(a!)[] weights, Tensor(b!)[] vectors, int[] slots, Tensor weak, "
      "Tensor(c!) status, Tensor(d!) multiplier, float factor, float eps, bool restore) "
      "-> (Tensor, Tensor)");
  m.def("zero_removed_(Tensor(a!)[] weights, Tensor(b!)[] vectors, int[] slots, Tensor status) -> ()");
  // Returns (output, x_live): x_live is the input's live channels (gathered; an empty tensor when
  // in_index is None), which autograd saves for the backward instead of gathering them again.
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? out_index, Tensor? in_index, "
      "Tensor? scale, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor)");
  // Gradients of (x, weight, bias, scale) from x_live (x itself when in_index is None); an entry of
  // output_mask that is false gets an empty tensor of shape (0,).
  m.def(
      "masked_conv2d_backward(Tensor grad_out, Tensor x_live, Tensor weight, Tensor? out_index, "
      "Tensor? in_index, Tensor? scale, int[2] stride, int[2] padding, int[2] dilation, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // BatchNorm of channels-last activations for any channel count (CPU; attenuation/batch_norm.py).
  // batch_norm_train returns (out, mean, biased var); the statistics are float32 (float64 for a
  // float64 x) and the running statistics are updated by the caller from them.
  m.def("batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("channel_affine(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor var, float eps, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // 2x2 max pooling with stride 2 of channels-last activations (CPU; attenuation/max_pool.py):
  // (out, codes), codes (uint8) naming each output's window position for the backward.
  m.def("max_pool2x2(Tensor x) -> (Tensor, Tensor)");
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor codes, int[] x_size) -> Tensor");
}
