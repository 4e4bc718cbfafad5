# remi: one C file, libc + libm + pthreads.
CC      ?= cc
WARN    := -Wall -Wextra -Wno-psabi -std=gnu11
BASE    := -ffp-contract=off -fno-math-errno -fno-trapping-math
CFLAGS  ?= -O3 -march=native $(BASE)
LDLIBS  := -lm -lpthread
# FMA=1: every sum of products by fused multiply-add (the kernel section of remi.c): twice
# the products' speed on cores whose adds share the FMA units, other bits than the default
FMA     ?= 0
DEFS    := $(if $(filter 1,$(FMA)),-DREMI_FMA)
FLAGS    = $(strip $(CFLAGS) $(DEFS))

all: remi

# .flags: the compiler and flags of the last build, rewritten when they change, so that a
# change of CC, CFLAGS or FMA rebuilds remi (for reproduce and the runs too); not by the
# binaries beside it, so that building them leaves a remi of other flags (make asan) as it
# is, and not by a dry run (make -n), which changes nothing
BESIDE  := remi-asan remi-sse remi-avx remi-fma remi-fma-sse clean
BUILD    = printf '%s\n%s\n' '$(CC)' '$(FLAGS)'
# (two lines: the compiler, the flags)
ifneq ($(filter-out $(BESIDE),$(or $(MAKECMDGOALS),all)),)
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
$(shell $(BUILD) | cmp -s - .flags || $(BUILD) > .flags)
endif
endif
.flags:
	$(BUILD) > $@

remi: remi.c remi.h .flags
	$(CC) $(FLAGS) $(WARN) -DREMI_CFLAGS='"$(FLAGS)"' -o $@ remi.c $(LDLIBS)

debug:
	$(MAKE) -B remi CFLAGS="-O0 -g $(BASE)"

ASAN    := -O1 -g -march=native -fsanitize=address,undefined -fno-omit-frame-pointer $(BASE)

asan:
	$(MAKE) -B remi CFLAGS="$(ASAN)"

# remi-asan: the sanitizer build beside ./remi (test.sh fuzzes with it when a compiler is there)
remi-asan: remi.c remi.h
	$(CC) $(ASAN) $(WARN) -DREMI_CFLAGS='"$(ASAN)"' -o $@ remi.c $(LDLIBS)

# remi-sse, remi-avx: the kernels' other register tiles (see gemm_tile_full) beside ./remi;
# test.sh checks that they give the native build's bits (x86 only for remi-avx)
remi-sse: remi.c remi.h
	$(CC) -O3 $(BASE) $(DEFS) $(WARN) -DREMI_CFLAGS='"-O3 $(BASE) $(DEFS)"' -o $@ remi.c $(LDLIBS)
remi-avx: remi.c remi.h
	$(CC) -O3 -mavx $(BASE) $(DEFS) $(WARN) -DREMI_CFLAGS='"-O3 -mavx $(BASE) $(DEFS)"' -o $@ remi.c $(LDLIBS)

# remi-fma, remi-fma-sse: FMA=1 builds beside ./remi, native and portable (where fmaf is a
# library call); test.sh checks that they give each other's bits
remi-fma: remi.c remi.h
	$(CC) $(CFLAGS) -DREMI_FMA $(WARN) -DREMI_CFLAGS='"$(CFLAGS) -DREMI_FMA"' -o $@ remi.c $(LDLIBS)
remi-fma-sse: remi.c remi.h
	$(CC) -O3 $(BASE) -DREMI_FMA $(WARN) -DREMI_CFLAGS='"-O3 $(BASE) -DREMI_FMA"' -o $@ remi.c $(LDLIBS)

# a longer fuzz run of every reader under the sanitizers
fuzz: remi-asan
	./remi-asan fuzz --iters 20000

portable:
	$(MAKE) -B remi CFLAGS="-O3 $(BASE)"

test: remi
	./test.sh

bench: remi
	./remi bench

clean:
	rm -f remi remi-asan remi-sse remi-avx remi-fma remi-fma-sse .flags

# ---------------------------------------------------------------- reproduce
# `make -j2 reproduce`: every run behind the README's result tables, then the tables.
# One run = one folder under $(RESULTS), finished once its train.log exists; an interrupted
# run resumes from its checkpoint. `expected/results/` holds the metrics.jsonl of the runs
# the README quotes; `remi report` over them gives its tables.
RESULTS    ?= out/results
RUN_T      ?= 1

