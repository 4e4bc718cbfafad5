# remi: one C file, libc + libm + pthreads.
CC      ?= cc
WARN    := -Wall -Wextra -Wno-psabi -std=gnu11
BASE    := -ffp-contract=off -fno-math-errno
CFLAGS  ?= -O3 -march=native $(BASE)
LDLIBS  := -lm -lpthread

all: remi

remi: remi.c remi.h
	$(CC) $(CFLAGS) $(WARN) -DREMI_CFLAGS='"$(CFLAGS)"' -o $@ remi.c $(LDLIBS)

debug:
	$(MAKE) -B remi CFLAGS="-O0 -g $(BASE)"

ASAN    := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer $(BASE)

asan:
	$(MAKE) -B remi CFLAGS="$(ASAN)"

# remi-asan: the sanitizer build beside ./remi (test.sh fuzzes with it when a compiler is there)
remi-asan: remi.c remi.h
	$(CC) $(ASAN) $(WARN) -DREMI_CFLAGS='"$(ASAN)"' -o $@ remi.c $(LDLIBS)

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
	rm -f remi remi-asan

# ---------------------------------------------------------------- reproduce
# `make -j2 reproduce`: the study on the stand-ins (README "Results on the stand-ins").
# One run = one folder $(STUDY)/DATA/CONFIG/SEED, finished once its train.log exists; an
# interrupted run resumes from its checkpoint. Per-dataset settings: REMI-SPEC f.2.
STUDY      ?= out/study
STUDY_DATA ?= cds gowalla1k rr-sessions
SEEDS      ?= 2021 2022 2023
CONFIGS    ?= sa-base sa-ihn sa-rr sa-remi dr-base dr-ihn dr-rr dr-remi \
              mind-base mind-ihn mind-rr mind-remi dnn gru4rec pop
BUDGET     ?= --iters 20000 --patience 10
RUN_T      ?= 1

set_cds         := --len 20 --eval-every 1000
set_gowalla1k   := --len 40 --eval-every 1000
set_rr-sessions := --len 20 --eval-every 200
set_tiny        := --len 8 --eval-every 50 --batch 16 --neg 64 --hidden 8
beta_cds         := 10
beta_gowalla1k   := 1
beta_rr-sessions := 0.1
beta_tiny        := 1

# CONFIG = MODEL[-VARIANT]; the variant sets IHN (beta of the dataset) and RR (lambda 100)
flags_base = --rbeta 0 --rlambda 0
flags_ihn  = --rbeta $(beta_$1) --rlambda 0
flags_rr   = --rbeta 0 --rlambda 100
flags_remi = --rbeta $(beta_$1) --rlambda 100
part       = $(word $1,$(subst /, ,$*))
data_dir   = $(if $(filter tiny,$1),expected/tiny,data)
run_flags  = --data $(call data_dir,$1) --name $1 $(set_$1) --model $(firstword $(subst -, ,$2)) \
             $(if $(word 2,$(subst -, ,$2)),$(call flags_$(word 2,$(subst -, ,$2)),$1)) --seed $3 $(BUDGET)

$(STUDY)/%/train.log: | remi
	@mkdir -p $(@D)
	@echo "remi train $(call run_flags,$(call part,1),$(call part,2),$(call part,3))"
	@if [ -f $(@D)/checkpoint.bin ]; then ./remi train --resume $(@D) -t $(RUN_T); \
	 else ./remi train $(call run_flags,$(call part,1),$(call part,2),$(call part,3)) -t $(RUN_T) --out $(@D); \
	 fi >> $@.tmp && mv $@.tmp $@

runs_by_seed   = $(foreach s,$(SEEDS),$(foreach c,$(CONFIGS),$(STUDY)/$1/$c/$s/train.log))
runs_by_config = $(foreach c,$(CONFIGS),$(foreach s,$(SEEDS),$(STUDY)/$1/$c/$s))
define study_table
$(STUDY)/$1.md: $(call runs_by_seed,$1)
	./remi report $(call runs_by_config,$1) > $$@.tmp && mv $$@.tmp $$@
endef
$(foreach d,$(STUDY_DATA),$(eval $(call study_table,$d)))

reproduce: $(foreach d,$(STUDY_DATA),$(STUDY)/$d.md)
	@cat $^

.PHONY: all debug asan portable test bench fuzz clean reproduce
