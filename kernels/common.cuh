// Shared helpers for numres's CUDA kernels: float/half conversion and index types.
//
// Kernels are templates over the element type T (float or __half); arithmetic happens in
// float and is rounded to T once, on store. Each .cu file instantiates its kernels for both
// types at the end, so nvcc checks real code and CuPy (NVRTC) finds them by name, e.g.
// "max_pool_nhwc<float>".
//
// Defining NUMRES_NO_HALF leaves out everything half-precision (and cuda_fp16.h), so the
// float32 build never depends on that header being found.
//
// numres pastes this header into the program text in place of each #include "common.cuh"
// (numres/backends/cupy/kernels.py): CuPy's compile cache is keyed on the text it is given,
// so an edit here must change that text. The same text is compiled for the CPU in the tests.
#pragma once

typedef long long index_t;  // 64-bit indices: large batches exceed 2^31 elements

__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

#ifndef NUMRES_NO_HALF
#include <cuda_fp16.h>
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
    return __float2half_rn(v);
}
#endif

// Grid-stride loop over [0, n).
#define FOR_EACH(i, n) \
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (index_t)blockDim.x * gridDim.x)
