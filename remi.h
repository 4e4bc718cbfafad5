/* remi.h - the public face of remi: configuration, data, model and the functions
 * that make up REMI (Xie et al., RecSys 2023) training and evaluation.
 * Dimension legend used in every shape comment:
 *   B batch, L history length, D hidden size, H = 4D attention width, K interests,
 *   G = 2D GRU4Rec hidden size, M sampled negatives, N items including the padding id 0,
 *   U users of a split. */
#ifndef REMI_H
#define REMI_H

#include <stdint.h>
#include <stdio.h>
#include <stddef.h>

#define REMI_MODEL_MAGIC 0x494d4552u /* "REMI" little-endian */
#define REMI_MODEL_VERSION 4 /* 4: + the data's fingerprint; 3 is still read */

/* ---------------------------------------------------------------- config */
/* The encoders of the reference (REMI-SPEC c.1-c.5). The first three are multi-interest
 * (K vectors per user); the others produce one vector. */
typedef enum { ENC_SA, ENC_DR, ENC_MIND, ENC_DNN, ENC_GRU4REC, ENC_POP, N_ENCODERS } Encoder;

/* --remove-hits: which sampled negatives a training row drops (the reference drops none) */
typedef enum { HITS_NONE, HITS_TARGET, HITS_HISTORY } Hits;

