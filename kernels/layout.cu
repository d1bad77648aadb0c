// Layout conversion between the user's NCHW float32 and the backend's NHWC activations.
#include "common.cuh"

// out[n, y, x, c] = in[n, c, y, x], converting float32 to T.
template <typename T>
__global__ void nchw_to_nhwc(const float* __restrict__ in, T* __restrict__ out,
                             index_t n, int c, int h, int w) {
    const index_t total = n * c * h * w;
    FOR_EACH(i, total) {
        // i enumerates the output (n, y, x, c), so writes are coalesced
        int ci = (int)(i % c);
        index_t pix = i / c;
        int x = (int)(pix % w);
        index_t rest = pix / w;
        int y = (int)(rest % h);
        index_t b = rest / h;
        out[i] = from_float<T>(in[((b * c + ci) * h + y) * w + x]);
    }
}

// out[n, c, y, x] = in[n, y, x, c], converting T to float32 (feature maps for the user).
template <typename T>
__global__ void nhwc_to_nchw(const T* __restrict__ in, float* __restrict__ out,
                             index_t n, int c, int h, int w) {
    const index_t total = n * c * h * w;
    FOR_EACH(i, total) {
        int x = (int)(i % w);
        index_t rest = i / w;
        int y = (int)(rest % h);
        rest /= h;
        int ci = (int)(rest % c);
        index_t b = rest / c;
        out[i] = to_float(in[((b * h + y) * w + x) * c + ci]);
    }
}

template __global__ void nchw_to_nhwc<float>(const float*, float*, index_t, int, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void nchw_to_nhwc<__half>(const float*, __half*, index_t, int, int, int);
#endif
template __global__ void nhwc_to_nchw<float>(const float*, float*, index_t, int, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void nhwc_to_nchw<__half>(const __half*, float*, index_t, int, int, int);
#endif
