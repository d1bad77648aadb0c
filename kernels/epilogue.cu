// The fused epilogue of a convolution GEMM: bias + residual + ReLU in one pass.
#include "common.cuh"

// In place on y (M, O): y = relu?(y + bias + residual?); residual is read only when
// has_residual (otherwise any valid pointer).
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

// Grouped convolution: per-group GEMM results yg (G, M, O/G) interleaved into out (M, O),
// with the same epilogue. One thread per element of out.
template <typename T>
__global__ void bias_act_grouped(const T* __restrict__ yg, const T* __restrict__ bias,
                                 const T* __restrict__ residual, int has_residual,
                                 T* __restrict__ out, index_t m, int o, int groups, int relu) {
    const int og = o / groups;
    const index_t total = m * o;
    FOR_EACH(i, total) {
        int oc = (int)(i % o);
        index_t r = i / o;
        int g = oc / og;
        float v = to_float(yg[((index_t)g * m + r) * og + (oc - g * og)]) + to_float(bias[oc]);
        if (has_residual) v += to_float(residual[i]);
        if (relu) v = fmaxf(v, 0.0f);
        out[i] = from_float<T>(v);
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
template __global__ void bias_act_grouped<float>(const float*, const float*, const float*, int,
                                                 float*, index_t, int, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void bias_act_grouped<__half>(const __half*, const __half*, const __half*,
                                                  int, __half*, index_t, int, int, int);
#endif
template __global__ void batch_norm<float>(const float*, const float*, const float*,
                                           const float*, int, float*, index_t, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void batch_norm<__half>(const __half*, const float*, const float*,
                                            const __half*, int, __half*, index_t, int, int);
#endif
