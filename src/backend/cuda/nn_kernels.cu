// The ops' kernels on CUDA, in f32, f16 and bf16, with the names and argument
// layouts of the table at the top of src/ops/ops.cpp (the CPU ones are in
// src/backend/cpu/kernels_nn.cpp).
//
// linear_<dt> is, in f32 at 1 to 8 rows, one kernel of our own (Note [Linear
// for a few rows]); otherwise one cuBLASLt matmul with the bias and the
// activation fused in its epilogue: RELU_BIAS / GELU_BIAS (cuBLASLt's GELU is
// the tanh approximation, so act=3 fuses and act=2, exact GELU, runs the gelu
// kernel after a BIAS epilogue). Compute and scale types are f32 (CUBLAS_COMPUTE_32F,
// no TF32), so f32 results match a float64 reference to ~1e-6 and f16/bf16
// accumulate in f32.
//
// Note [cuBLASLt plans]
// Making a matmul descriptor, three layouts and asking the heuristic for an
// algorithm costs tens of microseconds, more than the GEMM at batch 1. Each
// queue keeps a cache of plans keyed by (M, N, K, dtype, epilogue, the three
// alignments, the SM target of Note [GEMMs for a share of the device]), in a
// per-queue resource with its cuBLASLt handle and workspace (kernels.h). The
// bias pointer is an attribute of the descriptor, so setting it and
// launching happen under the resource's mutex: two threads launching on one
// queue (rare: one thread per stream is the norm) take turns for the few
// microseconds of the enqueue.
//
// Note [Tuned GEMMs for a share of the device]
// For a share of the device (Note [GEMMs for a share of the device]) the
// heuristic's first choice for the seed MLP's f32 layers at 192 to 448 rows
// on the H100 is a 32x64 or 64x64 tile with no split along K. Timed with 8
// streams replaying each layer at once, some of its other candidates, 128x64,
// 128x128 and 256x64 tiles split 1, 2 or 4 ways, ran the three layers 1.17x
// to 1.27x as fast (scripts/gemm_configs.cu with GC_SM_TARGET=16;
// docs/PERF.md, "Tuned GEMMs for a share of the device"), and which one won
// varied by layer and size: no fixed rule. With Config::cuda_tune_gemm, the
// first plan on a device of such a shape (key.sm_target > 0) times the
// heuristic's first kTuneResults candidates, each as offered and split 2 and
// 4 ways along K where the algorithm allows it (reduced in the compute type,
// in the workspace: no atomics, so a plan's bits do not vary between runs),
// and a device-wide table (g_tuned) keeps the fastest: every stream of the
// device then plans that shape alike, so a request's output does not depend
// on the worker that ran it. The timing runs on the queue's own tuning
// stream, with scratch rows, output and workspace allocated on that stream
// and freed after, never on the caller's stream: the caller may be
// recording a CUDA graph (command buffers capture in relaxed mode, so this
// thread may launch on and wait for another stream meanwhile), and its
// earlier batches may still be running with its workspace. The weights and
// the bias are the call's own, only read. One lock (g_tune_mu) serialises
// tuning on every device, so no shape is tuned twice; each candidate gets
// one warm-up launch and the best of kTuneRuns timed runs of kTuneLaunches,
// slowed by the other streams' kernels as it would be in use. A timed
// choice can differ between processes (their outputs then differ within
// rounding), hence the option.
//
// Elementwise kernels read and write T and compute in f32; layernorm and
// softmax run one block per row with f32 block reductions.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/cuda/kernels.h"
#include "flotilla/common/error.h"
#include "flotilla/common/sync.h"

