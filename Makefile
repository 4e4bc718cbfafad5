# remi: one C file, libc + libm + pthreads.
CC      ?= cc
WARN    := -Wall -Wextra -std=gnu11
BASE    := -ffp-contract=off -fno-math-errno
CFLAGS  ?= -O3 -march=native $(BASE)
LDLIBS  := -lm -lpthread

all: remi

remi: remi.c remi.h
	$(CC) $(CFLAGS) $(WARN) -DREMI_CFLAGS='"$(CFLAGS)"' -o $@ remi.c $(LDLIBS)

debug:
	$(MAKE) -B remi CFLAGS="-O0 -g $(BASE)"

asan:
	$(MAKE) -B remi CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer $(BASE)"

portable:
	$(MAKE) -B remi CFLAGS="-O3 $(BASE)"

test: remi
	./test.sh

bench: remi
	./remi bench

clean:
	rm -f remi

.PHONY: all debug asan portable test bench clean
