// CPU post-processing for MRKD anomaly maps: per image, bilinear upsampling (align_corners=True)
// of every scale summed in one pass, a separable Gaussian (scipy gaussian_filter semantics,
// 'reflect' border) and the per-image maximum. OpenMP over (image, row) pairs.
//
// Pass 1 (per output row): upsample + sum straight into a padded line buffer, fill its reflected
// halo, convolve horizontally -> workspace. Pass 2 (per output row): vertical convolution through
// a precomputed reflected row-index table, row maximum kept on the fly -> maps, scores.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "postprocess_common.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

namespace mrkd {
namespace {

struct ScaleTables {
    const float* data;
    int h;
    int w;
    std::vector<LinearTap> rows;  // one per output row
    std::vector<LinearTap> cols;  // one per output column
};

// out[x] = sum_k weights[k] * line[x + k] for x in [0, n); the kernel is symmetric, so pairs of
// taps share one multiplication (as scipy does).
inline void convolve_symmetric(const float* __restrict line, const float* __restrict weights, int radius,
                               int n, float* __restrict out) {
    const float centre = weights[radius];
    for (int x = 0; x < n; ++x) out[x] = centre * line[x + radius];
    for (int k = 0; k < radius; ++k) {
        const float wk = weights[k];
        const float* __restrict left = line + k;
        const float* __restrict right = line + 2 * radius - k;
        for (int x = 0; x < n; ++x) out[x] += wk * (left[x] + right[x]);
    }
}

void anomaly_map_cpu(const std::vector<ScaleTables>& scales, int n_images, int H, int W,
                     const std::vector<float>& weights, float* maps, float* scores) {
    const int radius = static_cast<int>(weights.size() / 2);
    const long plane = static_cast<long>(H) * W;
    std::vector<float> workspace(static_cast<size_t>(n_images) * plane);
    std::vector<int> reflected_rows(H + 2 * radius);
    for (int j = 0; j < H + 2 * radius; ++j) reflected_rows[j] = reflect_index(j - radius, H);
    std::vector<int> reflected_cols(2 * radius);  // halo only: left then right
    for (int j = 0; j < radius; ++j) {
        reflected_cols[j] = reflect_index(j - radius, W);
        reflected_cols[radius + j] = reflect_index(W + j, W);
    }
    std::vector<float> row_max(static_cast<size_t>(n_images) * H);
    const long total_rows = static_cast<long>(n_images) * H;
    const float* w = weights.data();

#pragma omp parallel
    {
        std::vector<float> line(W + 2 * radius);
        float* centre = line.data() + radius;
#pragma omp for schedule(static)
        for (long job = 0; job < total_rows; ++job) {
            const int n = static_cast<int>(job / H);
            const int y = static_cast<int>(job % H);
            std::fill(centre, centre + W, 0.f);
            for (const ScaleTables& s : scales) {
                const float* img = s.data + static_cast<long>(n) * s.h * s.w;
                const LinearTap ty = s.rows[y];
                for (int x = 0; x < W; ++x) centre[x] += bilinear(img, s.w, ty, s.cols[x]);
            }
            for (int j = 0; j < radius; ++j) {
                line[j] = centre[reflected_cols[j]];
                centre[W + j] = centre[reflected_cols[radius + j]];
            }
            convolve_symmetric(line.data(), w, radius, W, workspace.data() + job * W);
        }
        // implicit barrier: the vertical pass reads rows written by other threads
#pragma omp for schedule(static)
        for (long job = 0; job < total_rows; ++job) {
            const int n = static_cast<int>(job / H);
            const int y = static_cast<int>(job % H);
            const float* src = workspace.data() + n * plane;
            float* __restrict out = maps + job * W;
            const int* rows = reflected_rows.data() + y;  // rows[k] = reflected (y - radius + k)
            const float* __restrict mid = src + static_cast<long>(rows[radius]) * W;
            for (int x = 0; x < W; ++x) out[x] = w[radius] * mid[x];
            for (int k = 0; k < radius; ++k) {
                const float* __restrict up = src + static_cast<long>(rows[k]) * W;
                const float* __restrict down = src + static_cast<long>(rows[2 * radius - k]) * W;
                const float wk = w[k];
                for (int x = 0; x < W; ++x) out[x] += wk * (up[x] + down[x]);
            }
            float m = -std::numeric_limits<float>::infinity();
            for (int x = 0; x < W; ++x) m = std::max(m, out[x]);
            row_max[job] = m;
        }
    }
    for (int n = 0; n < n_images; ++n) {
        const float* rm = row_max.data() + static_cast<long>(n) * H;
        scores[n] = *std::max_element(rm, rm + H);
    }
}

std::vector<float> checked_weights(const DoubleArray& weights) {
    if (weights.ndim() != 1 || weights.shape(0) % 2 != 1)
        throw std::invalid_argument("weights must be a 1-D array of odd length (2*radius+1), got shape with " +
                                    std::to_string(weights.ndim()) + " dims and " +
                                    std::to_string(weights.size()) + " values");
    std::vector<float> w(weights.size());
    for (py::ssize_t i = 0; i < weights.size(); ++i) w[i] = static_cast<float>(weights.data()[i]);
    return w;
}

py::tuple anomaly_map_py(const std::vector<FloatArray>& per_scale, int H, int W, const DoubleArray& weights) {
    if (per_scale.empty()) throw std::invalid_argument("per_scale is empty: need at least one map");
    if (H < 1 || W < 1)
        throw std::invalid_argument("output size must be positive, got " + std::to_string(H) + "x" +
                                    std::to_string(W));
    const std::vector<float> w = checked_weights(weights);
    const py::ssize_t n_images = per_scale[0].ndim() == 3 ? per_scale[0].shape(0) : -1;
    std::vector<ScaleTables> scales;
    for (size_t i = 0; i < per_scale.size(); ++i) {
        const FloatArray& a = per_scale[i];
        if (a.ndim() != 3)
            throw std::invalid_argument("per_scale[" + std::to_string(i) + "] must be N x h x w, got " +
                                        std::to_string(a.ndim()) + " dims");
        if (a.shape(0) != n_images)
            throw std::invalid_argument("per_scale[" + std::to_string(i) + "] has batch " +
                                        std::to_string(a.shape(0)) + ", per_scale[0] has " +
                                        std::to_string(n_images));
        if (a.shape(1) < 1 || a.shape(2) < 1)
            throw std::invalid_argument("per_scale[" + std::to_string(i) + "] has an empty spatial size");
        ScaleTables s{a.data(), static_cast<int>(a.shape(1)), static_cast<int>(a.shape(2)), {}, {}};
        const float sy = align_corners_scale(s.h, H), sx = align_corners_scale(s.w, W);
        for (int y = 0; y < H; ++y) s.rows.push_back(linear_tap(y, sy, s.h));
        for (int x = 0; x < W; ++x) s.cols.push_back(linear_tap(x, sx, s.w));
        scales.push_back(std::move(s));
    }
    FloatArray maps({n_images, static_cast<py::ssize_t>(H), static_cast<py::ssize_t>(W)});
    FloatArray scores({n_images});
    float* maps_ptr = maps.mutable_data();
    float* scores_ptr = scores.mutable_data();
    if (n_images > 0) {
        py::gil_scoped_release release;
        anomaly_map_cpu(scales, static_cast<int>(n_images), H, W, w, maps_ptr, scores_ptr);
    }
    return py::make_tuple(maps, scores);
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace
}  // namespace mrkd

PYBIND11_MODULE(_postprocess_cpu, m) {
    m.doc() = "MRKD anomaly-map post-processing on the CPU (C++/OpenMP): upsample + sum + Gaussian + max.";
    m.def("anomaly_map", &mrkd::anomaly_map_py, py::arg("per_scale"), py::arg("height"), py::arg("width"),
          py::arg("weights"),
          "anomaly_map(per_scale, height, width, weights) -> (maps N x H x W float32, scores N float32).\n"
          "per_scale: list of C-contiguous float32 N x h x w arrays; weights: 1-D Gaussian taps (odd length).");
    m.def("max_threads", &mrkd::max_threads, "OpenMP threads a call will use (1 when built without OpenMP).");
#ifdef _OPENMP
    m.attr("OPENMP") = true;
#else
    m.attr("OPENMP") = false;
#endif
}