namespace flotilla::backend::cuda {

namespace {

constexpr int kThreads = 256;
constexpr size_t kWorkspaceBytes = size_t{8} << 20;  // per queue; enough for these GEMMs

void need(const KernelArgs& a, const char* name, int ptrs, int scalars) {
  FL_CHECK_ARG(a.num_ptrs >= ptrs && a.num_scalars >= scalars, "[kernel ", name, "] needs ", ptrs,
               " pointers and ", scalars, " scalars, got ", a.num_ptrs, " and ", a.num_scalars);
}

unsigned blocks_for(uint64_t n, const LaunchContext& ctx) {
  const uint64_t want = (n + kThreads - 1) / kThreads;
  const uint64_t cap = static_cast<uint64_t>(std::max(1, ctx.sm_count())) * 8;
  return static_cast<unsigned>(std::max<uint64_t>(1, std::min(want, cap)));
}

// Note [GEMMs for a share of the device]
// cuBLASLt's heuristic plans a GEMM for the whole device: for the seed MLP's
// batches of 64 to 512 rows it picks 32x32 tiles, often split along K, enough
// blocks to cover 132 SMs. When several queues run GEMMs at once (a
// BatchQueue's 8 workers, each on its own stream) every GEMM gets a share of
// the SMs, and those plans spend it on small tiles and split-K reductions. A
// queue's Queue::set_device_share(n) hint makes the linear kernel ask the
// heuristic for CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET = sm_count / n SMs (at
// least 1), so it picks bigger tiles and fewer splits. The choice stays the
// heuristic's (deterministic: the same on every run of one device and
// library), and the target is part of the plan's key.
//
// Only where it was measured to help: f32, and 64 to 512 rows. Measured on
// the H100 (scripts/gemm_sm_target.cu; docs/PERF.md, "GEMMs for a share of
// the device"), the MLP's three f32 layers, 8 streams replaying graphs of
// them at once, target 16 SMs (132 / 8) against the whole device: 1.50x the
// rows/s at 64 rows, 1.67x at 128 and 256, 1.45x at 192, 1.07x at 512. Out
// of that window it loses or is mixed: at 1 to 3 rows the targeted plans take
// 2-3x as long (38.9 against 11.9 us for the chain at 2 rows; 8 closed-loop
// clients of a 4-worker queue fell from 192k to 149k req/s), at 32 rows a
// target of 33 or 66 SMs lost 12-14 %, at 1024 rows the targets went 0.92x
// to 1.17x. One stream alone gets slower too (256 rows: 96 against 72 us per
// chain): a hint for concurrent callers only.
int gemm_sm_target(int sm_count, int share, int64_t rows, int dtype) {
  if (share <= 1 || sm_count <= 0 || dtype != 0 || rows < 64 || rows > 512) return 0;
  return std::max(1, sm_count / share);
}

// ---- Element conversions -------------------------------------------------------------

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Cvt<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Exact GELU through erfc (1 + erf(x) cancels for x << 0), and PyTorch's
// tanh form written as x / (1 + exp(-2z)) for the same reason.
__device__ float gelu_erf(float x) { return 0.5f * x * erfcf(-x * 0.70710678118654752f); }
__device__ float gelu_tanh(float x) {
  const float z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + expf(-2.0f * z));
}

// ---- Elementwise -----------------------------------------------------------------------

template <typename T, bool kMul>
__global__ void binary_bcast_kernel(const T* a, const T* b, T* out, uint64_t m, uint64_t n) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const float x = Cvt<T>::load(a[i]);
    const float y = Cvt<T>::load(b[m == n ? i : i % m]);
    out[i] = Cvt<T>::store(kMul ? x * y : x + y);
  }
}

// act: 0 none, 1 relu, 2 gelu (erf), 3 gelu (tanh).
__device__ float apply_act(float v, int act) {
  switch (act) {
    case 1: return v > 0.f ? v : 0.f;
    case 2: return gelu_erf(v);
    case 3: return gelu_tanh(v);
    default: return v;
  }
}

template <typename T>
__global__ void activation_kernel(const T* x, T* y, int act, uint64_t n) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x)
    y[i] = Cvt<T>::store(apply_act(Cvt<T>::load(x[i]), act));
}

// ---- Row reductions ------------------------------------------------------------------

// The sum (or max) of this block's threads' `v`, returned to every thread.
template <bool kMax>
__device__ float block_reduce(float v) {
  __shared__ float partial[32];
  __shared__ float result;
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_down_sync(0xffffffffu, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    v = lane < warps ? partial[lane] : (kMax ? -INFINITY : 0.f);
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_down_sync(0xffffffffu, v, off);
      v = kMax ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) result = v;
  }
  __syncthreads();
  const float r = result;
  __syncthreads();  // `partial` and `result` are reused by the next call
  return r;
}

template <typename T>
__global__ void layernorm_kernel(const T* x, const T* gamma, const T* beta, T* y, int64_t cols,
                                 float eps) {
  const T* row = x + blockIdx.x * cols;
  T* out = y + blockIdx.x * cols;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) s += Cvt<T>::load(row[j]);
  const float mean = block_reduce<false>(s) / static_cast<float>(cols);
  float v = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float d = Cvt<T>::load(row[j]) - mean;
    v += d * d;
  }
  const float inv = rsqrtf(block_reduce<false>(v) / static_cast<float>(cols) + eps);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float r = (Cvt<T>::load(row[j]) - mean) * inv;
    if (gamma) r *= Cvt<T>::load(gamma[j]);
    if (beta) r += Cvt<T>::load(beta[j]);
    out[j] = Cvt<T>::store(r);
  }
}

