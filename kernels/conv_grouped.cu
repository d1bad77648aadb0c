// Grouped convolution (ResNeXt's 3x3) computed directly on NHWC activations, with the
// convolution's epilogue: no im2col matrix, no GEMM and no float32 copies in half precision.
#include "common.cuh"

// out[m, oc] = relu?(sum over (ky, kx, ci) of x[n, iy, ix, g*Cg + ci] *
//                     weight[(ky*k + kx)*Cg + ci, oc] + bias[oc] + residual?[m, oc])
// with m = (n, oy, ox), iy = oy*s - p + ky, ix = ox*s - p + kx (taps outside the image skipped)
// and g = oc / (O/G). weight is (k*k*Cg, O): each output channel's filter over its group's Cg
// input channels. residual is read only when has_residual (otherwise any pointer, NULL
// included). Sums in float (half inputs are widened exactly), one rounding on store.
//
// One thread per output element, output channels fastest: the threads of a warp read
// consecutive weights (coalesced) and the same few input pixels (broadcast). ResNeXt's groups
// are small (Cg = 4 to 64 channels), where a batched GEMM per group would run tiny matrices at
// misaligned strides; this kernel reads the input k*k times from cache instead.
template <typename T>
__global__ void conv_grouped_nhwc(const T* __restrict__ x, const T* __restrict__ weight,
                                  const T* __restrict__ bias, const T* __restrict__ residual,
                                  int has_residual, T* __restrict__ out, index_t n, int h, int w,
                                  int c, int k, int stride, int pad, int out_h, int out_w, int o,
                                  int groups, int relu) {
    const int cg = c / groups, og = o / groups, hw = out_h * out_w;
    const index_t total = n * hw * o;
    FOR_EACH(i, total) {
        const index_t m = i / o;
        const int oc = (int)(i - m * o);
        const index_t b = m / hw;
        const int pix = (int)(m - b * hw);
        const int oy = pix / out_w, ox = pix - oy * out_w;
        const int c0 = (oc / og) * cg;
        float acc = 0.0f;
        for (int ky = 0; ky < k; ++ky) {
            const int iy = oy * stride - pad + ky;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < k; ++kx) {
                const int ix = ox * stride - pad + kx;
                if (ix < 0 || ix >= w) continue;
                const T* src = x + ((b * h + iy) * w + ix) * (index_t)c + c0;
                const T* wk = weight + (index_t)((ky * k + kx) * cg) * o + oc;
                for (int ci = 0; ci < cg; ++ci) {
                    acc += to_float(src[ci]) * to_float(wk[(index_t)ci * o]);
                }
            }
        }
        acc += to_float(bias[oc]);
        if (has_residual) acc += to_float(residual[i]);
        if (relu) acc = fmaxf(acc, 0.0f);
        out[i] = from_float<T>(acc);
    }
}

template __global__ void conv_grouped_nhwc<float>(const float*, const float*, const float*,
                                                  const float*, int, float*, index_t, int, int,
                                                  int, int, int, int, int, int, int, int, int);
#ifndef NUMRES_NO_HALF
template __global__ void conv_grouped_nhwc<__half>(const __half*, const __half*, const __half*,
                                                   const __half*, int, __half*, index_t, int,
                                                   int, int, int, int, int, int, int, int, int,
                                                   int);
#endif
