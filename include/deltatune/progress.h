/* A progress line on stderr: done/total, rate, ETA.
 *
 * On a terminal it redraws in place (\r), at most about ten times a second; into a file or
 * pipe it prints a plain line at 0, 25, 50, 75 and 100 %, so logs stay short. */
#ifndef DELTATUNE_PROGRESS_H
#define DELTATUNE_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    const char *label;      /* "eval" */
    const char *unit;       /* what done/total count: "rows"; NULL: bytes, shown in KiB/MiB/GiB */
    const char *rate_unit;  /* what the rate counts ("tok"): the work passed to update; NULL: done */
    int64_t total, done, work;
    double t0, last_draw;
    bool tty, finished;
    int next_quarter;       /* non-TTY: the next 25 % mark to print */
} dt_progress;

void dt_progress_start(dt_progress *p, const char *label, int64_t total, const char *unit,
                       const char *rate_unit);
/* done: in units of total; work: the count the rate is shown in (ignored when rate_unit is NULL). */
void dt_progress_update(dt_progress *p, int64_t done, int64_t work);
/* Draws the final state and ends the line. */
void dt_progress_finish(dt_progress *p);

#endif