template <typename T>
__global__ void softmax_kernel(const T* x, T* y, int64_t cols) {
  const T* row = x + blockIdx.x * cols;
  T* out = y + blockIdx.x * cols;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, Cvt<T>::load(row[j]));
  m = block_reduce<true>(m);
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) s += expf(Cvt<T>::load(row[j]) - m);
  const float inv = 1.f / block_reduce<false>(s);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    out[j] = Cvt<T>::store(expf(Cvt<T>::load(row[j]) - m) * inv);
}

int row_threads(int64_t cols) {
  // A warp multiple, up to 1024, about one element per thread.
  const int64_t t = std::min<int64_t>(1024, std::max<int64_t>(32, (cols + 31) / 32 * 32));
  return static_cast<int>(t);
}

// ---- cuBLASLt ---------------------------------------------------------------------------

[[noreturn]] void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  const auto text =
      detail::str_cat("[kernel linear] ", call, " failed at ", file, ":", line, ": ",
                      cublasLtGetStatusName(s), " (", cublasLtGetStatusString(s), ")");
  if (s == CUBLAS_STATUS_ALLOC_FAILED) throw OutOfMemory(text);
  if (s == CUBLAS_STATUS_INVALID_VALUE || s == CUBLAS_STATUS_NOT_SUPPORTED)
    throw InvalidArgument(text);
  throw InvalidState(text);
}
#define FL_CUBLAS_CHECK(call)                          \
  do {                                                 \
    const cublasStatus_t fl_st_ = (call);              \
    if (fl_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]  \
      throw_cublas(fl_st_, #call, __FILE__, __LINE__); \
  } while (0)

struct PlanKey {
  int64_t m, n, k;
  int dtype;     // 0 f32, 1 f16, 2 bf16
  int epilogue;  // cublasLtEpilogue_t
  // Alignment in bytes (a power of two up to 256) of w, x and y: row views
  // (Tensor::narrow) are less aligned than fresh blocks, and an algorithm
  // chosen for 256-byte alignment fails on them.
  uint32_t align_a, align_b, align_c;
  int sm_target;  // 0: the whole device (Note [GEMMs for a share of the device])
  bool operator==(const PlanKey& o) const {
    return m == o.m && n == o.n && k == o.k && dtype == o.dtype && epilogue == o.epilogue &&
           align_a == o.align_a && align_b == o.align_b && align_c == o.align_c &&
           sm_target == o.sm_target;
  }
};

uint32_t alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  const uintptr_t low = v & (~v + 1);  // the lowest set bit
  return static_cast<uint32_t>(low == 0 || low > 256 ? 256 : low);
}
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t v : {static_cast<uint64_t>(k.m), static_cast<uint64_t>(k.n),
                       static_cast<uint64_t>(k.k), static_cast<uint64_t>(k.dtype),
                       static_cast<uint64_t>(k.epilogue), static_cast<uint64_t>(k.sm_target)})
      h = (h ^ v) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

// One matmul's descriptor, layouts and algorithm (Note [cuBLASLt plans]).
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    // Errors ignored: destroying host-side descriptors has no one to report to.
    if (c) (void)cublasLtMatrixLayoutDestroy(c);
    if (b) (void)cublasLtMatrixLayoutDestroy(b);
    if (a) (void)cublasLtMatrixLayoutDestroy(a);
    if (desc) (void)cublasLtMatmulDescDestroy(desc);
  }
};

struct LtResource final : QueueResource {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  Mutex mu;  // guards plans, the tuning stream and events, and the descriptors' bias pointers
             // during a launch
  std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans FL_GUARDED_BY(mu);
  // Made on this queue's first tuning (Note [Tuned GEMMs for a share of the
  // device]): a stream of its own and two events to time on it.
  cudaStream_t tune_stream FL_GUARDED_BY(mu) = nullptr;
  cudaEvent_t tune_start FL_GUARDED_BY(mu) = nullptr;
  cudaEvent_t tune_stop FL_GUARDED_BY(mu) = nullptr;

  ~LtResource() override {
    {
      MutexLock lock(mu);
      plans.clear();
      // Errors ignored. A tuning's last frees may still be queued on the
      // tuning stream: cudaStreamDestroy lets them finish first.
      if (tune_stop) (void)cudaEventDestroy(tune_stop);
      if (tune_start) (void)cudaEventDestroy(tune_start);
      if (tune_stream) (void)cudaStreamDestroy(tune_stream);
    }
    // The queue's stream has finished (kernels.h), so the workspace is idle.
    if (workspace) (void)cudaFree(workspace);
    if (handle) (void)cublasLtDestroy(handle);
  }
};

