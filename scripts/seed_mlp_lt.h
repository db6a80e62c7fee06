// Shared by the standalone cuBLASLt programs in scripts/ (gemm_configs.cu,
// gemm_sm_target.cu, cublaslt_candidates.cu; each is built by the one nvcc
// command in its first lines, outside the build): the error check, the seed
// MLP's three linear layers as the linear kernel runs them (bias, and ReLU
// after the first two, fused as epilogues), their matmul descriptors and a
// workspace preference, and reading a chosen algorithm's configuration.
#pragma once

#include <cublasLt.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

// Exits the program (status 1) on a CUDA or cuBLAS error, naming the call.
#define CK(x)                                                                  \
  do {                                                                         \
    auto e_ = (x);                                                             \
    if (e_ != 0) {                                                             \
      std::printf("error %d at %s:%d: %s\n", (int)e_, __FILE__, __LINE__, #x); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

struct Layer {
  int n, k;  // out and in features
  cublasLtEpilogue_t epi;
};
inline const Layer kLayers[] = {{1024, 512, CUBLASLT_EPILOGUE_RELU_BIAS},
                                {1024, 1024, CUBLASLT_EPILOGUE_RELU_BIAS},
                                {512, 1024, CUBLASLT_EPILOGUE_BIAS}};

// y [m, n] = x [m, k] W^T [k, n] + bias, as the linear kernel lays it out
// for cuBLASLt (column-major: W^T op, x as is).
struct MatmulDesc {
  cublasLtMatmulDesc_t d;
  cublasLtMatrixLayout_t a, b, c;
};
// `sm_target`: CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET (0: the whole device),
// or < 0 to leave it unset.
inline MatmulDesc make_matmul_desc(const Layer& L, int m, cublasComputeType_t ct, const float* bias,
                                   int sm_target = -1) {
  MatmulDesc s;
  CK(cublasLtMatmulDescCreate(&s.d, ct, CUDA_R_32F));
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CK(cublasLtMatmulDescSetAttribute(s.d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  CK(cublasLtMatmulDescSetAttribute(s.d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  CK(cublasLtMatmulDescSetAttribute(s.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &L.epi, sizeof L.epi));
  CK(cublasLtMatmulDescSetAttribute(s.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  if (sm_target >= 0) {
    int32_t t = sm_target;
    CK(cublasLtMatmulDescSetAttribute(s.d, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &t, sizeof t));
  }
  CK(cublasLtMatrixLayoutCreate(&s.a, CUDA_R_32F, L.k, L.n, L.k));
  CK(cublasLtMatrixLayoutCreate(&s.b, CUDA_R_32F, L.k, m, L.k));
  CK(cublasLtMatrixLayoutCreate(&s.c, CUDA_R_32F, L.n, m, L.n));
  return s;
}

inline void destroy_matmul_desc(const MatmulDesc& s) {
  cublasLtMatrixLayoutDestroy(s.a);
  cublasLtMatrixLayoutDestroy(s.b);
  cublasLtMatrixLayoutDestroy(s.c);
  cublasLtMatmulDescDestroy(s.d);
}

// A heuristic preference allowing `bytes` of workspace (destroy it after).
inline cublasLtMatmulPreference_t workspace_preference(uint64_t bytes) {
  cublasLtMatmulPreference_t p;
  CK(cublasLtMatmulPreferenceCreate(&p));
  CK(cublasLtMatmulPreferenceSetAttribute(p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes,
                                          sizeof bytes));
  return p;
}

// One configuration attribute of a chosen algorithm (0 if it has none).
inline int algo_attr(const cublasLtMatmulAlgo_t& a, cublasLtMatmulAlgoConfigAttributes_t at) {
  uint32_t v = 0;
  size_t got = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&a, at, &v, sizeof v, &got);
  return static_cast<int>(v);
}
