// Standalone (not part of the build): the seed MLP's three fp32 linear layers
// (bias + ReLU epilogues, as the linear kernel fuses them) with cuBLASLt's
// heuristic first choice, when the matmul descriptor tells the heuristic how
// many SMs to plan for (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET; 0 = the whole
// device). For each batch size M and target: the algorithm chosen per layer,
// one stream's three-layer chain back to back (µs per chain: latency with the
// GPU to itself) and 8 streams each replaying a graph of chains (aggregate
// rows/s: the BatchQueue's regime, 8 workers sharing the GPU).
//   nvcc -O2 -std=c++17 -o /tmp/gs scripts/gemm_sm_target.cu -lcublasLt && /tmp/gs [M...]
// GS_TARGETS="0 66 33 16" (SM counts; -1: TF32 on the whole device) sets the
// targets tried; the default is the whole device, 1/2 ... 1/32 of it, TF32.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "seed_mlp_lt.h"

constexpr int kStreams = 8, kChainsPerGraph = 10, kGraphReps = 10, kMaxM = 1024;
constexpr size_t kWs = size_t{8} << 20;  // as the linear kernel's

struct Plan {
  MatmulDesc m;
  cublasLtMatmulAlgo_t algo;
  const float* w;
};

cublasLtHandle_t lt;
cudaStream_t streams[kStreams];
float* act[kStreams][4];  // x, h1, h2, y
void* ws[kStreams];
float *w[3], *bias;

Plan plan(const Layer& L, int m, int sm_target, cublasComputeType_t ct, const float* wl) {
  Plan p;
  p.w = wl;
  p.m = make_matmul_desc(L, m, ct, bias, sm_target);
  cublasLtMatmulPreference_t pref = workspace_preference(kWs);
  cublasLtMatmulHeuristicResult_t r{};
  int found = 0;
  CK(cublasLtMatmulAlgoGetHeuristic(lt, p.m.d, p.m.a, p.m.b, p.m.c, p.m.c, pref, 1, &r, &found));
  if (!found) std::exit(2);
  p.algo = r.algo;
  cublasLtMatmulPreferenceDestroy(pref);
  return p;
}

bool chain(const Plan* ps, int s) {
  const float alpha = 1, beta = 0;
  for (int l = 0; l < 3; ++l)
    if (const MatmulDesc& d = ps[l].m;
        cublasLtMatmul(lt, d.d, &alpha, ps[l].w, d.a, act[s][l], d.b, &beta, act[s][l + 1], d.c,
                       act[s][l + 1], d.c, &ps[l].algo, ws[s], kWs, streams[s]) != 0)
      return false;
  return true;
}

// Chains per second over `n` streams, each replaying a graph of chains.
double rate(const Plan* ps, int n) {
  cudaGraphExec_t exec[kStreams];
  for (int i = 0; i < n; ++i) {
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(streams[i], cudaStreamCaptureModeThreadLocal));
    for (int j = 0; j < kChainsPerGraph; ++j)
      if (!chain(ps, i)) std::exit(3);
    CK(cudaStreamEndCapture(streams[i], &g));
    CK(cudaGraphInstantiate(&exec[i], g, 0));
    CK(cudaGraphDestroy(g));
  }
  for (int i = 0; i < n; ++i) CK(cudaGraphLaunch(exec[i], streams[i]));
  CK(cudaDeviceSynchronize());
  std::vector<double> runs;
  for (int trial = 0; trial < 5; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < kGraphReps; ++r)
      for (int i = 0; i < n; ++i) CK(cudaGraphLaunch(exec[i], streams[i]));
    CK(cudaDeviceSynchronize());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    runs.push_back(n * kChainsPerGraph * kGraphReps / s);
  }
  for (int i = 0; i < n; ++i) CK(cudaGraphExecDestroy(exec[i]));
  std::sort(runs.begin(), runs.end());
  return runs[runs.size() / 2];
}

int main(int argc, char** argv) {
  CK(cublasLtCreate(&lt));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::vector<float> h(1024 * 1024);
  srand(1);
  for (auto& v : h) v = (rand() / float(RAND_MAX) - 0.5f) * 0.06f;
  for (int l = 0; l < 3; ++l) {
    CK(cudaMalloc(&w[l], 1024 * 1024 * 4));
    CK(cudaMemcpy(w[l], h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  }
  CK(cudaMalloc(&bias, 1024 * 4));
  CK(cudaMemcpy(bias, h.data(), 1024 * 4, cudaMemcpyHostToDevice));
  for (int i = 0; i < kStreams; ++i) {
    CK(cudaStreamCreateWithFlags(&streams[i], cudaStreamNonBlocking));
    for (auto& a : act[i]) {
      CK(cudaMalloc(&a, size_t(kMaxM) * 1024 * 4));
      CK(cudaMemcpy(a, h.data(), size_t(kMaxM) * 1024 * 4 / 2, cudaMemcpyHostToDevice));
    }
    CK(cudaMalloc(&ws[i], kWs));
  }
  std::printf("device SMs: %d\n", sms);
  std::printf("%5s %6s | %-44s | %10s | %12s %6s\n", "M", "target", "per layer: tile/split",
              "1 stream", "8 streams", "vs 1st");
  std::vector<int> ms = {16, 32, 64, 128, 192, 256, 384, 512, 1024};
  if (argc > 1) {  // the batch sizes to try, e.g. 1 2 4 8
    ms.clear();
    for (int i = 1; i < argc; ++i) ms.push_back(std::atoi(argv[i]));
  }
  std::vector<int> targets = {0, sms / 2, sms / 4, sms / 8, sms / 16, sms / 32, -1};
  if (const char* env = std::getenv("GS_TARGETS")) {
    targets.clear();
    for (const char* p = env; *p;) {
      char* end = nullptr;
      const long t = std::strtol(p, &end, 10);
      if (end == p) break;
      targets.push_back(static_cast<int>(t));
      p = end;
    }
  }
  for (int m : ms) {
    double base = 0;
    for (int target : targets) {
      const bool tf32 = target < 0;
      Plan ps[3];
      char desc[128];
      int off = 0;
      for (int l = 0; l < 3; ++l) {
        ps[l] = plan(kLayers[l], m, tf32 ? 0 : target,
                     tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, w[l]);
        off += std::snprintf(desc + off, sizeof desc - off, "a%d t%d s%d  ",
                             algo_attr(ps[l].algo, CUBLASLT_ALGO_CONFIG_ID),
                             algo_attr(ps[l].algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                             algo_attr(ps[l].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM));
      }
      const double one = rate(ps, 1), eight = rate(ps, kStreams);
      if (base == 0) base = eight;  // the first target tried (0 by default)
      std::printf("%5d %6s | %-44s | %7.1f us | %9.2fM/s %5.2fx\n", m,
                  tf32 ? "tf32" : std::to_string(target).c_str(), desc, 1e6 / one, eight * m / 1e6,
                  eight / base);
      for (auto& p : ps) destroy_matmul_desc(p.m);
    }
  }
  return 0;
}