LtResource& lt_resource(LaunchContext& ctx) {
  return ctx.resource<LtResource>([&ctx] {
    auto r = std::make_unique<LtResource>();
    FL_CUBLAS_CHECK(cublasLtCreate(&r->handle));
    FL_CUDA_CHECK_CTX(ctx, cudaMalloc(&r->workspace, kWorkspaceBytes));
    return r;
  });
}

cudaDataType_t cuda_type(int dtype) {
  return dtype == 0 ? CUDA_R_32F : dtype == 1 ? CUDA_R_16F : CUDA_R_16BF;
}

// Note [Tuned GEMMs for a share of the device]: the heuristic's candidates
// a tuning times, and its timed runs of launches per candidate.
constexpr int kTuneResults = 8;
constexpr int kTuneRuns = 3, kTuneLaunches = 4;
// cublasLtMatmulAlgo_t, named: nvcc 13's front end fails on containers of
// the unnamed struct it is a typedef of (their destructor's traits).
struct Algo {
  cublasLtMatmulAlgo_t algo;
};

// Row-major y[M,N] = x[M,K] w[N,K]^T is column-major y^T[N,M] = w^T x^T:
// A = w seen as column-major [K,N] (transposed), B = x as column-major [K,M].
// With `offered`, the heuristic's first kTuneResults candidates go there too
// (Note [Tuned GEMMs for a share of the device]).
std::unique_ptr<Plan> make_plan(LtResource& r, const PlanKey& key, std::vector<Algo>* offered) {
  auto p = std::make_unique<Plan>();
  const cudaDataType_t t = cuda_type(key.dtype);
  FL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  FL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                                 sizeof(trans_a)));
  FL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b,
                                                 sizeof(trans_b)));
  const auto epi = static_cast<cublasLtEpilogue_t>(key.epilogue);
  FL_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  FL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, t, static_cast<uint64_t>(key.k),
                                             static_cast<uint64_t>(key.n), key.k));
  FL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, t, static_cast<uint64_t>(key.k),
                                             static_cast<uint64_t>(key.m), key.k));
  FL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->c, t, static_cast<uint64_t>(key.n),
                                             static_cast<uint64_t>(key.m), key.n));
  cublasLtMatmulPreference_t pref = nullptr;
  FL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kWorkspaceBytes;
  cublasLtMatmulHeuristicResult_t results[kTuneResults]{};
  int found = 0;
  cublasStatus_t s1 = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c}};
  for (const auto& [attr, value] : aligns)
    if (s1 == CUBLAS_STATUS_SUCCESS)
      s1 = cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value));
  bool target_set = false;  // the descriptor has an SM target (0 resets it)
  const auto heuristic = [&](int32_t sm_target) {
    found = 0;
    cublasStatus_t s = CUBLAS_STATUS_SUCCESS;
    if (sm_target > 0 || target_set) {
      s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sm_target,
                                         sizeof(sm_target));
      target_set = s == CUBLAS_STATUS_SUCCESS && sm_target > 0;
    }
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulAlgoGetHeuristic(r.handle, p->desc, p->a, p->b, p->c, p->c, pref,
                                         offered ? kTuneResults : 1, results, &found);
    return s;
  };
  cublasStatus_t s2 = s1;
  // The share is a hint (Note [GEMMs for a share of the device]): when the
  // heuristic has nothing for it, or this cuBLASLt lacks the attribute, the
  // plan is the whole device's.
  if (s2 == CUBLAS_STATUS_SUCCESS && key.sm_target > 0) s2 = heuristic(key.sm_target);
  if (s1 == CUBLAS_STATUS_SUCCESS &&
      (key.sm_target == 0 || s2 != CUBLAS_STATUS_SUCCESS || found == 0))
    s2 = heuristic(0);
  (void)cublasLtMatmulPreferenceDestroy(pref);
  FL_CUBLAS_CHECK(s2);
  FL_CHECK_ARG(found > 0, "[kernel linear] cuBLASLt has no algorithm for M=", key.m, " N=", key.n,
               " K=", key.k, " dtype=", key.dtype, " epilogue=", key.epilogue);
  p->algo = results[0].algo;
  if (offered)
    for (int i = 0; i < found; ++i) offered->push_back({results[i].algo});
  return p;
}

