#!/usr/bin/env bash
# test.sh - remi's test suite. Run as `make && ./test.sh`; needs only the binary.
# Closing line: "N passed, M failed"; exit status 1 if anything failed.
set -u
cd "$(dirname "$0")"
REMI=./remi
[ -x "$REMI" ] || { echo "no ./remi binary: run make first"; exit 1; }
TMP=$(mktemp -d)
trap 'umount "$TMP/ro-out" 2>/dev/null; rm -rf "$TMP"' EXIT # ro-out: the read-only --out check's mount
# make's runs and tables below keep ./remi's build (`make asan`, `make FMA=1`, `make CC=clang`):
# its compiler and flags, as .flags holds them (a line each), given again (others would rebuild
# ./remi partway through the tests)
FUSED=0; grep -q REMI_FMA .flags 2>/dev/null && FUSED=1
KEEP=(FMA=$FUSED); [ -f .flags ] && KEEP+=(CC="$(sed -n 1p .flags)" CFLAGS="$(sed -n '2{s/ *-DREMI_FMA//;p;}' .flags)")
npass=0; nfail=0
pass() { npass=$((npass + 1)); printf 'ok    %s\n' "$1"; }
fail() { nfail=$((nfail + 1)); printf 'FAIL  %s: %s\n' "$1" "$2"; }

# ---------------------------------------------------------------- unit checks
if "$REMI" gradcheck >"$TMP/gradcheck.log" 2>&1; then pass "gradcheck (finite differences, every backward)"
else fail "gradcheck" "$(grep -m3 FAIL "$TMP/gradcheck.log" | tr '\n' ' ')"; fi
# other seeds, which put the readout's argmax or MIND's kinks near a step, or a curved loss (these
# failed when each element had one step; a wrong gradient misses at both steps)
why=""
for sd in 4 47 54 114 123 195 263 390 397; do "$REMI" gradcheck --seed $sd >"$TMP/gc-seed.log" 2>&1 || why="$why $sd"; done
if [ -z "$why" ]; then pass "gradcheck on seeds 4 47 54 114 123 195 263 390 397"; else fail "gradcheck seeds" "failed:$why"; fi

if "$REMI" selftest -t 3 >"$TMP/selftest.log" 2>&1; then pass "selftest (kernels vs scalar twins, eval twin, set order, the reference's training steps, -t invariance)"
else fail "selftest" "$(grep FAIL "$TMP/selftest.log" | tr '\n' ' ')"; fi

# ---------------------------------------------------------------- prep
# Run one fixture and compare the five output files byte for byte.
# prep_fixture TEST NAME TMPDIR ARGS...
prep_fixture() {
    local test=$1 name=$2 tmp=$3; shift 3
    local exp=${PREP_EXPECTED:-expected/prep} out=$tmp/prep-$test
    rm -rf "$out"
    "$REMI" prep --name "$name" --out "$out" "$@" >"$tmp/prep-$test.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        fail "prep $test" "exit status $rc ($(tail -n 1 "$tmp/prep-$test.log"))"; return
    fi
    local f why=""
    for f in train valid test user_map item_map; do
        cmp -s "$exp/$test/${name}_$f.txt" "$out/${name}_$f.txt" || why="$why ${name}_$f.txt"
    done
    if [ -z "$why" ]; then pass "prep $test"; else fail "prep $test" "differs from $exp/$test:$why"; fi
}

# Bad input: must exit non-zero, name the file (and the line, if given) and write nothing.
# prep_bad TEST TMPDIR CONTENT LINE ARGS...   (CONTENT: printf %b escapes; LINE "" = no line number)
prep_bad() {
    local test=$1 tmp=$2 content=$3 line=$4; shift 4
    local in=$tmp/prep-bad-$test.txt out=$tmp/prep-bad-out
    printf '%b' "$content" >"$in"   # CONTENT holds \n and \t escapes
    rm -rf "$out"; mkdir -p "$out"
    if "$REMI" prep --input "$in" --name bad --out "$out" "$@" >"$tmp/prep-bad.log" 2>&1; then
        fail "prep bad $test" "exit status 0"; return
    fi
    local want=$in; [ -n "$line" ] && want="$in:$line:"
    if ! grep -qF -- "$want" "$tmp/prep-bad.log"; then
        fail "prep bad $test" "message lacks \"$want\": $(head -c 200 "$tmp/prep-bad.log")"; return
    fi
    if [ -n "$(ls -A "$out")" ]; then fail "prep bad $test" "left files: $(ls -A "$out")"; return; fi
    pass "prep bad $test"
}

# Bad command line: non-zero exit and a message mentioning WHAT.
prep_badarg() {
    local test=$1 tmp=$2 what=$3; shift 3
    if "$REMI" prep "$@" >"$tmp/prep-bad.log" 2>&1; then fail "prep arg $test" "exit status 0"; return; fi
    if grep -qF -- "$what" "$tmp/prep-bad.log"; then pass "prep arg $test"
    else fail "prep arg $test" "message lacks \"$what\": $(head -c 200 "$tmp/prep-bad.log")"; fi
}

test_prep() {
    local tmp=$1 exp=${PREP_EXPECTED:-expected/prep}

    # (a) pairs: header, comma, time column (ints, decimals, exponents; ties), ids as strings
    prep_fixture a a "$tmp" --input "$exp/a_pairs_time.csv" --sep comma --header --time-col 3
    # (b) sequence lines, runs of spaces/tabs, one user spread over two lines
    prep_fixture b b "$tmp" --input "$exp/b_sequence.txt" --format sequence
    # (b') sessions: the same lines without their user field give the outputs of the lines with
    #      the line number as their user (awk '{ print NR, $0 }'), byte for byte
    sed 's/^[^ \t]*[ \t]*//' "$exp/b_sequence.txt" >"$tmp/b_sessions.txt"
    awk '{ print NR, $0 }' "$tmp/b_sessions.txt" >"$tmp/b_numbered.txt"
    "$REMI" prep --input "$tmp/b_sessions.txt" --name s --format sessions --min 2 --out "$tmp/sess" >/dev/null 2>&1
    "$REMI" prep --input "$tmp/b_numbered.txt" --name s --format sequence --min 2 --out "$tmp/numb" >/dev/null 2>&1
    why=""
    for f in train valid test user_map item_map; do
        [ -s "$tmp/sess/s_$f.txt" ] && cmp -s "$tmp/sess/s_$f.txt" "$tmp/numb/s_$f.txt" || why="$why $f"
    done
    if [ -z "$why" ]; then pass "prep --format sessions = sequence with the line number as the user"
    else fail "prep sessions" "differ:$why"; fi
    # (c) pairs: tab, no time column (time = line number), CRLF line endings, extra column
    prep_fixture c c "$tmp" --input "$exp/c_pairs_notime.tsv"
    # (d) fixture (a) with --min 4 and a seed wider than 32 bits (two-word random.seed key)
    prep_fixture d d "$tmp" --input "$exp/a_pairs_time.csv" --sep comma --header --time-col 3 \
        --min 4 --seed 12345678901
    # (e-j) the presets of the paper's raw files, expected outputs from the reference's readers
    # (e) Amazon JSON lines: escapes, \u and raw UTF-8 ids, keys in any order, nested fields,
    #     a repeated key, string/float/exponent times sorted as floats, CRLF, whitespace
    prep_fixture e e "$tmp" --input "$exp/e_book.json" --preset book
    # (f, g) RecBole gowalla.inter: header, int ids with leading zeros, sign and blanks, CRLF
    prep_fixture f f "$tmp" --input "$exp/f_gowalla.inter" --preset gowalla
    prep_fixture g g "$tmp" --input "$exp/f_gowalla.inter" --preset gowalla10
    # (h) RecBole retailrocket-view.inter: time in column 0, millisecond times
    prep_fixture h h "$tmp" --input "$exp/h_rocket.inter" --preset rocket
    # (i) Kaggle events.csv: views only (addtocart, transaction and "View" lines dropped)
    prep_fixture i i "$tmp" --input "$exp/i_events.csv" --preset rocket-events
    # (j) SNAP check-ins: ISO 8601 times (leap days, before 1970), location id in column 4
    prep_fixture j j "$tmp" --input "$exp/j_gowalla_snap.txt" --preset gowalla-snap
    # a preset's options give way to explicit flags: book's keys renamed
    sed 's/"reviewerID"/"user"/g' "$exp/e_book.json" >"$tmp/e_renamed.json"
    prep_fixture e e "$tmp" --input "$tmp/e_renamed.json" --preset book --user-key user

    if "$REMI" prep --help >"$tmp/prep-help.log" 2>&1 && grep -q -- "--seed" "$tmp/prep-help.log" &&
       grep -q -- "--int-ids" "$tmp/prep-help.log" && grep -q "gowalla-snap" "$tmp/prep-help.log"; then
        pass "prep --help"
    else
        fail "prep --help" "no usage text with exit 0"
    fi

    prep_bad missing-column "$tmp" 'u1\ti1\nu2\n' 2
    prep_bad empty-user "$tmp" 'u1\ti1\n\ti2\n' 2
    prep_bad empty-item "$tmp" 'u1,i1,5\nu1,,6\n' 2 --sep comma --time-col 2
    prep_bad bad-time "$tmp" 'h,h,h\nu1,i1,5\nu2,i2,12:30\n' 3 --sep comma --header --time-col 2
    prep_bad nan-time "$tmp" 'u1,i1,nan\n' 1 --sep comma --time-col 2
    prep_bad quoted-field "$tmp" 'u1,i1\n"Smith, J",i2\n' 2 --sep comma # CSV quoting is not read: no shifted columns
    # a field whose quotes close inside it ("Weird Al" Yankovic in a TSV) is a whole id: taken as read
    for u in $(seq 8); do printf 'u%d\t"Weird Al" Yankovic\nu%d\ta\tb\nu%d\t"b"\n' $u $u $u; done >"$tmp/quotes.tsv"
    if "$REMI" prep --input "$tmp/quotes.tsv" --name q --min 2 --out "$tmp/quotes" >"$tmp/quotes.log" 2>&1 &&
       grep -qF '"Weird Al" Yankovic' "$tmp/quotes/q_item_map.txt"; then pass "prep: a field whose quotes close inside it is an id"
    else fail "prep whole quoted field" "$(head -c 200 "$tmp/quotes.log")"; fi
    # a header line without --header: the message asks
    printf 'user,item,time\nu1,i1,5\n' >"$tmp/hdr.csv"
    if ! "$REMI" prep --input "$tmp/hdr.csv" --name h --sep comma --time-col 2 --out "$tmp/hdr" >"$tmp/hdr.log" 2>&1 &&
       grep -q "hdr.csv:1: .*(a header line? give --header)" "$tmp/hdr.log"; then pass "prep: a header line without --header, named as one"
    else fail "prep header hint" "$(head -c 200 "$tmp/hdr.log")"; fi
    # an ISO 8601 time without --time-format iso8601 on the first line is no header: the message says which
    printf 'u1,i1,2010-10-19T23:55:27Z\n' >"$tmp/iso.csv"
    if ! "$REMI" prep --input "$tmp/iso.csv" --name h --sep comma --time-col 2 --out "$tmp/iso" >"$tmp/iso.log" 2>&1 &&
       grep -q "iso.csv:1: .*give --time-format iso8601" "$tmp/iso.log" && ! grep -q "header" "$tmp/iso.log"; then
        pass "prep: an ISO time without --time-format, named as one (not a header)"
    else fail "prep ISO time hint" "$(head -c 200 "$tmp/iso.log")"; fi
    # no time column and every user's integer ids ascending (set data listed by id): a note; mixed orders: none
    for u in $(seq 30); do seq 8 | awk -v u=$u '{ print "u" u "\t" $1 }'; done >"$tmp/asc.txt"
    for u in $(seq 30); do seq 8 | awk -v u=$u '{ print "u" u "\t" (u % 2 ? $1 : 9 - $1) }'; done >"$tmp/mixed.txt"
    "$REMI" prep --input "$tmp/asc.txt" --name a --out "$tmp/asc" >"$tmp/asc.log" 2>&1
    "$REMI" prep --input "$tmp/mixed.txt" --name m --out "$tmp/mixed" >"$tmp/mixed.log" 2>&1
    if grep -q "note: .*30 of 30 users (100%) list their items by ascending id" "$tmp/asc.log" && ! grep -q "note" "$tmp/mixed.log"; then
        pass "prep: items listed by ascending id with no time column, a note; mixed orders, none"
    else fail "prep ascending-id note" "$(grep note "$tmp/asc.log") / $(grep note "$tmp/mixed.log")"; fi
    printf 'u1,i1,5\nu1,i2,9300000000000000000\n' >"$tmp/big-time.txt" # beyond 2^63: said so, not "not a number"
    if ! "$REMI" prep --input "$tmp/big-time.txt" --sep comma --time-col 2 --name big --out "$tmp/big-out" >"$tmp/big.log" 2>&1 &&
       grep -qF "big-time.txt:2: time column 2 (\"9300000000000000000\") is out of range" "$tmp/big.log"; then pass "prep bad time beyond 2^63: out of range"
    else fail "prep time beyond 2^63" "$(head -c 200 "$tmp/big.log")"; fi
    printf '{"reviewerID": "u2", "asin": "i2", "unixReviewTime": 1e19}\n' >"$tmp/big-time.json"
    if ! "$REMI" prep --input "$tmp/big-time.json" --preset book --name big --out "$tmp/big-out" >"$tmp/big.log" 2>&1 &&
       grep -qF 'big-time.json:1: the time "unixReviewTime" is out of range' "$tmp/big.log"; then pass "prep bad JSON time 1e19: out of range"
    else fail "prep JSON time 1e19" "$(head -c 200 "$tmp/big.log")"; fi
    prep_bad blank-line "$tmp" 'u1\ti1\n\nu2\ti2\n' 2
    prep_bad trailing-blank "$tmp" 'u1\ti1\nu2\ti2\n\n' 3
    prep_bad seq-no-items "$tmp" 'u1 i1 i2\nu2\n' 2 --format sequence
    prep_bad empty-file "$tmp" '' ""
    prep_bad header-only "$tmp" 'user\titem\n' "" --header
    prep_bad no-user-left "$tmp" 'u1\ti1\nu1\ti2\nu2\ti1\n' ""
    prep_bad bom "$tmp" '\xef\xbb\xbfu1\ti1\nu1\ti2\n' 1
    prep_bad five-users "$tmp" "$(for u in 1 2 3 4 5; do printf 'u%s\\ti1\\nu%s\\ti2\\n' $u $u; done)" "" --min 2
    local j1='{"reviewerID": "u1", "asin": "i1", "unixReviewTime": 5}\n'
    prep_bad json-trailing-comma "$tmp" "$j1"'{"reviewerID": "u2", "asin": "i2", "unixReviewTime": 6,}\n' 2 --preset book
    prep_bad json-extra-text "$tmp" "$j1"'{"reviewerID": "u2", "asin": "i2", "unixReviewTime": 6} x\n' 2 --preset book
    prep_bad json-unterminated "$tmp" "$j1"'{"reviewerID": "u2", "asin": "i2\n' 2 --preset book
    prep_bad json-not-object "$tmp" "$j1"'["u2", "i2", 6]\n' 2 --preset book
    prep_bad json-missing-key "$tmp" "$j1"'{"reviewerID": "u2", "unixReviewTime": 6}\n' 2 --preset book
    prep_bad json-bad-u "$tmp" "$j1"'{"reviewerID": "u\\u12G4", "asin": "i2", "unixReviewTime": 6}\n' 2 --preset book
    prep_bad json-bad-escape "$tmp" "$j1"'{"reviewerID": "u\\x41", "asin": "i2", "unixReviewTime": 6}\n' 2 --preset book
    prep_bad json-lone-surrogate "$tmp" "$j1"'{"reviewerID": "u\\ud800", "asin": "i2", "unixReviewTime": 6}\n' 2 --preset book
    prep_bad json-number-id "$tmp" "$j1"'{"reviewerID": "u2", "asin": 17, "unixReviewTime": 6}\n' 2 --preset book
    prep_bad json-bad-time "$tmp" "$j1"'{"reviewerID": "u2", "asin": "i2", "unixReviewTime": "soon"}\n' 2 --preset book
    prep_bad json-null-time "$tmp" "$j1"'{"reviewerID": "u2", "asin": "i2", "unixReviewTime": null}\n' 2 --preset book
    prep_bad json-nan-time "$tmp" "$j1"'{"reviewerID": "u2", "asin": "i2", "unixReviewTime": NaN}\n' 2 --preset book
    prep_bad json-bad-utf8 "$tmp" "$j1"'{"reviewerID": "u\xff", "asin": "i2", "unixReviewTime": 6}\n' 2 --preset book
    prep_bad json-raw-tab "$tmp" "$j1"'{"reviewerID": "u\t2", "asin": "i2", "unixReviewTime": 6}\n' 2 --preset book
    prep_bad cr-inside-line "$tmp" 'u1\ti1\r\nu1\ti2\r\r\n' 2
    prep_bad id-with-tab "$tmp" 'u1,i1\nu1,i\t2\n' 2 --sep comma
    prep_bad json-newline-id "$tmp" "$j1"'{"reviewerID": "u2", "asin": "i\\n2", "unixReviewTime": 6}\n' 2 --preset book
    prep_bad int-id "$tmp" 'h\n1\t2\t3\n1\tx7\t4\n' 3 --preset gowalla
    prep_bad int-id-underscore "$tmp" 'h\n1\t2_\t3\n' 2 --preset gowalla
    prep_bad iso-no-day "$tmp" '1\t2010-02-30T00:00:00Z\t0\t0\t5\n' 1 --preset gowalla-snap
    prep_bad iso-format "$tmp" '1\t2010-10-19T23:55:27Z\t0\t0\t5\n1\t2010-10-19 23:55:27\t0\t0\t5\n' 2 --preset gowalla-snap
    prep_bad keep-none "$tmp" 'timestamp,visitorid,event,itemid,transactionid\n5,1,cart,2,\n' "" --preset rocket-events

    prep_badarg no-input "$tmp" "--input" --name x
    prep_badarg no-name "$tmp" "--name" --input "$exp/c_pairs_notime.tsv"
    prep_badarg unknown-flag "$tmp" "--bogus" --input "$exp/c_pairs_notime.tsv" --name x --bogus 1
    prep_badarg missing-value "$tmp" "--min" --input "$exp/c_pairs_notime.tsv" --name x --min
    prep_badarg min-1 "$tmp" "--min = 1: must be at least 2" --input "$exp/c_pairs_notime.tsv" --name x --min 1
    prep_badarg bad-format "$tmp" "--format" --input "$exp/c_pairs_notime.tsv" --name x --format csv
    prep_badarg missing-file "$tmp" "$tmp/no-such-file" --input "$tmp/no-such-file" --name x
    prep_badarg unknown-preset "$tmp" "--preset" --input "$exp/c_pairs_notime.tsv" --name x --preset books
    prep_badarg keep-col-alone "$tmp" "--keep-value" --input "$exp/c_pairs_notime.tsv" --name x --keep-col 1
    prep_badarg time-format "$tmp" "--time-format" --input "$exp/c_pairs_notime.tsv" --name x --time-format unix
    prep_badarg iso-no-time-col "$tmp" "--time-col" --input "$exp/c_pairs_notime.tsv" --name x --time-format iso8601
    prep_badarg json-cols "$tmp" "--format pairs only" --input "$exp/e_book.json" --name x --format json --user-col 2
}
test_prep "$TMP"

