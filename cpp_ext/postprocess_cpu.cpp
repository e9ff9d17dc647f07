// CPU post-processing for MRKD anomaly maps: per image, bilinear upsampling (align_corners=True)
// of every scale summed, a separable Gaussian (scipy gaussian_filter semantics, 'reflect' border)
// and the per-image maximum. Tasks of (image, band of rows) run on the calling thread and, when
// the work is large enough (work_split) and cores are free at the moment (free_cores), on helper
// threads of a small pool that sleep on a condition variable between calls (they never spin: with
// OpenMP's spinning waits, 2 threads on busy cores were 10-50x slower than 1).
//
// Upsampling and the Gaussian are both linear and separable, so per scale and axis they compose
// into one banded matrix (output pixel <- a few low-resolution pixels): smoothed = sum over scales
// of Ay * map * Ax^T. The Gaussian is thereby applied to the low-resolution rows (64, 32, 16 at
// 256 px) instead of the 256 upsampled ones, and the vertical pass reads ~20 rows (about 10, 6, 4
// per scale) instead of 33: about 1.5 M multiply-adds per 256x256 map instead of 2.2 M plus the
// upsampling. The matrices depend only on sizes and sigma; they are built once (in double, from
// the same index math as the CUDA kernels: postprocess_common.h) and cached.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

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

// Work is counted in output pixels x images x scale maps summed into each pixel (the "channels"):
// the row pass reads ~6-10 taps per scale for every output pixel, so this is what the time follows.
// A call uses at most work / kMinWorkPerThread threads (at least one). Measured on the 2-core VM
// with every call forced onto 2 threads (medians of 5 alternated rounds, MRKD's three scales): one
// 256 px image (196,608 units, ~0.06 ms) 0.97x the one-thread time, 256 px batch 2 (393,216) 1.13x,
// 384 px batch 1 (442,368) 1.00x: waking a sleeping helper (~50-100 us on a VM) and the bands'
// overlapping halo rows eat what the second core saves. 512 px batch 1 (786,432) 0.83x, 256 px
// batch 4 0.70x, 1024 px 0.52x. So a second thread from 2 x 393,216 units on.
constexpr long kMinWorkPerThread = 2L * 256 * 256 * 3;
// Tasks are cut to about this much work (one 256 px image, ~0.06-0.1 ms), at least two per thread,
// so that a helper the scheduler preempts on a busy core holds up at most one small task, and the
// caller takes over every task a late helper has not claimed yet.
constexpr long kTaskWork = 256L * 256 * 3;

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
__attribute__((always_inline)) inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// One axis of "upsample in_size -> out_size, then Gaussian with 'reflect' border" as a banded
// matrix: out[o] = sum_k weights[o * taps + k] * in[first[o] + k], k < taps (the same band width
// for every o, zero-padded, so loops have a fixed length).
// For the horizontal pass the same matrix is also kept by blocks of kLanes outputs (x0..x0+7):
// block b reads inputs block_first[b] + j, j < block_taps, with lane weights
// block_weights[(b * block_taps + j) * kLanes + lane]; lanes past out_size have zero weights.
struct AxisOperator {
    int taps = 0;
    std::vector<int> first;
    std::vector<float> weights;
    int block_taps = 0;
    std::vector<int> block_first;
    std::vector<float> block_weights;
};

