// Ops: the kernels a small model needs, on every backend.
//
// Each op takes the Stream to run on first, checks its inputs on the host,
// allocates its output on that stream (from the caching allocator) and
// encodes one or two kernels; it never waits for the device. Inputs made on
// another stream are recorded on this one (Tensor::record_stream) so their
// memory is not reused while this stream still reads it; ordering this
// stream after the producer's writes is the caller's job (an Event).
//
// Kernels: the CPU backend runs f32 only (GEMM by OpenBLAS cblas_sgemm, one
// thread per call: Flotilla's threads are the parallelism); the CUDA backend
// runs f32, f16 and bf16 (GEMM by cuBLASLt with bias and activation fused in
// the epilogue where the library allows; f16/bf16 accumulate in f32).
//
// Errors: a bad input (an undefined tensor, a shape mismatch, mixed dtypes
// or devices, a stream of another device, a dtype the backend has no kernel
// for) throws InvalidArgument naming the op and the shapes, e.g.
// "[ops::linear] x is [8, 512] but weight is [1024, 256]: x's last dim must
// equal weight's dim 1". Device failures surface at the stream's next
// synchronize (or to_host), as for any kernel.
//
// Thread safety: every op may be called from any thread at once, on any
// streams. Lifetime: the output is a new Tensor on `stream`.
#pragma once

#include <span>
#include <vector>

#include "flotilla/ops/tensor.h"
#include "flotilla/runtime/stream.h"

namespace flotilla::ops {

enum class Activation {
  kNone,
  kRelu,
  kGelu,      // exact: x * 0.5 * (1 + erf(x / sqrt(2))), PyTorch's default GELU
  kGeluTanh,  // PyTorch's GELU(approximate="tanh"); what cuBLASLt's epilogue fuses
};
const char* to_string(Activation a) noexcept;
// "none", "relu", "gelu", "gelu_tanh"; throws InvalidArgument listing them.
Activation parse_activation(const std::string& s);

// y = act(x W^T + b), PyTorch's nn.Linear layout: x [..., in], weight
// [out, in], bias [out] or undefined (no bias); y [..., out]. Leading dims of
// x are flattened into rows. relu and gelu_tanh are fused into the GEMM
// epilogue on CUDA; exact gelu on CUDA runs as a second kernel.
Tensor linear(const Stream& stream, const Tensor& x, const Tensor& weight, const Tensor& bias = {},
              Activation act = Activation::kNone);

// Elementwise a + b and a * b. b has a's shape, or a's trailing dims (it is
// broadcast over a's leading dims, e.g. a bias [C] over [N, C]).
Tensor add(const Stream& stream, const Tensor& a, const Tensor& b);
Tensor mul(const Stream& stream, const Tensor& a, const Tensor& b);

Tensor relu(const Stream& stream, const Tensor& x);
// Exact (erf) GELU by default, PyTorch's default; `tanh_approx` for
// GELU(approximate="tanh").
Tensor gelu(const Stream& stream, const Tensor& x, bool tanh_approx = false);
// relu / gelu / gelu_tanh / none (a copy) by enum.
Tensor activation(const Stream& stream, const Tensor& x, Activation act);

// Layer normalisation over the last dimension, PyTorch's F.layer_norm with
// normalized_shape = [C]: (x - mean) / sqrt(var + eps) * gamma + beta, with
// the biased variance. gamma and beta are [C]; either may be undefined (1, 0).
Tensor layernorm(const Stream& stream, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                 double eps = 1e-5);

// Softmax along `dim`; only the last dimension (-1 or rank-1) is supported.
// Max-subtracted, so large inputs do not overflow.
Tensor softmax(const Stream& stream, const Tensor& x, int dim = -1);

// ---- Copies -------------------------------------------------------------
// dst <- src on the device; same dtype and numel (shapes may differ).
void copy(const Stream& stream, const Tensor& src, const Tensor& dst);
// A new tensor with src's values.
Tensor clone(const Stream& stream, const Tensor& src);
// Concatenation along dimension 0: every tensor has the same dtype, device
// and trailing dims; the result has the sum of their dim 0. One copy each.
Tensor cat_rows(const Stream& stream, std::span<const Tensor> tensors);
// Host <-> device: Tensor::from_host / copy_from_host / to_host (tensor.h).

}  // namespace flotilla::ops