# The shipped splits are what the reference preprocessing makes from the raw files.
same_split() { # DIR NAME: DIR's five files equal data/'s
    local f
    for f in train valid test user_map item_map; do cmp -s "$1/${2}_$f.txt" "data/${2}_$f.txt" || return 1; done
}
for spec in "beauty --sep space" "cds --format sequence" "gowalla1k --time-col 2" "rr-sessions --format sequence"; do
    set -- $spec; n=$1; shift
    if "$REMI" prep --input "data/${n}_raw.txt" --name "$n" "$@" --out "$TMP/$n" >/dev/null 2>&1 && same_split "$TMP/$n" "$n"; then
        pass "prep regenerates data/${n}_* from data/${n}_raw.txt byte for byte"
    else fail "prep $n" "output differs from data/"; fi
done
# a folder in the place of one of the five: refused before any is replaced (the others stay as they were)
rm "$TMP/beauty/beauty_user_map.txt"; mkdir -p "$TMP/beauty/beauty_user_map.txt/sub"
if ! "$REMI" prep --input data/beauty_raw.txt --name beauty --sep space --min 10 --out "$TMP/beauty" >"$TMP/prep-dir.log" 2>&1 &&
   grep -q "cannot replace .*beauty_user_map.txt: it is a folder" "$TMP/prep-dir.log" &&
   cmp -s "$TMP/beauty/beauty_train.txt" data/beauty_train.txt && cmp -s "$TMP/beauty/beauty_test.txt" data/beauty_test.txt &&
   cmp -s "$TMP/beauty/beauty_item_map.txt" data/beauty_item_map.txt &&
   [ -z "$(find "$TMP/beauty" -name '*.tmp.*')" ]; then
    pass "prep with a folder in place of an output: refused, the other four untouched"
else fail "prep over a folder" "$(head -c 200 "$TMP/prep-dir.log")"; fi

# ---------------------------------------------------------------- golden training runs
# A fixed slice of data/ (expected/tiny: the 400 most popular items; 600 train, 150 valid,
# 150 test users), 300 steps of every model.
# Golden: expected/tiny_<model>_metrics.jsonl. Tolerance: relative 1e-3 on losses and
# absolute 2e-3 on metrics. The same binary reproduces them bit for bit; the tolerance is
# for another compiler or libm (logf/exp in the loss), whose last-bit differences grow
# over 300 steps.
TINY=(--data expected/tiny --name tiny --batch 32 --neg 256 --iters 300 --eval-every 100 --seed 7)
MODELS=(sa dr mind dnn gru4rec pop)
declare -A MODEL_ARGS=(
    [sa]="--rbeta 1 --rlambda 100" [dr]="--rbeta 1 --rlambda 100" [mind]="--relu --rbeta 1 --rlambda 100"
    [dnn]="--rbeta 1" [gru4rec]="" [pop]=""
)

# jsonl_close A B: same structure, numbers within tolerance; timing fields ignored.
jsonl_close() {
    awk -v RTOL=1e-3 -v ATOL=2e-3 '
        function num(s) { return s ~ /^-?[0-9.]+([eE][-+]?[0-9]+)?$/ }
        NR == FNR { a[FNR] = $0; na = FNR; next }
        {
            if (FNR > na) { print "extra line " FNR; bad = 1; exit }
            n1 = split(a[FNR], x, /[{}:,"]+/); n2 = split($0, y, /[{}:,"]+/)
            if (n1 != n2) { print "line " FNR ": different fields"; bad = 1; exit }
            key = ""
            for (i = 1; i <= n1; i++) {
                if (key == "steps_per_s" || key == "elapsed") { key = x[i]; continue }
                if (num(x[i]) && num(y[i])) {
                    d = x[i] - y[i]; if (d < 0) d = -d
                    tol = (key == "loss") ? RTOL * (y[i] < 0 ? -y[i] : y[i]) : ATOL
                    if (d > tol) { print "line " FNR ", " key ": " x[i] " vs " y[i]; bad = 1 }
                } else if (x[i] != y[i]) { print "line " FNR ": " x[i] " vs " y[i]; bad = 1 }
                key = x[i]
            }
        }
        END { if (FNR != na && !bad) { print "missing lines"; bad = 1 } exit bad }' "$1" "$2"
}
strip_timing() { sed -E 's/"steps_per_s":[^,]*,"elapsed":[^}]*//' "$1"; }
same_run() { cmp -s "$1/model.bin" "$2/model.bin" && [ "$(strip_timing "$1/metrics.jsonl")" = "$(strip_timing "$2/metrics.jsonl")" ]; }

for mdl in "${MODELS[@]}"; do
    # shellcheck disable=SC2206  # the per-model flags are meant to split
    args=("${TINY[@]}" --model "$mdl" ${MODEL_ARGS[$mdl]})
    ran=1
    for t in 1 2; do
        "$REMI" train "${args[@]}" -t $t --out "$TMP/tiny-$mdl-t$t" >"$TMP/tiny-$mdl-t$t.log" 2>&1 \
            || { fail "tiny $mdl training -t $t" "$(tail -n 2 "$TMP/tiny-$mdl-t$t.log")"; ran=0; }
    done
    [ $ran = 1 ] || continue
    if out=$(jsonl_close "$TMP/tiny-$mdl-t2/metrics.jsonl" "expected/tiny_${mdl}_metrics.jsonl"); then
        pass "tiny $mdl training matches expected/tiny_${mdl}_metrics.jsonl (loss rtol 1e-3, metrics atol 2e-3)"
    else fail "tiny $mdl golden" "$out"; fi
    if same_run "$TMP/tiny-$mdl-t1" "$TMP/tiny-$mdl-t2"; then pass "tiny $mdl: -t 1 and -t 2 give identical model and metrics"
    else fail "tiny $mdl -t 1 vs -t 2" "outputs differ"; fi
done

# -t above the online CPUs: a note (slower, the same results); at 1, none
over=$(($(getconf _NPROCESSORS_ONLN) + 1))
"$REMI" eval --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny -t $over >"$TMP/over.log" 2>&1
"$REMI" eval --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny -t 1 >"$TMP/over1.log" 2>&1
if grep -q "note: -t $over is more threads than the" "$TMP/over.log" && ! grep -q "note" "$TMP/over1.log" &&
   [ "$(grep -v note "$TMP/over.log")" = "$(cat "$TMP/over1.log")" ]; then pass "eval -t $over (above the online CPUs): a note, the same metrics"
else fail "-t above the CPUs" "$(head -c 200 "$TMP/over.log")"; fi
# MIND's final valid line, drawn afresh, is not the validation that chose the model: a note says so
if grep -q "note: MIND with --mind-eval fresh draws new routing logits" "$TMP/tiny-mind-t2.log"; then
    pass "MIND (--mind-eval fresh): a note that the final valid line is a new draw"
else fail "MIND fresh note" "$(tail -n 3 "$TMP/tiny-mind-t2.log")"; fi

# ---------------------------------------------------------------- evaluation against the reference
# expected/reference-eval/: five small models of remi's and the metrics the reference
# implementation's evaluate() gives them (metrics.txt, 6 decimals). remi eval must print the
# same recall, ndcg_ref and hitrate, within one unit of the 6th decimal (the bound, 1.5e-6, leaves
# room for awk's arithmetic on the two rounded printouts).
for mdl in sa dr mind dnn gru4rec; do
    why=""; seen=0
    while read -r m split n recall ndcg hit; do
        [ "$m" = "$mdl" ] || continue
        seen=$((seen + 1))
        got=$("$REMI" eval --model-file "expected/reference-eval/$mdl.bin" --data expected/tiny --name tiny \
              --split "$split" --topn "$n" -t 2 2>&1 | grep " N=$n ")
        echo "$got" | awk -v r="$recall" -v d="$ndcg" -v h="$hit" '
            { for (i = 1; i < NF; i++) { if ($i == "recall") gr = $(i + 1); if ($i == "ndcg_ref") gd = $(i + 1); if ($i == "hitrate") gh = $(i + 1) } }
            END { ok = gr != "" && (gr - r)^2 <= 2.25e-12 && (gd - d)^2 <= 2.25e-12 && (gh - h)^2 <= 2.25e-12; exit !ok }' \
            || why="$why $split@$n: ${got:-no output}"
    done < expected/reference-eval/metrics.txt
    [ $seen -eq 4 ] || why="$why $seen lines of metrics.txt for $mdl, not 4"
    if [ -z "$why" ]; then pass "eval of a $mdl model matches the reference's evaluate() (valid and test, N 20 and 50)"
    else fail "eval of a $mdl model vs the reference's" "$why"; fi
done
# a cut-off that reaches the catalogue's 400 items gets a note (recall and hit rate are then 1
# or nearly whatever the model); one below it none
"$REMI" eval --model-file expected/reference-eval/sa.bin --data expected/tiny --name tiny --topn 400 >"$TMP/cover.log" 2>&1
"$REMI" eval --model-file expected/reference-eval/sa.bin --data expected/tiny --name tiny --topn 399 >"$TMP/cover2.log" 2>&1
if grep -q "has 400 items: at N = 400 a list holds (almost) every item" "$TMP/cover.log" && ! grep -q "note" "$TMP/cover2.log"; then
    pass "eval at N 400 of 400 items notes that the lists hold every item; at N 399 no note"
else fail "eval's note on a cut-off covering the catalogue" "$(head -c 300 "$TMP/cover.log")"; fi

# 5,000 negatives (2.6 MB of gathered rows, over NEG_OWN_BYTES): the threads gather one shared copy,
# where 256 (above) have each thread gather its own; the same bits on 1 and 3 threads either way
for t in 1 3; do
    "$REMI" train "${TINY[@]}" --neg 5000 --iters 40 --eval-every 40 -t $t --out "$TMP/neg5k-t$t" >/dev/null 2>&1
done
if [ -s "$TMP/neg5k-t1/model.bin" ] && same_run "$TMP/neg5k-t1" "$TMP/neg5k-t3"; then
    pass "--neg 5000 (negatives gathered once, shared): -t 1 and -t 3 give identical model and metrics"
else fail "--neg 5000 -t 1 vs -t 3" "outputs differ"; fi

"$REMI" train "${TINY[@]}" ${MODEL_ARGS[sa]} -t 2 --out "$TMP/tiny-again" >"$TMP/tiny-again.log" 2>&1
if same_run "$TMP/tiny-sa-t2" "$TMP/tiny-again"; then pass "same seed twice: identical model and metrics"
else fail "same seed twice" "outputs differ"; fi
"$REMI" train "${TINY[@]}" ${MODEL_ARGS[sa]} --seed 8 -t 2 --out "$TMP/tiny-seed8" >/dev/null 2>&1
if ! cmp -s "$TMP/tiny-sa-t2/model.bin" "$TMP/tiny-seed8/model.bin"; then pass "another seed gives another model"
else fail "seed" "--seed 8 gave the same model as --seed 7"; fi