AxisOperator make_axis_operator(int in_size, int out_size, const std::vector<double>& gaussian) {
    const int r = static_cast<int>(gaussian.size() / 2);
    const float scale = align_corners_scale(in_size, out_size);
    std::vector<LinearTap> upsample(out_size);
    for (int o = 0; o < out_size; ++o) upsample[o] = linear_tap(o, scale, in_size);
    // fn(input index, weight) for every term of output o: each Gaussian tap over the reflected
    // upsampled row, each upsampling tap of that row
    auto for_each_term = [&](int o, auto&& fn) {
        for (int t = -r; t <= r; ++t) {
            const LinearTap& tap = upsample[reflect_index(o + t, out_size)];
            fn(tap.i0, gaussian[t + r] * static_cast<double>(1.f - tap.w1));
            fn(tap.i1, gaussian[t + r] * static_cast<double>(tap.w1));
        }
    };
    std::vector<int> lo(out_size, in_size), hi(out_size, -1);
    for (int o = 0; o < out_size; ++o)
        for_each_term(o, [&](int i, double) { lo[o] = std::min(lo[o], i), hi[o] = std::max(hi[o], i); });

    AxisOperator op;
    for (int o = 0; o < out_size; ++o) op.taps = std::max(op.taps, hi[o] - lo[o] + 1);
    op.first.resize(out_size);
    std::vector<double> band(static_cast<size_t>(out_size) * op.taps, 0.0);  // summed in double
    for (int o = 0; o < out_size; ++o) {
        op.first[o] = std::min(lo[o], in_size - op.taps);
        double* row = band.data() + static_cast<size_t>(o) * op.taps - op.first[o];
        for_each_term(o, [&](int i, double w) { row[i] += w; });
    }
    op.weights.assign(band.begin(), band.end());

    const int blocks = (out_size + kLanes - 1) / kLanes;
    std::vector<int> block_lo(blocks, in_size), block_hi(blocks, -1);
    for (int o = 0; o < out_size; ++o) {
        block_lo[o / kLanes] = std::min(block_lo[o / kLanes], lo[o]);
        block_hi[o / kLanes] = std::max(block_hi[o / kLanes], hi[o]);
    }
    for (int b = 0; b < blocks; ++b) op.block_taps = std::max(op.block_taps, block_hi[b] - block_lo[b] + 1);
    op.block_first.resize(blocks);
    std::vector<double> lanes(static_cast<size_t>(blocks) * op.block_taps * kLanes, 0.0);
    for (int b = 0; b < blocks; ++b) op.block_first[b] = std::min(block_lo[b], in_size - op.block_taps);
    for (int o = 0; o < out_size; ++o) {
        const int b = o / kLanes;
        double* column = lanes.data() + static_cast<size_t>(b) * op.block_taps * kLanes + (o - b * kLanes);
        for_each_term(o, [&](int i, double w) { column[static_cast<size_t>(i - op.block_first[b]) * kLanes] += w; });
    }
    op.block_weights.assign(lanes.begin(), lanes.end());
    return op;
}

// The operators depend only on (in_size, out_size, weights): built once per process and shape.
std::shared_ptr<const AxisOperator> axis_operator(int in_size, int out_size, const std::vector<double>& gaussian) {
    using Key = std::tuple<int, int, std::vector<double>>;
    static std::mutex mutex;
    static std::map<Key, std::shared_ptr<const AxisOperator>> cache;
    Key key{in_size, out_size, gaussian};
    {
        std::lock_guard<std::mutex> lock(mutex);
        auto found = cache.find(key);
        if (found != cache.end()) return found->second;
    }
    auto op = std::make_shared<const AxisOperator>(make_axis_operator(in_size, out_size, gaussian));
    std::lock_guard<std::mutex> lock(mutex);
    if (cache.size() >= 256) cache.clear();  // many distinct shapes: a bounded cache, rebuilt on demand
    return cache.emplace(std::move(key), std::move(op)).first->second;
}

struct Scale {
    const float* data;  // N x h x w
    int h;
    int w;
    std::shared_ptr<const AxisOperator> rows;  // H x h
    std::shared_ptr<const AxisOperator> cols;  // W x w
};

// dst[x] = sum_j src[first(x) + j] * weight(x, j) for the blocks of one axis operator: a
// low-resolution row upsampled and smoothed along x. Four blocks at a time keep four independent
// accumulators in flight. dst has room for whole blocks.
MRKD_SIMD_CLONES
void smooth_columns(const float* __restrict src, const AxisOperator& op, float* __restrict dst) {
    const int blocks = static_cast<int>(op.block_first.size()), taps = op.block_taps;
    const float* weights = op.block_weights.data();
    int b = 0;
    for (; b + 4 <= blocks; b += 4) {
        const float* s0 = src + op.block_first[b];
        const float* s1 = src + op.block_first[b + 1];
        const float* s2 = src + op.block_first[b + 2];
        const float* s3 = src + op.block_first[b + 3];
        const float* w0 = weights + static_cast<size_t>(b) * taps * kLanes;
        const float* w1 = w0 + taps * kLanes;
        const float* w2 = w1 + taps * kLanes;
        const float* w3 = w2 + taps * kLanes;
        vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int j = 0; j < taps; ++j) {
            a0 += s0[j] * load(w0 + j * kLanes);
            a1 += s1[j] * load(w1 + j * kLanes);
            a2 += s2[j] * load(w2 + j * kLanes);
            a3 += s3[j] * load(w3 + j * kLanes);
        }
        store(dst + b * kLanes, a0);
        store(dst + (b + 1) * kLanes, a1);
        store(dst + (b + 2) * kLanes, a2);
        store(dst + (b + 3) * kLanes, a3);
    }
    for (; b < blocks; ++b) {
        const float* s = src + op.block_first[b];
        const float* w = weights + static_cast<size_t>(b) * taps * kLanes;
        vfloat a = {};
        for (int j = 0; j < taps; ++j) a += s[j] * load(w + j * kLanes);
        store(dst + b * kLanes, a);
    }
}

