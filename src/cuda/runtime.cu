// Device, stream, cuBLAS handle, counted allocations and per-region timing.
#include <map>
#include <stdio.h>
#include <string.h>
#include <string>
#include <vector>
#include <algorithm>

#include "cuda/cuda_internal.h"

extern "C" {
#include "deltatune/error.h"
}

static cudaStream_t stream;
static cublasHandle_t cublas;
static bool ready;

cudaStream_t cuda_stream(void) { return stream; }
cublasHandle_t cuda_cublas(void) { return cublas; }

int cuda_sm_count(void) {
    static int n;
    if (n <= 0) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
            n = 1;
    }
    return n;
}

extern "C" int cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // no driver or no device: not an error here
        return 0;
    }
    return n;
}

extern "C" const char *cuda_device_name(void) {
    static cudaDeviceProp prop;
    return cudaGetDeviceProperties(&prop, 0) == cudaSuccess ? prop.name : "";
}

extern "C" int cuda_init(void) {
    if (ready) return 0;
    if (cuda_device_count() == 0) return dt_err("no CUDA device");
    cudaError_t e = cudaSetDevice(0);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) return dt_err("CUDA start: %s", cudaGetErrorString(e));
    if (cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS) return dt_err("cuBLAS could not start");
    cublasSetStream(cublas, stream);
    ready = true;
    return 0;
}

// Sizes of live allocations, so the peak counts what we asked for, as torch's counter does.
static std::map<void *, size_t> sizes;
static size_t live, peak;

static int fail(cudaError_t e, const char *what, size_t bytes) {
    return dt_err("CUDA %s of %zu bytes: %s", what, bytes, cudaGetErrorString(e));
}

extern "C" int cuda_alloc(void **p, size_t bytes) {
    if (cuda_init()) return -1;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaGetLastError();
        cudaMemGetInfo(&fr, &tot);
        return dt_err("CUDA allocation of %.1f MiB failed (%.1f MiB free of %.1f MiB, %.1f MiB ours): %s",
                      bytes / 1048576.0, fr / 1048576.0, tot / 1048576.0, live / 1048576.0, cudaGetErrorString(e));
    }
    sizes[*p] = bytes;
    live += bytes;
    peak = live > peak ? live : peak;
    return 0;
}

extern "C" void cuda_free(void *p) {
    if (!p) return;
    auto it = sizes.find(p);
    if (it != sizes.end()) {
        live -= it->second;
        sizes.erase(it);
    }
    cudaFree(p);
}

extern "C" size_t cuda_mem_live(void) { return live; }
extern "C" size_t cuda_mem_peak(void) { return peak; }
extern "C" void cuda_mem_reset_peak(void) { peak = live; }

extern "C" int cuda_upload(void *dst, const void *src, size_t bytes) {
    if (cuda_init()) return -1;
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    return e == cudaSuccess ? 0 : fail(e, "upload", bytes);
}

extern "C" int cuda_download(void *dst, const void *src, size_t bytes) {
    if (cuda_init()) return -1;
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    return e == cudaSuccess ? 0 : fail(e, "download", bytes);
}

extern "C" int cuda_zero(void *p, size_t bytes) {
    if (cuda_init()) return -1;
    cudaError_t e = cudaMemsetAsync(p, 0, bytes, stream);
    return e == cudaSuccess ? 0 : fail(e, "memset", bytes);
}

extern "C" void cuda_copy_f32(float *dst, const float *src, int64_t n) {
    if (n > 0 && dst != src) cudaMemcpyAsync(dst, src, sizeof(float) * (size_t)n, cudaMemcpyDeviceToDevice, stream);
}

extern "C" int cuda_copy_rows(void *dst, size_t dst_pitch, const void *src, size_t src_pitch, size_t width,
                              size_t rows) {
    if (cuda_init()) return -1;
    cudaError_t e = cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDeviceToDevice, stream);
    return e == cudaSuccess ? 0 : fail(e, "copy", width * rows);
}