# The register tiles of other vector widths (SSE, AVX; ./remi has the machine's) must give
# the same bits: every sum runs in the same order whatever the tile. (They are built fused,
# as ./remi, when make's last build of it was FMA=1.)
for isa in sse avx; do
    if ! command -v "${CC:-cc}" >/dev/null || ! make -s -B remi-$isa FMA=$FUSED >"$TMP/build-$isa.log" 2>&1; then
        echo "skip  remi-$isa (no compiler, or not this architecture)"; continue
    fi
    if ./remi-$isa selftest -t 3 >"$TMP/selftest-$isa.log" 2>&1; then
        pass "remi-$isa selftest (its register tile and tile order against the scalar twins)"
    else fail "remi-$isa selftest" "$(grep FAIL "$TMP/selftest-$isa.log" | tr '\n' ' ')"; fi
    why=""
    for mdl in sa dr mind gru4rec; do
        ./remi-$isa train "${TINY[@]}" --model "$mdl" ${MODEL_ARGS[$mdl]} -t 2 --out "$TMP/tiny-$mdl-$isa" >/dev/null 2>&1
        same_run "$TMP/tiny-$mdl-t2" "$TMP/tiny-$mdl-$isa" || why="$why $mdl"
    done
    if [ -z "$why" ]; then pass "remi-$isa (other register tile) gives the native build's models and metrics: sa dr mind gru4rec"
    else fail "remi-$isa" "differs from the native build:$why"; fi
done

# FMA=1 (every sum of products fused): its own bits, the same for any -t and from the native
# and the portable build (fmaf a library call there), and the golden runs within tolerance
if command -v "${CC:-cc}" >/dev/null && make -s remi-fma remi-fma-sse >"$TMP/build-fma.log" 2>&1; then
    if ./remi-fma selftest -t 3 >"$TMP/selftest-fma.log" 2>&1; then pass "remi-fma selftest (fused kernels against fused scalar twins)"
    else fail "remi-fma selftest" "$(grep FAIL "$TMP/selftest-fma.log" | tr '\n' ' ')"; fi
    why=""
    for mdl in sa dr mind gru4rec; do
        ./remi-fma train "${TINY[@]}" --model "$mdl" ${MODEL_ARGS[$mdl]} -t 1 --out "$TMP/fma-$mdl-t1" >/dev/null 2>&1
        ./remi-fma train "${TINY[@]}" --model "$mdl" ${MODEL_ARGS[$mdl]} -t 3 --out "$TMP/fma-$mdl" >/dev/null 2>&1
        same_run "$TMP/fma-$mdl-t1" "$TMP/fma-$mdl" || why="$why $mdl: -t 1 vs -t 3;"
        cmp -s "$TMP/fma-$mdl/model.bin" "$TMP/tiny-$mdl-t2/model.bin"
        [ $? = $((1 - FUSED)) ] || why="$why $mdl: ./remi's model $([ $FUSED = 1 ] && echo "differs (./remi is FMA=1)" || echo "the same");"
        out=$(jsonl_close "$TMP/fma-$mdl/metrics.jsonl" "expected/tiny_${mdl}_metrics.jsonl") || why="$why $mdl: $out;"
    done
    ./remi-fma-sse train "${TINY[@]}" --model sa ${MODEL_ARGS[sa]} -t 2 --out "$TMP/fma-sse" >/dev/null 2>&1
    same_run "$TMP/fma-sa" "$TMP/fma-sse" || why="$why sa: the portable build differs;"
    if [ -z "$why" ]; then pass "remi-fma: other models than the default build (./remi FMA=$FUSED), the same for -t 1/3 and from the portable build, golden runs within tolerance"
    else fail "remi-fma" "$why"; fi
else echo "skip  remi-fma (no compiler)"; fi

# eval of a saved model reproduces the test metrics printed by train
eval_matches() { # TEST TRAIN-OUT-DIR [EVAL FLAGS...]
    local test=$1 dir=$2; shift 2
    "$REMI" eval --model-file "$dir/model.bin" --data expected/tiny --name tiny --split test "$@" >"$TMP/eval.log" 2>&1
    local want got
    want=$(grep '^test' "$dir.log" | sed 's/  */ /g'); got=$(grep '^test' "$TMP/eval.log" | sed 's/  */ /g')
    if [ -n "$want" ] && [ "$want" = "$got" ]; then pass "$test"; else fail "$test" "train: $want / eval: $got"; fi
}
eval_matches "eval of the saved model reproduces train's test metrics" "$TMP/tiny-sa-t2"
# a model evaluated on other splits of its items (valid and test swapped, as a prep with another
# --seed would split them) gets a note; on its own data, none
d=$TMP/resplit; mkdir -p "$d"; cp expected/tiny/tiny_train.txt "$d/"
cp expected/tiny/tiny_valid.txt "$d/tiny_test.txt"; cp expected/tiny/tiny_test.txt "$d/tiny_valid.txt"
"$REMI" eval --model-file "$TMP/tiny-sa-t2/model.bin" --data "$d" --name tiny >"$TMP/fp.log" 2>&1; rc=$?
"$REMI" eval --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny >"$TMP/fp2.log" 2>&1
if [ $rc = 0 ] && grep -q "is not the data .*model.bin was trained on" "$TMP/fp.log" && ! grep -q "note" "$TMP/fp2.log"; then
    pass "eval on splits other than the model's: a note; on its own: none"
else fail "eval: data fingerprint" "$(head -c 200 "$TMP/fp.log") / $(head -c 200 "$TMP/fp2.log")"; fi
eval_matches "eval of a single-vector model (gru4rec) reproduces train's test metrics" "$TMP/tiny-gru4rec-t2"
# MIND draws routing logits at evaluation; with --mind-eval fixed they are the same every pass
"$REMI" train "${TINY[@]}" --model mind --iters 100 --mind-eval fixed -t 2 --out "$TMP/tiny-mind-fixed" \
    >"$TMP/tiny-mind-fixed.log" 2>&1
eval_matches "MIND --mind-eval fixed: eval reproduces train's test metrics" "$TMP/tiny-mind-fixed" --mind-eval fixed
# the model file records it: eval's default for that model is fixed
eval_matches "MIND --mind-eval fixed: eval reproduces them with no --mind-eval (the model file's default)" "$TMP/tiny-mind-fixed"

# full softmax (--neg 0): an untrained model's first loss is log N (N = 401 ids), and training runs
"$REMI" train "${TINY[@]}" --neg 0 --rbeta 0 --rlambda 0 --iters 1 --eval-every 1 -t 2 --out "$TMP/full1" >"$TMP/full1.log" 2>&1
"$REMI" train "${TINY[@]}" --neg 0 --rbeta 0 --iters 200 -t 2 --out "$TMP/full" >"$TMP/full.log" 2>&1
l1=$(awk '/^iter/ { print $4; exit }' "$TMP/full1.log")
if [ -n "$l1" ] && awk -v l="$l1" 'BEGIN { d = l - log(401); exit !(d < 0.1 && d > -0.1) }' && grep -q '^test.*N=50' "$TMP/full.log"; then
    pass "full softmax: first loss $l1 = log 401 (+-0.1), and it trains"
else fail "full softmax" "first loss '$l1': $(tail -n 1 "$TMP/full.log")"; fi
if ! "$REMI" train "${TINY[@]}" --neg 0 --rbeta 1 --out "$TMP/full-ihn" >"$TMP/f.log" 2>&1 && grep -q "rbeta 0" "$TMP/f.log"; then
    pass "full softmax refuses IHN"; else fail "full softmax with IHN" "$(head -c 200 "$TMP/f.log")"; fi

# no validation beats recall 0 (a cut-off of 1, patience 0): the last parameters are reported, and called so
if "$REMI" train --data expected/tiny --name tiny --topn 1 --iters 100 --eval-every 50 --patience 0 --out "$TMP/noimp" >"$TMP/noimp.log" 2>&1 &&
   grep -q "^model: the last parameters, iter 50" "$TMP/noimp.log" && ! grep -q "best model" "$TMP/noimp.log" && [ -s "$TMP/noimp/model.bin" ]; then
    pass "no validation improvement: the last parameters, said so, saved"
else fail "no improvement" "$(tail -n 3 "$TMP/noimp.log")"; fi

# a negative --rbeta (easy negatives) can make the sampled softmax's factor M / (Z S) exceed the
# float range: its gradient must stay finite (it went NaN at step 148 of this run, the loss finite)
if "$REMI" train --data expected/tiny --name tiny --rbeta -0.5 --lr 0.03 --iters 200 --eval-every 200 --out "$TMP/negbeta" \
       >"$TMP/negbeta.log" 2>&1 && grep -q '^test.*N=50' "$TMP/negbeta.log"; then pass "--rbeta -0.5 at a high learning rate: trains, finite"
else fail "negative rbeta" "$(tail -n 1 "$TMP/negbeta.log")"; fi

# --remove-hits: with negatives drawn from 401 ids, targets and history items are often among
# them, so dropping them changes the model; target and history differ from each other too
for h in target history; do
    "$REMI" train "${TINY[@]}" --iters 100 --remove-hits $h -t 2 --out "$TMP/hits-$h" >"$TMP/hits-$h.log" 2>&1
done
"$REMI" train "${TINY[@]}" --iters 100 -t 2 --out "$TMP/hits-none" >/dev/null 2>&1
if grep -q '"remove_hits":"history"' "$TMP/hits-history/metrics.jsonl" 2>/dev/null &&
   ! cmp -s "$TMP/hits-none/model.bin" "$TMP/hits-target/model.bin" &&
   ! cmp -s "$TMP/hits-target/model.bin" "$TMP/hits-history/model.bin"; then
    pass "--remove-hits target / history train other models than the reference's sampling, and say so in metrics.jsonl"
else fail "--remove-hits" "$(tail -n 1 "$TMP/hits-history.log")"; fi

# ---------------------------------------------------------------- checkpoints, resuming, interrupts
# A run stopped at any point and resumed must end with the bytes of the run left alone.
resume_matches() { # TEST MODEL STOP-AFTER: stop, refuse a --stop-after it has passed, resume with -t 1, compare with the golden run
    local test=$1 mdl=$2 k=$3 d=$TMP/resume-$2-$3
    # shellcheck disable=SC2206
    local args=("${TINY[@]}" --model "$mdl" ${MODEL_ARGS[$mdl]})
    "$REMI" train "${args[@]}" -t 2 --out "$d" --stop-after "$k" >"$d.log" 2>&1 || { fail "$test" "stop: $(tail -n 1 "$d.log")"; return; }
    grep -q "resume $d" "$d.log" || { fail "$test" "no resume hint: $(tail -n 1 "$d.log")"; return; }
    if "$REMI" train --resume "$d" --stop-after $((k - 1)) >"$d-0.log" 2>&1 || ! grep -q "is at step $k already" "$d-0.log"; then
        fail "$test" "--stop-after before the checkpoint not refused: $(tail -n 1 "$d-0.log")"; return
    fi
    "$REMI" train --resume "$d" -t 1 >"$d-2.log" 2>&1 || { fail "$test" "resume: $(tail -n 1 "$d-2.log")"; return; }
    if same_run "$d" "$TMP/tiny-$mdl-t2"; then pass "$test"; else fail "$test" "resumed run differs from the run left alone"; fi
}
resume_matches "resume: SA stopped at step 150 (between evaluations) = the run left alone" sa 150
resume_matches "resume: GRU4Rec stopped at step 200 (at an evaluation) = the run left alone" gru4rec 200
resume_matches "resume: MIND stopped at step 77 = the run left alone" mind 77

# a finished run's checkpoint copied alone into a folder: resumed, it ends with the files of the
# run (model.bin and curves.svg included, though no step runs), and says the run had finished
"$REMI" train --data expected/tiny --name tiny --iters 300 --eval-every 100 --out "$TMP/ck-whole" >/dev/null 2>&1
mkdir -p "$TMP/ck-copy"; cp "$TMP/ck-whole/checkpoint.bin" "$TMP/ck-copy/"
"$REMI" train --resume "$TMP/ck-copy" >"$TMP/ck-copy.log" 2>&1
if same_run "$TMP/ck-copy" "$TMP/ck-whole" && cmp -s "$TMP/ck-copy/curves.svg" "$TMP/ck-whole/curves.svg" &&
   grep -q "the run had finished training (its last step)" "$TMP/ck-copy.log"; then
    pass "resume from a folder holding only the checkpoint: model.bin, curves.svg and metrics.jsonl of the run left alone"
else fail "resume from the checkpoint alone" "$(ls "$TMP/ck-copy" | tr '\n' ' ') $(tail -n 1 "$TMP/ck-copy.log")"; fi
# stopped at the very step that stops it early: both runs say so, and the resume ends as the run left alone
ES=(--data expected/tiny --name tiny --patience 0 --eval-every 5 --iters 200 -t 1)
"$REMI" train "${ES[@]}" --out "$TMP/es-whole" >"$TMP/es-whole.log" 2>&1
"$REMI" train "${ES[@]}" --stop-after 30 --out "$TMP/es-stop" >"$TMP/es-stop.log" 2>&1
"$REMI" train --resume "$TMP/es-stop" >"$TMP/es-res.log" 2>&1
if grep -q "best model: iter 25 of 30" "$TMP/es-whole.log" && grep -q "^early stop: 1 evaluations" "$TMP/es-stop.log" &&
   grep -q "the run had finished training (early stop)" "$TMP/es-res.log" && same_run "$TMP/es-stop" "$TMP/es-whole"; then
    pass "stopped at the early-stop step: 'early stop' printed, the resume ends as the run left alone"
else fail "stop at the early-stop step" "$(tail -n 2 "$TMP/es-stop.log" | head -c 200)"; fi
# the data changed under a stopped run (one test item, the same counts): the resume is refused
mkdir -p "$TMP/chg"; cp expected/tiny/tiny_* "$TMP/chg/"
"$REMI" train --data "$TMP/chg" --name tiny --iters 300 --eval-every 100 --stop-after 150 --out "$TMP/chg-run" >/dev/null 2>&1
awk -F, 'BEGIN { OFS = "," } NR == 1 { $2 = $2 % 400 + 1 } { print }' expected/tiny/tiny_test.txt >"$TMP/chg/tiny_test.txt"
if ! "$REMI" train --resume "$TMP/chg-run" >"$TMP/chg.log" 2>&1 && grep -q "is not the data this run started on" "$TMP/chg.log"; then
    pass "resume on changed data of the same sizes refused: $(grep -o 'is not the data.*started on' "$TMP/chg.log")"
else fail "resume on changed data" "$(tail -n 1 "$TMP/chg.log")"; fi

# a data folder's path of 1,200 characters and a --name of 1,200 (with folders in it) are recorded
# whole in the config line (the path was cut at 1,017), the run resumes, and report reads it
long=$TMP/$(printf 'd%.0s' $(seq 200)); sub=""
for _ in 1 2 3 4 5 6; do long=$long/$(printf 'e%.0s' $(seq 200)); sub=$sub$(printf 'n%.0s' $(seq 200))/; done
mkdir -p "$long/$sub"; cp expected/tiny/tiny_* "$long/$sub"
"$REMI" train --data "$long" --name "${sub}tiny" --iters 20 --eval-every 10 --stop-after 10 --out "$TMP/longpath" >/dev/null 2>&1
"$REMI" train --resume "$TMP/longpath" >/dev/null 2>&1
if [ "${#long}" -gt 1200 ] && [ "${#sub}" -gt 1200 ] &&
   head -n 1 "$TMP/longpath/metrics.jsonl" 2>/dev/null | grep -qF "\"data\":\"$long\",\"name\":\"${sub}tiny\"," &&
   "$REMI" report "$TMP/longpath" 2>&1 | grep -qF "| ${sub}tiny | sa |"; then
    pass "a data path and a --name of 1,200+ characters: recorded whole, resumed, reported"
else fail "long data path and name" "$(head -c 200 "$TMP/longpath/metrics.jsonl" 2>&1)"; fi

