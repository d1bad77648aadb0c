// Epilogues: bias + residual + ReLU in one pass after a GEMM (used where cuBLASLt cannot fuse
// them into the GEMM itself), and the unfolded batch norm.
#include "common.cuh"

// In place on y (M, O): y = relu?(y + bias + residual?); residual is read only when
// has_residual (otherwise any pointer, NULL
// included).
template <typename T>
__global__ void bias_act(T* __restrict__ y, const T* __restrict__ bias,
                         const T* __restrict__ residual, int has_residual, index_t m, int o,
                         int relu) {
    const index_t total = m * o;
    FOR_EACH(i, total) {
        float v = to_float(y[i]) + to_float(bias[i % o]);
        if (has_residual) v += to_float(residual[i]);
        if (relu) v = fmaxf(v, 0.0f);
        y[i] = from_float<T>(v);
    }
}

// Unfolded batch norm (the reference path): out = relu?(x * scale + shift + residual?).
template <typename T>
__global__ void batch_norm(const T* __restrict__ x, const float* __restrict__ scale,
                           const float* __restrict__ shift, const T* __restrict__ residual,
                           int has_residual, T* __restrict__ out, index_t m, int c, int relu) {
    const index_t total = m * c;
    FOR_EACH(i, total) {
        int ch = (int)(i % c);
        float v = to_float(x[i]) * scale[ch] + shift[ch];
        if (has_residual) v += to_float(residual[i]);
        if (relu) v = fmaxf(v, 0.0f);
        out[i] = from_float<T>(v);
    }
}

template __global__ void bias_act<float>(float*, const float*, const float*, int, index_t, int,
                                         int);
#ifndef NUMRES_NO_HALF
template __global__ void bias_act<__half>(__half*, const __half*, const __half*, int, index_t,
                                          int, int);
#endif
template __global__ void batch_norm<float>(const float*, const float*, const float*,
                                           const float*, int, float*, index_t, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void batch_norm<__half>(const __half*, const float*, const float*,
                                            const __half*, int, __half*, index_t, int, int);
#endif
