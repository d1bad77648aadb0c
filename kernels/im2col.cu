// im2col for NHWC activations: the GEMM input of a kxk (possibly grouped) convolution.
#include "common.cuh"

// cols[g, m, (ky, kx, cg)] = x[n, oy*s - p + ky, ox*s - p + kx, g*Cg + cg], 0 outside,
// where m = (n, oy, ox). With groups == 1 this is the plain (M, k*k*C) matrix; a strided
// 1x1 convolution is the k == 1 case (a subsample). One thread per element of cols, in
// cols order, so writes are coalesced and reads walk contiguous channels.
template <typename T>
__global__ void im2col_nhwc(const T* __restrict__ x, T* __restrict__ cols,
                            index_t n, int h, int w, int c, int k, int stride, int pad,
                            int out_h, int out_w, int groups) {
    const int cg = c / groups;
    const index_t row_len = (index_t)k * k * cg;
    const index_t m_total = n * out_h * out_w;
    const index_t total = (index_t)groups * m_total * row_len;
    FOR_EACH(i, total) {
        int ci = (int)(i % cg);
        index_t rest = i / cg;
        int kx = (int)(rest % k);
        rest /= k;
        int ky = (int)(rest % k);
        rest /= k;                          // rest = g * M + m
        index_t m = rest % m_total;
        int g = (int)(rest / m_total);
        int ox = (int)(m % out_w);
        index_t r2 = m / out_w;
        int oy = (int)(r2 % out_h);
        index_t b = r2 / out_h;
        int iy = oy * stride - pad + ky;
        int ix = ox * stride - pad + kx;
        T v = from_float<T>(0.0f);
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
            v = x[((b * h + iy) * w + ix) * c + g * cg + ci];
        }
        cols[i] = v;
    }
}

template __global__ void im2col_nhwc<float>(const float*, float*, index_t, int, int, int, int,
                                            int, int, int, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void im2col_nhwc<__half>(const __half*, __half*, index_t, int, int, int,
                                             int, int, int, int, int, int);
#endif
