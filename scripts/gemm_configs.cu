// Standalone (not part of the build): how fast can the seed MLP's three
// linear layers (fp32, bias + ReLU epilogues as the linear kernel fuses them)
// run when 8 streams share the GPU, as the BatchQueue's workers do? For each
// layer and batch size M it takes cuBLASLt's heuristic candidates (up to 16)
// and each with split-K 1, 2, 4, 8, 16 where the algorithm allows it, checks
// the result against the heuristic's first choice, and times 8 streams each
// replaying a graph of back-to-back launches (aggregate rows/s). Then the
// three-layer chain with the first choices against the best per layer, and
// legacy cublasSgemm (no epilogue) and TF32 first choices for reference.
//   nvcc -O2 -std=c++17 -o /tmp/gc scripts/gemm_configs.cu -lcublasLt -lcublas && /tmp/gc [M...]
// GC_SM_TARGET=16 plans for 16 SMs (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, as
// the linear kernel does for a queue of 8 workers): "first" is then the
// library's plan under a device share, and the candidates are the ones the
// heuristic offers for that target. GC_WS_MIB sets the workspace (default
// 32; the linear kernel's is 8).
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "seed_mlp_lt.h"

constexpr int kStreams = 8, kLaunchesPerGraph = 25, kGraphReps = 8, kMaxM = 512;
size_t ws_bytes = size_t{32} << 20;  // GC_WS_MIB
int sm_target = -1;                  // GC_SM_TARGET; -1: not set

cublasLtHandle_t lt;
cublasHandle_t blas;
cudaStream_t streams[kStreams];
float *x[kStreams], *y[kStreams], *w, *bias;
void* ws[kStreams];

// Aggregate launches per second of `launch(stream_index)` over 8 streams, each
// replaying a graph of kLaunchesPerGraph launches kGraphReps times.
double rate(const std::function<bool(int)>& launch) {
  cudaGraphExec_t exec[kStreams];
  for (int i = 0; i < kStreams; ++i) {
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(streams[i], cudaStreamCaptureModeThreadLocal));
    bool ok = true;
    for (int j = 0; j < kLaunchesPerGraph && ok; ++j) ok = launch(i);
    CK(cudaStreamEndCapture(streams[i], &g));
    if (!ok) return 0;
    CK(cudaGraphInstantiate(&exec[i], g, 0));
    CK(cudaGraphDestroy(g));
  }
  for (int i = 0; i < kStreams; ++i) CK(cudaGraphLaunch(exec[i], streams[i]));  // warm
  CK(cudaDeviceSynchronize());
  double best = 0;
  for (int trial = 0; trial < 3; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < kGraphReps; ++r)
      for (int i = 0; i < kStreams; ++i) CK(cudaGraphLaunch(exec[i], streams[i]));
    CK(cudaDeviceSynchronize());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, kStreams * kLaunchesPerGraph * kGraphReps / s);
  }
  for (int i = 0; i < kStreams; ++i) CK(cudaGraphExecDestroy(exec[i]));
  return best;
}

struct Cand {
  cublasLtMatmulAlgo_t algo;
  size_t ws;
  double per_s;
  int split;
};

std::vector<float> out_of(int s, int m, int n) {
  std::vector<float> h(size_t(m) * n);
  CK(cudaMemcpy(h.data(), y[s], h.size() * 4, cudaMemcpyDeviceToHost));
  return h;
}

