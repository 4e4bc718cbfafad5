/* remi.h - the public face of remi: configuration, data, model and the functions
 * that make up REMI (Xie et al., RecSys 2023) training and evaluation.
 * Dimension legend used in every shape comment:
 *   B batch, L history length, D hidden size, H = 4D attention width, K interests,
 *   M sampled negatives, N items including the padding id 0, U users of a split. */
#ifndef REMI_H
#define REMI_H

#include <stdint.h>
#include <stdio.h>
#include <stddef.h>

#define REMI_MODEL_MAGIC 0x494d4552u /* "REMI" little-endian */
#define REMI_MODEL_VERSION 1

/* ---------------------------------------------------------------- config */
typedef struct {
    const char *data;     /* folder of <name>_{train,valid,test}.txt */
    const char *name;     /* dataset prefix, e.g. "beauty" */
    const char *out;      /* output folder: metrics.jsonl, model.bin */
    const char *model;    /* encoder: "sa" (ComiRec-SA backbone of REMI) */
    int D, K, L, B, M;    /* hidden, interests, history length, batch, negatives */
    int add_pos;          /* 1: add position embeddings (REMI-SPEC c.1 step 1) */
    float lr, rbeta, rlambda;
    long iters;           /* stop after this many steps */
    int eval_every, patience, topn;
    uint64_t seed;
    int threads;
    int eval_batch;       /* users per evaluation chunk */
} Config;

/* ---------------------------------------------------------------- data */
/* One split: each user's items in time order, concatenated (CSR layout). */
typedef struct {
    int n_users;
    int64_t *user_id; /* (U) id as written in the file */
    int *off;         /* (U+1) user u owns items[off[u] .. off[u+1]) */
    int *items;       /* (total) item ids in 1..N-1 */
} Split;

typedef struct {
    Split train, valid, test;
    int N; /* number of items + 1 (id 0 = padding) */
} Dataset;

/* ---------------------------------------------------------------- model */
/* ComiRec-SA / REMI parameters (REMI-SPEC c.1). The same layout is used for the
 * gradients and for Adam's two moments, so the optimiser is one flat loop. */
typedef struct {
    float *item_emb; /* (N, D) E, row 0 = padding (still trained, REMI-SPEC c.0) */
    float *pos_emb;  /* (L, D) P */
    float *w1;       /* (H, D) first attention layer, followed by tanh */
    float *w2;       /* (K, H) second attention layer */
} Params;
#define N_PARAM_TENSORS 4

typedef struct {
    int N, D, K, L, H;
    size_t size[N_PARAM_TENSORS]; /* floats per tensor */
    size_t n_params;
    float *mem;   Params p;  /* parameters */
    float *gmem;  Params g;  /* gradients */
    float *mmem, *vmem;      /* Adam moments */
    long step;               /* Adam t */
    int add_pos;             /* position embeddings in use */
} Model;

/* Activations of one batch (training) or one chunk of users (evaluation).
 * Allocated once for the largest batch; no allocation inside the step. */
typedef struct {
    int cap_b, M;
    int *hist;     /* (B, L) history ids, left-aligned, 0 = padding */
    float *mask;   /* (B, L) 1 on real positions */
    int *target;   /* (B) */
    int *neg;      /* (M) shared negatives */
    float *x;      /* (B, L, D) masked item embeddings */
    float *xt;     /* (B, L, D) x + P */
    float *h;      /* (B, L, H) tanh(xt W1^T) */
    float *z;      /* (B, L, K) h W2^T */
    float *att;    /* (B, K, L) A, masked softmax over L */
    float *v;      /* (B, K, D) interests V = A x */
    int *sel;      /* (B) k* of the hard readout */
    float *r;      /* (B, D) readout V[k*] */
    float *en;     /* (M, D) negative embeddings */
    float *ent;    /* (D, M) the same, transposed */
    float *logit;  /* (B, M) r . E[neg] */
    float *pos;    /* (B) r . E[target] */
    float *dlogit; /* (B, M) */
    float *dpos;   /* (B) */
    float *ssm_tmp;  /* (B, 2, M) importance weights and exponentials of the loss */
    double *ssm_st;  /* (B, 4) per-sample loss statistics: x0, S, T, Z */
    float *loss;   /* (B) per-sample sampled-softmax loss */
    float *rr_d;   /* (B, K) diag of the RR covariance */
    float *dr;     /* (B, D) */
    float *den;    /* (M, D) */
    float *dv;     /* (B, K, D) */
    float *datt;   /* (B, K, L) */
    float *dz;     /* (B, L, K) */
    float *dh;     /* (B, L, H) */
    float *dxt;    /* (B, L, D) */
    float *dx;     /* (B, L, D) */
    float *w1t;    /* (D, H) W1 transposed */
    float *w2t;    /* (H, K) W2 transposed */
    float *et;     /* (D, N) item embeddings transposed, for evaluation */
} Acts;

/* Metrics of one evaluation at one cut-off N (REMI-SPEC g.3). */
typedef struct {
    int topn, users;
    double recall, ndcg, ndcg_ref, hitrate;
} Metrics;

/* ---------------------------------------------------------------- api */
void die(const char *fmt, ...);
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
FILE *xfopen(const char *path, const char *mode, const char *hint);
FILE *atomic_open(const char *path);
void atomic_commit(FILE *f);

void load_split(Split *s, const char *path, int max_item, int min_items);
void load_dataset(Dataset *ds, const char *dir, const char *name);

void model_init(Model *m, int N, const Config *c);
void acts_init(Acts *a, const Model *m, int cap_b, int M);
float train_step(Model *m, Acts *a, const Split *train, const Config *c, uint64_t *rng, int *perm);
void evaluate(Metrics *out, const int *cuts, int n_cut, const Model *m, Acts *a, const Split *s);
void set_order(int *order, const int *keys, int n);

int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_prep(int argc, char **argv);
int cmd_gradcheck(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_selftest(int argc, char **argv);

#endif
