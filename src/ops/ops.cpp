// The ops: host-side checks, output allocation, one kernel each.
//
// Kernel names and argument layouts are shared by the backends (the CPU ones
// in src/backend/cpu/kernels_nn.cpp, the CUDA ones in
// src/backend/cuda/nn_kernels.cu); <dt> is f32, f16 or bf16:
//
//   name               ptrs                          scalars                       n
//   linear_<dt>        x, w, bias|null, y            M, N, K (i), act (i)          M*N
//   add_bcast_<dt>     a, b, out                     b's numel m (i)               a's numel
//   mul_bcast_<dt>     a, b, out                     m (i)                         a's numel
//   relu_<dt>          x, y                          -                             numel
//   gelu_<dt>          x, y                          tanh_approx (i)               numel
//   layernorm_<dt>     x, gamma|null, beta|null, y   rows, cols (i), eps (f)       rows*cols
//   softmax_<dt>       x, y                          rows, cols (i)                rows*cols
//   copy_bytes         dst, src                      -                             bytes
//
// act: 0 none, 1 relu, 2 gelu (erf), 3 gelu (tanh). Every tensor is
// contiguous; b of add/mul is broadcast as out[i] = a[i] op b[i % m].
#include "flotilla/ops/ops.h"

#include <string>

#include "flotilla/common/error.h"
#include "flotilla/runtime/device.h"