int main(int argc, char** argv) {
  if (const char* v = std::getenv("GC_SM_TARGET")) sm_target = std::atoi(v);
  if (const char* v = std::getenv("GC_WS_MIB")) ws_bytes = size_t(std::atoi(v)) << 20;
  std::vector<int> ms = {32, 64, 128, 192, 256, 384, 512};
  if (argc > 1) {
    ms.clear();
    for (int i = 1; i < argc; ++i) ms.push_back(std::atoi(argv[i]));
  }
  for (int m : ms)
    if (m < 1 || m > kMaxM) {
      std::printf("batch size %d: use 1 to %d (the buffers' rows)\n", m, kMaxM);
      return 2;
    }
  CK(cublasLtCreate(&lt));
  CK(cublasCreate(&blas));
  CK(cudaMalloc(&w, 1024 * 1024 * 4));
  CK(cudaMalloc(&bias, 1024 * 4));
  std::vector<float> hw(1024 * 1024), hx(kMaxM * 1024);
  srand(1);
  for (auto& v : hw) v = (rand() / float(RAND_MAX) - 0.5f) * 0.06f;
  for (auto& v : hx) v = rand() / float(RAND_MAX) - 0.5f;
  CK(cudaMemcpy(w, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(bias, hw.data(), 1024 * 4, cudaMemcpyHostToDevice));
  for (int i = 0; i < kStreams; ++i) {
    CK(cudaStreamCreateWithFlags(&streams[i], cudaStreamNonBlocking));
    CK(cudaMalloc(&x[i], kMaxM * 1024 * 4));
    CK(cudaMalloc(&y[i], kMaxM * 1024 * 4));
    CK(cudaMalloc(&ws[i], ws_bytes));
    CK(cudaMemcpy(x[i], hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
  }
  const float alpha = 1, beta = 0;
  std::printf("SM target %d, workspace %zu MiB\n", sm_target, ws_bytes >> 20);
  std::printf(
      "per layer, 8 streams: M N K | first: rows/s | best: rows/s gain algo tile stages "
      "split red swizzle custom | sgemm | tf32\n");
  for (int m : ms) {
    double chain_first = 0, chain_best = 0;  // seconds per row summed over layers
    std::vector<Cand> picks;
    std::vector<Cand> firsts;
    for (const Layer& L : kLayers) {
      MatmulDesc d = make_matmul_desc(L, m, CUBLAS_COMPUTE_32F, bias, sm_target);
      cublasLtMatmulPreference_t p = workspace_preference(ws_bytes);
      cublasLtMatmulHeuristicResult_t r[16];
      int found = 0;
      CK(cublasLtMatmulAlgoGetHeuristic(lt, d.d, d.a, d.b, d.c, d.c, p, 16, r, &found));
      // The reference output: the first choice.
      CK(cublasLtMatmul(lt, d.d, &alpha, w, d.a, x[0], d.b, &beta, y[0], d.c, y[0], d.c, &r[0].algo,
                        ws[0], ws_bytes, streams[0]));
      CK(cudaDeviceSynchronize());
      const std::vector<float> ref = out_of(0, m, L.n);
      std::vector<Cand> cands;
      for (int i = 0; i < found; ++i) {
        for (int split : {0, 2, 4, 8, 16}) {
          cublasLtMatmulAlgo_t a = r[i].algo;
          if (split) {
            size_t got = 0;
            int splits_ok = 0;
            cublasLtMatmulAlgoCapGetAttribute(&a, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &splits_ok,
                                              sizeof splits_ok, &got);
            if (!splits_ok) continue;
            uint32_t s = split;
            if (cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &s,
                                                     sizeof s) != 0)
              continue;
            uint32_t red = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
            cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red,
                                                 sizeof red);
          }
          cublasLtMatmulHeuristicResult_t chk{};
          if (cublasLtMatmulAlgoCheck(lt, d.d, d.a, d.b, d.c, d.c, &a, &chk) != 0) continue;
          if (chk.workspaceSize > ws_bytes) continue;
          CK(cudaMemset(y[1], 0, size_t(m) * L.n * 4));
          if (cublasLtMatmul(lt, d.d, &alpha, w, d.a, x[1], d.b, &beta, y[1], d.c, y[1], d.c, &a,
                             ws[1], ws_bytes, streams[1]) != 0)
            continue;
          CK(cudaDeviceSynchronize());
          const std::vector<float> got = out_of(1, m, L.n);
          double err = 0;
          for (size_t j = 0; j < got.size(); ++j)
            err = std::max(err, double(std::fabs(got[j] - ref[j])));
          if (err > 1e-4) {
            std::printf("  [M=%d layer %dx%d cand %d split %d wrong by %g]\n", m, L.n, L.k, i,
                        split, err);
            continue;
          }
          const double per_s = rate([&](int s) {
            return cublasLtMatmul(lt, d.d, &alpha, w, d.a, x[s], d.b, &beta, y[s], d.c, y[s], d.c,
                                  &a, ws[s], ws_bytes, streams[s]) == 0;
          });
          cands.push_back({a, chk.workspaceSize, per_s, split});
        }
      }
      const Cand first = cands.front();
      const Cand best =
          *std::max_element(cands.begin(), cands.end(),
                            [](const Cand& u, const Cand& v) { return u.per_s < v.per_s; });
      const double sgemm = rate([&](int s) {
        return cublasSetStream(blas, streams[s]) == 0 &&
               cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, L.n, m, L.k, &alpha, w, L.k, x[s], L.k,
                           &beta, y[s], L.n) == 0;
      });
      MatmulDesc t = make_matmul_desc(L, m, CUBLAS_COMPUTE_32F_FAST_TF32, bias);
      cublasLtMatmulHeuristicResult_t rt{};
      int ft = 0;
      CK(cublasLtMatmulAlgoGetHeuristic(lt, t.d, t.a, t.b, t.c, t.c, p, 1, &rt, &ft));
      const double tf32 = rate([&](int s) {
        return cublasLtMatmul(lt, t.d, &alpha, w, t.a, x[s], t.b, &beta, y[s], t.c, y[s], t.c,
                              &rt.algo, ws[s], ws_bytes, streams[s]) == 0;
      });
      const auto& b = best.algo;
      std::printf(
          "%4d %4d %4d | first %8.2fM (%d cands) | best %8.2fM %5.2fx id %d tile %d stages %d "
          "split %d red %d swz %d custom %d cluster %d ws %zu | sgemm %8.2fM | tf32 %8.2fM\n",
          m, L.n, L.k, first.per_s * m / 1e6, (int)cands.size(), best.per_s * m / 1e6,
          best.per_s / first.per_s, algo_attr(b, CUBLASLT_ALGO_CONFIG_ID),
          algo_attr(b, CUBLASLT_ALGO_CONFIG_TILE_ID), algo_attr(b, CUBLASLT_ALGO_CONFIG_STAGES_ID),
          algo_attr(b, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
          algo_attr(b, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
          algo_attr(b, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
          algo_attr(b, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
          algo_attr(b, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID), best.ws, sgemm * m / 1e6,
          tf32 * m / 1e6);
      const auto& f = first.algo;
      std::printf(
          "               first: id %d tile %d stages %d split %d swz %d custom %d cluster %d\n",
          algo_attr(f, CUBLASLT_ALGO_CONFIG_ID), algo_attr(f, CUBLASLT_ALGO_CONFIG_TILE_ID),
          algo_attr(f, CUBLASLT_ALGO_CONFIG_STAGES_ID),
          algo_attr(f, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
          algo_attr(f, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
          algo_attr(f, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
          algo_attr(f, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID));
      // Every candidate, sorted, for the rule.
      std::vector<Cand> sorted = cands;
      std::sort(sorted.begin(), sorted.end(),
                [](const Cand& u, const Cand& v) { return u.per_s > v.per_s; });
      for (size_t i = 0; i < sorted.size() && i < 6; ++i)
        std::printf("               #%zu %8.2fM id %d tile %d stages %d split %d\n", i,
                    sorted[i].per_s * m / 1e6, algo_attr(sorted[i].algo, CUBLASLT_ALGO_CONFIG_ID),
                    algo_attr(sorted[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                    algo_attr(sorted[i].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID), sorted[i].split);
      chain_first += 1 / (first.per_s * m);
      chain_best += 1 / (best.per_s * m);
      CK(cublasLtMatmulPreferenceDestroy(p));
    }
    std::printf(
        "M=%d three layers (from per-layer rates): first %.2fM rows/s, best %.2fM (%.2fx)\n\n", m,
        1 / chain_first / 1e6, 1 / chain_best / 1e6, chain_first / chain_best);
  }
  return 0;
}
