// Index arithmetic shared by the CPU (C++) and CUDA post-processing, so that both follow
// the same conventions: bilinear upsampling with align_corners=True (as torch F.interpolate) and
// scipy.ndimage's 'reflect' border (symmetric: d c b a | a b c d, the edge pixel repeated).
#pragma once

#ifdef __CUDACC__
#define MRKD_HD __host__ __device__ __forceinline__
#else
#define MRKD_HD inline
#endif

namespace mrkd {

// Largest Gaussian radius the CUDA kernels accept (weights travel as a kernel argument);
// sigma up to ~32 at truncate 4.0. The CPU path has no limit.
constexpr int kMaxRadius = 128;
// Largest number of scales the CUDA kernels accept (pointers travel as a kernel argument).
constexpr int kMaxScales = 8;

// scipy 'reflect' for any offset, also when it lies more than one image length outside:
// the extension is periodic with period 2n, so repeated reflection is a modulo.
MRKD_HD int reflect_index(int i, int n) {
    if (n == 1) return 0;
    const int period = 2 * n;
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - 1 - i;
}

// align_corners=True maps output pixel 0 to input pixel 0 and the last to the last.
MRKD_HD float align_corners_scale(int in_size, int out_size) {
    return out_size > 1 ? static_cast<float>(in_size - 1) / static_cast<float>(out_size - 1) : 0.f;
}

// One axis of a bilinear sample: value = (1 - w1) * v[i0] + w1 * v[i1].
struct LinearTap {
    int i0;
    int i1;
    float w1;
};

// Same arithmetic as PyTorch's upsample_bilinear2d (float source coordinate, truncation, clamp).
MRKD_HD LinearTap linear_tap(int dst, float scale, int in_size) {
    const float src = scale * static_cast<float>(dst);
    int i0 = static_cast<int>(src);
    if (i0 > in_size - 1) i0 = in_size - 1;
    const int i1 = i0 < in_size - 1 ? i0 + 1 : i0;
    return LinearTap{i0, i1, src - static_cast<float>(i0)};
}

MRKD_HD float bilinear(const float* img, int w, const LinearTap& ty, const LinearTap& tx) {
    const float* r0 = img + static_cast<long>(ty.i0) * w;
    const float* r1 = img + static_cast<long>(ty.i1) * w;
    const float top = (1.f - tx.w1) * r0[tx.i0] + tx.w1 * r0[tx.i1];
    const float bottom = (1.f - tx.w1) * r1[tx.i0] + tx.w1 * r1[tx.i1];
    return (1.f - ty.w1) * top + ty.w1 * bottom;
}

}  // namespace mrkd