# Adam's mode and --remove-hits are settings of the run: they travel in the checkpoint
LH=("${TINY[@]}" --model sa --adam lazy --remove-hits history)
"$REMI" train "${LH[@]}" -t 2 --out "$TMP/lh" >/dev/null 2>&1
"$REMI" train "${LH[@]}" -t 2 --stop-after 130 --out "$TMP/lh-r" >/dev/null 2>&1
"$REMI" train --resume "$TMP/lh-r" -t 1 >"$TMP/lh-r2.log" 2>&1
if same_run "$TMP/lh" "$TMP/lh-r" && grep -q "remove-hits history  adam lazy" "$TMP/lh-r2.log"; then
    pass "resume: a run with --adam lazy --remove-hits history stopped at step 130 = the run left alone"
else fail "resume with lazy Adam and removed hits" "$(head -n 1 "$TMP/lh-r2.log")"; fi

# --resume from another directory with a relative --data: says where to run it from
"$REMI" train --data expected/tiny --name tiny --iters 100 --eval-every 50 --stop-after 60 --out "$TMP/rel" >/dev/null 2>&1
remi_abs=$(cd "$(dirname "$REMI")" && pwd)/$(basename "$REMI")
if ! (cd / && "$remi_abs" train --resume "$TMP/rel" >"$TMP/rel.log" 2>&1) && grep -q "from the folder the run started in" "$TMP/rel.log"; then
    pass "--resume elsewhere with a relative data folder: says to run it from the run's folder"
else fail "resume elsewhere" "$(tail -n 1 "$TMP/rel.log")"; fi
mkdir -p "$TMP/elsewhere/expected/tiny" # the folder is there, the split files are not
if ! (cd "$TMP/elsewhere" && "$remi_abs" train --resume "$TMP/rel" >"$TMP/rel2.log" 2>&1) &&
   grep -q "expected/tiny/tiny_train.txt (as given when it started) is not found from here; run the --resume from the folder" "$TMP/rel2.log"; then
    pass "--resume where the relative data folder exists without the run's files: the same advice"
else fail "resume elsewhere, empty data folder" "$(tail -n 1 "$TMP/rel2.log")"; fi

# temporary files of a killed run (kill -9 leaves model.bin.tmp.PID) are removed by the next train
# in the folder, which holds its lock; other files, and those of a live process, stay
dead=$(sh -c 'echo $$')
touch "$TMP/rel/model.bin.tmp.$dead" "$TMP/rel/checkpoint.bin.tmp.$dead" "$TMP/rel/notes.tmp.1" "$TMP/rel/curves.svg.tmp.$$"
"$REMI" train --resume "$TMP/rel" >/dev/null 2>&1
if [ ! -e "$TMP/rel/model.bin.tmp.$dead" ] && [ ! -e "$TMP/rel/checkpoint.bin.tmp.$dead" ] && [ -e "$TMP/rel/notes.tmp.1" ] &&
   [ -e "$TMP/rel/curves.svg.tmp.$$" ] && [ -s "$TMP/rel/model.bin" ]; then
    pass "a killed run's temporary files are removed by the next train in its folder (a live process's stay)"
else fail "stale temporary files" "$(ls "$TMP/rel" | tr '\n' ' ')"; fi
rm -f "$TMP/rel/curves.svg.tmp.$$"

# one remi train at a time in an output folder: a second is refused while the first runs
d=$TMP/locked
"$REMI" train --data expected/tiny --name tiny --iters 100000000 --eval-every 100000000 --out "$d" >"$d.log" 2>&1 &
pid=$!
for _ in $(seq 300); do grep -q '^remi train' "$d.log" 2>/dev/null && break; sleep 0.1; done
if ! "$REMI" train --data expected/tiny --name tiny --iters 10 --eval-every 10 --out "$d" >"$d-2.log" 2>&1 &&
   grep -q "in use by another remi train" "$d-2.log"; then locked=1; else locked=0; fi
kill -TERM "$pid"; wait "$pid"; rc=$?
if [ "$locked" = 1 ] && [ "$rc" = 143 ] && [ -s "$d/checkpoint.bin" ]; then
    pass "a second train into a folder in use is refused; the first, stopped, writes its checkpoint"
else fail "output folder lock" "locked $locked, first run's status $rc: $(head -c 200 "$d-2.log")"; fi

# a new run into a finished run's folder replaces it whole: stopped before its first validation,
# the folder holds no model or curves of the old run, and its checkpoint is the new run's
d=$TMP/again
"$REMI" train --data expected/tiny --name tiny --iters 20 --eval-every 10 --out "$d" >/dev/null 2>&1
"$REMI" train --data expected/tiny --name tiny --model dnn --iters 20 --eval-every 10 --stop-after 5 --out "$d" >/dev/null 2>&1
if [ -s "$d/checkpoint.bin" ] && [ ! -e "$d/model.bin" ] && [ ! -e "$d/curves.svg" ] &&
   [ "$(grep -c '"config"' "$d/metrics.jsonl")" = 1 ] && grep -q '"model":"dnn"' "$d/metrics.jsonl" &&
   "$REMI" train --resume "$d" >"$d.log" 2>&1 && grep -q "model dnn" "$d.log"; then
    pass "a new run into a finished run's folder replaces it whole (no model or curves of the old one left)"
else fail "a new run into an old folder" "$(ls "$d" | tr '\n' ' ') $(head -c 200 "$d.log")"; fi

# SIGINT in the middle of a run: a checkpoint and exit 130; resumed up to a later step K, the run
# must match a run left alone up to K (K follows wherever the signal landed: the test does not
# depend on the machine's speed)
SIG=(--data expected/tiny --name tiny --batch 32 --neg 64 --iters 100000000 --eval-every 500 --seed 3 --model dnn -t 2)
interrupt() { # SIGNAL DIR: start a run, signal it after a second; prints the step it stopped after
    "$REMI" train "${SIG[@]}" --out "$2" >"$2.log" 2>&1 &
    local pid=$!; sleep 1; kill "-$1" $pid; wait $pid; echo "$? $(grep -o 'after iteration [0-9]*' "$2.log" | grep -o '[0-9]*$')"
}
read -r rc k < <(interrupt INT "$TMP/sig")
if [ "$rc" = 130 ] && [ -n "$k" ] && [ -f "$TMP/sig/checkpoint.bin" ]; then
    K=$(( (k / 500 + 2) * 500 ))
    "$REMI" train --resume "$TMP/sig" --stop-after $K >"$TMP/sig-2.log" 2>&1
    "$REMI" train "${SIG[@]}" --stop-after $K --out "$TMP/sig-whole" >"$TMP/sig-whole.log" 2>&1
    if same_run "$TMP/sig" "$TMP/sig-whole"; then pass "SIGINT after step $k: checkpoint, exit 130; resumed to step $K = the run left alone"
    else fail "SIGINT resume" "resumed run differs from the run left alone"; fi
else fail "SIGINT" "exit $rc: $(tail -n 1 "$TMP/sig.log")"; fi

# SIGTERM: the same, with exit status 143
read -r rc k < <(interrupt TERM "$TMP/term")
if [ "$rc" = 143 ] && [ -n "$k" ] && "$REMI" train --resume "$TMP/term" --stop-after $((k + 10)) >/dev/null 2>&1; then
    pass "SIGTERM after step $k: checkpoint, exit 143, resumable"
else fail "SIGTERM" "exit $rc: $(tail -n 1 "$TMP/term.log")"; fi

# SIGTERM at the end of a run (Beauty at D 256: its final evaluation takes about a second, and
# the signal comes 0.3 s after the last validation's line): exit 143 wherever it lands, with the
# checkpoint of the finished run, whose resume makes the final lines
d=$TMP/term-end
"$REMI" train --hidden 256 --neg 256 --batch 16 --eval-every 20 --iters 100 -t 2 --out "$d" >"$d.log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q '^iter      100' "$d.log" 2>/dev/null && break; sleep 0.05; done
sleep 0.3; kill -TERM $pid; wait $pid; rc=$?
where=$(grep -o "stopped in the final evaluation\|terminated (SIGTERM)" "$d.log")
if [ "$rc" = 143 ] && [ -n "$where" ] && ! grep -q '"final"' "$d/metrics.jsonl" &&
   "$REMI" train --resume "$d" >"$d-2.log" 2>&1 && [ "$(grep -c '"final"' "$d/metrics.jsonl")" = 3 ]; then
    pass "SIGTERM at the end of a run ($where): exit 143; its resume writes the final lines"
else fail "SIGTERM at the end of a run" "exit $rc: $(tail -n 2 "$d.log" | tr '\n' ' ')"; fi

# damaged, foreign and missing checkpoints are refused, and settings cannot change on resume
ck=$TMP/resume-sa-150/checkpoint.bin
bad_ckpt() { # TEST WANT: $TMP/ck/checkpoint.bin prepared by the caller
    if ! "$REMI" train --resume "$TMP/ck" >"$TMP/ck.log" 2>&1 && grep -q "$2" "$TMP/ck.log"; then pass "checkpoint: $1 refused"
    else fail "checkpoint: $1" "$(head -c 200 "$TMP/ck.log")"; fi
}
mkdir -p "$TMP/ck"
head -c 5000 "$ck" >"$TMP/ck/checkpoint.bin"; bad_ckpt truncated "checksum mismatch"
cp "$ck" "$TMP/ck/checkpoint.bin"; printf '\x55' | dd of="$TMP/ck/checkpoint.bin" bs=1 seek=3000 conv=notrunc 2>/dev/null
bad_ckpt "one byte changed" "checksum mismatch"
cp "$TMP/tiny-sa-t2/model.bin" "$TMP/ck/checkpoint.bin"; bad_ckpt "foreign file" "not a remi checkpoint"
rm "$TMP/ck/checkpoint.bin"; bad_ckpt missing "train --out DIR"
if ! "$REMI" train --resume "$ck" >"$TMP/ck.log" 2>&1 && grep -q "not a folder; give the --out folder" "$TMP/ck.log"; then
    pass "checkpoint: --resume given the checkpoint file instead of its folder refused, saying so"
else fail "checkpoint: --resume of a file" "$(head -c 200 "$TMP/ck.log")"; fi
if ! "$REMI" train --resume "$TMP/resume-sa-150" --lr 0.1 >"$TMP/ck.log" 2>&1 && grep -q "cannot be changed" "$TMP/ck.log"; then
    pass "resume refuses changed settings"; else fail "resume settings" "$(head -c 200 "$TMP/ck.log")"; fi

# the training curves are an SVG with the loss and both validation series
if grep -q "<svg" "$TMP/tiny-sa-t2/curves.svg" && [ "$(grep -c '<polyline' "$TMP/tiny-sa-t2/curves.svg")" -eq 3 ]; then
    pass "curves.svg: loss, Recall@50 and NDCG@50 curves"; else fail "curves.svg" "missing or incomplete"; fi

