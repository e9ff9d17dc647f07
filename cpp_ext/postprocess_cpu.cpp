// CPU post-processing for MRKD anomaly maps: per image, bilinear upsampling (align_corners=True)
// of every scale summed, a separable Gaussian (scipy gaussian_filter semantics, 'reflect' border)
// and the per-image maximum. OpenMP over (image, band of rows) tasks.
//
// Everything a task touches stays in cache: bilinear upsampling is separable too, so each
// low-resolution row is interpolated along x once (lazily, when an output row first needs it) and
// output rows are lerps of two such rows; each horizontally smoothed row goes into a ring of
// min(H, 2*radius+1) rows, from which the vertical pass (with the row maximum fused in) reads
// through the reflected row-index table. No full-size intermediate image is written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// Hot loops get an AVX2+FMA clone picked at load time on x86-64, so one build runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MRKD_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MRKD_SIMD_CLONES
#endif

namespace mrkd {
namespace {

// Below this many output pixels per thread, waking another thread costs more than it saves.
constexpr long kMinPixelsPerThread = 128 * 1024;

struct ScaleTables {
    const float* data;
    int h;
    int w;
    std::vector<LinearTap> rows;  // one per output row
    std::vector<LinearTap> cols;  // one per output column
};

struct Problem {
    const std::vector<ScaleTables>& scales;
    int H;
    int W;
    int radius;
    const float* weights;        // 2 * radius + 1
    std::vector<int> reflected;  // reflected[radius + p] = row/column for position p in [-radius, n + radius)
};

// 8 floats in GCC/Clang vector extensions: AVX in the x86-64-v3 clone, SSE or NEON pairs elsewhere.
typedef float vfloat __attribute__((vector_size(32)));
constexpr int kLanes = sizeof(vfloat) / sizeof(float);

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vfloat never crosses a non-inlined call: no ABI at stake
#endif
__attribute__((always_inline)) inline vfloat load(const float* p) {
    vfloat v;
    std::memcpy(&v, p, sizeof v);  // unaligned load
    return v;
}

// out[x] = sum_k weights[k] * taps[k][x] for x in [0, n), returning max_x out[x]. The kernel is
// symmetric, so pairs of taps share one multiplication (as scipy does). Serves both passes: the
// horizontal one with taps[k] = line + k, the vertical one with taps[k] = reflected row k.
// Blocks of 2 vectors are accumulated in registers over all taps and stored once.
MRKD_SIMD_CLONES
float convolve_taps(const float* const* taps, const float* __restrict weights, int radius, int n,
                    float* __restrict out) {
    const float centre = weights[radius];
    const float* mid = taps[radius];
    float m = -std::numeric_limits<float>::infinity();
    vfloat vmax = {};
    vmax -= std::numeric_limits<float>::infinity();
    int x = 0;
    for (; x + 2 * kLanes <= n; x += 2 * kLanes) {
        vfloat acc0 = centre * load(mid + x), acc1 = centre * load(mid + x + kLanes);
        for (int k = 0; k < radius; ++k) {
            const float wk = weights[k];
            const float* left = taps[k] + x;
            const float* right = taps[2 * radius - k] + x;
            acc0 += wk * (load(left) + load(right));
            acc1 += wk * (load(left + kLanes) + load(right + kLanes));
        }
        std::memcpy(out + x, &acc0, sizeof acc0);
        std::memcpy(out + x + kLanes, &acc1, sizeof acc1);
        vmax = vmax > acc0 ? vmax : acc0;
        vmax = vmax > acc1 ? vmax : acc1;
    }
    for (int j = 0; j < kLanes; ++j) m = std::max(m, vmax[j]);
    for (; x < n; ++x) {
        float acc = centre * mid[x];
        for (int k = 0; k < radius; ++k) acc += weights[k] * (taps[k][x] + taps[2 * radius - k][x]);
        out[x] = acc;
        m = std::max(m, acc);
    }
    return m;
}

// acc[x] += (1 - w1) * a[x] + w1 * b[x]
MRKD_SIMD_CLONES
void add_lerp(const float* __restrict a, const float* __restrict b, float w1, int n, float* __restrict acc) {
    const float w0 = 1.f - w1;
    for (int x = 0; x < n; ++x) acc[x] += w0 * a[x] + w1 * b[x];
}

// Per-thread scratch, reused across the tasks a thread runs.
class BandWorker {
public:
    explicit BandWorker(const Problem& p)
        : p_(p), ring_rows_(std::min(p.H, 2 * p.radius + 1)), line_(p.W + 2 * p.radius),
          ring_(static_cast<size_t>(ring_rows_) * p.W), taps_(2 * p.radius + 1), line_taps_(2 * p.radius + 1) {
        for (int k = 0; k <= 2 * p.radius; ++k) line_taps_[k] = line_.data() + k;
        for (const ScaleTables& s : p.scales) {
            lowres_.emplace_back(static_cast<size_t>(s.h) * p.W);
            have_.emplace_back(s.h);
        }
    }

