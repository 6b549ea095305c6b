// The Python bindings of the C++ ops (matris/cpu_kernels.py builds this file with line_attention.cpp and
// sink_messages.cpp into one extension).

#include <torch/extension.h>

#include <vector>

namespace matris_ops {
using torch::Tensor;
Tensor line_forward(Tensor q, Tensor k, Tensor v, Tensor qa, Tensor env, Tensor theta, Tensor A, double cap);
std::vector<Tensor> line_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor qa, Tensor env, Tensor theta,
                                  Tensor A, double cap);
std::vector<Tensor> line_double_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor qa, Tensor env,
                                         Tensor theta, Tensor A, Tensor uq, Tensor uk, Tensor uv, Tensor uqa,
                                         Tensor uenv, Tensor utheta, Tensor uA, double cap);
Tensor sink_forward(Tensor q, Tensor kv, Tensor env, double cap);
std::vector<Tensor> sink_backward(Tensor grad, Tensor q, Tensor kv, Tensor env, double cap);
std::vector<Tensor> sink_double_backward(Tensor grad, Tensor q, Tensor kv, Tensor env, Tensor uq, Tensor ukv,
                                         Tensor uenv, double cap);
}  // namespace matris_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace matris_ops;
  m.def("line_forward", &line_forward, "line attention's bucket (float, c a multiple of 8, L + 1 = 8)");
  m.def("line_backward", &line_backward, "its vector-Jacobian product");
  m.def("line_double_backward", &line_double_backward, "the vjp of line_backward, on dual numbers");
  m.def("sink_forward", &sink_forward, "an attention sum's per-edge terms [w v | w] (float, c a multiple of 8)");
  m.def("sink_backward", &sink_backward, "its vector-Jacobian product");
  m.def("sink_double_backward", &sink_double_backward, "the vjp of sink_backward, on dual numbers");
}