typedef struct {
    const char *data;     /* folder of <name>_{train,valid,test}.txt */
    const char *name;     /* dataset prefix, e.g. "beauty" */
    const char *out;      /* output folder: metrics.jsonl, model.bin */
    const char *model;    /* encoder name: sa, dr, mind, dnn, gru4rec, pop */
    Encoder enc;          /* the same, resolved by check_config */
    int D, K, L, B, M;    /* hidden, interests, history length, batch, negatives */
    int full_softmax;     /* --neg 0: softmax over all N items (M is then set to N) */
    int add_pos;          /* SA: 1 = add position embeddings (REMI-SPEC c.1 step 1) */
    int relu;             /* MIND: 1 = the ReLU layer the reference uses on Book (c.3) */
    float dropout;        /* GRU4Rec: embedding dropout (c.5) */
    const char *mind_eval;/* MIND evaluation routing logits: "fresh" or "fixed" */
    const char *adam;     /* "dense" (the reference) or "lazy" (touched item rows only) */
    const char *remove_hits; /* "none" (the reference), "target" or "history" */
    Hits hits;            /* the same, resolved by check_config */
    float lr, rbeta, rlambda;
    long iters;           /* stop after this many steps */
    int eval_every, patience, topn;
    uint64_t seed;
    uint64_t data_fp;     /* fingerprint of the splits trained on (data_sum), kept in model.bin; 0 = unknown */
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
/* Parameters of every encoder; a model uses some of them, the others have size 0.
 * The same layout is used for the gradients and for Adam's two moments, so the
 * optimiser is one flat loop. */
typedef struct {
    float *item_emb; /* (N, D) E, row 0 = padding (still trained, REMI-SPEC c.0);
                      * Pop: (N, 1) how often each item was a training target */
    float *pos_emb;  /* SA (L, D) P */
    float *w1;       /* SA (H, D) first attention layer, followed by tanh */
    float *w2;       /* SA (K, H) second attention layer */
    float *caps;     /* DR (L, K D, D) per-position bilinear maps; MIND (D, D) shared map S */
    float *relu_w;   /* MIND with --relu (D, D) R */
    float *dnn_w;    /* DNN (D, D) */
    float *gru_ih;   /* GRU4Rec (3G, D) input weights, gates r, z, n stacked */
    float *gru_hh;   /* GRU4Rec (3G, G) recurrent weights */
    float *dense_w;  /* GRU4Rec (D, G) output layer */
    float *dense_b;  /* GRU4Rec (D) its bias */
} Params;
#define N_PARAM_TENSORS 11

/* The item table's gradient, kept by rows: a step's first write to an item's row takes the
 * next free row of g, so only the rows a step touches (history items, targets, negatives)
 * are ever written, and memory holds that many rows, not N. row[item] is its row, -1 when
 * the step gave it none; items[0..n) are the rows' items in order. row == NULL: dense, the
 * item's row is its id (tests). Adam reads and zeroes the rows, then clears the map. */
typedef struct { float *g; int *row, *items; int n; } ItemGrad;

typedef struct {
    Encoder enc;
    int multi;       /* 1: K interests per user (sa, dr, mind); 0: one vector (K = 1) */
    int relu;        /* MIND ReLU layer in use */
    int N, D, K, L, H, G;
    size_t size[N_PARAM_TENSORS]; /* floats per tensor */
    size_t n_params;
    float *mem;   Params p;  /* parameters */
    float *gmem;  Params g;  /* gradients; the item table's (g.item_emb) by rows, in ge */
    ItemGrad ge;
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
    float *x;      /* (R, D) SA: the item embeddings on the rows of real_rows (prow) */
    /* SA's hidden layer and the capsules' maps run on R rows, the real positions (real_rows) */
    int *prow;     /* (B, L) the row of each position, -1 for none */
    int *poff;     /* (L + 1) DR: rows by position, position l from poff[l] */
    int R;         /* rows */
    int all_rows;  /* selftest: a row for every position, padded ones too (the reference's work) */
    float *xt;     /* (R, D) SA: x + P; DR, MIND: x */
    float *h;      /* (R, H) tanh(xt W1^T) (SA only) */
    float *zr;     /* (R, K) h W2^T (SA only) */
    float *z;      /* (B, L, K) zr on the positions, 0 on skipped ones (masked) */
    float *att;    /* (B, K, L) A, masked softmax over L */
    float *v;      /* (B, K, D) interests V = A x */
    int *sel;      /* (B) k* of the hard readout */
    float *r;      /* (B, D) readout V[k*] */
    float *en;     /* (M, D) negative embeddings, then (D, M) the same transposed (neg_rows) */
    float *logit;  /* (B, M) r . E[neg] */
    float *pos;    /* (B) r . E[target] */
    float *dlogit; /* (B, M) written over logit, by the loss's forward pass */
    float *dpos;   /* (B) */
    double *ssm_st;  /* (B, 6) per-sample loss statistics: x0, S, T, P, Z, Mb */
    float *loss;   /* (B) per-sample sampled-softmax loss */
    float *rr_d;   /* (B, K) diag of the RR covariance */
    float *dr;     /* (B, D) */
    float *den;    /* (M, D) */
    float *dv;     /* (B, K, D) */
    float *datt;   /* (B, K, L) */
    float *dz;     /* (B, L, K) */
    float *dzr;    /* (R, K) dz on the hidden layer's rows (SA only) */
    float *dh;     /* (R, H) gradient of the hidden layer's input xt W1^T, through tanh (SA only) */
    float *dxt;    /* (R, D) its gradient */
    float *dx;     /* (R, D) SA: its gradient; DNN: (B, D) the mean's */
    float *w1t;    /* (D, H) W1 transposed */
    float *w2t;    /* (H, K) W2 transposed */
    /* capsule routing, DR and MIND (REMI-SPEC c.2, c.3) */
    float *uhat;   /* DR (B, L, K D) per-position predictions; MIND (B, L, D), shared by all k */
    float *duhat;  /* the same shape */
    float *ur;     /* (R, K D) DR, (R, D) MIND: u_hat on the rows (0 at padded positions) */
    float *dur;    /* the same shape: du_hat on the rows */
    float *capt;   /* DR (L, D, K D) the bilinear maps transposed; MIND (2, D, D) S^T and R^T */
    float *noise;  /* MIND (B, K, L) initial routing logits, N(0, 1) */
    float *rp;     /* (B, 3, K, L) softmax over l of the routing logits, per iteration */
    float *rs;     /* (B, 3, K, D) capsules s before the squash, per iteration */
    float *rv;     /* (B, 2, K, D) squash(s) of iterations 0 and 1 */
    float *caps;   /* (B, K, D) output of the routing (before MIND's ReLU layer) */
    float *dcaps;  /* (B, K, D) */
    const float *route_frozen; /* (B, K, L) gradient check only: routing weights of the last
                                * iteration held constant, as the stop-gradient does */
    /* DNN (c.5) */
    float *mean;   /* (B, D) mean history embedding */
    /* GRU4Rec (c.5): rows sorted by history length (longest first) and packed by time:
     * step t holds rows 0..gact[t]-1 at row offset goff[t] */
    int *glen;     /* (B) history length of each sample */
    int gsteps;    /* steps of the batch: the longest history */
    int *gorder;   /* (B) sample of each sorted row */
    int *grow;     /* (B) sorted row of each sample */
    int *gact;     /* (L) active rows per step */
    int *goff;     /* (L + 1) */
    float *drop;   /* (B, L, D) dropout multipliers, 0 or 1 / (1 - p) */
    float *gx;     /* (R, D) inputs after dropout, R = sum of history lengths */
    float *ggi;    /* (R, 3G) x W_ih^T; then the gradients of the gate inputs */
    float *ggate;  /* (R, 3G) gates r, z and candidate n */
    float *gghn;   /* (R, G) W_hn h_{t-1} */
    float *gh;     /* (R, G) hidden states */
    float *ggh;    /* (B, 3G) h_{t-1} W_hh^T of one step; then its gradient */
    float *gdh;    /* (B, G) gradient of the hidden state being walked back */
    float *glast;  /* (B, G) hidden state at each sample's last position */
    float *dglast; /* (B, G) */
    float *gwt;    /* scratch for transposed weights: max(3G D, 3G G, G D) */
    void *owned[64]; size_t owned_bytes[64]; int n_owned; /* every array above and its size, for acts_free */
    unsigned char owned_rows[64]; /* made by acts_calloc_rows */
} Acts;

/* Metrics of one evaluation at one cut-off N (REMI-SPEC g.3). */
typedef struct {
    int topn, users;
    double recall, ndcg, ndcg_ref, hitrate;
} Metrics;

/* ---------------------------------------------------------------- api */
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
FILE *xfopen(const char *path, const char *mode, const char *hint);
FILE *atomic_open(const char *path);
void atomic_commit(FILE *f);

void load_split(Split *s, const char *path, int max_item, const char *from, int min_items);
void load_dataset(Dataset *ds, const char *dir, const char *name);

void model_init(Model *m, int N, const Config *c);
void acts_init(Acts *a, const Model *m, int cap_b, int M);
void acts_free(Acts *a);
void model_free(Model *m);
float train_step(Model *m, Acts *a, const Split *train, const Config *c, uint64_t *rng, int *perm);
void evaluate(Metrics *out, const int *cuts, int n_cut, const Model *m, Acts *a, const Split *s, uint64_t noise_key);
void set_order(int *order, const int *keys, int n);

int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_prep(int argc, char **argv);
int cmd_gradcheck(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_selftest(int argc, char **argv);
int cmd_fuzz(int argc, char **argv);
int cmd_recommend(int argc, char **argv);
int cmd_export(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_report(int argc, char **argv);

#endif
