// Just enough of the CUDA runtime to run postprocess_cuda.cu's kernels on the CPU: every block in
// turn, each of its threads a std::thread, __syncthreads a std::barrier. Test-only (no GPU here);
// it checks indexing, halos, shared-memory tiling and the max reduction, not performance.
#pragma once
#define MRKD_CUDA_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // blocks run one after another, so one copy serves every block

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr int cudaDevAttrMemoryPoolsSupported = 0;

namespace emu {
inline thread_local dim3 thread_idx;
inline dim3 block_idx, block_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<float> dynamic_shared;
inline std::vector<float> shuffle_slots;
inline std::mutex atomic_mutex;

inline int linear_thread() { return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z); }

template <class Kernel>
struct Launch {
    Kernel kernel;
    dim3 grid, block;
    size_t shared_bytes;
    template <class... Args>
    void operator()(Args... args) const {
        block_dim = block;
        const unsigned threads = block.x * block.y * block.z;
        dynamic_shared.assign(shared_bytes / sizeof(float) + 1, std::nanf(""));  // stale reads show as NaN
        shuffle_slots.assign(threads, 0.f);
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    block_idx = dim3(bx, by, bz);
                    std::barrier<> barrier(threads);
                    block_barrier = &barrier;
                    std::vector<std::thread> pool;
                    for (unsigned t = 0; t < threads; ++t)
                        pool.emplace_back([&, t] {
                            thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                            kernel(args...);
                        });
                    for (auto& th : pool) th.join();
                }
    }
};
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define MRKD_DYNAMIC_SHARED(name) float* name = emu::dynamic_shared.data()
#define MRKD_LAUNCH(kernel, grid, block, smem, stream) \
    emu::Launch<decltype(&kernel)>{&kernel, dim3(grid), dim3(block), static_cast<size_t>(smem)}

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// Every thread of the block calls it (as the kernels do), so two barriers order the exchange.
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    const int me = emu::linear_thread();
    emu::shuffle_slots[me] = value;
    __syncthreads();
    const float other = emu::shuffle_slots[(me & ~31) | ((me & 31) ^ lane_mask)];
    __syncthreads();
    return other;
}

inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int atomicMax(int* p, int v) { std::lock_guard<std::mutex> l(emu::atomic_mutex); int o = *p; if (v > o) *p = v; return o; }
inline unsigned atomicMin(unsigned* p, unsigned v) { std::lock_guard<std::mutex> l(emu::atomic_mutex); unsigned o = *p; if (v < o) *p = v; return o; }

inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, int, int) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaMalloc(void** p, size_t bytes) { *p = std::malloc(bytes); return *p ? cudaSuccess : 2; }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