// The tuned algorithm of each (device, plan key) (Note [Tuned GEMMs for a
// share of the device]).
struct TunedKey {
  int device;
  PlanKey key;
  bool operator==(const TunedKey& o) const { return device == o.device && key == o.key; }
};
struct TunedKeyHash {
  size_t operator()(const TunedKey& k) const noexcept {
    return PlanKeyHash{}(k.key) ^ static_cast<size_t>(k.device) * 0x9e3779b97f4a7c15ull;
  }
};
Mutex g_tune_mu;  // guards g_tuned; held through a tuning, so a shape is tuned once per device
std::unordered_map<TunedKey, Algo, TunedKeyHash> g_tuned FL_GUARDED_BY(g_tune_mu);

// Scratch allocated on a stream, freed on it however the tuning ends.
class StreamScratch {
 public:
  explicit StreamScratch(cudaStream_t s) : stream(s) {}
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  cudaStream_t stream;
  void* p[3] = {nullptr, nullptr, nullptr};
  ~StreamScratch() {
    for (void* q : p)
      if (q) (void)cudaFreeAsync(q, stream);
  }
};

// `algo` split `splits` ways along K, reduced in the compute type in the
// workspace; false if the algorithm cannot split.
bool split_along_k(cublasLtMatmulAlgo_t& algo, uint32_t splits) {
  int32_t can = 0;
  size_t got = 0;
  if (cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &can, sizeof(can),
                                        &got) != CUBLAS_STATUS_SUCCESS ||
      !can)
    return false;
  const uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  return cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits,
                                              sizeof(splits)) == CUBLAS_STATUS_SUCCESS &&
         cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                                              sizeof(scheme)) == CUBLAS_STATUS_SUCCESS;
}

// The algorithm every stream of ctx's device uses for `key`: the table's, or
// the fastest of `offered` and their splits along K, timed now on r's tuning
// stream (Note [Tuned GEMMs for a share of the device]). `p` is the plan
// being made (its first choice in p.algo); w and bias are the call's.
cublasLtMatmulAlgo_t tuned_algo(LtResource& r, Plan& p, const PlanKey& key,
                                const std::vector<Algo>& offered, const void* w, const void* bias,
                                LaunchContext& ctx) FL_REQUIRES(r.mu) {
  MutexLock lock(g_tune_mu);
  const TunedKey tk{ctx.device(), key};
  if (auto it = g_tuned.find(tk); it != g_tuned.end()) return it->second.algo;
  std::vector<Algo> cands;
  for (const Algo& a : offered) {
    cands.push_back(a);
    for (uint32_t splits : {2u, 4u}) {
      cublasLtMatmulAlgo_t s = a.algo;
      cublasLtMatmulHeuristicResult_t check{};
      if (split_along_k(s, splits) &&
          cublasLtMatmulAlgoCheck(r.handle, p.desc, p.a, p.b, p.c, p.c, &s, &check) ==
              CUBLAS_STATUS_SUCCESS &&
          check.workspaceSize <= kWorkspaceBytes)
        cands.push_back({s});
    }
  }
  cublasLtMatmulAlgo_t best = p.algo;
  if (cands.size() > 1) {
    ctx.count_gemm_tuning();
    if (!r.tune_stream) {
      FL_CUDA_CHECK_CTX(ctx, cudaStreamCreateWithFlags(&r.tune_stream, cudaStreamNonBlocking));
      FL_CUDA_CHECK_CTX(ctx, cudaEventCreate(&r.tune_start));
      FL_CUDA_CHECK_CTX(ctx, cudaEventCreate(&r.tune_stop));
    }
    const cudaStream_t s = r.tune_stream;
    const size_t esize = key.dtype == 0 ? 4 : 2;
    const size_t x_bytes = static_cast<size_t>(key.m * key.k) * esize;
    StreamScratch scratch(s);
    FL_CUDA_CHECK_CTX(ctx, cudaMallocAsync(&scratch.p[0], x_bytes, s));
    FL_CUDA_CHECK_CTX(
        ctx, cudaMallocAsync(&scratch.p[1], static_cast<size_t>(key.m * key.n) * esize, s));
    FL_CUDA_CHECK_CTX(ctx, cudaMallocAsync(&scratch.p[2], kWorkspaceBytes, s));
    void* const x = scratch.p[0];
    void* const y = scratch.p[1];
    void* const ws = scratch.p[2];
    FL_CUDA_CHECK_CTX(ctx, cudaMemsetAsync(x, 0, x_bytes, s));
    if (bias)
      FL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                     &bias, sizeof(bias)));
    const float alpha = 1.f, beta = 0.f;
    const auto launch = [&](const cublasLtMatmulAlgo_t& a) {
      return cublasLtMatmul(r.handle, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &a, ws,
                            kWorkspaceBytes, s) == CUBLAS_STATUS_SUCCESS;
    };
    float best_ms = -1;
    for (const Algo& c : cands) {
      const cublasLtMatmulAlgo_t& a = c.algo;
      if (!launch(a)) continue;  // warm-up; an algorithm that refuses is skipped
      float fastest = -1;
      bool ok = true;  // every launch taken: a refused one would shorten the time
      for (int run = 0; run < kTuneRuns && ok; ++run) {
        FL_CUDA_CHECK_CTX(ctx, cudaEventRecord(r.tune_start, s));
        for (int i = 0; i < kTuneLaunches && ok; ++i) ok = launch(a);
        FL_CUDA_CHECK_CTX(ctx, cudaEventRecord(r.tune_stop, s));
        FL_CUDA_CHECK_CTX(ctx, cudaEventSynchronize(r.tune_stop));
        float ms = 0;
        FL_CUDA_CHECK_CTX(ctx, cudaEventElapsedTime(&ms, r.tune_start, r.tune_stop));
        if (fastest < 0 || ms < fastest) fastest = ms;
      }
      if (ok && (best_ms < 0 || fastest < best_ms)) {
        best_ms = fastest;
        best = a;
      }
    }
  }
  g_tuned.emplace(tk, Algo{best});
  return best;
}