# ---------------------------------------------------------------- recommend, export
# recommend's top 5 for a training user's history = the top 5 recomputed (in awk) from the
# user vector and the item embeddings that export wrote (DNN: one vector; items 1..N-1, not the padding id 0)
m=$TMP/tiny-dnn-t2/model.bin
if "$REMI" export --model-file "$m" --data expected/tiny --name tiny --out "$TMP/export" >"$TMP/export.log" 2>&1; then
    u=$(awk -F, 'NR == 1 { print $1 }' expected/tiny/tiny_train.txt)
    hist=$(awk -F, -v u="$u" '$1 == u { print $4 "," NR "," $2 }' expected/tiny/tiny_train.txt | sort -t, -k1,1n -k2,2n | cut -d, -f3 | tr '\n' ' ')
    got=$("$REMI" recommend --model-file "$m" --history "$hist" --topn 5 | awk 'NR > 2 { print $2 }' | tr '\n' ' ')
    want=$(awk -F'\t' -v u="$u" 'NR == FNR { if (FNR > 1 && $1 == "train" && $2 == u) for (d = 4; d <= NF; d++) v[d - 4] = $d; next }
        FNR > 1 && $1 > 0 { s = 0; for (d = 3; d <= NF; d++) s += v[d - 3] * $d; printf "%.9f %d\n", s, $1 }' \
        "$TMP/export/users.tsv" "$TMP/export/items.tsv" | sort -k1,1gr -k2,2n | head -n 5 | awk '{ print $2 }' | tr '\n' ' ')
    if [ -n "$got" ] && [ "$got" = "$want" ]; then pass "recommend = top 5 recomputed from export's vectors ($got)"
    else fail "recommend vs export" "recommend: $got / from export: $want"; fi
else fail "export" "$(tail -n 1 "$TMP/export.log")"; fi
n_users=$(($(cut -d, -f1 expected/tiny/tiny_{train,valid,test}.txt | sort -u | wc -l)))
if [ "$(($(wc -l <"$TMP/export/users.tsv") - 1))" -eq "$n_users" ] && [ "$(($(wc -l <"$TMP/export/items.tsv") - 1))" -eq 401 ]; then
    pass "export: one row per item (401) and per user ($n_users)"; else fail "export rows" "$(wc -l "$TMP"/export/*.tsv | tr '\n' ' ')"; fi
# export writes its two files as a pair: users.tsv failing (a 1 MB file size limit) leaves the folder's
# previous pair as it was, and no temporary file
cp -r "$TMP/export" "$TMP/export-full"
(trap '' XFSZ; ulimit -f 1000; "$REMI" export --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny \
    --out "$TMP/export-full" >"$TMP/export-full.log" 2>&1); rc=$?
if [ "$rc" = 1 ] && grep -q "error writing $TMP/export-full/users.tsv (disk full?)" "$TMP/export-full.log" &&
   cmp -s "$TMP/export/items.tsv" "$TMP/export-full/items.tsv" && cmp -s "$TMP/export/users.tsv" "$TMP/export-full/users.tsv" &&
   [ "$(ls "$TMP/export-full" | wc -l)" = 2 ]; then pass "export: a failed users.tsv leaves the previous pair whole, no temporary file"
else fail "export pair" "exit $rc: $(head -c 200 "$TMP/export-full.log"); $(ls "$TMP/export-full" | tr '\n' ' ')"; fi
# SIGTERM while export writes (a D 1024 model: 56 MB of text) removes the files being written
"$REMI" train --data expected/tiny --name tiny --hidden 1024 --iters 1 --eval-every 1 --out "$TMP/wide" >/dev/null 2>&1
"$REMI" export --model-file "$TMP/wide/model.bin" --data expected/tiny --name tiny --out "$TMP/export-sig" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 1000); do ls "$TMP"/export-sig/*.tmp.* >/dev/null 2>&1 && break; sleep 0.01; done
seen=$(ls "$TMP"/export-sig/ 2>/dev/null | tr '\n' ' ')
kill -TERM $pid; wait $pid; rc=$?
if [ "$rc" = 143 ] && [ -n "$seen" ] && [ -z "$(ls "$TMP/export-sig")" ]; then
    pass "SIGTERM during export (writing $seen): exit 143, no file left"
else fail "SIGTERM during export" "exit $rc, saw '$seen', left: $(ls "$TMP/export-sig" | tr '\n' ' ')"; fi
"$REMI" recommend --model-file "$TMP/tiny-mind-t2/model.bin" --history "3 9 27" --topn 10 >"$TMP/rec.log" 2>&1
if [ "$(awk 'NR > 2 && $5 >= 0 && $5 < 4' "$TMP/rec.log" | wc -l)" -eq 10 ]; then pass "recommend (MIND): 10 items, each with its interest"
else fail "recommend MIND" "$(head -c 200 "$TMP/rec.log")"; fi
"$REMI" recommend --model-file "$m" --history "3 9 27" --topn 400 >"$TMP/rec.log" 2>&1
if [ "$(awk 'NR > 2 && $2 > 0' "$TMP/rec.log" | sort -u -k2,2n | wc -l)" -eq 400 ] &&
   ! "$REMI" recommend --model-file "$m" --history "3 9 27" --topn 401 >/dev/null 2>&1; then
    pass "recommend (DNN) --topn 400: every item once, never the padding id 0; --topn 401 refused"
else fail "recommend all items" "$(awk 'NR > 2 && $2 == 0' "$TMP/rec.log" | head -c 100)"; fi
# a history pasted from a CRLF file (its CR a blank), and a model file read from a pipe (no size to check first)
a=$("$REMI" recommend --model-file "$m" --history "3 9 27" --topn 5 2>&1)
b=$("$REMI" recommend --model-file "$m" --history "$(printf '3 9 27\r\n')" --topn 5 2>&1)
c=$(cat "$m" | "$REMI" recommend --model-file /dev/stdin --history "3 9 27" --topn 5 2>&1)
if [ -n "$a" ] && [ "$a" = "$b" ] && [ "$(echo "$c" | tail -n 5)" = "$(echo "$a" | tail -n 5)" ] &&
   ! { cat "$m"; printf x; } | "$REMI" recommend --model-file /dev/stdin --history "3" >"$TMP/rec.log" 2>&1 &&
   grep -q "bytes after its checksum" "$TMP/rec.log"; then
    pass "recommend: a CRLF history as a plain one; a model from a pipe, and one with a byte after its checksum refused"
else fail "recommend: CRLF history / piped model" "$(echo "$b" | head -c 200) / $(echo "$c" | head -c 200) / $(head -c 200 "$TMP/rec.log")"; fi
for h in "3 x 9" "3 0 9" "3 401" ""; do
    if ! "$REMI" recommend --model-file "$m" --history "$h" >"$TMP/rec.log" 2>&1 && grep -q -- "--history" "$TMP/rec.log"; then
        pass "recommend refuses --history \"$h\""; else fail "recommend --history \"$h\"" "$(head -c 200 "$TMP/rec.log")"; fi
done
if "$REMI" recommend --model-file "$TMP/tiny-pop-t2/model.bin" --history "3 9" --topn 3 | grep -q "^pop model: the most frequent training targets (a history changes nothing)" &&
   "$REMI" recommend --model-file "$TMP/tiny-pop-t2/model.bin" --history "3 9" --topn 3 --exclude-history | grep -q "^pop model: .*(the history only leaves its items out)"; then
    pass "recommend (Pop) says a history changes nothing"; else fail "recommend pop" "$("$REMI" recommend --model-file "$TMP/tiny-pop-t2/model.bin" --history 3 2>&1 | head -1)"; fi
# --data shows each item's raw id from the item map; a folder without one is refused
mkdir -p "$TMP/rmap"; seq 1 400 | awk '{ print "raw" $1 "," $1 }' >"$TMP/rmap/tiny_item_map.txt"
"$REMI" recommend --model-file "$m" --history "3 9 27" --topn 5 --data "$TMP/rmap" --name tiny >"$TMP/rec.log" 2>&1
raw_ok=$(awk -F'\t' 'NR > 2 && $3 == "raw" $2 { n++ } END { print n + 0 }' "$TMP/rec.log")
if [ "$raw_ok" -eq 5 ] && ! "$REMI" recommend --model-file "$m" --history "3 9 27" --data "$TMP" --name tiny >"$TMP/rec2.log" 2>&1 &&
   grep -q "no item map $TMP/tiny_item_map.txt" "$TMP/rec2.log"; then pass "recommend --data: raw ids from the item map; a folder without one refused"
else fail "recommend --data" "$raw_ok of 5 raw ids; $(head -c 200 "$TMP/rec2.log")"; fi
sed -i '$d' "$TMP/rmap/tiny_item_map.txt" # a map of 399 items, for a model of 400: another dataset's
if ! "$REMI" recommend --model-file "$m" --history "3 9 27" --data "$TMP/rmap" --name tiny >"$TMP/rec2.log" 2>&1 &&
   grep -q "tiny_item_map.txt has 399 items but the model was trained with 400" "$TMP/rec2.log"; then pass "recommend --data: a map of another size refused"
else fail "recommend --data, map size" "$(head -c 200 "$TMP/rec2.log")"; fi
printf 'raw400,400\n\n' >>"$TMP/rmap/tiny_item_map.txt" # 400 items and a blank line: the line is named
if ! "$REMI" recommend --model-file "$m" --history "3 9 27" --data "$TMP/rmap" --name tiny >"$TMP/rec2.log" 2>&1 &&
   grep -q "tiny_item_map.txt:401: expected 'raw id,item'" "$TMP/rec2.log"; then pass "recommend --data: a blank line in the map named, not called another dataset's"
else fail "recommend --data, blank map line" "$(head -c 200 "$TMP/rec2.log")"; fi
# --exclude-history: every item but the history's (given twice), once each; one more than that refused
"$REMI" recommend --model-file "$m" --history "3 9 27 9" --topn 397 --exclude-history >"$TMP/rec.log" 2>&1
if [ "$(awk 'NR > 2 && $2 > 0 && $2 != 3 && $2 != 9 && $2 != 27' "$TMP/rec.log" | sort -u -k2,2n | wc -l)" -eq 397 ] &&
   ! "$REMI" recommend --model-file "$m" --history "3 9 27 9" --topn 398 --exclude-history >"$TMP/rec2.log" 2>&1 &&
   grep -q "only 397 items are not in the history" "$TMP/rec2.log"; then pass "recommend --exclude-history: the 397 other items; --topn 398 refused"
else fail "recommend --exclude-history" "$(head -c 200 "$TMP/rec.log") / $(head -c 200 "$TMP/rec2.log")"; fi

# ---------------------------------------------------------------- routing collapse
# RR exists to stop interests collapsing onto one item: the tiny SA model trained with RR
# (lambda 100) must have far fewer collapsed interests than the same run without it
"$REMI" train "${TINY[@]}" --rbeta 1 --rlambda 0 -t 2 --out "$TMP/tiny-norr" >/dev/null 2>&1
collapsed() { "$REMI" inspect --model-file "$1/model.bin" --data expected/tiny --name tiny --out "$2" | awk '/^collapsed/ { sub("%", "", $NF); print $NF }'; }
with=$(collapsed "$TMP/tiny-sa-t2" "$TMP/insp-rr"); without=$(collapsed "$TMP/tiny-norr" "$TMP/insp-norr")
if [ -n "$with" ] && [ -n "$without" ] && awk -v a="$with" -v b="$without" 'BEGIN { exit !(a < 10 && b > 30) }'; then
    pass "inspect: collapsed interests ${with}% with RR, ${without}% without"
else fail "inspect collapse" "with RR: '$with', without: '$without'"; fi
# the users drawn are named by id and by the row --users takes
"$REMI" inspect --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny --users "2" --out "$TMP/insp-row" >"$TMP/insp-row.log" 2>&1
u=$(awk -F, 'NR == FNR { if (!($1 in seen)) { seen[$1] = 1; n++; if (n == 3) { print $1; exit } } }' expected/tiny/tiny_test.txt)
if grep -q "^user $u (row 2), history:" "$TMP/insp-row.log" && grep -q "user $u (row 2)" "$TMP/insp-row/routing.svg"; then
    pass "inspect names a drawn user by id and row (user $u (row 2))"
else fail "inspect row" "user '$u': $(grep -m1 '^user' "$TMP/insp-row.log")"; fi
rects=$(grep -c "<rect x=" "$TMP/insp-rr/routing.svg")
if [ "$rects" -gt 16 ]; then pass "inspect: routing.svg heatmap ($rects cells)"; else fail "routing.svg" "$rects cells"; fi
# its output piped to a reader that has quit (SIGPIPE): no temporary file left (routing.svg whole or absent)
"$REMI" inspect --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny --users "$(seq -s ' ' 0 140)" \
    --out "$TMP/insp-pipe" | true
rc=${PIPESTATUS[0]}
if [ -z "$(find "$TMP/insp-pipe" -name '*.tmp.*' 2>/dev/null)" ] &&
   { { [ "$rc" = 141 ] && [ ! -e "$TMP/insp-pipe/routing.svg" ]; } || { [ "$rc" = 0 ] && grep -q '</svg>' "$TMP/insp-pipe/routing.svg"; }; }; then
    pass "inspect into a closed pipe: exit $rc, no temporary file left"
else fail "inspect into a closed pipe" "exit $rc: $(ls "$TMP/insp-pipe" 2>&1 | tr '\n' ' ')"; fi
if ! "$REMI" inspect --model-file "$TMP/tiny-dnn-t2/model.bin" --data expected/tiny --name tiny --out "$TMP/insp-x" >"$TMP/insp.log" 2>&1 &&
   grep -q "no routing matrix" "$TMP/insp.log"; then pass "inspect refuses a single-vector model"
else fail "inspect dnn" "$(head -c 200 "$TMP/insp.log")"; fi
"$REMI" train --data expected/tiny --name tiny --len 1 --iters 20 --eval-every 20 --out "$TMP/len1" >/dev/null 2>&1
"$REMI" inspect --model-file "$TMP/len1/model.bin" --data expected/tiny --name tiny --out "$TMP/len1" >"$TMP/insp1.log" 2>&1
if grep -q "no collapse statistics" "$TMP/insp1.log" && ! grep -qi "nan" "$TMP/insp1.log"; then
    pass "inspect on a --len 1 model: no user with 2 items, said so (no NaN)"
else fail "inspect --len 1" "$(head -c 200 "$TMP/insp1.log")"; fi

# ---------------------------------------------------------------- report over runs
# two seeds of one setting make one row whose Recall@50 is their mean; full softmax its own row
"$REMI" report "$TMP/tiny-sa-t2" "$TMP/tiny-seed8" "$TMP/full" --negatives-svg "$TMP/neg.svg" >"$TMP/report.md" 2>&1
want=$(awk -F'"recall":' '/"final":"test".*"topn":50/ { split($2, a, ","); s += a[1]; n++ } END { if (n == 2) printf "%.4f", s / n }' \
       "$TMP/tiny-sa-t2/metrics.jsonl" "$TMP/tiny-seed8/metrics.jsonl")
got=$(awk -F'|' '$3 ~ /^ sa $/ && $7 ~ /^ 2 $/ { split($12, a, " "); print a[1] }' "$TMP/report.md")
if [ -n "$want" ] && [ "$got" = "$want" ] && grep -q "all (full softmax)" "$TMP/report.md" && grep -q "<polyline" "$TMP/neg.svg"; then
    pass "report: 2 seeds in one row (Recall@50 mean $got), full softmax apart, negatives figure"
else fail "report" "mean R@50 want '$want' got '$got': $(head -c 300 "$TMP/report.md")"; fi
# the figure's points lie inside its plot with a single M; Pop (no negatives) is not drawn; another
# lambda is a line of its own
"$REMI" report "$TMP/tiny-sa-t2" "$TMP/tiny-pop-t2" "$TMP/tiny-norr" --negatives-svg "$TMP/neg1.svg" >/dev/null 2>&1
out=$(awk -F'"' '/<circle/ { if ($2 < 70 || $2 > 590) print "cx " $2 }' "$TMP/neg1.svg")
if [ -z "$out" ] && [ "$(grep -c '<circle' "$TMP/neg1.svg")" = 2 ] && ! grep -q ">pop" "$TMP/neg1.svg" &&
   grep -q "lambda 0<" "$TMP/neg1.svg"; then pass "report --negatives-svg: one M drawn inside the plot, Pop left out, lambdas apart"
else fail "negatives figure, one M" "$out; $(grep -c '<circle' "$TMP/neg1.svg") points; $(grep -o '>[a-z][^<]*<' "$TMP/neg1.svg" | tr '\n' ' ')"; fi
# Pop, left out, sets neither scale nor legend: beside a Pop run of another --neg, a single M
# stays in the middle, and Pop's lambda (0) asks for no lambda in the legend
"$REMI" train "${TINY[@]}" --model pop --neg 64 --out "$TMP/pop-m64" >/dev/null 2>&1
"$REMI" report "$TMP/tiny-sa-t2" "$TMP/pop-m64" --negatives-svg "$TMP/neg2.svg" >/dev/null 2>&1
out=$(awk -F'"' '/<circle/ { if ($2 <= 70 || $2 >= 590) print "cx " $2 }' "$TMP/neg2.svg")
if [ -z "$out" ] && [ "$(grep -c '<circle' "$TMP/neg2.svg")" = 1 ] && ! grep -q "lambda" "$TMP/neg2.svg"; then
    pass "report --negatives-svg: Pop of another M sets neither the scales nor the legend"
else fail "negatives figure beside Pop" "$out; $(grep -o '>[a-z][^<]*<' "$TMP/neg2.svg" | tr '\n' ' ')"; fi
# runs that differ in another setting than the seed are separate rows, which say how they differ; a run given twice is refused
"$REMI" train --data expected/tiny --name tiny --iters 40 --eval-every 20 --batch 16 --neg 64 --hidden 8 --out "$TMP/rep-d8" >/dev/null 2>&1
"$REMI" train --data expected/tiny --name tiny --iters 40 --eval-every 20 --batch 16 --neg 64 --hidden 12 --out "$TMP/rep-d12" >/dev/null 2>&1
# and in the negatives figure, lines whose legends name that setting
"$REMI" report "$TMP/rep-d8" "$TMP/rep-d12" --negatives-svg "$TMP/neg-d.svg" >/dev/null 2>&1
if grep -q ">sa, IHN, D 8<" "$TMP/neg-d.svg" && grep -q ">sa, IHN, D 12<" "$TMP/neg-d.svg"; then
    pass "report --negatives-svg: lines of another D named by it"
else fail "negatives figure legends" "$(grep -o '>[a-z][^<]*<' "$TMP/neg-d.svg" | tr '\n' ' ')"; fi
"$REMI" report "$TMP/rep-d8" "$TMP/rep-d12" >"$TMP/report2.md" 2>&1
if [ "$(grep -c '^| tiny | sa, D 8 | .* | 1 |' "$TMP/report2.md")" = 1 ] && [ "$(grep -c '^| tiny | sa, D 12 | .* | 1 |' "$TMP/report2.md")" = 1 ] &&
   ! "$REMI" report "$TMP/rep-d8" "$TMP/rep-d8" >"$TMP/report3.md" 2>&1 && grep -q "same setting and seed" "$TMP/report3.md"; then
    pass "report: runs with another D are rows of their own, marked D 8 / D 12; a run given twice is refused"
else fail "report: settings" "$(head -c 300 "$TMP/report2.md") / $(head -c 200 "$TMP/report3.md")"; fi
# a damaged metrics file is refused with its line: junk, a NaN or out-of-range value, another cut-off, a second config
bad_metrics() { # WHAT LINE SED-SCRIPT
    mkdir -p "$TMP/badm"; sed "$3" "$TMP/tiny-sa-t2/metrics.jsonl" >"$TMP/badm/metrics.jsonl"
    if ! "$REMI" report "$TMP/badm" >"$TMP/badm.log" 2>&1 && grep -q "metrics.jsonl:$2: " "$TMP/badm.log"; then
        pass "report refuses a metrics file with $1 ($(cut -c1-60 "$TMP/badm.log" | sed 's/.*metrics.jsonl//'))"
    else fail "report: $1" "$(head -c 200 "$TMP/badm.log")"; fi
}
nm=$(wc -l <"$TMP/tiny-sa-t2/metrics.jsonl")
bad_metrics "a junk line" 3 '3i hello'
bad_metrics "recall NaN" "$nm" '$s/"recall":[0-9.]*/"recall":nan/'
bad_metrics "hit rate 1.5" "$nm" '$s/"hitrate":[0-9.]*/"hitrate":1.5/'
bad_metrics "a final line at N = 30" "$nm" '$s/"topn":50/"topn":30/'
bad_metrics "a second config line" 2 '1p'
bad_metrics "an empty line" 3 '3i\\'
bad_metrics "NDCG infinite" "$nm" '$s/"ndcg":[0-9.]*/"ndcg":inf/'
bad_metrics "best_iter 2.5" "$nm" '$s/"best_iter":[0-9]*/"best_iter":2.5/'
bad_metrics "the two test lines swapped" "$((nm - 1))" "$((nm - 1)){h;d};\${G}"
bad_metrics "a third final test line" "$((nm + 1))" '$p'
bad_metrics "the last line cut short" "$nm" '$s/.\{30\}$//'
bad_metrics "iter NaN" 2 '2s/"iter":[0-9]*/"iter":nan/'
bad_metrics "rbeta NaN" 1 '1s/"rbeta":[0-9.]*/"rbeta":nan/'
# a dataset's name in the figure's legend is escaped as SVG text
mkdir -p "$TMP/svgname"; sed '1s/"name":"[^"]*"/"name":"a\&b<c>"/' "$TMP/tiny-sa-t2/metrics.jsonl" >"$TMP/svgname/metrics.jsonl"
"$REMI" report "$TMP/svgname" "$TMP/tiny-sa-t2" --negatives-svg "$TMP/neg-n.svg" >/dev/null 2>&1
if grep -q ">a&amp;b&lt;c&gt;: sa, IHN<" "$TMP/neg-n.svg" && ! grep -q "a&b" "$TMP/neg-n.svg"; then
    pass "report --negatives-svg: a name with & and < escaped in the legend"
