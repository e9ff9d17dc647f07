// CUDA post-processing for MRKD anomaly maps; same arithmetic as postprocess_cpu.cpp.
//
// Kernel 1, upsample_sum_hblur: one block per (row segment, row, image). It computes the
//   upsampled sum of all scales for the segment plus its reflected halo into shared memory,
//   then convolves horizontally -> workspace.
// Kernel 2, vblur_max: one block per (32 columns x kColTile rows, image). It stages the column
//   strip plus reflected halo rows in shared memory, convolves vertically -> maps, and reduces
//   the block maximum into scores[n] with a float atomic max.
// cpp_ext/emulation/ compiles this file for the CPU (no GPU needed) to test the kernels' indexing.
#ifndef MRKD_CUDA_EMULATION
#include <cuda_runtime.h>
#define MRKD_DYNAMIC_SHARED(name) extern __shared__ float name[]
#define MRKD_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

#include <cmath>

#include "postprocess_common.h"
#include "postprocess_cuda.h"

namespace mrkd {
namespace {

constexpr int kRowTile = 128;     // outputs per block in the horizontal pass (= threads)
constexpr int kColWidth = 32;     // columns per block in the vertical pass (= one warp)
constexpr int kColRows = 8;       // warps per block in the vertical pass
constexpr int kColTile = 64;      // output rows per block in the vertical pass

// Kernel arguments travel by value: no constant-memory state shared between streams.
struct ScaleArgs {
    const float* data[kMaxScales];
    int h[kMaxScales];
    int w[kMaxScales];
    float scale_y[kMaxScales];
    float scale_x[kMaxScales];
    int count;
};

struct GaussArgs {
    float w[2 * kMaxRadius + 1];
    int radius;
};

// Symmetric taps around centre[0]; `stride` steps between neighbouring samples.
__device__ __forceinline__ float convolve_at(const float* centre, int stride, const GaussArgs& g) {
    const int r = g.radius;
    float acc = g.w[r] * centre[0];
    for (int k = 0; k < r; ++k) acc += g.w[k] * (centre[(k - r) * stride] + centre[(r - k) * stride]);
    return acc;
}

// Float atomic max valid for any sign: non-negative floats order like signed ints, negative
// floats order inversely to unsigned ints. The slot starts at -inf.
__device__ __forceinline__ void atomic_max_float(float* slot, float value) {
    if (value >= 0.f)
        atomicMax(reinterpret_cast<int*>(slot), __float_as_int(value));
    else
        atomicMin(reinterpret_cast<unsigned int*>(slot), __float_as_uint(value));
}

__global__ void fill_kernel(float* out, int n, float value) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = value;
}

__global__ void upsample_sum_hblur(ScaleArgs s, GaussArgs g, int H, int W, float* __restrict workspace) {
    MRKD_DYNAMIC_SHARED(line);  // kRowTile + 2 * radius
    const int n = blockIdx.z;
    const int y = blockIdx.y;
    const int x0 = blockIdx.x * kRowTile;
    const int r = g.radius;
    for (int j = threadIdx.x; j < kRowTile + 2 * r; j += blockDim.x) {
        const int x = reflect_index(x0 - r + j, W);
        float v = 0.f;
        for (int i = 0; i < s.count; ++i) {
            const float* img = s.data[i] + static_cast<long>(n) * s.h[i] * s.w[i];
            v += bilinear(img, s.w[i], linear_tap(y, s.scale_y[i], s.h[i]), linear_tap(x, s.scale_x[i], s.w[i]));
        }
        line[j] = v;
    }
    __syncthreads();
    const int x = x0 + threadIdx.x;
    if (x < W) workspace[(static_cast<long>(n) * H + y) * W + x] = convolve_at(line + threadIdx.x + r, 1, g);
}

__global__ void vblur_max(GaussArgs g, int H, int W, const float* __restrict workspace, float* __restrict maps,
                          float* __restrict scores) {
    MRKD_DYNAMIC_SHARED(strip);  // (kColTile + 2 * radius) x kColWidth
    __shared__ float warp_max[kColRows];
    const int n = blockIdx.z;
    const int x = blockIdx.x * kColWidth + threadIdx.x;
    const int y0 = blockIdx.y * kColTile;
    const int r = g.radius;
    const float* src = workspace + static_cast<long>(n) * H * W;
    for (int j = threadIdx.y; j < kColTile + 2 * r; j += blockDim.y) {
        const int y = reflect_index(y0 - r + j, H);
        strip[j * kColWidth + threadIdx.x] = x < W ? src[static_cast<long>(y) * W + x] : 0.f;
    }
    __syncthreads();
    float local_max = -INFINITY;
    if (x < W) {
        for (int i = threadIdx.y; i < kColTile && y0 + i < H; i += blockDim.y) {
            const float v = convolve_at(strip + (i + r) * kColWidth + threadIdx.x, kColWidth, g);
            maps[(static_cast<long>(n) * H + y0 + i) * W + x] = v;
            local_max = fmaxf(local_max, v);
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1)
        local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
    if (threadIdx.x == 0) warp_max[threadIdx.y] = local_max;
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        float m = warp_max[0];
        for (int i = 1; i < kColRows; ++i) m = fmaxf(m, warp_max[i]);
        if (m > -INFINITY) atomic_max_float(scores + n, m);
    }
}

}  // namespace