// Note [Linear for a few rows]
// At 1 to 8 rows an f32 linear is a matrix-vector product: it reads the
// whole weight once and does little arithmetic, so its time is the read and
// the launch. cuBLASLt's plans for those shapes took 4 to 7 us a layer on the
// H100 (11.9 us for the seed MLP's three layers at 2 rows: docs/PERF.md),
// more than the read of a layer's 2-4 MiB from L2. This kernel gives each
// output column kRowsSplit warps, each summing its own contiguous part of K
// (four floats a lane at a time where K and the pointers allow it, else
// one): enough warps on every SM to keep the whole weight's reads in flight
// at once. Each warp keeps one sum per row and adds its lanes up with a
// butterfly of shuffles; the block then adds the parts of a column in a
// fixed order, adds the bias and applies the activation as it stores. Every
// row's sum is taken in the same order whatever the number of rows, so up to
// kRowsKernelMax rows a row's result does not depend on the batch it ran in
// (a request batched with up to 7 others gets the bits it would get alone,
// as long as the four-float and one-float paths are chosen alike: they sum
// in different orders; from 9 rows cuBLASLt's order applies), and nothing
// is accumulated with atomics (deterministic). Used for f32 up to
// kRowsKernelMax rows; beyond that, and for f16/bf16, cuBLASLt. Measured on
// the H100 (docs/PERF.md, "A kernel for a few rows"): 1.25x and 1.35x a
// round trip of the MLP at 1 and 8 rows, 1.15x for 8 closed-loop clients of
// a BatchQueue; but 5-8 % less for 64 clients, whose few small batches
// spread over every SM while the other workers' GEMMs run. A grid capped by
// the stream's device share, 16 rows, and rows staged in shared memory were
// tried and lost more than they won.
constexpr int64_t kRowsKernelMax = 8;
constexpr int kRowsWarps = 8;                       // warps in a block
constexpr int kRowsSplit = 4;                       // warps summing one column
constexpr int kRowsCols = kRowsWarps / kRowsSplit;  // columns of a block

