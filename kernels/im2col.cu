// im2col for NHWC activations: the GEMM input of a kxk or strided convolution (grouped
// convolutions are computed directly, conv_grouped.cu).
#include "common.cuh"

// cols[m, j] = x[n, oy*s - p + ky, ox*s - p + kx, c] for m = (n, oy, ox) and j = (ky, kx, c) <
// k*k*C, 0 outside the image; columns k*k*C <= j < row_len are zero. row_len is K rounded up to
// a multiple of 8, so that half-precision GEMMs see an 8-aligned leading dimension (the fast
// tensor-core kernels need one). A strided 1x1 convolution is the k == 1 case (a subsample).
//
// One thread moves VEC consecutive channels of one tap (C % VEC == 0): the index arithmetic
// costs two 64-bit divisions per VEC elements, the rest is 32-bit, and each thread reads and
// writes a contiguous run. Consecutive threads take consecutive runs of one row, so writes are
// coalesced and reads walk contiguous channels.
template <typename T, int VEC>
__global__ void im2col_nhwc(const T* __restrict__ x, T* __restrict__ cols, index_t n, int h,
                            int w, int c, int k, int stride, int pad, int out_h, int out_w,
                            int row_len) {
    const int runs = c / VEC;                  // runs per tap
    const int image_runs = k * k * runs;       // runs of a row that read the image
    const int row_runs = row_len / VEC;        // row_len is a multiple of 8, so of VEC
    const int hw = out_h * out_w;
    const index_t total = n * hw * row_runs;
    FOR_EACH(u, total) {
        const index_t m = u / row_runs;
        const int j = (int)(u - m * row_runs);
        T* dst = cols + m * row_len + (index_t)j * VEC;
        const T* src = 0;
        if (j < image_runs) {
            const int tap = j / runs;
            const int ci = (j - tap * runs) * VEC;
            const int ky = tap / k, kx = tap - ky * k;
            const index_t b = m / hw;
            const int pix = (int)(m - b * hw);
            const int oy = pix / out_w, ox = pix - oy * out_w;
            const int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
            if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
                src = x + ((b * h + iy) * w + ix) * (index_t)c + ci;
            }
        }
        if (src) {
            for (int v = 0; v < VEC; ++v) dst[v] = src[v];
        } else {
            for (int v = 0; v < VEC; ++v) dst[v] = from_float<T>(0.0f);
        }
    }
}

template __global__ void im2col_nhwc<float, 1>(const float*, float*, index_t, int, int, int,
                                               int, int, int, int, int, int);
template __global__ void im2col_nhwc<float, 4>(const float*, float*, index_t, int, int, int,
                                               int, int, int, int, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void im2col_nhwc<__half, 1>(const __half*, __half*, index_t, int, int, int,
                                                int, int, int, int, int, int);
template __global__ void im2col_nhwc<__half, 8>(const __half*, __half*, index_t, int, int, int,
                                                int, int, int, int, int, int);
#endif