size_t workspace_bytes(int n_images, int height, int width) {
    return static_cast<size_t>(n_images) * height * width * sizeof(float);
}

cudaError_t anomaly_map_cuda(const DeviceScale* scales, int n_scales, int n_images, int height, int width,
                             const float* weights, int n_taps, float* maps, float* scores, float* workspace,
                             cudaStream_t stream) {
    if (n_scales < 1 || n_scales > kMaxScales || n_taps < 1 || n_taps % 2 != 1 || n_taps > 2 * kMaxRadius + 1 ||
        height < 1 || width < 1 || n_images < 0)
        return cudaErrorInvalidValue;
    if (n_images == 0) return cudaSuccess;
    ScaleArgs s{};
    s.count = n_scales;
    for (int i = 0; i < n_scales; ++i) {
        s.data[i] = scales[i].data;
        s.h[i] = scales[i].h;
        s.w[i] = scales[i].w;
        s.scale_y[i] = align_corners_scale(scales[i].h, height);
        s.scale_x[i] = align_corners_scale(scales[i].w, width);
    }
    GaussArgs g{};
    g.radius = n_taps / 2;
    for (int k = 0; k < n_taps; ++k) g.w[k] = weights[k];

    float* ws = workspace;
    cudaError_t err = cudaSuccess;
    bool pooled = false;  // stream-ordered allocation where the device has memory pools
    if (ws == nullptr) {
        int device = 0, pools = 0;
        err = cudaGetDevice(&device);
        if (err == cudaSuccess) err = cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device);
        if (err != cudaSuccess) return err;
        pooled = pools != 0;
        const size_t bytes = workspace_bytes(n_images, height, width);
        err = pooled ? cudaMallocAsync(reinterpret_cast<void**>(&ws), bytes, stream)
                     : cudaMalloc(reinterpret_cast<void**>(&ws), bytes);
        if (err != cudaSuccess) return err;
    }
    MRKD_LAUNCH(fill_kernel, (n_images + 255) / 256, 256, 0, stream)(scores, n_images, -INFINITY);
    const dim3 row_grid((width + kRowTile - 1) / kRowTile, height, n_images);
    MRKD_LAUNCH(upsample_sum_hblur, row_grid, kRowTile, (kRowTile + 2 * g.radius) * sizeof(float), stream)(
        s, g, height, width, ws);
    const dim3 col_grid((width + kColWidth - 1) / kColWidth, (height + kColTile - 1) / kColTile, n_images);
    const dim3 col_block(kColWidth, kColRows);
    MRKD_LAUNCH(vblur_max, col_grid, col_block, (kColTile + 2 * g.radius) * kColWidth * sizeof(float), stream)(
        g, height, width, ws, maps, scores);
    err = cudaGetLastError();
    if (workspace == nullptr) {
        // without pools, the kernels must finish before the plain cudaFree
        const cudaError_t free_err = pooled ? cudaFreeAsync(ws, stream)
                                            : (cudaStreamSynchronize(stream) == cudaSuccess ? cudaFree(ws)
                                                                                             : cudaGetLastError());
        if (err == cudaSuccess) err = free_err;
    }
    return err;
}

}  // namespace mrkd