// out[x] = sum_k weights[k] * rows[k][x] for x < n, returning max_x out[x]: one output row from
// the x-smoothed low-resolution rows of every scale. Eight accumulators (64 columns) in flight.
MRKD_SIMD_CLONES
float combine_rows(const float* const* rows, const float* __restrict weights, int taps, int n,
                   float* __restrict out) {
    vfloat vmax = {};
    vmax -= std::numeric_limits<float>::infinity();
    int x = 0;
    for (; x + 8 * kLanes <= n; x += 8 * kLanes) {
        vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
        for (int k = 0; k < taps; ++k) {
            const float w = weights[k];
            const float* p = rows[k] + x;
            a0 += w * load(p);
            a1 += w * load(p + kLanes);
            a2 += w * load(p + 2 * kLanes);
            a3 += w * load(p + 3 * kLanes);
            a4 += w * load(p + 4 * kLanes);
            a5 += w * load(p + 5 * kLanes);
            a6 += w * load(p + 6 * kLanes);
            a7 += w * load(p + 7 * kLanes);
        }
        const vfloat acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
        for (int i = 0; i < 8; ++i) {
            store(out + x + i * kLanes, acc[i]);
            vmax = vmax > acc[i] ? vmax : acc[i];
        }
    }
    float m = -std::numeric_limits<float>::infinity();
    for (; x < n; x += kLanes) {  // rows are padded to whole vectors: compute a whole one, keep n - x
        vfloat a = {};
        for (int k = 0; k < taps; ++k) a += weights[k] * load(rows[k] + x);
        const int valid = std::min(kLanes, n - x);
        std::memcpy(out + x, &a, valid * sizeof(float));
        for (int i = 0; i < valid; ++i) m = std::max(m, a[i]);
    }
    for (int j = 0; j < kLanes; ++j) m = std::max(m, vmax[j]);
    return m;
}

// Per-thread scratch (x-smoothed low-resolution rows, tap lists), reused across tasks and calls.
class BandWorker {
public:
    BandWorker(const std::vector<Scale>& scales, int H, int W)
        : scales_(scales), H_(H), W_(W), padded_(((W + kLanes - 1) / kLanes) * kLanes) {
        taps_ = 0;
        for (const Scale& s : scales) {
            offsets_.push_back(smoothed_size_);
            smoothed_size_ += static_cast<size_t>(s.h) * padded_;
            taps_ += s.rows->taps;
        }
        thread_local std::vector<float> smoothed, weights;
        thread_local std::vector<const float*> rows;
        if (smoothed.size() < smoothed_size_) smoothed.resize(smoothed_size_);
        if (weights.size() < static_cast<size_t>(taps_)) weights.resize(taps_), rows.resize(taps_);
        smoothed_ = smoothed.data();
        row_weights_ = weights.data();
        row_ptrs_ = rows.data();
    }