else fail "negatives figure, escaped name" "$(grep -o 'fill="#[^"]*">[^<]*' "$TMP/neg-n.svg" | head -3 | tr '\n' ' ')"; fi
bad_metrics "an empty string for iter" 2 '2s/"iter":[0-9]*/"iter":""/'
bad_metrics "an empty string for rbeta" 1 '1s/"rbeta":[0-9.]*/"rbeta":""/'
# names holding a quote or a backslash (escaped in the config line) are read back whole: two rows
mkdir -p "$TMP/repq1" "$TMP/repq2"
sed '1s/"name":"[^"]*"/"name":"q\\"1"/' "$TMP/tiny-sa-t2/metrics.jsonl" >"$TMP/repq1/metrics.jsonl"
sed '1s/"name":"[^"]*"/"name":"q\\\\2"/' "$TMP/tiny-sa-t2/metrics.jsonl" >"$TMP/repq2/metrics.jsonl"
"$REMI" report "$TMP/repq1" "$TMP/repq2" >"$TMP/reportq.md" 2>&1
if grep -qF '| q"1 | sa |' "$TMP/reportq.md" && grep -qF '| q\2 | sa |' "$TMP/reportq.md"; then
    pass "report reads names with a quote or a backslash back whole (q\"1, q\\2: two rows)"
else fail "report: escaped names" "$(head -c 300 "$TMP/reportq.md")"; fi
# output that cannot be written is an error: a full standard output, an SVG's missing folder before the table
if ! "$REMI" report "$TMP/tiny-sa-t2" >/dev/full 2>"$TMP/full.log" && grep -q "error writing standard output" "$TMP/full.log" &&
   ! "$REMI" eval --help >/dev/full 2>/dev/null && ! "$REMI" --help >/dev/full 2>/dev/null &&
   ! "$REMI" report --negatives-svg "$TMP/nofolder/n.svg" "$TMP/tiny-sa-t2" >"$TMP/svgdir.md" 2>&1 &&
   grep -q "cannot write to folder $TMP/nofolder" "$TMP/svgdir.md" && ! grep -q '^| tiny' "$TMP/svgdir.md"; then
    pass "report: a full standard output exits 1; --negatives-svg in a missing folder refused before the table"
else fail "report: unwritable output" "$(cat "$TMP/full.log") / $(head -c 200 "$TMP/svgdir.md")"; fi
# runs with another step budget are rows of their own (the config line records iters, eval_every, patience, topn);
# --mind-eval on SA runs with a note and is recorded as the default; only unfinished runs: an error, no table
"$REMI" train "${TINY[@]}" ${MODEL_ARGS[sa]} --iters 200 --seed 9 --mind-eval fixed -t 2 --out "$TMP/rep-i200" >"$TMP/rep-i200.log" 2>&1
"$REMI" report "$TMP/tiny-sa-t2" "$TMP/rep-i200" >"$TMP/report4.md" 2>&1
mkdir -p "$TMP/rep-unfinished"; head -n 2 "$TMP/tiny-sa-t2/metrics.jsonl" >"$TMP/rep-unfinished/metrics.jsonl"
if [ "$(grep -c '^| tiny | sa, iters 200 |' "$TMP/report4.md")" = 1 ] && [ "$(grep -c '^| tiny | sa, iters 300 |' "$TMP/report4.md")" = 1 ] &&
   grep -q "note: --mind-eval has no effect" "$TMP/rep-i200.log" && grep -q '"mind_eval":"fresh"' "$TMP/rep-i200/metrics.jsonl" &&
   ! "$REMI" report "$TMP/rep-unfinished" >"$TMP/report5.md" 2>&1 && grep -q "none of the 1 run(s) has finished" "$TMP/report5.md"; then
    pass "report: another --iters is a row of its own; --mind-eval on SA a note; only unfinished runs refused"
else fail "report: iters / unfinished" "$(head -c 300 "$TMP/report4.md") / $(head -c 200 "$TMP/report5.md")"; fi

# ---------------------------------------------------------------- make reproduce
# The study's make target on the tiny slice: each run gets its config's flags (beta of the
# dataset for IHN, lambda 100 for RR), an interrupted run resumes from its checkpoint, the
# table has one row per config over both seeds, and a second make has nothing to do.
if command -v make >/dev/null; then
    ST=$TMP/study; SARGS=(RESULTS="$ST" STUDY_DATA=tiny SEEDS="1 2" CONFIGS="sa-base sa-ihn sa-remi dnn" BUDGET="--iters 100"
           COLLAPSE="sa-base sa-remi")
    # seed 2's sa-remi was stopped at step 60, as by Ctrl-C: make must resume it
    "$REMI" train --data expected/tiny --name tiny --len 8 --eval-every 50 --batch 16 --neg 64 --hidden 8 --model sa \
        --rbeta 1 --rlambda 100 --seed 2 --iters 100 -t 1 --stop-after 60 --out "$ST/study/tiny/sa-remi/2" >/dev/null 2>&1
    "$REMI" train --data expected/tiny --name tiny --len 8 --eval-every 50 --batch 16 --neg 64 --hidden 8 --model sa \
        --rbeta 1 --rlambda 100 --seed 2 --iters 100 -t 1 --out "$TMP/study-straight" >/dev/null 2>&1
    make -s "${KEEP[@]}" "${SARGS[@]}" "$ST/tiny.md" "$ST/tiny-collapse.md" >"$TMP/reproduce.log" 2>&1; rc=$?
    why=""
    [ $rc -eq 0 ] || why="make exit status $rc: $(tail -n 2 "$TMP/reproduce.log")"
    for want in "sa-base 0 0 sa" "sa-ihn 1 0 sa" "sa-remi 1 100 sa" "dnn 0 0 dnn"; do
        set -- $want
        for seed in 1 2; do
            grep -q "\"model\":\"$4\".*\"rbeta\":$2,\"rlambda\":$3,.*\"seed\":$seed," "$ST/study/tiny/$1/$seed/metrics.jsonl" 2>/dev/null ||
                why="$why; $1/$seed has other settings"
        done
    done
    grep -q "resumed from .*sa-remi/2/checkpoint.bin at iteration 60" "$ST/study/tiny/sa-remi/2/train.log" 2>/dev/null || why="$why; sa-remi/2 not resumed"
    cmp -s <(grep final "$ST/study/tiny/sa-remi/2/metrics.jsonl") <(grep final "$TMP/study-straight/metrics.jsonl") ||
        why="$why; the resumed run's metrics differ from a straight run's"
    rows=$(grep -c "^| tiny | .* | 2 | " "$ST/tiny.md" 2>/dev/null)
    [ "$rows" = 4 ] || why="$why; table has $rows rows over 2 seeds, not 4"
    rows=$(grep -c "^| tiny | sa-[a-z]* | [0-9.]*% | 0\.[0-9]* | [01]\.[0-9]* |$" "$ST/tiny-collapse.md" 2>/dev/null)
    [ "$rows" = 2 ] || why="$why; collapse table has $rows rows, not 2"
    make -q "${KEEP[@]}" "${SARGS[@]}" "$ST/tiny.md" "$ST/tiny-collapse.md" || why="$why; a second make would run again"
    if [ -z "$why" ]; then pass "make reproduce: flags per config, resume after an interrupt, 4 rows over 2 seeds, collapse table, up to date"
    else fail "make reproduce" "${why#; }"; fi
    # a run reached through a pattern rule alone (a routing figure's) keeps its log, the mark that
    # it finished, when make ends (the figure's inspect then fails: the tiny model is not Beauty's)
    RR=$TMP/routing/beauty/routing-rr; mkdir -p "$RR"; cp "$ST/study/tiny/sa-remi/2/checkpoint.bin" "$RR/"
    make -s "${KEEP[@]}" RESULTS="$TMP/routing" "$TMP/routing/routing-rr.svg" >"$TMP/routing.log" 2>&1
    if grep -q "the run had finished" "$RR/train.log" 2>/dev/null; then pass "make keeps the log of a routing figure's run"
    else fail "make keeps a routing run's log" "$(tail -n 2 "$TMP/routing.log")"; fi
else echo "skip  make reproduce (no make)"; fi

# ---------------------------------------------------------------- recorded results
# expected/results holds the metrics.jsonl of every run the README's result tables quote and
# the tables themselves: make's table rules (remi report) must give them back byte for byte
# from the runs, and the README must quote every line of them.
if command -v make >/dev/null; then
    cp -r expected/results "$TMP/results"
    tables=$(cd expected/results && ls *.md | grep -v collapse) # collapse tables and routing figures need the models
    for run in $(find "$TMP/results" -name metrics.jsonl); do touch "$(dirname "$run")/train.log"; done # recorded = finished
    rm -f "$TMP"/results/*.md "$TMP"/results/*.svg
    make -s "${KEEP[@]}" RESULTS="$TMP/results" $(for t in $tables; do echo "$TMP/results/$t"; done) >"$TMP/tables.log" 2>&1
    why=""
    for f in $tables beauty-negatives.svg; do
        cmp -s "expected/results/$f" "$TMP/results/$f" || why="$why $f differs;"
    done
    for t in $tables; do
        missing=$(grep '^| [a-z]' "expected/results/$t" | while IFS= read -r line; do grep -qxF -- "$line" README.md || echo x; done | wc -l)
        [ "$missing" = 0 ] || why="$why README lacks $missing rows of $t;"
    done
    if [ -z "$why" ]; then pass "recorded results: $(echo $tables | wc -w) tables regenerate from their runs; the README quotes them"
    else fail "recorded results" "$why $(tail -n 2 "$TMP/tables.log")"; fi
else echo "skip  recorded results (no make)"; fi

# ---------------------------------------------------------------- terminal output
# a live progress line on a terminal (util-linux script gives one), plain lines otherwise
if command -v script >/dev/null; then
    script -qec "$REMI train ${TINY[*]} --iters 1500 --eval-every 1500 --out $TMP/tty" /dev/null >"$TMP/tty.log" 2>&1
    if grep -q $'\r  iter [0-9]* *[0-9]* it/s  loss' "$TMP/tty.log" && ! grep -q $'\r' "$TMP/tiny-sa-t2.log"; then
        pass "progress line on a terminal, none in a log file"
    else fail "progress line" "$(tr '\r' '|' <"$TMP/tty.log" | head -c 300)"; fi
fi
# out of memory: the size asked for and what to lower, nothing left behind
if ! "$REMI" train "${TINY[@]}" --hidden 4096 --len 10000 --eval-batch 65536 --out "$TMP/oom" >"$TMP/oom.log" 2>&1 &&
   grep -q "out of memory allocating .*lower --batch" "$TMP/oom.log" && [ ! -e "$TMP/oom/checkpoint.bin" ]; then
    pass "out of memory: $(head -c 100 "$TMP/oom.log")"; else fail "out of memory" "$(head -c 200 "$TMP/oom.log")"; fi

# ---------------------------------------------------------------- bad input to train
# bad_split CASE LINE CONTENT-OF-VALID: must exit non-zero, name file:line and the text,
# and leave nothing in --out.
bad_split() {
    local case=$1 line=$2 content=$3 d=$TMP/bad-$1
    mkdir -p "$d"; cp expected/tiny/tiny_train.txt expected/tiny/tiny_test.txt "$d/"
    printf '%b' "$content" >"$d/tiny_valid.txt"
    if "$REMI" train --data "$d" --name tiny --out "$d/out" >"$d/log" 2>&1; then fail "bad input: $case" "exit 0"; return; fi
    local want="$d/tiny_valid.txt"; [ -n "$line" ] && want="$want:$line:"
    if ! grep -qF -- "$want" "$d/log"; then fail "bad input: $case" "message lacks '$want': $(head -c 200 "$d/log")"; return; fi
    if [ -e "$d/out" ]; then fail "bad input: $case" "left $d/out behind"; return; fi
    pass "bad input: $case ($(head -c 90 "$d/log" | tr '\n' ' '))"
}
# a dataset of one item (prep --min 2 keeps it): refused plainly, not with advice no --topn can follow
d=$TMP/one-item; mkdir -p "$d"; for u in $(seq 10); do printf 'u%d\ti1\nu%d\ti1\n' $u $u; done >"$d/raw.txt"
"$REMI" prep --input "$d/raw.txt" --name one --min 2 --out "$d" >/dev/null 2>&1
if ! "$REMI" train --data "$d" --name one --batch 4 --out "$d/out" >"$d/log" 2>&1 && grep -q "has 1 item: a model that ranks items needs 2" "$d/log" &&
   [ ! -e "$d/out" ]; then pass "a dataset of one item refused ($(head -c 60 "$d/log"))"
else fail "one-item dataset" "$(head -c 200 "$d/log")"; fi
bad_split "malformed line" 2 '20892,43,0,1\n20892,10\n20892,5,2,3\n'
bad_split "non-numeric id" 2 '20892,43,0,1\n20892,x12,1,2\n'
bad_split "item id out of range" 2 '20892,43,0,1\n20892,0,1,2\n'
bad_split "negative item id" 1 '20892,-3,0,1\n20892,5,1,2\n'
bad_split "comma after the fourth field" 2 '20892,43,0,1\n20892,5,1,2,\n'
bad_split "overflowing id" 1 '20892,99999999999999999999999,0,1\n'
bad_split "last line cut short (3 fields after 4)" 3 '20892,43,0,1\n20892,5,1,2\n20892,7,2\n'
bad_split "one-item user" 3 '20892,43,0,1\n20892,5,1,2\n20893,7,0,1\n'
bad_split "empty file" "" ''
bad_split "binary garbage" 1 '\x01\x02\x00\x7f\n'
bad_split "UTF-8 byte-order mark" 1 '\xef\xbb\xbf20892,43,0,1\n20892,5,1,2\n'
bad_split "a byte-order mark inside the file" 2 '20892,43,0,1\n\xef\xbb\xbf20892,5,1,2\n'
if grep -qF 'got "\uFEFF20892,5,1,2"' "$TMP/bad-a byte-order mark inside the file/log"; then
    pass "an invisible character in a bad line is shown escaped (\\uFEFF)"
else fail "invisible character escaped" "$(head -c 200 "$TMP/bad-a byte-order mark inside the file/log")"; fi
bad_split "empty line" 2 '20892,43,0,1\n\n20892,5,1,2\n'
bad_split "very long line" 2 "20892,43,0,1\n20892,5,1,$(printf '7%.0s' $(seq 100000))\n"
# a folder's file set is replaced and read whole by two processes at once: prep waits while a
# reader holds the folder's lock (.remi-commit.lock, shared), and a reader while a writer holds it
if command -v flock >/dev/null; then
    d=$TMP/setlock; pa=(--input expected/prep/a_pairs_time.csv --name a --sep comma --header --time-col 3 --out "$d")
    "$REMI" prep "${pa[@]}" --seed 1 >/dev/null 2>&1; cp -r "$d" "$TMP/setlock-1"
    held() { rm -f "$TMP/held"; flock "$1" "$d/.remi-commit.lock" -c "touch $TMP/held; sleep 3" & holder=$!
             for _ in $(seq 500); do [ -e "$TMP/held" ] && break; sleep 0.01; done; }
    held -s; "$REMI" prep "${pa[@]}" --seed 2 >/dev/null 2>&1 & writer=$!
    sleep 1; waited=$(for f in "$TMP"/setlock-1/a_*.txt; do cmp -s "$f" "$d/${f##*/}" || echo no; done); wait $holder $writer
    replaced=$(diff -q "$TMP/setlock-1/a_train.txt" "$d/a_train.txt" >/dev/null || echo yes)
    held -x; "$REMI" train --data "$d" --name a --topn 5 --batch 2 --iters 1 --eval-every 1 --out "$TMP/setlock-run" >"$TMP/setlock.log" 2>&1 &
    reader=$!; sleep 1; read_early=$(grep -c "^remi train" "$TMP/setlock.log"); wait $holder $reader
    if [ -z "$waited" ] && [ "$replaced" = yes ] && [ "$read_early" = 0 ] && grep -q "^remi train" "$TMP/setlock.log"; then
        pass "prep waits for a reader of its folder, and a reader for a writer (.remi-commit.lock)"
    else fail "set lock" "files replaced while a reader held the lock: '$waited', replaced after: '$replaced', reader started early: $read_early"; fi
