/* What a run costs: resident memory and wall-clock time. */
#ifndef DELTATUNE_MEM_H
#define DELTATUNE_MEM_H

#include <stdint.h>

/* Peak resident set size of this process in bytes (getrusage); -1 if unknown. */
int64_t dt_peak_rss(void);
/* Current resident set size in bytes (/proc/self/statm, else the peak); -1 if unknown. */
int64_t dt_current_rss(void);
/* Seconds on a monotonic clock, from an arbitrary origin. */
double dt_seconds(void);

#endif