define train_run
	@mkdir -p $(@D)
	@echo "remi train $1"
	@if [ -f $(@D)/checkpoint.bin ]; then ./remi train --resume $(@D) -t $(RUN_T); \
	 else ./remi train $1 -t $(RUN_T) --out $(@D); fi >> $@.tmp && mv $@.tmp $@
endef

# The study on the stand-ins: every encoder with and without IHN and RR, 3 seeds, a
# budget of 20,000 steps and patience 10; per-dataset settings from REMI-SPEC f.2.
STUDY_DATA ?= cds gowalla1k rr-sessions
SEEDS      ?= 2021 2022 2023
CONFIGS    ?= sa-base sa-ihn sa-rr sa-remi dr-base dr-ihn dr-rr dr-remi \
              mind-base mind-ihn mind-rr mind-remi dnn gru4rec pop
BUDGET     ?= --iters 20000 --patience 10

set_cds         := --len 20 --eval-every 1000
set_gowalla1k   := --len 40 --eval-every 1000
set_rr-sessions := --len 20 --eval-every 200
set_tiny        := --len 8 --eval-every 50 --batch 16 --neg 64 --hidden 8
beta_cds         := 10
beta_gowalla1k   := 1
beta_rr-sessions := 0.1
beta_tiny        := 1

# CONFIG = MODEL[-VARIANT]: config_flags,CONFIG,BETA; the variant sets IHN (beta BETA) and
# RR (lambda 100); a single-vector model alone keeps its defaults
flags_base = --rbeta 0 --rlambda 0
flags_ihn  = --rbeta $1 --rlambda 0
flags_rr   = --rbeta 0 --rlambda 100
flags_remi = --rbeta $1 --rlambda 100
config_flags = --model $(firstword $(subst -, ,$1)) $(if $(word 2,$(subst -, ,$1)),$(call flags_$(word 2,$(subst -, ,$1)),$2))
part       = $(word $1,$(subst /, ,$*))
data_dir   = $(if $(filter tiny,$1),expected/tiny,data)
study_flags = --data $(call data_dir,$1) --name $1 $(set_$1) $(call config_flags,$2,$(beta_$1)) --seed $3 $(BUDGET)

$(RESULTS)/study/%/train.log: | remi
	$(call train_run,$(call study_flags,$(call part,1),$(call part,2),$(call part,3)))

runs_by_seed   = $(foreach s,$(SEEDS),$(foreach c,$(CONFIGS),$(RESULTS)/study/$1/$c/$s/train.log))
runs_by_config = $(foreach c,$(CONFIGS),$(foreach s,$(SEEDS),$(RESULTS)/study/$1/$c/$s))
define study_table
$(RESULTS)/$1.md: $(call runs_by_seed,$1)
	./remi report $(call runs_by_config,$1) > $$@.tmp && mv $$@.tmp $$@
endef
$(foreach d,$(STUDY_DATA),$(eval $(call study_table,$d)))

# Amazon Beauty with the reference's protocol (patience 50, no step cap), one run each: the
# CONFIGS at Beauty's beta 0.1, and the extra runs below; the negatives sweep with patience 10.
beauty_sa-base-2022 = $(call config_flags,sa-base) --seed 2022
beauty_sa-ihn-b1    = $(call config_flags,sa-ihn,1)
beauty_sa-remi-2022 = $(call config_flags,sa-remi,0.1) --seed 2022
beauty_sa-remi-b1   = $(call config_flags,sa-remi,1)
beauty_sa-remi-b10  = $(call config_flags,sa-remi,10)
beauty_flags = $(if $(beauty_$1),$(beauty_$1),$(call config_flags,$1,0.1))
BEAUTY     := sa-base sa-base-2022 sa-ihn sa-ihn-b1 sa-rr sa-remi sa-remi-2022 sa-remi-b1 sa-remi-b10 \
              dr-base dr-ihn dr-rr dr-remi mind-base mind-ihn mind-rr mind-remi dnn gru4rec pop
