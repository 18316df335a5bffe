#include "deltatune/progress.h"

#include <stdio.h>
#include <unistd.h>

#include "deltatune/mem.h"

static void fmt_count(char *buf, size_t cap, double n, bool bytes) {
    static const char *si[] = {"", "K", "M", "G", "T"}, *bin[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    double base = bytes ? 1024 : 1000;
    while (n >= base && u < 4) { n /= base; u++; }
    if (u == 0) snprintf(buf, cap, "%.0f%s%s", n, bytes ? " " : "", bytes ? bin[0] : "");
    else snprintf(buf, cap, "%.*f%s%s", n < 10 ? 2 : 1, n, bytes ? " " : "", bytes ? bin[u] : si[u]);
}

static void fmt_eta(char *buf, size_t cap, double s) {
    if (!(s >= 0) || s > 359999) { snprintf(buf, cap, "?"); return; }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

static void draw(dt_progress *p, double now, bool final) {
    double el = now - p->t0;
    bool bytes = p->unit == NULL;
    char d[32], t[32], r[32], eta[32], u[32], ru[32];
    fmt_count(d, sizeof d, (double)p->done, bytes);
    fmt_count(t, sizeof t, (double)p->total, bytes);
    snprintf(u, sizeof u, "%s%s", bytes ? "" : " ", bytes ? "" : p->unit);
    /* The rate counts work in rate_unit, or the same thing as done. */
    double rate_n = p->rate_unit ? (double)p->work : (double)p->done;
    fmt_count(r, sizeof r, el > 0 ? rate_n / el : 0, bytes && !p->rate_unit);
    snprintf(ru, sizeof ru, "%s%s", p->rate_unit || !bytes ? " " : "", p->rate_unit ? p->rate_unit : bytes ? "" : p->unit);
    double frac = p->total > 0 ? (double)p->done / (double)p->total : 1;
    if (final) fmt_eta(eta, sizeof eta, el);
    else fmt_eta(eta, sizeof eta, p->done > 0 ? el * (1 - frac) / frac : -1);
    const char *eta_label = final ? "in" : "ETA";
    if (p->tty) {
        char bar[21];
        int fill = (int)(frac * 20 + 1e-9);
        for (int i = 0; i < 20; i++) bar[i] = i < fill ? '#' : '.';
        bar[20] = 0;
        fprintf(stderr, "\r%s [%s] %s/%s%s  %s%s/s  %s %s\033[K", p->label, bar, d, t, u, r, ru, eta_label, eta);
    } else {
        fprintf(stderr, "%s: %s/%s%s (%.0f%%), %s%s/s, %s %s\n", p->label, d, t, u, frac * 100, r, ru, eta_label,
                eta);
    }
    fflush(stderr);
    p->last_draw = now;
}

void dt_progress_start(dt_progress *p, const char *label, int64_t total, const char *unit,
                       const char *rate_unit) {
    *p = (dt_progress){.label = label, .unit = unit, .rate_unit = rate_unit, .total = total};
    p->tty = isatty(STDERR_FILENO);
    p->t0 = dt_seconds();
    draw(p, p->t0, false);
    p->next_quarter = 1;
}

void dt_progress_update(dt_progress *p, int64_t done, int64_t work) {
    p->done = done;
    p->work = work;
    if (p->finished) return;
    double now = dt_seconds();
    if (p->tty) {
        if (now - p->last_draw >= 0.1) draw(p, now, false);
        return;
    }
    /* Only the highest mark crossed is printed, so a jump from 10 % to 90 % gives one line. */
    int q = p->total > 0 ? (int)(4 * done / p->total) : 4;
    if (q >= p->next_quarter && q < 4) {
        draw(p, now, false);
        p->next_quarter = q + 1;
    }
}

void dt_progress_finish(dt_progress *p) {
    if (p->finished) return;
    p->finished = true;
    draw(p, dt_seconds(), true);
    if (p->tty) fputc('\n', stderr);
    fflush(stderr);
}