else echo "skip  set lock (no flock command)"; fi
# an --out folder that takes no files is refused before the run starts, by name (made read-only
# with chmod, or as root, who passes permissions, by a read-only mount where one is allowed)
d=$TMP/ro-out; mkdir -p "$d"; chmod 555 "$d"; mounted=0
[ "$(id -u)" = 0 ] && mount -t tmpfs -o ro tmpfs "$d" 2>/dev/null && mounted=1
if [ "$(id -u)" != 0 ] || [ $mounted = 1 ]; then
    "$REMI" train --data expected/tiny --name tiny --out "$d" --iters 10 >"$TMP/ro.log" 2>&1; rc=$?
    if [ $rc = 1 ] && grep -qF "cannot write to folder $d" "$TMP/ro.log" && ! grep -q "^remi train" "$TMP/ro.log"; then
        pass "read-only --out: $(head -c 90 "$TMP/ro.log")"
    else fail "read-only --out" "exit $rc: $(head -c 200 "$TMP/ro.log")"; fi
    why=""
    for cmd in export inspect; do # refused before their work too
        "$REMI" $cmd --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny --out "$d" >"$TMP/ro.log" 2>&1
        [ $? = 1 ] && grep -qF "cannot write to folder $d" "$TMP/ro.log" && ! grep -q "^collapsed\|^user" "$TMP/ro.log" ||
            why="$why $cmd: $(head -c 100 "$TMP/ro.log")"
    done
    if [ -z "$why" ]; then pass "read-only --out of export and inspect refused before their work"; else fail "read-only --out, export / inspect" "$why"; fi
else echo "skip  read-only --out (root, and no read-only mount allowed)"; fi
[ $mounted = 1 ] && umount "$d"; chmod 755 "$d"
# users in two splits (a valid file that is the train file): a note names both files and the count
d=$TMP/overlap; mkdir -p "$d"; cp expected/tiny/tiny_train.txt expected/tiny/tiny_test.txt "$d/"; cp expected/tiny/tiny_train.txt "$d/tiny_valid.txt"
if "$REMI" train --data "$d" --name tiny --iters 1 --eval-every 1 --out "$d/out" >"$d/log" 2>&1 &&
   grep -qF "note: 600 users of $d/tiny_valid.txt are also in $d/tiny_train.txt" "$d/log" && ! grep -q "tiny_test.txt are" "$d/log"; then
    pass "users in two splits: a note with their number"
else fail "users in two splits" "$(grep note "$d/log" | head -c 200)"; fi
# CRLF line endings read the same as LF
d=$TMP/crlf; mkdir -p "$d"; cp expected/tiny/tiny_*.txt "$d/"; sed -i 's/$/\r/' "$d/tiny_test.txt"
"$REMI" eval --model-file "$TMP/tiny-sa-t2/model.bin" --data "$d" --name tiny >"$d/crlf.log" 2>&1
"$REMI" eval --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny >"$d/lf.log" 2>&1
if grep -q '^test' "$d/lf.log" && cmp -s "$d/crlf.log" "$d/lf.log"; then pass "CRLF split file: the same metrics as LF"
else fail "CRLF split file" "$(head -c 200 "$d/crlf.log")"; fi
# lines in any order: each user's items are sorted by time (REMI-SPEC b), so split files with
# the even lines first and then the odd ones (every user's items out of order) give the same
# evaluation and train the same model
d=$TMP/shuffled; mkdir -p "$d"
for f in expected/tiny/tiny_*.txt; do { awk 'NR % 2 == 0' "$f"; awk 'NR % 2 == 1' "$f"; } >"$d/$(basename "$f")"; done
"$REMI" eval --model-file "$TMP/tiny-sa-t2/model.bin" --data "$d" --name tiny >"$d/eval.log" 2>&1
"$REMI" train "${TINY[@]}" --data "$d" --iters 100 -t 2 --out "$d/run" >"$d/train.log" 2>&1 # as hits-none, above
if ! cmp -s "$d/tiny_test.txt" expected/tiny/tiny_test.txt && cmp -s "$d/eval.log" "$TMP/crlf/lf.log" &&
   grep -q "^remi train: $d/tiny " "$d/train.log" && cmp -s "$d/run/model.bin" "$TMP/hits-none/model.bin"; then
    pass "split files with every user's lines out of order: the same metrics and the same model"
else fail "split files out of order" "$(head -c 200 "$d/eval.log") $(tail -n 1 "$d/train.log")"; fi
# every negative of a row removed (--neg 1 --remove-hits target: the one negative is often the
# target): that row's loss is the target's alone, and the run stays finite
if "$REMI" train "${TINY[@]}" --neg 1 --remove-hits target -t 2 --out "$TMP/neg1" >"$TMP/neg1.log" 2>&1 &&
   grep -q '^test .*N=50' "$TMP/neg1.log"; then pass "--neg 1 --remove-hits target (rows with no negative left): trains, finite"
else fail "rows with no negative left" "$(tail -n 2 "$TMP/neg1.log")"; fi
d=$TMP/bad-missing; mkdir -p "$d"
if "$REMI" train --data "$d" --name nosuch --out "$d/out" >"$d/log" 2>&1; then fail "bad input: missing file" "exit 0"
elif grep -q "nosuch_train.txt" "$d/log" && grep -q "remi prep" "$d/log" && [ ! -e "$d/out" ]; then pass "bad input: missing file says what to run"
else fail "bad input: missing file" "$(cat "$d/log")"; fi
# a directory where a file belongs
d=$TMP/bad-dir; mkdir -p "$d/tiny_valid.txt"; cp expected/tiny/tiny_train.txt expected/tiny/tiny_test.txt "$d/"
if ! "$REMI" train --data "$d" --name tiny --out "$d/out" >"$d/log" 2>&1 && grep -q "tiny_valid.txt: is a directory" "$d/log"; then
    pass "bad input: a directory given as a file"; else fail "bad input: directory" "$(head -c 200 "$d/log")"; fi
# items beyond the item map
d=$TMP/bad-map; mkdir -p "$d"; cp expected/tiny/tiny_*.txt "$d/"; printf '1,1\n2,2\n' >"$d/tiny_item_map.txt"
if ! "$REMI" train --data "$d" --name tiny --out "$d/out" >"$d/log" 2>&1 && grep -q "out of range 1..2" "$d/log"; then
    pass "bad input: item id beyond the item map"
else fail "bad input: item map range" "$(head -c 200 "$d/log")"; fi
# an output folder whose files' paths would not fit is refused before anything is created
long=$TMP/long/$(printf 'd%.0s' $(seq 200))$(for i in $(seq 19); do printf '/%0200d' 0; done)
if ! "$REMI" train --data expected/tiny --name tiny --iters 10 --eval-every 10 --out "$long" >"$TMP/long.log" 2>&1 &&
   grep -q "output folder path too long" "$TMP/long.log" && [ ! -e "$TMP/long" ]; then pass "an --out path too long: refused, nothing created"
else fail "long --out" "$(head -c 200 "$TMP/long.log")"; fi
# a data path whose file names would not fit is refused, where a cut path would open another file
mkdir -p "$TMP/cut"; cp expected/tiny/tiny_train.txt "$TMP/cut/d_"
if ! "$REMI" train --data "$(printf './%.0s' $(seq 2045))$TMP/cut" --name d --iters 1 --out "$TMP/cut/o" >"$TMP/cut.log" 2>&1 &&
   grep -q "path too long" "$TMP/cut.log"; then pass "a --data path too long for its file names: refused"
else fail "long --data" "$(head -c 200 "$TMP/cut.log")"; fi
# without an item map, N comes from the largest id: a stray large id is pointed out (and the run goes on)
d2=$TMP/stray-id; mkdir -p "$d2"; cp expected/tiny/tiny_*.txt "$d2/"; printf '99999,20000,0,1\n99999,5,1,2\n' >>"$d2/tiny_train.txt"
if "$REMI" train --data "$d2" --name tiny --iters 1 --eval-every 1 --out "$d2/out" >"$d2/log" 2>&1 &&
   grep -q "N = 20001 (the largest item id + 1), but only 401 distinct items" "$d2/log"; then
    pass "no item map: a stray large item id is pointed out"
else fail "stray item id" "$(head -c 200 "$d2/log")"; fi
# an item map is checked line by line: a blank line, an item twice, an empty map
bad_map() { # WHAT WANT: train on $d, whose item map is bad, must fail saying WANT and write nothing
    if ! "$REMI" train --data "$d" --name tiny --out "$d/out" >"$d/log" 2>&1 && grep -qF "$2" "$d/log" && [ ! -e "$d/out" ]; then
        pass "bad input: item map, $1 ($(head -c 90 "$d/log"))"
    else fail "bad input: item map, $1" "$(head -c 200 "$d/log")"; fi
}
seq 1 400 | awk '{print "r" $1 "," $1}' >"$d/good_map.txt"
{ cat "$d/good_map.txt"; echo; } >"$d/tiny_item_map.txt"; bad_map blank "tiny_item_map.txt:401: expected 'raw id,item'"
{ cat "$d/good_map.txt"; echo r9,9; } >"$d/tiny_item_map.txt"; bad_map twice "tiny_item_map.txt:401: item 9 appears twice"
: >"$d/tiny_item_map.txt"; bad_map empty "tiny_item_map.txt: empty file"
sed '17s/^r17,/r9,/' "$d/good_map.txt" >"$d/tiny_item_map.txt"; bad_map "a raw id twice" "tiny_item_map.txt:17: raw id \"r9\" is also on line 9"
tr '\n' '\r' <"$d/good_map.txt" >"$d/tiny_item_map.txt"; bad_map "CR line endings" "tiny_item_map.txt:1: the line holds a carriage return"
sed '5s/^r5//' "$d/good_map.txt" >"$d/tiny_item_map.txt"; bad_map "empty raw id" "tiny_item_map.txt:5: expected 'raw id,item' with a raw id"
{ printf 'r1\0x,1\n'; sed 1d "$d/good_map.txt"; } >"$d/tiny_item_map.txt"; bad_map "NUL byte" "tiny_item_map.txt:1: the line holds a NUL byte"
rm -f "$d/tiny_item_map.txt"; mkfifo "$d/tiny_item_map.txt"; { cat "$d/good_map.txt"; echo r9,9; } >"$d/tiny_item_map.txt" &
bad_map "from a pipe, checked too" "tiny_item_map.txt:401: item 9 appears twice"; kill $! 2>/dev/null; wait $! 2>/dev/null; rm -f "$d/tiny_item_map.txt"
sed 's/$/\r/' "$d/good_map.txt" >"$d/tiny_item_map.txt" # CRLF line endings are a map's too
if "$REMI" train --data "$d" --name tiny --iters 1 --eval-every 1 --out "$d/crlf" >"$d/log" 2>&1; then pass "item map with CRLF line endings read"
else fail "item map, CRLF" "$(head -c 200 "$d/log")"; fi
for flag in "--model gru4rec --dropout 0.99" "--lr 1e-12"; do # a float flag at its bound is in range
    if "$REMI" train --data expected/tiny --name tiny --iters 1 --eval-every 1 $flag --out "$TMP/bound" >"$TMP/bound.log" 2>&1
    then pass "flag at its bound accepted: $flag"; else fail "flag at its bound: $flag" "$(head -c 200 "$TMP/bound.log")"; fi
done
for flag in "--interests 0" "--hidden 0" "--lr -1" "--batch x" "--bogus 1" "--model bert" "--model dnn --rlambda 5" \
            "--model pop --rbeta 1" "--model sa --relu" "--model gru4rec --dropout 1" "--model sa --dropout 0.5" \
            "--mind-eval sometimes" "--lr 0x1p-10" "--batch 0x10" \
            "--remove-hits all" "--neg 0 --rbeta 0 --remove-hits target" "--model pop --remove-hits target"; do
    if ! "$REMI" train $flag --out "$TMP/flag-out" >"$TMP/flag.log" 2>&1 && [ ! -e "$TMP/flag-out" ]; then
        pass "bad flag: $flag ($(head -c 70 "$TMP/flag.log"))"
    else fail "bad flag: $flag" "accepted"; fi
