/* MultiBalance's M-sized host step in C: `_track_host`, `multibalance_update_host`,
 * `stability_cap`, `project_simplex_host`, `_count_reversals` and `combination` of
 * balancing/multibalance.py, one call instead of ~100 Python-level operations.
 *
 * It performs the same IEEE double operations as those Python functions, in the same order
 * (max(a, b) keeps a unless b > a; min(a, b) keeps a unless b < a; sum() as `py_sum` below), and
 * rounds to float32 with the same C cast as array('f'), so it gives the same bits:
 * tests/balancing/test_native_step.py compares the two on random steps. Built with
 * -ffp-contract=off (no fused multiply-add) and without -ffast-math, which would reorder sums.
 *
 * Where the Python code would raise (a division by zero) or sort NaN (whose order depends on
 * the sort), it returns 1 and writes nothing: the caller then runs the Python step on the same
 * state. The state it reads and writes is the float32 stage of `MultiBalance._share_buffers`
 * ([lam | u | n | balanced | coef | G~], the state buffers' own memory), plus the reversal
 * counters (float64). */
#include <math.h>

enum { EMA = 1, COSINE = 2, PAPER_RESCALE = 4, CAPPED = 8, TRACKED = 16, COMPENSATED_SUM = 32 };

typedef struct {
    long long m, flags;
    double beta, rho, gamma, eta, scale;
    const double *prior;                    /* [m] lambda0 */
    double *last_delta, *moved, *reversals; /* [m] each: `_count_reversals`' counters */
    float *stage;                           /* [5m + m^2] (m^2 with TRACKED) */
    double *scratch;                        /* [10m + 2m^2] */
} mb_ctx;

static const double EPS = 1e-12;

static double py_max(double a, double b) { return b > a ? b : a; }
static double py_min(double a, double b) { return b < a ? b : a; }

/* Python's built-in sum() of floats (from its start 0): up to 3.11 ((0.0 + x0) + x1) + ...; from
 * 3.12 (COMPENSATED_SUM) 0.0 + x0, then Neumaier's compensated sum over the rest, the compensation
 * added at the end where it is non-zero and finite (CPython's bltinmodule.c). */
typedef struct { double f, c; long long n; int comp; } py_sum;

static py_sum sum_start(long long flags) { py_sum s = {0.0, 0.0, 0, (flags & COMPENSATED_SUM) != 0}; return s; }

static void sum_add(py_sum *s, double x) {
    if (!s->comp || s->n++ == 0) { s->f += x; return; }
    double t = s->f + x;
    if (fabs(s->f) >= fabs(x)) s->c += (s->f - t) + x;
    else s->c += (x - t) + s->f;
    s->f = t;
}

static double sum_value(const py_sum *s) { return s->comp && s->c != 0 && isfinite(s->c) ? s->f + s->c : s->f; }

/* `stability_cap`: 1 / min(trace, max row sum) of Gram(V) (cosine: of its scaled form) over the
 * active tasks. vn: [m] scratch. */
static double stability_cap(long long m, long long fl, const double *gv, const char *active, double norm_a,
                            double *vn) {
    int any = 0, cosine = (fl & COSINE) != 0;
    for (long long i = 0; i < m; i++) any |= active[i];
    if (!any) return INFINITY;
    double denom = py_max(norm_a, EPS), rows = 0.0;
    py_sum trace = sum_start(fl);
    int first = 1;
    if (cosine)
        for (long long i = 0; i < m; i++) vn[i] = sqrt(py_max(gv[i * m + i], 0.0));
    for (long long i = 0; i < m; i++) {
        if (!active[i]) continue;
        py_sum row = sum_start(fl);
        for (long long j = 0; j < m; j++) {
            if (!active[j]) continue;
            double a = gv[i * m + j];
            if (cosine) {
                double r = sqrt(vn[i] * vn[j]);
                a = a / (EPS > r ? EPS : r) / denom;
            }
            if (j == i) sum_add(&trace, a);
            sum_add(&row, fabs(a));
        }
        double r = sum_value(&row);
        if (first || r > rows) rows = r;
        first = 0;
    }
    double bound = py_min(sum_value(&trace), rows);
    return bound > 0 ? 1.0 / bound : INFINITY;
}

/* `project_simplex_host` into out [m]; -> 1 where an active entry is NaN. sorted: [m] scratch. */
static int project_simplex(long long m, long long fl, const double *y, const char *active, const double *fallback,
                           double *sorted, double *out) {
    py_sum inactive = sum_start(fl);
    long long k = 0;
    for (long long i = 0; i < m; i++) {
        if (!active[i]) { sum_add(&inactive, fallback[i]); continue; }
        if (isnan(y[i])) return 1;
        long long j = k++;  /* insertion, descending */
        while (j > 0 && sorted[j - 1] < y[i]) { sorted[j] = sorted[j - 1]; j--; }
        sorted[j] = y[i];
    }
    double mass = 1.0 - sum_value(&inactive), theta = 0.0, css = 0.0;  /* css: a loop's +=, not sum() */
    for (long long r = 1; r <= k; r++) {
        double yk = sorted[r - 1];
        css += yk;
        if (r == 1 || yk * (double)r > css - mass) theta = (css - mass) / (double)r;
    }
    for (long long i = 0; i < m; i++) out[i] = active[i] ? py_max(y[i] - theta, 0.0) : fallback[i];
    return 0;
}

/* `_track_host`: G~ [m^2] <- (1 - eta) G~ + eta factor G over the pairs of tasks with a gradient
 * now (a pair seen the first time: factor G), rounded as the buffer holds it, into nt. */
