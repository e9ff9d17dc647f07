// The CUDA post-processing (postprocess_cuda.cu, host function and kernels) compiled for the CPU
// through cuda_emulation.h, as a pybind11 module the tests build on machines without a GPU.
#include "cuda_emulation.h"
#include "../postprocess_cuda.cu"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

PYBIND11_MODULE(cuda_kernels_on_cpu, m) {
    m.def("anomaly_map", [](const std::vector<FloatArray>& per_scale, int height, int width,
                            const FloatArray& weights) {
        std::vector<mrkd::DeviceScale> scales;
        for (const FloatArray& a : per_scale)
            scales.push_back({a.data(), static_cast<int>(a.shape(1)), static_cast<int>(a.shape(2))});
        const int n = static_cast<int>(per_scale[0].shape(0));
        FloatArray maps({n, height, width}), scores({n});
        const int err = mrkd::anomaly_map_cuda(scales.data(), static_cast<int>(scales.size()), n, height, width,
                                               weights.data(), static_cast<int>(weights.size()),
                                               maps.mutable_data(), scores.mutable_data(), nullptr, nullptr);
        if (err != cudaSuccess) throw std::runtime_error("anomaly_map_cuda returned " + std::to_string(err));
        return py::make_tuple(maps, scores);
    });
}