done
# a flag the model takes nothing from is run with a note (a sweep gives every model one set of flags)
if "$REMI" train --data expected/tiny --name tiny --model pop --interests 8 --lr 0.01 --hidden 32 --len 5 --neg 10 --adam lazy \
       --iters 1 --eval-every 1 --out "$TMP/note" >"$TMP/note.log" 2>&1 &&
   grep -q "note: --interests has no effect: --model pop has one user vector" "$TMP/note.log" &&
   [ "$(grep -c "note: --\(hidden\|len\|lr\|neg\|adam\) has no effect: --model pop counts the training targets" "$TMP/note.log")" = 5 ] &&
   grep -q "model pop  B 128  seed" "$TMP/note.log" && ! grep -q " lr " "$TMP/note.log" &&
   "$REMI" train --data expected/tiny --name tiny --interests 8 --iters 1 --eval-every 1 --out "$TMP/note2" >"$TMP/note2.log" 2>&1 &&
   ! grep -q "note:" "$TMP/note2.log"; then pass "flags a model ignores (--interests, --hidden, --len, --lr, --neg, --adam with pop): run, with a note each, and not in its startup line; none for SA"
else fail "notes on ignored flags" "$(grep note "$TMP/note.log" | head -c 200)"; fi
# a model larger than the machine's memory (DR's position weights: L K D^2, 42e9 floats) is refused before
# anything is reserved or written, where the overcommitted allocation would be killed while it trains
if ! "$REMI" train --model dr --len 10000 --hidden 1024 --out "$TMP/huge" >"$TMP/huge.log" 2>&1 &&
   grep -q "the model's parameters (N = 17042 items) need 167.8 GB, more than this machine's" "$TMP/huge.log" && [ ! -e "$TMP/huge" ]; then
    pass "a model beyond the machine's memory refused, naming the flags to lower"
else fail "model beyond memory" "$(head -c 200 "$TMP/huge.log")"; fi
# parameters that fit (3/10 of the memory) but not with their gradient, Adam's moments and the
# activations: train and bench refuse before writing them, and bench before measuring anything
if mem=$(( $(getconf _PHYS_PAGES) * $(getconf PAGE_SIZE) )) && [ "$mem" -gt 0 ]; then
    Lfit=$(( mem * 3 / 10 / (4 * 1024 * 1024 * 4) )) # DR's position weights: L K D^2 floats, K 4, D 1024
    fits="the parameters (N = 17042 items), their gradient, Adam's two moments and a batch's activations need"
    if ! "$REMI" train --model dr --hidden 1024 --len "$Lfit" --out "$TMP/fit" >"$TMP/fit.log" 2>&1 &&
       grep -q "$fits" "$TMP/fit.log" && [ ! -e "$TMP/fit" ] &&
       ! "$REMI" bench --model dr --hidden 1024 --len "$Lfit" --synthetic-items 0 >"$TMP/fitb.log" 2>&1 &&
       grep -q "$fits" "$TMP/fitb.log" && ! grep -q "ceilings" "$TMP/fitb.log"; then
        pass "training beyond the memory (parameters at 3/10 of it, --len $Lfit): train and bench refuse before writing anything"
    else fail "training beyond memory" "$(head -c 200 "$TMP/fit.log") | $(head -c 200 "$TMP/fitb.log")"; fi
fi
# a batch larger than the training users (600): refused, nothing written
if ! "$REMI" train --data expected/tiny --name tiny --batch 601 --out "$TMP/b601" >"$TMP/b601.log" 2>&1 &&
   grep -q "600 users, fewer than --batch 601" "$TMP/b601.log" && [ ! -e "$TMP/b601" ]; then
    pass "train --batch above the training users refused"; else fail "train --batch 601" "$(head -c 200 "$TMP/b601.log")"; fi
# --topn at the catalogue's size: every validation list would hold every item (recall 1), refused
if ! "$REMI" train --data expected/tiny --name tiny --topn 400 --out "$TMP/topn-all" >"$TMP/topn.log" 2>&1 &&
   grep -q -- "--topn 400: expected/tiny/tiny has 400 items" "$TMP/topn.log" && [ ! -e "$TMP/topn-all" ]; then
    pass "train --topn 400 on 400 items refused"; else fail "train --topn at the catalogue size" "$(head -c 200 "$TMP/topn.log")"; fi
# more flags than any fixed table: the 70th (--lr, after 68 others) is still refused by --resume
many=$(for _ in $(seq 68); do printf -- '-t 2 '; done)
# shellcheck disable=SC2086  # the repeated flags are meant to split
if ! "$REMI" train --resume "$TMP/resume-sa-150" $many --lr 0.5 >"$TMP/many.log" 2>&1 && grep -q -- "--lr cannot be changed" "$TMP/many.log"; then
    pass "--resume refuses --lr given after 68 other flags"; else fail "flags after the 64th" "$(head -c 200 "$TMP/many.log")"; fi
# -0 is recorded as 0 (one report row); --mind-eval on a model without draws, in eval too: a note;
# inspect --users with no row refused; a resume hint pastes as one word with a blank in the folder
"$REMI" train --data expected/tiny --name tiny --rbeta -0 --iters 1 --eval-every 1 --stop-after 1 --out "$TMP/sp ace" >"$TMP/misc.log" 2>&1
"$REMI" eval --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny --mind-eval fixed >"$TMP/misc2.log" 2>&1
if grep -q '"rbeta":0,' "$TMP/sp ace/metrics.jsonl" && grep -q "resume '$TMP/sp ace'\`" "$TMP/misc.log" &&
   grep -q "note: --mind-eval has no effect" "$TMP/misc2.log" &&
   ! "$REMI" inspect --model-file "$TMP/tiny-sa-t2/model.bin" --data expected/tiny --name tiny --users " " --out "$TMP/insp-none" >"$TMP/misc3.log" 2>&1 &&
   grep -q -- "--users: give at least one user row" "$TMP/misc3.log"; then
    pass "--rbeta -0 recorded as 0; eval's note on --mind-eval; inspect --users \" \" refused; resume hint quoted"
else fail "small flags" "$(tail -n 1 "$TMP/misc.log") / $(head -c 100 "$TMP/misc2.log") / $(head -c 100 "$TMP/misc3.log")"; fi
# report --negatives-svg with no file name, or a folder: refused before the table is printed;
# --stop-after past --iters: a note
"$REMI" report --negatives-svg "" "$TMP/tiny-sa-t2" >"$TMP/rsvg.out" 2>"$TMP/rsvg.err"; rc1=$?
"$REMI" report --negatives-svg "$TMP" "$TMP/tiny-sa-t2" >>"$TMP/rsvg.out" 2>>"$TMP/rsvg.err"; rc2=$?
"$REMI" train --data expected/tiny --name tiny --iters 10 --eval-every 10 --stop-after 20 --out "$TMP/sa20" >"$TMP/sa20.log" 2>&1
if [ $rc1 = 1 ] && [ $rc2 = 1 ] && [ ! -s "$TMP/rsvg.out" ] && [ "$(grep -c "give a file name" "$TMP/rsvg.err")" = 2 ] &&
   grep -q "note: --stop-after 20 has no effect: the run ends at --iters 10" "$TMP/sa20.log"; then
    pass "report --negatives-svg \"\" or a folder refused before any table; --stop-after past --iters: a note"
else fail "report svg path / stop-after note" "$(head -c 200 "$TMP/rsvg.err") $(head -c 100 "$TMP/rsvg.out")"; fi
# selftest away from the repository names the file it misses and the flag that finds it
if ! (cd "$TMP" && "$remi_abs" selftest >"$TMP/st-away.log" 2>&1) && grep -q "cannot open expected/setorder.txt (.*--expected DIR)" "$TMP/st-away.log"; then
    pass "selftest from another folder names expected/setorder.txt and --expected"
else fail "selftest away" "$(grep FAIL "$TMP/st-away.log" | head -c 200)"; fi
# a number after a blank: strtoull would wrap " -1" to 2^64 - 1
if ! "$REMI" train --seed " -1" --out "$TMP/flag-out" >"$TMP/flag.log" 2>&1 && grep -q "bad value ' -1' for --seed" "$TMP/flag.log" &&
   [ ! -e "$TMP/flag-out" ]; then pass "bad flag: --seed \" -1\" (a leading blank)"; else fail "bad flag: --seed \" -1\"" "accepted"; fi
printf 'not a model' >"$TMP/bad.bin"
if ! "$REMI" eval --model-file "$TMP/bad.bin" --data expected/tiny --name tiny >"$TMP/m.log" 2>&1 && grep -q "not a remi model" "$TMP/m.log"; then
    pass "foreign model file refused"; else fail "foreign model file" "$(cat "$TMP/m.log")"; fi
head -c 1000 "$TMP/tiny-sa-t2/model.bin" >"$TMP/trunc.bin"
if ! "$REMI" eval --model-file "$TMP/trunc.bin" --data expected/tiny --name tiny >"$TMP/m.log" 2>&1 && grep -q "truncated" "$TMP/m.log"; then
    pass "truncated model file refused"; else fail "truncated model file" "$(cat "$TMP/m.log")"; fi
# the checksum covers the header: a flipped bit of the training seed (byte 40), which MIND's evaluation draws from
cp "$TMP/tiny-sa-t2/model.bin" "$TMP/seed.bin"; printf '\x01' | dd of="$TMP/seed.bin" bs=1 seek=40 conv=notrunc 2>/dev/null
if ! cmp -s "$TMP/seed.bin" "$TMP/tiny-sa-t2/model.bin" && ! "$REMI" eval --model-file "$TMP/seed.bin" --data expected/tiny --name tiny >"$TMP/m.log" 2>&1 &&
   grep -q "checksum mismatch" "$TMP/m.log"; then pass "model file with a changed header byte (the seed) refused"
else fail "model header checksum" "$(cat "$TMP/m.log")"; fi

# ---------------------------------------------------------------- fuzzing every reader
if "$REMI" fuzz --iters 560 --keep "$TMP" >"$TMP/fuzz.log" 2>&1; then pass "$(tail -n 1 "$TMP/fuzz.log")"
else fail "fuzz" "$(grep -v '^fuzz: [0-9]' "$TMP/fuzz.log" | head -n 3)"; fi
# under AddressSanitizer and UBSan too, when a compiler is at hand (REMI_TEST_ASAN=0 skips it)
if [ "${REMI_TEST_ASAN:-1}" != 0 ] && command -v "${CC:-cc}" >/dev/null && make -s remi-asan >"$TMP/asan-build.log" 2>&1; then
    if ./remi-asan fuzz --iters 160 --seed 2 --keep "$TMP" >"$TMP/fuzz-asan.log" 2>&1; then
        pass "under the sanitizers, $(tail -n 1 "$TMP/fuzz-asan.log")"
    else fail "fuzz under the sanitizers" "$(grep -v '^fuzz: [0-9]' "$TMP/fuzz-asan.log" | head -n 3)"; fi
    # the kernels against their twins, built for this CPU as ./remi is (AVX-512 paths included)
    if ./remi-asan selftest >"$TMP/selftest-asan.log" 2>&1; then pass "selftest under the sanitizers"
    else fail "selftest under the sanitizers" "$(grep -v ' ok ' "$TMP/selftest-asan.log" | head -n 5)"; fi
else echo "skip  fuzz and selftest under the sanitizers (no compiler, or REMI_TEST_ASAN=0)"; fi

# ---------------------------------------------------------------- bench --regions
# each step's parallel regions, named by task function, and the time outside them add up to
# the mean step (to the rounding of the printed values); the SA step's regions are all named;
# a synthetic dataset (of any size but 0, even 1 item) follows the tiny one
"$REMI" bench --data expected/tiny --name tiny --synthetic-items 1 --steps 5 --regions --batch 32 --neg 256 -t 2 \
    >"$TMP/bench.log" 2>&1
if [ "$(grep -c 'parallel regions, ms per step (mean' "$TMP/bench.log")" = 4 ] &&
   grep -q "^== synthetic: 1 items" "$TMP/bench.log" &&
   grep 'parallel regions, ms per step' "$TMP/bench.log" | awk '
       { line = $0; sub(/.*\(mean /, "", line); sub(/\)$/, "", line)
         mean = line + 0; sub(/^[0-9.]+ ms: /, "", line)
         n = split(line, parts, ", "); sum = 0; names = ""
         for (i = 1; i <= n; i++) { k = split(parts[i], w, " "); v = w[k] + 0; if (v < -0.011) bad = 1; sum += v; names = names " " w[1] }
         if (sum - mean > 0.006 * (n + 1) || mean - sum > 0.006 * (n + 1)) bad = 1
         if (names !~ / gemm_task/ || names !~ / adam_task/ || names !~ / sa_tanh_task/ || names !~ / ssm_forward_task/ || names !~ / outside/) bad = 1 }
       END { exit bad }'; then
    pass "bench --regions: $(grep -m1 'parallel regions' "$TMP/bench.log" | cut -c1-90)..."
else fail "bench --regions" "$(grep 'parallel regions' "$TMP/bench.log" | head -c 300)"; fi
# on -t 1 each figure is printed once: one ceilings line, one per-thread line of each phase, no scaling
"$REMI" bench --data expected/tiny --name tiny --synthetic-items 0 --steps 2 --regions --batch 32 --neg 256 -t 1 \
    >"$TMP/bench1.log" 2>&1
if [ "$(grep -c '^ceilings' "$TMP/bench1.log")" = 1 ] && [ "$(grep -c 'parallel regions' "$TMP/bench1.log")" = 1 ] &&
   [ "$(grep -c '^  1 thread(s): interest vectors' "$TMP/bench1.log")" = 1 ] && ! grep -q 'scaling' "$TMP/bench1.log" &&
   grep -q '^train step (median of 2): [0-9.]* ms on 1 thread; ' "$TMP/bench1.log"; then
    pass "bench -t 1 prints each figure once"
else fail "bench -t 1" "$(head -c 400 "$TMP/bench1.log")"; fi
# Pop (no arithmetic, no Adam) with more threads than online CPUs: times without rates, no NaN,
# and a note that the rates per thread's time mean little
over=$(( $(getconf _NPROCESSORS_ONLN) + 1 ))
"$REMI" bench --data expected/tiny --name tiny --model pop --synthetic-items 0 --steps 2 -t "$over" >"$TMP/benchp.log" 2>&1; rc=$?
if [ $rc = 0 ] && ! grep -qiE '(^|[^a-z])nan([^a-z]|$)' "$TMP/benchp.log" && grep -q "^note: -t $over is more threads than the" "$TMP/benchp.log" &&
   grep -q "^  $over thread(s): batch [0-9.]*  forward + backward [0-9.]* ms  Adam [0-9.]* ms$" "$TMP/benchp.log"; then
    pass "bench of Pop at -t $over: times without rates, no NaN, a note on the threads"
else fail "bench of Pop" "exit $rc: $(grep -i 'nan\|thread(s): batch' "$TMP/benchp.log" | head -c 300)"; fi
# a batch of more distinct users than a dataset holds is refused by bench too, before any step
if ! "$REMI" bench --data expected/tiny --name tiny --synthetic-items 0 --steps 1 --batch 601 >"$TMP/bb.log" 2>&1 &&
   grep -q "tiny_train.txt has 600 users, fewer than --batch 601" "$TMP/bb.log" && ! grep -q "ceilings" "$TMP/bb.log"; then
    pass "bench refuses a --batch larger than the training users"
else fail "bench --batch above the users" "$(head -c 300 "$TMP/bb.log")"; fi

for cmd in train eval prep gradcheck selftest bench fuzz recommend export inspect report; do
    "$REMI" $cmd --help >"$TMP/help.log" 2>&1 && grep -q "usage: remi $cmd" "$TMP/help.log" || fail "$cmd --help" "no usage"
done
pass "--help on every subcommand"

echo "$npass passed, $nfail failed"
[ "$nfail" -eq 0 ]