static void track_gram(const mb_ctx *c, const float *gram, double factor, double *nt) {
    const long long m = c->m;
    const float *old = c->stage + 5 * m;
    for (long long i = 0; i < m; i++) {
        int now_i = (double)gram[i * m + i] > 0, seen_i = (double)old[i * m + i] > 0;
        for (long long j = 0; j < m; j++) {
            double o = old[i * m + j], x = gram[i * m + j], v = o;
            int now_j = (double)gram[j * m + j] > 0, seen_j = (double)old[j * m + j] > 0;
            if (now_i && now_j) v = seen_i && seen_j ? o + c->eta * (x * factor - o) : x * factor;
            nt[i * m + j] = (double)(float)v;
        }
    }
}

/* `combination`: the coefficients c [m] of the gradients passed on, into out. */
static void combination(const mb_ctx *c, const double *lam, const double *un, const double *s, double *out) {
    const long long m = c->m, fl = c->flags;
    if ((fl & EMA) && (fl & PAPER_RESCALE)) {
        py_sum known = sum_start(fl);
        double mean_u = 1.0;
        long long count = 0;
        for (long long i = 0; i < m; i++)
            if (un[i] > 0) { sum_add(&known, un[i]); count++; }
        if (count) mean_u = sum_value(&known) / (double)count;
        for (long long i = 0; i < m; i++) out[i] = un[i] > 0 ? lam[i] * mean_u / un[i] : lam[i];
    } else
        for (long long i = 0; i < m; i++) out[i] = lam[i] * s[i];
}

/* The step's results into the state: `_count_reversals` (on the unrounded lambda, against the
 * old one), then the stage [lam | u | n | balanced | coef | G~] rounded to float32. */
static void commit(mb_ctx *c, const double *old, const double *lam, const double *un, const double *n,
                   const double *coef, const double *nt) {
    const long long m = c->m;
    float *st = c->stage;
    for (long long i = 0; i < m; i++) {
        double delta = lam[i] - old[i];
        if (delta * c->last_delta[i] < 0) c->reversals[i] += 1;
        c->moved[i] += fabs(delta);
        if (delta != 0) c->last_delta[i] = delta;
    }
    for (long long i = 0; i < m; i++) {
        st[i] = (float)lam[i];
        st[m + i] = (float)un[i];
        st[2 * m + i] = (float)n[i];
        st[3 * m + i] = (float)(coef[i] * n[i]);
        st[4 * m + i] = (float)(coef[i] * c->scale);
    }
    if (c->flags & TRACKED)
        for (long long i = 0; i < m * m; i++) st[5 * m + i] = (float)nt[i];
}

/* One step (`MultiBalance._step_python`): -> 0, the stage holds the new state; 1, nothing written. */
int mb_host_step(mb_ctx *c, const float *gram, double factor) {
    const long long m = c->m, fl = c->flags;
    const float *st = c->stage;
    double *n = c->scratch, *un = n + m, *s = un + m, *d = s + m, *dir = d + m, *vn = dir + m,
           *y = vn + m, *lam = y + m, *old = lam + m, *tmp = old + m, *gv = tmp + m, *nt = gv + m * m;
    char active[m > 0 ? m : 1];
    if (fl & TRACKED) track_gram(c, gram, factor, nt);
    /* `multibalance_update_host` */
    for (long long i = 0; i < m; i++) {
        double ui = st[m + i];
        n[i] = sqrt(py_max((double)gram[i * m + i] * factor, 0.0));
        active[i] = n[i] > 0;
        if (fl & EMA) un[i] = n[i] > 0 ? (ui > 0 ? ui + c->gamma * (n[i] - ui) : n[i]) : ui;
        else un[i] = n[i] > 0 ? n[i] : ui;
        if (!(fl & EMA)) s[i] = n[i] > 0 ? 1.0 : 0.0;
        else if (fl & PAPER_RESCALE) {
            if (n[i] > 0 && un[i] == 0) return 1;  /* Python: ZeroDivisionError */
            s[i] = n[i] > 0 ? 1.0 / un[i] : 0.0;
        } else s[i] = n[i] > 0 ? un[i] / n[i] : 0.0;
        d[i] = (double)st[i] + c->rho * c->prior[i];
    }
    for (long long i = 0; i < m; i++) {
        vn[i] = (fl & TRACKED) ? sqrt(py_max(nt[i * m + i], 0.0)) : n[i];
        for (long long j = 0; j < m; j++) {
            double x = (fl & TRACKED) ? nt[i * m + j] : (double)gram[i * m + j];
            double f = (fl & TRACKED) ? 1.0 : factor;
            gv[i * m + j] = x * f * s[i] * s[j];  /* Gram(V) = S G S */
        }
    }
    for (long long i = 0; i < m; i++) {
        py_sum acc = sum_start(fl);
        for (long long j = 0; j < m; j++) sum_add(&acc, gv[i * m + j] * d[j]);
        dir[i] = sum_value(&acc);  /* <v_i, V d> */
    }
    py_sum dot = sum_start(fl);
    for (long long i = 0; i < m; i++) sum_add(&dot, d[i] * dir[i]);
    double norm_a = sqrt(py_max(sum_value(&dot), 0.0)), beta = c->beta;
    if (fl & COSINE)
        for (long long i = 0; i < m; i++) dir[i] = dir[i] / py_max(s[i] * vn[i] * norm_a, EPS);
    if (fl & CAPPED) beta = py_min(beta, stability_cap(m, fl, gv, active, norm_a, tmp));
    for (long long i = 0; i < m; i++) {
        y[i] = (double)st[i] - beta * dir[i];  /* eq. 12 */
        old[i] = st[i];  /* lambda before the step, the projection's fallback */
    }
    if (project_simplex(m, fl, y, active, old, tmp, lam)) return 1;
    combination(c, lam, un, s, tmp);
    commit(c, old, lam, un, n, tmp, nt);  /* nothing can fail from here */
    return 0;
}
