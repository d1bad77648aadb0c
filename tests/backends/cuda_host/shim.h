// Host shim: compiles numres's CUDA kernels (the unmodified program text of kernels/) with the
// host C++ compiler, so CI can run every kernel on the CPU. Force-included ahead of the text
// (g++ -include shim.h); the text itself is not edited, and kernels/ holds no host #ifdef.
//
// What it maps:
// * __global__ / __device__ / __forceinline__ / __restrict__ to plain host C++;
// * launch geometry: blockIdx, threadIdx, blockDim and gridDim are host variables, one set per
//   host thread, which the generated launchers (cuda_host/__init__.py) set before calling the
//   kernel body once per (block, thread) of the grid;
// * the device intrinsics the kernels use (__int_as_float, fmaxf, isnan) to their host forms;
// * __half: cuda_fp16.h's own host type and conversions (__half2float, __float2half_rn round
//   to nearest even on the host too), included here unless the build defines NUMRES_NO_HALF,
//   exactly as common.cuh includes it.
//
// Kernels run one thread after another, so a kernel relying on __syncthreads, shared memory or
// warp-level operations cannot be emulated this way (numres's kernels use none: each thread's
// work is independent, a grid-stride loop over its elements).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef NUMRES_NO_HALF
#include <cuda_fp16.h>
#endif

#undef __global__
#undef __device__
#undef __forceinline__
#define __global__
#define __device__
#define __forceinline__ inline
// g++ spells CUDA's __restrict__ the same way: nothing to map.

struct numres_dim3 {
    unsigned x, y, z;
};
static thread_local numres_dim3 blockIdx, threadIdx, blockDim, gridDim;

inline float __int_as_float(int bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}
using std::fmaxf;
using std::isnan;