template <int kRows, bool kVec4>
__global__ void __launch_bounds__(kRowsWarps * 32)
    linear_rows_kernel(const float* __restrict__ x, const float* __restrict__ w,
                       const float* __restrict__ bias, float* __restrict__ y, int64_t N, int64_t K,
                       int act) {
  __shared__ float parts[kRowsWarps][kRows];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t n = int64_t{blockIdx.x} * kRowsCols + warp / kRowsSplit;
  const int part = warp % kRowsSplit;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  if (n < N) {
    const float* wn = w + n * K;
    if constexpr (kVec4) {
      // This warp's share of K in float4s: [lo, hi).
      const int64_t k4 = K / 4, len = (k4 + kRowsSplit - 1) / kRowsSplit;
      const int64_t lo = part * len, hi = min(k4, lo + len);
      const auto* w4 = reinterpret_cast<const float4*>(wn);
#pragma unroll 2
      for (int64_t i = lo + lane; i < hi; i += 32) {
        const float4 wv = __ldg(w4 + i);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float4 xv = __ldg(reinterpret_cast<const float4*>(x + r * K) + i);
          acc[r] = fmaf(xv.x, wv.x, acc[r]);
          acc[r] = fmaf(xv.y, wv.y, acc[r]);
          acc[r] = fmaf(xv.z, wv.z, acc[r]);
          acc[r] = fmaf(xv.w, wv.w, acc[r]);
        }
      }
    } else {
      const int64_t len = (K + kRowsSplit - 1) / kRowsSplit;
      const int64_t lo = part * len, hi = min(K, lo + len);
#pragma unroll 4
      for (int64_t k = lo + lane; k < hi; k += 32) {
        const float wv = __ldg(wn + k);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] = fmaf(__ldg(x + r * K + k), wv, acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
    if (lane == 0) parts[warp][r] = acc[r];
  }
  __syncthreads();
  const int t = static_cast<int>(threadIdx.x);
  if (t >= kRowsCols * kRows) return;
  const int c = t / kRows, r = t % kRows;
  const int64_t out = int64_t{blockIdx.x} * kRowsCols + c;
  if (out >= N) return;
  float sum = parts[c * kRowsSplit][r];
#pragma unroll
  for (int p = 1; p < kRowsSplit; ++p) sum += parts[c * kRowsSplit + p][r];
  y[r * N + out] = apply_act(sum + (bias ? __ldg(bias + out) : 0.f), act);
}

template <int kRows>
void launch_linear_rows(const float* x, const float* w, const float* bias, float* y, int64_t N,
                        int64_t K, int act, LaunchContext& ctx) {
  const auto blocks = static_cast<unsigned>((N + kRowsCols - 1) / kRowsCols);
  const bool vec4 = K % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(w) % 16 == 0;
  if (vec4)
    linear_rows_kernel<kRows, true>
        <<<blocks, kRowsWarps * 32, 0, ctx.stream()>>>(x, w, bias, y, N, K, act);
  else
    linear_rows_kernel<kRows, false>
        <<<blocks, kRowsWarps * 32, 0, ctx.stream()>>>(x, w, bias, y, N, K, act);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

// y[M,N] = act(x[M,K] w[N,K]^T + bias) for 1 <= M <= kRowsKernelMax.
void linear_rows(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K, int act, LaunchContext& ctx) {
  switch (M) {
    case 1: return launch_linear_rows<1>(x, w, bias, y, N, K, act, ctx);
    case 2: return launch_linear_rows<2>(x, w, bias, y, N, K, act, ctx);
    case 3: return launch_linear_rows<3>(x, w, bias, y, N, K, act, ctx);
    case 4: return launch_linear_rows<4>(x, w, bias, y, N, K, act, ctx);
    case 5: return launch_linear_rows<5>(x, w, bias, y, N, K, act, ctx);
    case 6: return launch_linear_rows<6>(x, w, bias, y, N, K, act, ctx);
    case 7: return launch_linear_rows<7>(x, w, bias, y, N, K, act, ctx);
    default: return launch_linear_rows<8>(x, w, bias, y, N, K, act, ctx);
  }
}

template <typename T>
void launch_activation(const T* x, T* y, int act, uint64_t n, LaunchContext& ctx) {
  activation_kernel<T><<<blocks_for(n, ctx), kThreads, 0, ctx.stream()>>>(x, y, act, n);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

template <typename T, int kDtype>
void linear(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "linear", 4, 4);
  const int64_t M = a.scalars[0].i, N = a.scalars[1].i, K = a.scalars[2].i, act = a.scalars[3].i;
  FL_CHECK_ARG(M > 0 && N > 0 && K > 0 && act >= 0 && act <= 3, "[kernel linear] bad sizes M=", M,
               " N=", N, " K=", K, " act=", act);
  const void* x = a.ptrs[0];
  const void* w = a.ptrs[1];
  const void* bias = a.ptrs[2];
  void* y = a.ptrs[3];
  FL_CHECK_ARG(x && w && y, "[kernel linear] a tensor pointer is null");
  if constexpr (kDtype == 0) {
    if (M <= kRowsKernelMax && N < (int64_t{1} << 31) && K < (int64_t{1} << 31)) {
      linear_rows(static_cast<const float*>(x), static_cast<const float*>(w),
                  static_cast<const float*>(bias), static_cast<float*>(y), M, N, K,
                  static_cast<int>(act), ctx);
      return;
    }
  }
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
  if (act == 1)
    epi = bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  else if (act == 3)
    epi = bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  else if (bias)
    epi = CUBLASLT_EPILOGUE_BIAS;  // none, or exact gelu (a kernel after)
  LtResource& r = lt_resource(ctx);
  const PlanKey key{M,
                    N,
                    K,
                    kDtype,
                    static_cast<int>(epi),
                    alignment(w),
                    alignment(x),
                    alignment(y),
                    gemm_sm_target(ctx.sm_count(), ctx.device_share(), M, kDtype)};
  const float alpha = 1.f, beta = 0.f;
  {
    MutexLock lock(r.mu);
    auto it = r.plans.find(key);
    if (it == r.plans.end()) {
      const bool tune = key.sm_target > 0 && ctx.tune_gemm();
      std::vector<Algo> offered;
      std::unique_ptr<Plan> plan = make_plan(r, key, tune ? &offered : nullptr);
      if (tune) plan->algo = tuned_algo(r, *plan, key, offered, w, bias, ctx);
      it = r.plans.emplace(key, std::move(plan)).first;
      ctx.count_gemm_plan();
    }
    Plan& p = *it->second;
    if (bias)
      FL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                     &bias, sizeof(bias)));
    FL_CUBLAS_CHECK(cublasLtMatmul(r.handle, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c,
                                   &p.algo, r.workspace, kWorkspaceBytes, ctx.stream()));
  }
  if (act == 2)
    launch_activation<T>(static_cast<const T*>(y), static_cast<T*>(y), 2,
                         static_cast<uint64_t>(M * N), ctx);
}