    // Output rows [y0, y1) of image n into maps; returns their maximum.
    float run(int n, int y0, int y1, float* maps) {
        for (size_t s = 0; s < scales_.size(); ++s) {
            const Scale& sc = scales_[s];
            const AxisOperator& rows = *sc.rows;
            int lo = sc.h, hi = 0;  // low-resolution rows this band reads
            for (int y = y0; y < y1; ++y) {
                lo = std::min(lo, rows.first[y]);
                hi = std::max(hi, rows.first[y] + rows.taps);
            }
            const float* image = sc.data + static_cast<long>(n) * sc.h * sc.w;
            for (int i = lo; i < hi; ++i)
                smooth_columns(image + static_cast<long>(i) * sc.w, *sc.cols,
                               smoothed_ + offsets_[s] + static_cast<size_t>(i) * padded_);
        }
        float m = -std::numeric_limits<float>::infinity();
        for (int y = y0; y < y1; ++y) {
            int k = 0;
            for (size_t s = 0; s < scales_.size(); ++s) {
                const AxisOperator& rows = *scales_[s].rows;
                const float* w = rows.weights.data() + static_cast<size_t>(y) * rows.taps;
                const float* first = smoothed_ + offsets_[s] + static_cast<size_t>(rows.first[y]) * padded_;
                for (int j = 0; j < rows.taps; ++j, ++k) {
                    row_weights_[k] = w[j];
                    row_ptrs_[k] = first + static_cast<size_t>(j) * padded_;
                }
            }
            m = std::max(m, combine_rows(row_ptrs_, row_weights_, taps_, W_,
                                         maps + (static_cast<long>(n) * H_ + y) * W_));
        }
        return m;
    }

private:
    const std::vector<Scale>& scales_;
    const int H_, W_, padded_;
    int taps_;
    size_t smoothed_size_ = 0;
    std::vector<size_t> offsets_;
    float* smoothed_;
    float* row_weights_;
    const float** row_ptrs_;
};

// Threads for a call: as asked, but one per kMinWorkPerThread of work at most. Tasks: whole images
// when each is small, else bands of rows (at least 16 each) of about kTaskWork, and at least two
// tasks per thread; bands' low-resolution halo rows are smoothed by both neighbours (a few rows).
struct WorkSplit {
    int threads;
    int bands;  // row bands per image
};

WorkSplit work_split(long n_images, int H, int W, int n_scales, int threads) {
    const long image_work = static_cast<long>(H) * W * std::max(1, n_scales);
    const long work = n_images * image_work;
    threads = static_cast<int>(std::max(1L, std::min<long>(threads, work / kMinWorkPerThread)));
    if (threads == 1) return {1, 1};  // no split: the single-thread path has no halo overhead
    const long min_tasks = 2L * threads;
    long bands = std::max((image_work + kTaskWork - 1) / kTaskWork, (min_tasks + n_images - 1) / n_images);
    bands = std::max(1L, std::min<long>(bands, H / 16));
    return {threads, static_cast<int>(bands)};
}

// Helper threads that sleep on a condition variable between calls. run() executes tasks
// [0, n_tasks) on the calling thread and up to `helpers` pool threads: every participant claims
// the next task from an atomic counter, so the caller never waits for a helper that has not been
// scheduled yet (it takes that helper's tasks itself); it waits (blocking, not spinning) only for
// tasks a helper has already claimed. The result does not depend on who ran which task.
class TaskPool {
public:
    static TaskPool& instance() {
        // Leaked on purpose: helper threads may still sleep on it while the process exits. A forked
        // child has none of the parent's threads: it gets a fresh pool.
        static std::mutex mutex;
        static TaskPool* pool = nullptr;
        std::lock_guard<std::mutex> lock(mutex);
        if (pool == nullptr || pool->pid_ != getpid()) pool = new TaskPool();
        return *pool;
    }

    void run(long n_tasks, int helpers, const std::function<void(long)>& task) {
        auto job = std::make_shared<Job>(n_tasks, &task);
        if (helpers > 0) {
            std::lock_guard<std::mutex> lock(mutex_);
            while (static_cast<int>(threads_.size()) < helpers) threads_.emplace_back([this] { serve(); });
            job_ = job;
            ++generation_;
            wanted_ = helpers;
        }
        for (int i = 0; i < helpers; ++i) wake_.notify_one();
        work(*job);
        std::unique_lock<std::mutex> lock(job->mutex);
        job->finished.wait(lock, [&] { return job->done.load() == n_tasks; });
        if (job->error) std::rethrow_exception(job->error);
    }

private:
    struct Job {
        Job(long n, const std::function<void(long)>* fn) : n_tasks(n), task(fn) {}
        const long n_tasks;
        const std::function<void(long)>* task;  // valid while a claimed task is unfinished
        std::atomic<long> next{0};
        std::atomic<long> done{0};
        std::mutex mutex;
        std::condition_variable finished;
        std::exception_ptr error;
    };

    TaskPool() : pid_(getpid()) {}

    static void work(Job& job) {
        for (long t; (t = job.next.fetch_add(1)) < job.n_tasks;) {
            try {
                (*job.task)(t);
            } catch (...) {
                std::lock_guard<std::mutex> lock(job.mutex);
                if (!job.error) job.error = std::current_exception();
            }
            if (job.done.fetch_add(1) + 1 == job.n_tasks) {
                std::lock_guard<std::mutex> lock(job.mutex);  // the caller checks done under this lock
                job.finished.notify_one();
            }
        }
    }

