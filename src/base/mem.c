#include "deltatune/mem.h"

#include <stdio.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

int64_t dt_peak_rss(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return -1;
#if defined(__APPLE__)
    return (int64_t)ru.ru_maxrss;          /* macOS reports bytes */
#else
    return (int64_t)ru.ru_maxrss * 1024;   /* Linux and the BSDs report KiB */
#endif
}

int64_t dt_current_rss(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        long long size, resident;
        int ok = fscanf(f, "%lld %lld", &size, &resident) == 2;
        fclose(f);
        long page = sysconf(_SC_PAGESIZE);
        if (ok && page > 0) return (int64_t)resident * page;
    }
    return dt_peak_rss();
}

double dt_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
