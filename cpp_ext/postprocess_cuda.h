// Host entry of the CUDA post-processing (postprocess_cuda.cu), called by the pybind11 binding.
#pragma once
#ifndef MRKD_CUDA_EMULATION  // cpp_ext/emulation/cuda_emulation.h stands in for it
#include <cuda_runtime.h>
#endif

#include <cstddef>

namespace mrkd {

struct DeviceScale {
    const float* data;  // N x h x w, C-contiguous, float32, on the device
    int h;
    int w;
};

// Bytes of device workspace anomaly_map_cuda needs (the horizontally smoothed maps).
size_t workspace_bytes(int n_images, int height, int width);

// Enqueues the whole post-processing on `stream` and returns without waiting: upsample + sum +
// horizontal Gaussian, vertical Gaussian + per-image max. `weights` are 2*radius+1 host floats
// (radius <= kMaxRadius). `workspace` may be null: then it is allocated stream-ordered
// (cudaMallocAsync) and freed the same way. Returns the first CUDA error met.
cudaError_t anomaly_map_cuda(const DeviceScale* scales, int n_scales, int n_images, int height, int width,
                             const float* weights, int n_taps, float* maps, float* scores, float* workspace,
                             cudaStream_t stream);

}  // namespace mrkd