    void serve() {
        // SCHED_BATCH: a woken helper does not preempt whatever runs on the core it lands on (on a
        // busy machine that was often the caller itself, which then waited ms for its core back).
        sched_param param{};
        pthread_setschedparam(pthread_self(), SCHED_BATCH, &param);
        unsigned long seen = 0;
        for (;;) {
            std::shared_ptr<Job> job;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_ != seen && wanted_ > 0; });
                seen = generation_;
                --wanted_;
                job = job_;
            }
            work(*job);  // a late helper finds every task claimed and goes back to sleep
        }
    }

    const pid_t pid_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::vector<std::thread> threads_;  // never joined (see instance())
    std::shared_ptr<Job> job_;
    unsigned long generation_ = 0;
    int wanted_ = 0;
};

// Cores no other thread is running on at this moment: online CPUs minus the runnable threads that
// /proc/loadavg counts (4th field, "runnable/total", an instant count that includes the caller).
// May be negative (more runnable threads than cores). Read at most every 10 ms (a read costs a few
// us); kUnknownFreeCores where /proc/loadavg cannot be read (not Linux): no limit then.
constexpr int kUnknownFreeCores = std::numeric_limits<int>::max();
int free_cores() {
    using Clock = std::chrono::steady_clock;
    static std::atomic<long> read_at{0};
    static std::atomic<bool> valid{false};
    static std::atomic<int> cached{kUnknownFreeCores};
    const long now = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now().time_since_epoch()).count();
    if (valid.load(std::memory_order_acquire) && now - read_at.load(std::memory_order_relaxed) < 10)
        return cached.load(std::memory_order_relaxed);
    int result = kUnknownFreeCores;
    const int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char text[128];
        const ssize_t n = read(fd, text, sizeof text - 1);
        close(fd);
        double a, b, c;
        int runnable, total;
        if (n > 0 && (text[n] = '\0', std::sscanf(text, "%lf %lf %lf %d/%d", &a, &b, &c, &runnable, &total) == 5))
            result = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)) - (runnable - 1);
    }
    cached.store(result, std::memory_order_relaxed);
    read_at.store(now, std::memory_order_relaxed);
    valid.store(true, std::memory_order_release);
    return result;
}

thread_local int last_threads = 0;  // threads the calling thread's latest anomaly_map call used

void anomaly_map_cpu(const std::vector<Scale>& scales, int n_images, int H, int W, float* maps, float* scores,
                     int requested_threads, bool only_free_cores) {
    auto [threads, bands] = work_split(n_images, H, W, static_cast<int>(scales.size()), requested_threads);
    if (threads > 1 && only_free_cores) {
        // Helpers only on cores that are free now. On busy cores a second thread cannot add CPU
        // time, it only competes with the caller and the other programs: measured with four busy
        // processes per core, 512 px batch 4 took 6.3-6.7 ms on two threads (this pool, never
        // spinning) and 17-20 ms (OpenMP, spinning) against 1.6-2.2 ms on one.
        const int idle = free_cores();
        if (idle < threads - 1) threads = std::max(1, 1 + idle);
        if (threads == 1) bands = 1;
    }
    last_threads = threads;
    const long tasks = static_cast<long>(n_images) * bands;
    std::vector<float> task_max(tasks);
    auto band = [&, bands = bands](long t) {
        const int n = static_cast<int>(t / bands), b = static_cast<int>(t % bands);
        BandWorker worker(scales, H, W);
        task_max[t] = worker.run(n, static_cast<int>(static_cast<long>(H) * b / bands),
                                 static_cast<int>(static_cast<long>(H) * (b + 1) / bands), maps);
    };
    if (threads == 1) {
        for (long t = 0; t < tasks; ++t) band(t);
    } else {
        TaskPool::instance().run(tasks, threads - 1, band);
    }
    for (int n = 0; n < n_images; ++n)
        scores[n] = *std::max_element(task_max.begin() + static_cast<long>(n) * bands,
                                      task_max.begin() + static_cast<long>(n + 1) * bands);
}

