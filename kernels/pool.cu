// Pooling for NHWC activations.
#include "common.cuh"

// Max pooling with floor output size; padded positions never win (torch pads with -inf)
// and NaN propagates, as in torch. One thread per output element.
template <typename T>
__global__ void max_pool_nhwc(const T* __restrict__ x, T* __restrict__ out, index_t n,
                              int h, int w, int c, int k, int stride, int pad, int out_h,
                              int out_w) {
    const index_t total = n * out_h * out_w * c;
    FOR_EACH(i, total) {
        int ci = (int)(i % c);
        index_t rest = i / c;
        int ox = (int)(rest % out_w);
        rest /= out_w;
        int oy = (int)(rest % out_h);
        index_t b = rest / out_h;
        float best = __int_as_float(0xff800000);  // -inf (NVRTC has no INFINITY)
        for (int ky = 0; ky < k; ++ky) {
            int iy = oy * stride - pad + ky;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < k; ++kx) {
                int ix = ox * stride - pad + kx;
                if (ix < 0 || ix >= w) continue;
                float v = to_float(x[((b * h + iy) * w + ix) * c + ci]);
                if (v > best || isnan(v)) best = v;
                if (isnan(best)) break;
            }
            if (isnan(best)) break;
        }
        out[i] = from_float<T>(best);
    }
}

// Adaptive average pooling to 1x1: out[n, c] = mean over (y, x) of x[n, y, x, c], summed in
// float. One thread per (n, c); neighbouring threads read neighbouring channels.
template <typename T>
__global__ void global_avg_pool_nhwc(const T* __restrict__ x, T* __restrict__ out,
                                     index_t n, int hw, int c) {
    const index_t total = n * c;
    FOR_EACH(i, total) {
        int ci = (int)(i % c);
        index_t b = i / c;
        const T* p = x + b * hw * c + ci;
        float acc = 0.0f;
        for (int j = 0; j < hw; ++j) acc += to_float(p[(index_t)j * c]);
        out[i] = from_float<T>(acc / (float)hw);
    }
}

template __global__ void max_pool_nhwc<float>(const float*, float*, index_t, int, int, int, int,
                                              int, int, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void max_pool_nhwc<__half>(const __half*, __half*, index_t, int, int, int,
                                               int, int, int, int, int);
#endif
template __global__ void global_avg_pool_nhwc<float>(const float*, float*, index_t, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void global_avg_pool_nhwc<__half>(const __half*, __half*, index_t, int,
                                                      int);
#endif