extern "C" int cuda_check(const char *what) {
    if (cuda_init()) return -1;
    cudaError_t e = cudaStreamSynchronize(stream);
    if (e == cudaSuccess) e = cudaGetLastError();
    return e == cudaSuccess ? 0 : dt_err("CUDA %s: %s", what, cudaGetErrorString(e));
}

// ---- graphs: the launches between cuda_graph_begin and cuda_graph_end recorded (not run), then
// replayed by cuda_graph_launch; the host launches them once, not thousands of times a step
extern "C" int cuda_graph_begin(void) {
    if (cuda_init()) return -1;
    cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
    return e == cudaSuccess ? 0 : dt_err("CUDA graph capture: %s", cudaGetErrorString(e));
}

extern "C" int cuda_graph_end(void **exec) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t x = nullptr;
    *exec = nullptr;
    cudaError_t e = cudaStreamEndCapture(stream, &graph);
    if (e == cudaSuccess) e = cudaGraphInstantiate(&x, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        cudaGetLastError();  // a failed capture is not a launch error: the caller runs the ops instead
        return dt_err("CUDA graph capture: %s", cudaGetErrorString(e));
    }
    *exec = x;
    return 0;
}

extern "C" int cuda_graph_launch(void *exec) {
    cudaError_t e = cudaGraphLaunch((cudaGraphExec_t)exec, stream);
    return e == cudaSuccess ? 0 : dt_err("CUDA graph launch: %s", cudaGetErrorString(e));
}

extern "C" void cuda_graph_free(void *exec) {
    if (exec) cudaGraphExecDestroy((cudaGraphExec_t)exec);
}

// ---- timing: a pair of events per region, summed at the report
struct region {
    const char *name;
    cudaEvent_t begin, end;
};
static bool prof_on;
static std::vector<region> open_regions, done_regions;
static std::map<std::string, double> host_ms;  // regions timed on the host (wall clock)

extern "C" void cuda_prof_add_host(const char *name, double ms) {
    if (prof_on) host_ms[name] += ms;
}

extern "C" void cuda_prof_enable(int on) { prof_on = on != 0; }

extern "C" void cuda_prof_push(const char *name) {
    if (!prof_on) return;
    region r = {name, nullptr, nullptr};
    cudaEventCreate(&r.begin);
    cudaEventCreate(&r.end);
    cudaEventRecord(r.begin, stream);
    open_regions.push_back(r);
}

extern "C" void cuda_prof_pop(void) {
    if (!prof_on || open_regions.empty()) return;
    region r = open_regions.back();
    open_regions.pop_back();
    cudaEventRecord(r.end, stream);
    done_regions.push_back(r);
}

extern "C" void cuda_prof_reset(void) {
    for (region &r : done_regions) {
        cudaEventDestroy(r.begin);
        cudaEventDestroy(r.end);
    }
    done_regions.clear();
    host_ms.clear();
}

extern "C" void cuda_prof_report(void *f) {
    cudaStreamSynchronize(stream);
    std::map<std::string, double> ms = host_ms;
    int steps = 0;
    for (region &r : done_regions) {
        float t = 0;
        cudaEventElapsedTime(&t, r.begin, r.end);
        ms[r.name] += t;
        steps += strcmp(r.name, "step") == 0;
    }
    if (steps == 0) steps = 1;
    std::vector<std::pair<double, std::string>> order;
    double total = 0;
    for (auto &kv : ms) {
        order.push_back({kv.second, kv.first});
        // nested regions are reported too; the share is of the top-level "step" when present
    }
    auto step = ms.find("step");
    total = step != ms.end() ? step->second : 0;
    std::sort(order.rbegin(), order.rend());
    fprintf((FILE *)f, "profile: %d step%s, GPU time per step by region (regions nest; host.* is wall clock)\n", steps,
            steps == 1 ? "" : "s");
    for (auto &o : order)
        fprintf((FILE *)f, "profile: %-28s %9.3f ms %6.1f%%\n", o.second.c_str(), o.first / steps,
                total > 0 ? 100 * o.first / total : 0);
}