namespace flotilla::ops {

const char* to_string(Activation a) noexcept {
  switch (a) {
    case Activation::kNone: return "none";
    case Activation::kRelu: return "relu";
    case Activation::kGelu: return "gelu";
    case Activation::kGeluTanh: return "gelu_tanh";
  }
  return "?";
}

Activation parse_activation(const std::string& s) {
  if (s == "none" || s == "identity") return Activation::kNone;
  if (s == "relu") return Activation::kRelu;
  if (s == "gelu") return Activation::kGelu;
  if (s == "gelu_tanh") return Activation::kGeluTanh;
  throw InvalidArgument(detail::str_cat("[parse_activation] unknown activation '", s,
                                        "'; use none, relu, gelu or gelu_tanh"));
}

namespace {

// Stream's members are not const (it is a handle); the ops take const refs.
void dispatch(Stream stream, const backend::Pipeline& k, const backend::KernelArgs& args) {
  stream.dispatch(k, args);
}
void dispatch(Stream stream, std::string_view k, const backend::KernelArgs& args) {
  stream.dispatch(k, args);
}

std::string shp(const Tensor& t) { return shape_to_string(t.shape()); }

// Checks that `t` is defined, on `stream`'s device and of `dtype`; records
// `stream` on it (allocator.h) when it was made on another stream.
void check_input(const char* op, const char* name, const Tensor& t, const Stream& stream,
                 DType dtype) {
  FL_CHECK_ARG(t.defined(), "[ops::", op, "] ", name, " is an undefined (empty) tensor");
  FL_CHECK_ARG(&t.device() == &stream.device(), "[ops::", op, "] ", name, " is on ",
               t.device().name(), " but the stream is on ", stream.device().name(),
               "; copy it to the stream's device first");
  FL_CHECK_ARG(t.dtype() == dtype, "[ops::", op, "] ", name, " is ", to_string(t.dtype()), shp(t),
               " but the op runs in ", to_string(dtype), "; give every input the same dtype");
  if (t.stream() != stream) t.record_stream(stream);
}

// The pipeline `base`_<dt> on the stream's device, or InvalidArgument saying
// the backend has no kernel for that dtype.
const backend::Pipeline& kernel(const Stream& stream, const char* op, const char* base,
                                DType dtype) {
  const std::string name = detail::str_cat(base, "_", to_string(dtype));
  try {
    return stream.device().pipeline(name);
  } catch (const InvalidArgument&) {
    throw InvalidArgument(
        detail::str_cat("[ops::", op, "] ", stream.device().name(), " has no ", to_string(dtype),
                        " kernel (", name, "); the ", stream.device().backend(), " backend runs ",
                        stream.device().backend() == "cpu" ? "f32 only" : "f32, f16 and bf16",
                        ": convert the tensors, or use another backend"));
  }
}

int64_t act_code(Activation a) {
  switch (a) {
    case Activation::kNone: return 0;
    case Activation::kRelu: return 1;
    case Activation::kGelu: return 2;
    case Activation::kGeluTanh: return 3;
  }
  return 0;
}

Tensor binary(const char* op, const char* base, const Stream& stream, const Tensor& a,
              const Tensor& b) {
  FL_CHECK_ARG(a.defined(), "[ops::", op, "] a is an undefined (empty) tensor");
  check_input(op, "a", a, stream, a.dtype());
  check_input(op, "b", b, stream, a.dtype());
  // b is a's shape or a's trailing dims.
  bool ok = b.rank() <= a.rank();
  for (int i = 1; ok && i <= b.rank(); ++i) ok = a.dim(-i) == b.dim(-i);
  FL_CHECK_ARG(ok, "[ops::", op, "] a is ", shp(a), " but b is ", shp(b),
               ": b must have a's shape or a's trailing dims (broadcast over the leading ones)");
  const auto& k = kernel(stream, op, base, a.dtype());
  Tensor out = Tensor::empty(a.shape(), a.dtype(), stream);
  dispatch(stream, k,
           backend::KernelArgs()
               .ptr(a.data())
               .ptr(b.data())
               .ptr(out.data())
               .i64(b.numel())
               .size(static_cast<uint64_t>(a.numel())));
  return out;
}

}  // namespace

Tensor linear(const Stream& stream, const Tensor& x, const Tensor& weight, const Tensor& bias,
              Activation act) {
  FL_CHECK_ARG(x.defined(), "[ops::linear] x is an undefined (empty) tensor");
  FL_CHECK_ARG(weight.defined(), "[ops::linear] weight is an undefined (empty) tensor");
  FL_CHECK_ARG(weight.rank() == 2, "[ops::linear] weight is ", shp(weight),
               " but must be 2-d [out_features, in_features] (PyTorch's nn.Linear layout)");
  FL_CHECK_ARG(x.dim(-1) == weight.dim(1), "[ops::linear] x is ", shp(x), " but weight is ",
               shp(weight), ": x's last dim must equal weight's dim 1");
  if (bias.defined())
    FL_CHECK_ARG(bias.rank() == 1 && bias.dim(0) == weight.dim(0), "[ops::linear] bias is ",
                 shp(bias), " but weight is ", shp(weight), ": bias must be [", weight.dim(0),
                 "] (weight's dim 0)");
  check_input("linear", "x", x, stream, x.dtype());
  check_input("linear", "weight", weight, stream, x.dtype());
  if (bias.defined()) check_input("linear", "bias", bias, stream, x.dtype());
  const int64_t K = weight.dim(1);
  const int64_t N = weight.dim(0);
  const int64_t M = x.numel() / K;
  const auto& k = kernel(stream, "linear", "linear", x.dtype());
  Shape out_shape = x.shape();
  out_shape.back() = N;
  Tensor y = Tensor::empty(std::move(out_shape), x.dtype(), stream);
  dispatch(stream, k,
           backend::KernelArgs()
               .ptr(x.data())
               .ptr(weight.data())
               .ptr(bias.defined() ? bias.data() : nullptr)
               .ptr(y.data())
               .i64(M)
               .i64(N)
               .i64(K)
               .i64(act_code(act))
               .size(static_cast<uint64_t>(M * N)));
  return y;
}

Tensor add(const Stream& stream, const Tensor& a, const Tensor& b) {
  return binary("add", "add_bcast", stream, a, b);
}

Tensor mul(const Stream& stream, const Tensor& a, const Tensor& b) {
  return binary("mul", "mul_bcast", stream, a, b);
}

Tensor relu(const Stream& stream, const Tensor& x) {
  FL_CHECK_ARG(x.defined(), "[ops::relu] x is an undefined (empty) tensor");
  check_input("relu", "x", x, stream, x.dtype());
  const auto& k = kernel(stream, "relu", "relu", x.dtype());
  Tensor y = Tensor::empty(x.shape(), x.dtype(), stream);
  dispatch(
      stream, k,
      backend::KernelArgs().ptr(x.data()).ptr(y.data()).size(static_cast<uint64_t>(x.numel())));
  return y;
}

Tensor gelu(const Stream& stream, const Tensor& x, bool tanh_approx) {
  FL_CHECK_ARG(x.defined(), "[ops::gelu] x is an undefined (empty) tensor");
  check_input("gelu", "x", x, stream, x.dtype());
  const auto& k = kernel(stream, "gelu", "gelu", x.dtype());
  Tensor y = Tensor::empty(x.shape(), x.dtype(), stream);
  dispatch(stream, k,
           backend::KernelArgs()
               .ptr(x.data())
               .ptr(y.data())
               .i64(tanh_approx ? 1 : 0)
               .size(static_cast<uint64_t>(x.numel())));
  return y;
}

Tensor activation(const Stream& stream, const Tensor& x, Activation act) {
  switch (act) {
    case Activation::kNone: return clone(stream, x);
    case Activation::kRelu: return relu(stream, x);
    case Activation::kGelu: return gelu(stream, x, false);
    case Activation::kGeluTanh: return gelu(stream, x, true);
  }
  FL_CHECK_ARG(false, "[ops::activation] unknown activation ", static_cast<int>(act));
  return {};
}

Tensor layernorm(const Stream& stream, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                 double eps) {
  FL_CHECK_ARG(x.defined(), "[ops::layernorm] x is an undefined (empty) tensor");
  FL_CHECK_ARG(eps > 0, "[ops::layernorm] eps is ", eps, "; it must be positive");
  const int64_t cols = x.dim(-1);
  const std::pair<const char*, const Tensor*> affine[] = {{"gamma", &gamma}, {"beta", &beta}};
  for (const auto& [name, t] : affine) {
    if (!t->defined()) continue;
    FL_CHECK_ARG(t->rank() == 1 && t->dim(0) == cols, "[ops::layernorm] x is ", shp(x), " but ",
                 name, " is ", shp(*t), ": ", name, " must be [", cols, "] (x's last dim)");
  }
  check_input("layernorm", "x", x, stream, x.dtype());
  if (gamma.defined()) check_input("layernorm", "gamma", gamma, stream, x.dtype());
  if (beta.defined()) check_input("layernorm", "beta", beta, stream, x.dtype());
  const auto& k = kernel(stream, "layernorm", "layernorm", x.dtype());
  Tensor y = Tensor::empty(x.shape(), x.dtype(), stream);
  dispatch(stream, k,
           backend::KernelArgs()
               .ptr(x.data())
               .ptr(gamma.defined() ? gamma.data() : nullptr)
               .ptr(beta.defined() ? beta.data() : nullptr)
               .ptr(y.data())
               .i64(x.numel() / cols)
               .i64(cols)
               .f64(eps)
               .size(static_cast<uint64_t>(x.numel())));
  return y;
}

Tensor softmax(const Stream& stream, const Tensor& x, int dim) {
  FL_CHECK_ARG(x.defined(), "[ops::softmax] x is an undefined (empty) tensor");
  FL_CHECK_ARG(dim == -1 || dim == x.rank() - 1, "[ops::softmax] dim ", dim, " of x ", shp(x),
               " is not supported; only the last dim (-1 or ", x.rank() - 1,
               ") is: reshape so the softmax dim is last");
  check_input("softmax", "x", x, stream, x.dtype());
  const auto& k = kernel(stream, "softmax", "softmax", x.dtype());
  const int64_t cols = x.dim(-1);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), stream);
  dispatch(stream, k,
           backend::KernelArgs()
               .ptr(x.data())
               .ptr(y.data())
               .i64(x.numel() / cols)
               .i64(cols)
               .size(static_cast<uint64_t>(x.numel())));
  return y;
}