template <typename T, bool kMul>
void binary_bcast(const KernelArgs& a, LaunchContext& ctx) {
  need(a, kMul ? "mul_bcast" : "add_bcast", 3, 1);
  const auto m = static_cast<uint64_t>(a.scalars[0].i);
  if (a.n == 0) return;
  FL_CHECK_ARG(m > 0 && a.n % m == 0, "[kernel ", kMul ? "mul_bcast" : "add_bcast", "] b's size ",
               m, " does not divide a's ", a.n);
  binary_bcast_kernel<T, kMul><<<blocks_for(a.n, ctx), kThreads, 0, ctx.stream()>>>(
      static_cast<const T*>(a.ptrs[0]), static_cast<const T*>(a.ptrs[1]),
      static_cast<T*>(a.ptrs[2]), m, a.n);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

template <typename T>
void relu(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "relu", 2, 0);
  if (a.n == 0) return;
  launch_activation<T>(static_cast<const T*>(a.ptrs[0]), static_cast<T*>(a.ptrs[1]), 1, a.n, ctx);
}

template <typename T>
void gelu(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "gelu", 2, 1);
  if (a.n == 0) return;
  launch_activation<T>(static_cast<const T*>(a.ptrs[0]), static_cast<T*>(a.ptrs[1]),
                       a.scalars[0].i ? 3 : 2, a.n, ctx);
}

template <typename T>
void layernorm(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "layernorm", 4, 3);
  const int64_t rows = a.scalars[0].i, cols = a.scalars[1].i;
  FL_CHECK_ARG(rows > 0 && cols > 0 && rows < (int64_t{1} << 31),
               "[kernel layernorm] bad sizes rows=", rows, " cols=", cols);
  layernorm_kernel<T><<<static_cast<unsigned>(rows), row_threads(cols), 0, ctx.stream()>>>(
      static_cast<const T*>(a.ptrs[0]), static_cast<const T*>(a.ptrs[1]),
      static_cast<const T*>(a.ptrs[2]), static_cast<T*>(a.ptrs[3]), cols,
      static_cast<float>(a.scalars[2].f));
  FL_CUDA_CHECK_LAUNCH(ctx);
}

template <typename T>
void softmax(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "softmax", 2, 2);
  const int64_t rows = a.scalars[0].i, cols = a.scalars[1].i;
  FL_CHECK_ARG(rows > 0 && cols > 0 && rows < (int64_t{1} << 31),
               "[kernel softmax] bad sizes rows=", rows, " cols=", cols);
  softmax_kernel<T><<<static_cast<unsigned>(rows), row_threads(cols), 0, ctx.stream()>>>(
      static_cast<const T*>(a.ptrs[0]), static_cast<T*>(a.ptrs[1]), cols);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

template <typename T, int kDtype>
void add_typed(KernelTable& table, const char* suffix) {
  const std::string s = suffix;
  table.emplace("linear_" + s, &linear<T, kDtype>);
  table.emplace("add_bcast_" + s, &binary_bcast<T, false>);
  table.emplace("mul_bcast_" + s, &binary_bcast<T, true>);
  table.emplace("relu_" + s, &relu<T>);
  table.emplace("gelu_" + s, &gelu<T>);
  table.emplace("layernorm_" + s, &layernorm<T>);
  table.emplace("softmax_" + s, &softmax<T>);
}

}  // namespace

void add_nn_kernels(KernelTable& table) {
  add_typed<float, 0>(table, "f32");
  add_typed<__half, 1>(table, "f16");
  add_typed<__nv_bfloat16, 2>(table, "bf16");
}

}  // namespace flotilla::backend::cuda
