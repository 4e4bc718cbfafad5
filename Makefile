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

.PHONY: all debug asan portable test bench fuzz clean