void copy(const Stream& stream, const Tensor& src, const Tensor& dst) {
  FL_CHECK_ARG(src.defined() && dst.defined(), "[ops::copy] ", src.defined() ? "dst" : "src",
               " is an undefined (empty) tensor");
  FL_CHECK_ARG(src.numel() == dst.numel(), "[ops::copy] src is ", shp(src), " but dst is ",
               shp(dst), ": both must have the same number of elements");
  check_input("copy", "src", src, stream, src.dtype());
  check_input("copy", "dst", dst, stream, src.dtype());
  if (src.data() == dst.data()) return;
  dispatch(stream, "copy_bytes",
           backend::KernelArgs().ptr(dst.data()).ptr(src.data()).size(src.nbytes()));
}

Tensor clone(const Stream& stream, const Tensor& src) {
  FL_CHECK_ARG(src.defined(), "[ops::clone] src is an undefined (empty) tensor");
  check_input("clone", "src", src, stream, src.dtype());
  Tensor out = Tensor::empty(src.shape(), src.dtype(), stream);
  copy(stream, src, out);
  return out;
}

Tensor cat_rows(const Stream& stream, std::span<const Tensor> tensors) {
  FL_CHECK_ARG(!tensors.empty(), "[ops::cat_rows] no tensors given; pass at least one");
  const Tensor& first = tensors[0];
  FL_CHECK_ARG(first.defined(), "[ops::cat_rows] tensor 0 is an undefined (empty) tensor");
  int64_t rows = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    FL_CHECK_ARG(t.defined(), "[ops::cat_rows] tensor ", i, " is an undefined (empty) tensor");
    bool same = t.rank() == first.rank();
    for (int d = 1; same && d < t.rank(); ++d) same = t.dim(d) == first.dim(d);
    FL_CHECK_ARG(same, "[ops::cat_rows] tensor 0 is ", shp(first), " but tensor ", i, " is ",
                 shp(t), ": all must have the same rank and the same dims after dim 0");
    check_input("cat_rows", "a tensor", t, stream, first.dtype());
    rows += t.dim(0);
  }
  Shape shape = first.shape();
  shape[0] = rows;
  Tensor out = Tensor::empty(std::move(shape), first.dtype(), stream);
  int64_t at = 0;
  for (const Tensor& t : tensors) {
    dispatch(
        stream, "copy_bytes",
        backend::KernelArgs().ptr(out.narrow(at, t.dim(0)).data()).ptr(t.data()).size(t.nbytes()));
    at += t.dim(0);
  }
  return out;
}

}  // namespace flotilla::ops