NEGATIVES  := u10 u100 u1280 u5000 i10 i100 i1280 i5000 full
negatives   = --model sa --rlambda 100 --patience 10 $(if $(filter full,$1),--rbeta 0 --neg 0,\
              --rbeta $(if $(filter u%,$1),0,0.1) --neg $(patsubst u%,%,$(patsubst i%,%,$1)))

$(RESULTS)/beauty/%/train.log: | remi
	$(call train_run,$(call beauty_flags,$*))
$(RESULTS)/beauty-negatives/%/train.log: | remi
	$(call train_run,$(call negatives,$*))

$(RESULTS)/beauty.md: $(foreach r,$(BEAUTY),$(RESULTS)/beauty/$r/train.log)
	./remi report $(dir $^) > $@.tmp && mv $@.tmp $@
$(RESULTS)/beauty-negatives.md: $(foreach r,$(NEGATIVES),$(RESULTS)/beauty-negatives/$r/train.log)
	./remi report --negatives-svg $(@:.md=.svg) $(dir $^) > $@.tmp && mv $@.tmp $@

# False negatives: REMI with a row's hits removed from its negatives (--remove-hits), beside
# the same runs without (Beauty at beta 1; CDs at its beta 10 with the study's budget).
hits_beauty-b1-history = $(call config_flags,sa-remi,1) --remove-hits history
hits_cds-target        = $(call study_flags,cds,sa-remi,2021) --remove-hits target
hits_cds-history       = $(call study_flags,cds,sa-remi,2021) --remove-hits history
$(RESULTS)/hits/%/train.log: | remi
	$(call train_run,$(hits_$*))
HITS_RUNS  := beauty/sa-remi beauty/sa-remi-b1 hits/beauty-b1-history \
              study/cds/sa-rr/2021 study/cds/sa-remi/2021 hits/cds-target hits/cds-history
$(RESULTS)/hits.md: $(foreach r,$(HITS_RUNS),$(RESULTS)/$r/train.log)
	./remi report $(dir $^) > $@.tmp && mv $@.tmp $@

# Routing collapse (remi inspect): two ComiRec-SA runs of 6,000 steps on Beauty, without and
# with RR, drawn for the first two test users; on the stand-ins, the seed-2021 models.
beauty_routing-norr = $(call config_flags,sa-ihn,0.1) --iters 6000
beauty_routing-rr   = $(call config_flags,sa-remi,0.1) --iters 6000
$(RESULTS)/routing-%.svg: $(RESULTS)/beauty/routing-%/train.log
	./remi inspect --model-file $(<D)/model.bin --users "0 1" --out $(<D) > $(<D)/inspect.txt && cp $(<D)/routing.svg $@

COLLAPSE   := sa-base sa-remi dr-base dr-remi mind-base mind-remi
$(RESULTS)/%-collapse.md: $(foreach c,$(COLLAPSE),$(RESULTS)/study/%/$c/2021/train.log)
	@{ echo "| data | run | interests with a largest weight > 0.9 | mean largest weight | mean entropy / log n |"; \
	   echo "|---|---|---:|---:|---:|"; \
	   for c in $(COLLAPSE); do run=$(RESULTS)/study/$*/$$c/2021; \
	     ./remi inspect --model-file $$run/model.bin --data $(call data_dir,$*) --name $* --out $$run > $$run/inspect.txt || exit 1; \
	     awk -v d=$* -v c=$$c '/^collapsed/ { p = $$NF } /^mean largest/ { printf "| %s | %s | %s | %s | %s |\n", d, c, p, $$4, $$NF }' \
	       $$run/inspect.txt; done; } > $@.tmp && mv $@.tmp $@

# a run's log marks it finished; the routing runs' logs are reached through a pattern alone
.PRECIOUS: $(foreach d,study beauty beauty-negatives hits,$(RESULTS)/$d/%/train.log)

reproduce: $(foreach d,$(STUDY_DATA),$(RESULTS)/$d.md $(RESULTS)/$d-collapse.md) $(RESULTS)/beauty.md \
           $(RESULTS)/beauty-negatives.md $(RESULTS)/hits.md $(RESULTS)/routing-norr.svg $(RESULTS)/routing-rr.svg
	@cat $(filter %.md,$^)

.PHONY: all debug asan portable test bench fuzz clean reproduce
