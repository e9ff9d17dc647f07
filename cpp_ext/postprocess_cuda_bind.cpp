// pybind11 binding of the CUDA post-processing. Takes raw device pointers (Python ints) so that
// buffers from pycuda, cuda-python, CuPy or torch all work; cudart is linked statically, so the
// module imports on machines without a GPU and its calls then raise a clear RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "postprocess_common.h"
#include "postprocess_cuda.h"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const std::string& what) {
    if (err != cudaSuccess)
        throw std::runtime_error("CUDA post-processing: " + what + " failed: " + cudaGetErrorName(err) + " (" +
                                 cudaGetErrorString(err) + ")");
}

int device_count() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free error so later calls report their own
        return 0;
    }
    return count;
}

void require_device() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        cudaGetLastError();
        throw std::runtime_error(std::string("CUDA post-processing: no usable CUDA device (") +
                                 (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") +
                                 "); use impl='cpu'");
    }
}

void anomaly_map_device(const std::vector<std::uintptr_t>& ptrs, const std::vector<std::pair<int, int>>& shapes,
                        int n_images, int height, int width,
                        const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
                        std::uintptr_t out_map, std::uintptr_t out_score, std::uintptr_t stream,
                        std::uintptr_t workspace) {
    if (ptrs.size() != shapes.size())
        throw std::invalid_argument("ptrs and shapes differ in length (" + std::to_string(ptrs.size()) + " vs " +
                                    std::to_string(shapes.size()) + ")");
    if (ptrs.empty() || ptrs.size() > static_cast<size_t>(mrkd::kMaxScales))
        throw std::invalid_argument("need 1 to " + std::to_string(mrkd::kMaxScales) + " scales, got " +
                                    std::to_string(ptrs.size()));
    if (weights.ndim() != 1 || weights.size() % 2 != 1 || weights.size() > 2 * mrkd::kMaxRadius + 1)
        throw std::invalid_argument("weights must be 1-D with odd length <= " +
                                    std::to_string(2 * mrkd::kMaxRadius + 1) + " (Gaussian radius <= " +
                                    std::to_string(mrkd::kMaxRadius) + "), got " + std::to_string(weights.size()));
    if (height < 1 || width < 1 || height > 65535 || n_images < 0 || n_images > 65535)
        throw std::invalid_argument("unsupported sizes: N=" + std::to_string(n_images) + " H=" +
                                    std::to_string(height) + " W=" + std::to_string(width) +
                                    " (1 <= H <= 65535, 0 <= N <= 65535)");
    if (!out_map || !out_score) throw std::invalid_argument("out_map_ptr and out_score_ptr must be non-null");
    std::vector<mrkd::DeviceScale> scales;
    for (size_t i = 0; i < ptrs.size(); ++i) {
        if (!ptrs[i]) throw std::invalid_argument("ptrs[" + std::to_string(i) + "] is null");
        if (shapes[i].first < 1 || shapes[i].second < 1)
            throw std::invalid_argument("shapes[" + std::to_string(i) + "] must be positive");
        scales.push_back({reinterpret_cast<const float*>(ptrs[i]), shapes[i].first, shapes[i].second});
    }
    std::vector<float> w(weights.size());
    for (py::ssize_t k = 0; k < weights.size(); ++k) w[k] = static_cast<float>(weights.data()[k]);
    require_device();
    py::gil_scoped_release release;
    // Work on the device that owns the output buffer. Switch only when it differs from the current
    // one: cudaSetDevice binds the primary context and would unbind a pycuda-made context.
    cudaPointerAttributes attributes{};
    check(cudaPointerGetAttributes(&attributes, reinterpret_cast<void*>(out_map)), "cudaPointerGetAttributes(out_map)");
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
        throw std::invalid_argument("out_map_ptr is not device memory");
    int previous = 0;
    check(cudaGetDevice(&previous), "cudaGetDevice");
    const bool switch_device = attributes.type == cudaMemoryTypeDevice && attributes.device != previous;
    if (switch_device) check(cudaSetDevice(attributes.device), "cudaSetDevice");
    const cudaError_t err = mrkd::anomaly_map_cuda(
        scales.data(), static_cast<int>(scales.size()), n_images, height, width, w.data(), static_cast<int>(w.size()),
        reinterpret_cast<float*>(out_map), reinterpret_cast<float*>(out_score), reinterpret_cast<float*>(workspace),
        reinterpret_cast<cudaStream_t>(stream));
    if (switch_device) cudaSetDevice(previous);
    check(err, "kernel launch");
}

void synchronize(std::uintptr_t stream) {
    require_device();
    check(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

}  // namespace

PYBIND11_MODULE(_postprocess_cuda, m) {
    m.doc() = "MRKD anomaly-map post-processing on the GPU (CUDA) over raw device pointers.";
    m.def("anomaly_map", &anomaly_map_device, py::arg("ptrs"), py::arg("shapes"), py::arg("n"), py::arg("height"),
          py::arg("width"), py::arg("weights"), py::arg("out_map_ptr"), py::arg("out_score_ptr"),
          py::arg("stream") = 0, py::arg("workspace_ptr") = 0,
          "Enqueue upsample + sum + Gaussian + max on `stream` (asynchronous; returns at once).\n"
          "ptrs: device pointers of C-contiguous float32 N x h x w maps; shapes: their (h, w);\n"
          "out_map_ptr: N x H x W float32; out_score_ptr: N float32; workspace_ptr: N*H*W float32 or 0\n"
          "(then allocated stream-ordered).");
    m.def("device_count", &device_count, "Number of CUDA devices visible (0 when none or no driver).");
    m.def("workspace_bytes", &mrkd::workspace_bytes, py::arg("n"), py::arg("height"), py::arg("width"),
          "Bytes of workspace anomaly_map needs.");
    m.def("synchronize", &synchronize, py::arg("stream") = 0, "Wait for `stream` to finish.");
    m.attr("MAX_SCALES") = mrkd::kMaxScales;
    m.attr("MAX_RADIUS") = mrkd::kMaxRadius;
    int runtime_version = 0;
    cudaRuntimeGetVersion(&runtime_version);
    m.attr("CUDART_VERSION") = runtime_version;
}