std::vector<double> checked_weights(const DoubleArray& weights) {
    if (weights.ndim() != 1 || weights.shape(0) % 2 != 1)
        throw std::invalid_argument("weights must be a 1-D array of odd length (2*radius+1), got shape with " +
                                    std::to_string(weights.ndim()) + " dims and " +
                                    std::to_string(weights.size()) + " values");
    return std::vector<double>(weights.data(), weights.data() + weights.size());
}

// Threads a call with threads=0 uses: OMP_NUM_THREADS when set (the usual knob for "threads of
// numeric libraries in this process"), else the cores this process may run on.
int max_threads() {
    if (const char* env = std::getenv("OMP_NUM_THREADS")) {
        const int n = std::atoi(env);
        if (n > 0) return n;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
}

py::tuple anomaly_map_py(const std::vector<FloatArray>& per_scale, int H, int W, const DoubleArray& weights,
                         int threads, bool only_free_cores) {
    if (per_scale.empty()) throw std::invalid_argument("per_scale is empty: need at least one map");
    if (H < 1 || W < 1)
        throw std::invalid_argument("output size must be positive, got " + std::to_string(H) + "x" +
                                    std::to_string(W));
    const std::vector<double> w = checked_weights(weights);
    const py::ssize_t n_images = per_scale[0].ndim() == 3 ? per_scale[0].shape(0) : -1;
    std::vector<Scale> scales;
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
        const int h = static_cast<int>(a.shape(1)), wd = static_cast<int>(a.shape(2));
        scales.push_back(Scale{a.data(), h, wd, axis_operator(h, H, w), axis_operator(wd, W, w)});
    }
    FloatArray maps({n_images, static_cast<py::ssize_t>(H), static_cast<py::ssize_t>(W)});
    FloatArray scores({n_images});
    float* maps_ptr = maps.mutable_data();
    float* scores_ptr = scores.mutable_data();
    if (n_images > 0) {
        py::gil_scoped_release release;
        anomaly_map_cpu(scales, static_cast<int>(n_images), H, W, maps_ptr, scores_ptr,
                        threads > 0 ? threads : max_threads(), only_free_cores);
    }
    return py::make_tuple(maps, scores);
}

}  // namespace
}  // namespace mrkd

PYBIND11_MODULE(_postprocess_cpu, m) {
    m.doc() = "MRKD anomaly-map post-processing on the CPU (C++, a sleeping thread pool): upsample + sum + "
              "Gaussian + max.";
    m.def("anomaly_map", &mrkd::anomaly_map_py, py::arg("per_scale"), py::arg("height"), py::arg("width"),
          py::arg("weights"), py::arg("threads") = 0, py::arg("only_free_cores") = true,
          "anomaly_map(per_scale, height, width, weights, threads=0, only_free_cores=True) -> (maps N x H x W\n"
          "float32, scores N float32). per_scale: list of C-contiguous float32 N x h x w arrays; weights: 1-D\n"
          "Gaussian taps (odd length); threads: at most this many threads (0 = max_threads()), fewer for small\n"
          "work (see work_split) and, with only_free_cores, no more than 1 + free_cores() (False: tests).");
    m.def("work_split", [](long n, int height, int width, int scales, int threads) {
              const mrkd::WorkSplit split =
                  mrkd::work_split(n, height, width, scales, threads > 0 ? threads : mrkd::max_threads());
              return py::make_tuple(split.threads, split.bands);
          }, py::arg("n"), py::arg("height"), py::arg("width"), py::arg("scales"), py::arg("threads") = 0,
          "work_split(n, height, width, scales, threads=0) -> (threads, row bands per image) an anomaly_map\n"
          "call on n images of height x width from `scales` maps would use.");
    m.def("max_threads", &mrkd::max_threads,
          "Threads a call with threads=0 may use: OMP_NUM_THREADS when set, else the cores this process may run on.");
    m.def("free_cores", []() -> py::object {
              const int free = mrkd::free_cores();
              return free == mrkd::kUnknownFreeCores ? py::none() : py::object(py::int_(free));
          },
          "Cores no other thread runs on right now (online CPUs - runnable threads + 1; negative when\n"
          "oversubscribed), None if unknown; a call puts helpers on these only.");
    m.def("last_threads", [] { return mrkd::last_threads; },
          "Threads the calling thread's latest anomaly_map call ran on (0 before the first call).");
    m.attr("MIN_WORK_PER_THREAD") = mrkd::kMinWorkPerThread;
    m.attr("TASK_WORK") = mrkd::kTaskWork;
}