    // Output rows [y0, y1) of image n into maps; returns their maximum.
    float run(int n, int y0, int y1, float* maps) {
        n_ = n;
        for (auto& have : have_) std::fill(have.begin(), have.end(), 0);
        const int H = p_.H, W = p_.W, r = p_.radius;
        int next = std::max(0, y0 - r);  // next image row to smooth horizontally into the ring
        float m = -std::numeric_limits<float>::infinity();
        for (int y = y0; y < y1; ++y) {
            // every reflected row of the window lies in [max(0, y-r), min(H-1, y+r)]
            for (const int last = std::min(H - 1, y + r); next <= last; ++next) smooth_row(next);
            for (int k = 0; k <= 2 * r; ++k)
                taps_[k] = ring_.data() + static_cast<size_t>(p_.reflected[y + k] % ring_rows_) * W;
            m = std::max(m, convolve_taps(taps_.data(), p_.weights, r, W, maps + (static_cast<long>(n) * H + y) * W));
        }
        return m;
    }

private:
    // Row i of scale s of the current image, interpolated along x to the output width.
    const float* lowres_row(size_t s, int i) {
        float* row = lowres_[s].data() + static_cast<size_t>(i) * p_.W;
        if (!have_[s][i]) {
            const ScaleTables& t = p_.scales[s];
            const float* src = t.data + (static_cast<long>(n_) * t.h + i) * t.w;
            for (int x = 0; x < p_.W; ++x) {
                const LinearTap& tx = t.cols[x];
                row[x] = (1.f - tx.w1) * src[tx.i0] + tx.w1 * src[tx.i1];
            }
            have_[s][i] = 1;
        }
        return row;
    }

    // Upsampled sum of image row y, reflected halo, horizontal Gaussian -> ring slot y % ring_rows_.
    void smooth_row(int y) {
        const int W = p_.W, r = p_.radius;
        float* centre = line_.data() + r;
        std::fill(centre, centre + W, 0.f);
        for (size_t s = 0; s < p_.scales.size(); ++s) {
            const LinearTap& ty = p_.scales[s].rows[y];
            add_lerp(lowres_row(s, ty.i0), lowres_row(s, ty.i1), ty.w1, W, centre);
        }
        for (int j = 0; j < r; ++j) {
            line_[j] = centre[reflect_index(j - r, W)];
            centre[W + j] = centre[reflect_index(W + j, W)];
        }
        convolve_taps(line_taps_.data(), p_.weights, r, W, ring_.data() + static_cast<size_t>(y % ring_rows_) * W);
    }

    const Problem& p_;
    const int ring_rows_;
    int n_ = 0;
    std::vector<float> line_;
    std::vector<float> ring_;
    std::vector<const float*> taps_;       // vertical pass: reflected ring rows
    std::vector<const float*> line_taps_;  // horizontal pass: shifted views of line_
    std::vector<std::vector<float>> lowres_;
    std::vector<std::vector<char>> have_;
};

void anomaly_map_cpu(const std::vector<ScaleTables>& scales, int n_images, int H, int W,
                     const std::vector<float>& weights, float* maps, float* scores, int threads) {
    Problem p{scales, H, W, static_cast<int>(weights.size() / 2), weights.data(), {}};
    for (int j = -p.radius; j < H + p.radius; ++j) p.reflected.push_back(reflect_index(j, H));
    const long pixels = static_cast<long>(n_images) * H * W;
    threads = static_cast<int>(std::max(1L, std::min<long>(threads, pixels / kMinPixelsPerThread)));
    // Whole images per task when there are enough; otherwise bands, whose halo rows are
    // smoothed by both neighbours (small price next to idle cores).
    const int bands = std::max(1, std::min((threads + n_images - 1) / n_images, H / (2 * p.radius + 1)));
    const long tasks = static_cast<long>(n_images) * bands;
    std::vector<float> task_max(tasks);

#pragma omp parallel num_threads(threads)
    {
        BandWorker worker(p);
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < tasks; ++t) {
            const int n = static_cast<int>(t / bands), b = static_cast<int>(t % bands);
            task_max[t] = worker.run(n, static_cast<int>(static_cast<long>(H) * b / bands),
                                     static_cast<int>(static_cast<long>(H) * (b + 1) / bands), maps);
        }
    }
    for (int n = 0; n < n_images; ++n)
        scores[n] = *std::max_element(task_max.begin() + static_cast<long>(n) * bands,
                                      task_max.begin() + static_cast<long>(n + 1) * bands);
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

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

py::tuple anomaly_map_py(const std::vector<FloatArray>& per_scale, int H, int W, const DoubleArray& weights,
                         int threads) {
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
        anomaly_map_cpu(scales, static_cast<int>(n_images), H, W, w, maps_ptr, scores_ptr,
                        threads > 0 ? threads : max_threads());
    }
    return py::make_tuple(maps, scores);
}

}  // namespace
}  // namespace mrkd

PYBIND11_MODULE(_postprocess_cpu, m) {
    m.doc() = "MRKD anomaly-map post-processing on the CPU (C++/OpenMP): upsample + sum + Gaussian + max.";
    m.def("anomaly_map", &mrkd::anomaly_map_py, py::arg("per_scale"), py::arg("height"), py::arg("width"),
          py::arg("weights"), py::arg("threads") = 0,
          "anomaly_map(per_scale, height, width, weights, threads=0) -> (maps N x H x W float32, scores N float32).\n"
          "per_scale: list of C-contiguous float32 N x h x w arrays; weights: 1-D Gaussian taps (odd length);\n"
          "threads: OpenMP threads (0 = OMP_NUM_THREADS / all cores).");
    m.def("max_threads", &mrkd::max_threads, "OpenMP threads a call will use (1 when built without OpenMP).");
#ifdef _OPENMP
    m.attr("OPENMP") = true;
#else
    m.attr("OPENMP") = false;
#endif
}
