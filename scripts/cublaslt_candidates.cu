// Standalone (not part of the build): for the seed MLP's three linear layers
// at M rows, times every algorithm cuBLASLt's heuristic offers (up to 16)
// against its first choice, 200 back-to-back launches each (throughput, not
// one call's latency). Build and run on the GPU machine:
//   nvcc -O2 -o /tmp/lt scripts/cublaslt_candidates.cu -lcublasLt && /tmp/lt
// Output of one run: docs/perf/h100-cublaslt-candidates.txt.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "seed_mlp_lt.h"

int main() {
  cublasLtHandle_t h;
  CK(cublasLtCreate(&h));
  const size_t ws_bytes = 32 << 20;
  void* ws;
  CK(cudaMalloc(&ws, ws_bytes));
  float *x, *w, *b, *y;
  CK(cudaMalloc(&x, 512 * 1024 * 4));
  CK(cudaMalloc(&w, 1024 * 1024 * 4));
  CK(cudaMalloc(&b, 1024 * 4));
  CK(cudaMalloc(&y, 512 * 1024 * 4));
  cudaMemset(x, 0, 512 * 1024 * 4);
  cudaMemset(w, 0, 1024 * 1024 * 4);
  cudaMemset(b, 0, 4096);
  cudaStream_t s;
  cudaStreamCreate(&s);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::printf("%5s %5s %5s %4s %10s %10s %4s\n", "M", "N", "K", "algs", "first_us", "best_us",
              "best");
  for (int m : {1, 8, 16, 32, 64, 128, 256, 512}) {
    double sum_first = 0, sum_best = 0;
    for (const Layer& L : kLayers) {
      const MatmulDesc md = make_matmul_desc(L, m, CUBLAS_COMPUTE_32F, b);
      const cublasLtMatmulDesc_t d = md.d;
      const cublasLtMatrixLayout_t la = md.a, lb = md.b, lc = md.c;
      cublasLtMatmulPreference_t p = workspace_preference(ws_bytes);
      cublasLtMatmulHeuristicResult_t r[16];
      int found = 0;
      CK(cublasLtMatmulAlgoGetHeuristic(h, d, la, lb, lc, lc, p, 16, r, &found));
      float alpha = 1, beta = 0;
      double first = 0, best = 1e30;
      int besti = -1;
      for (int i = 0; i < found; ++i) {
        bool ok = true;
        for (int j = 0; j < 3 && ok; ++j)
          ok = cublasLtMatmul(h, d, &alpha, w, la, x, lb, &beta, y, lc, y, lc, &r[i].algo, ws,
                              ws_bytes, s) == 0;
        if (!ok) continue;
        const int iters = 200;
        cudaEventRecord(e0, s);
        for (int j = 0; j < iters; ++j)
          cublasLtMatmul(h, d, &alpha, w, la, x, lb, &beta, y, lc, y, lc, &r[i].algo, ws, ws_bytes,
                         s);
        cudaEventRecord(e1, s);
        cudaEventSynchronize(e1);
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        double us = ms * 1000 / iters;
        if (i == 0) first = us;
        if (us < best) {
          best = us;
          besti = i;
        }
      }
      std::printf("%5d %5d %5d %4d %10.2f %10.2f %4d\n", m, L.n, L.k, found, first, best, besti);
      sum_first += first;
      sum_best += best;
      cublasLtMatmulPreferenceDestroy(p);
      destroy_matmul_desc(md);
    }
    std::printf("M=%d: three layers, heuristic's first %.2f us, best %.2f us (%.2fx)\n", m,
                sum_first, sum_best, sum_first / sum_best);
  }
  return 0;
}
