#!/usr/bin/env bash
# Upload and packaging speed of `release`, printed beside their baselines measured in the
# same run, on the same files:
#   - `release package TREE` against `tar -c TREE | zstd -T0 -3` (goal: no slower);
#   - `release upload FILE` to a local server against `openssl dgst -sha256 FILE`
#     (goal: at least half the hashing speed, client and server sharing the machine's cores),
#     and against the hashing an upload must do, by openssl: the client's pass (its digest,
#     sent as a header, so before the bytes), then the server's three at once (the digest,
#     each frame's, each file's) on the machine's cores.
# Everything lives on tmpfs (/dev/shm): the tree, the archives, the server's data directory,
# so the figures measure CPU and memory bandwidth, not this machine's disk. Medians of $RUNS.
#
# Usage: bench/upload.sh [TOTAL_MB]    (default 1024: ~100 MB of source-like text files
#                                       plus incompressible assets up to the total)
# Env:   RELEASE_BIN=path (else cargo build --release), RUNS=5, BENCH_TREE=DIR (package and
#        upload a copy of that tree instead of generating one; bench/run passes its workloads),
#        BENCH_JSON=FILE (every figure also written there, for bench/run)
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL_MB=${1:-1024}
RUNS=${RUNS:-5}

if [ -z "${RELEASE_BIN:-}" ]; then
  cargo build --release --locked --quiet
  RELEASE_BIN=$PWD/target/release/release
fi
BIN=$(realpath "$RELEASE_BIN")
[ -x "$BIN" ] || { echo "no release binary at $BIN" >&2; exit 1; }
[ -z "${BENCH_TREE:-}" ] || [ -d "$BENCH_TREE" ] || { echo "BENCH_TREE=$BENCH_TREE is not a directory" >&2; exit 1; }
WORK=$(mktemp -d /dev/shm/release-bench.XXXXXX)
SERVER_PID=
# The server is waited for before its data directory goes: still shutting down, it writes
# there, and `rm -rf` failed with "Directory not empty" (a full run lost its Node-tree row).
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi
  rm -rf "$WORK" || { sleep 1; rm -rf "$WORK"; }
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cd "$WORK"

if [ -n "${BENCH_TREE:-}" ]; then
  cp -a "$BENCH_TREE" tree
else

python3 - "$TOTAL_MB" <<'PY'
import os, random, sys
total = int(sys.argv[1]) << 20
random.seed(7)
words = ["".join(random.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(random.randint(2, 12))) for _ in range(3000)]
size = 0
for i in range(20000):                      # vendor/-like PHP sources: small, compressible
    d = f"tree/vendor/pkg{i % 400}/src/m{i % 7}"
    os.makedirs(d, exist_ok=True)
    text = "<?php\n" + " ".join(random.choice(words) for _ in range(random.randint(150, 1200))) + "\n"
    with open(f"{d}/f{i}.php", "w") as f:
        f.write(text)
    size += len(text)
os.makedirs("tree/public/build", exist_ok=True)
i = 0
while size < total:                        # built assets: incompressible
    n = min(64 << 20, total - size)
    with open(f"tree/public/build/asset{i}.bin", "wb") as f:
        f.write(os.urandom(n))
    size += n
    i += 1
PY
fi

now() { date +%s.%N; }
# median SECONDS... -> the median
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
timed() { local s e; s=$(now); "$@" >/dev/null 2>&1; e=$(now); awk -v a="$s" -v b="$e" 'BEGIN {printf "%.4f\n", b - a}'; }

files=$(find tree -type f | wc -l)
tree_bytes=$(du -sb tree | cut -f1)

# --- packaging, alternating so both see the same machine state ---------------------------
# The previous run's output is removed before each timed run: freeing a gigabyte of tmpfs
# pages is not part of either tool's work.
timed "$BIN" package tree -o pkg.tar.zst >/dev/null   # warm-up (page cache, tmpfs pages)
pack=(); tarz=()
for _ in $(seq "$RUNS"); do
  rm -f pkg.tar.zst tarzstd.tar.zst
  pack+=("$(timed "$BIN" package tree -o pkg.tar.zst)")
  tarz+=("$(timed sh -c 'tar -cf - -C tree . | zstd -T0 -3 -q -o tarzstd.tar.zst')")
done
archive_bytes=$(stat -c %s pkg.tar.zst)

# --- hashing baselines on the archive -----------------------------------------------------
ossl=(); sums=()
for _ in $(seq "$RUNS"); do ossl+=("$(timed openssl dgst -sha256 pkg.tar.zst)"); done
for _ in 1 2 3; do sums+=("$(timed sha256sum pkg.tar.zst)"); done

# --- upload to a local server on the same machine -----------------------------------------
RELEASE_LOG=info "$BIN" serve --listen 127.0.0.1:0 --data-dir data 2>server.log &
SERVER_PID=$!
for _ in $(seq 100); do grep -q "listening on" server.log && break; sleep 0.05; done
URL=$(grep -o 'listening on http://[0-9.:]*' server.log | head -1 | cut -d' ' -f3)
TOKEN=$("$BIN" token create bench --role ci --data-dir data --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
export RELEASE_SERVER=$URL RELEASE_TOKEN=$TOKEN
timed "$BIN" upload pkg.tar.zst --service warmup >/dev/null
up=(); hfloor=()
for i in $(seq "$RUNS"); do
  # Each run stores the same object again (a new service name, so the client sends it);
  # the stored copy is removed first, for the same reason as above.
  rm -f data/objects/artifacts/sha256/*
  up+=("$(timed "$BIN" upload pkg.tar.zst --service "bench-$i")")
  ossl+=("$(timed openssl dgst -sha256 pkg.tar.zst)")
  hfloor+=("$(timed sh -c 'openssl dgst -sha256 pkg.tar.zst; for _ in 1 2 3; do openssl dgst -sha256 pkg.tar.zst & done; wait')")
done
peak_kib=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER_PID/status")

# --- report ---------------------------------------------------------------------------------
m_pack=$(median "${pack[@]}"); m_tarz=$(median "${tarz[@]}")
m_ossl=$(median "${ossl[@]}"); m_sums=$(median "${sums[@]}"); m_up=$(median "${up[@]}"); m_floor=$(median "${hfloor[@]}")
gbps() { echo "$archive_bytes / $1 / 1000000000" | bc -l; }
printf '\nrelease bench, %s, %s cores, files on tmpfs, medians of %s runs\n' "$(date -u +%FT%TZ)" "$(nproc)" "$RUNS"
printf 'tree: %s files, %.0f MB; archive: %.0f MB (release package) / %.0f MB (tar | zstd)\n\n' \
  "$files" "$(echo "$tree_bytes/1000000" | bc -l)" "$(echo "$archive_bytes/1000000" | bc -l)" \
  "$(echo "$(stat -c %s tarzstd.tar.zst)/1000000" | bc -l)"
printf '%-34s %8.2f s   runs: %s\n' "release package TREE" "$m_pack" "${pack[*]}"
printf '%-34s %8.2f s   runs: %s\n' "tar -c TREE | zstd -T0 -3" "$m_tarz" "${tarz[*]}"
printf '%-34s %8.2f     (goal: <= 1.00)\n\n' "  package / tar|zstd" "$(echo "$m_pack / $m_tarz" | bc -l)"
printf '%-34s %8.2f GB/s\n' "openssl dgst -sha256 FILE" "$(gbps "$m_ossl")"
printf '%-34s %8.2f GB/s\n' "sha256sum FILE" "$(gbps "$m_sums")"
printf '%-34s %8.2f GB/s  runs (s): %s\n' "release upload FILE (local server)" "$(gbps "$m_up")" "${up[*]}"
printf '%-34s %8.2f     (goal: >= 0.50)\n' "  upload / openssl" "$(echo "$m_ossl / $m_up" | bc -l)"
printf '%-34s %8.2f s   runs: %s\n' "its hashing by openssl (1, then 3)" "$m_floor" "${hfloor[*]}"
printf '%-34s %8.2f\n' "  upload / its hashing" "$(echo "$m_up / $m_floor" | bc -l)"
printf '%-34s %8.1f MiB\n' "server peak RSS" "$(echo "$peak_kib / 1024" | bc -l)"

if [ -n "${BENCH_JSON:-}" ]; then
  jl() { local IFS=,; printf '[%s]' "$*"; }
  printf '{"files": %s, "tree_bytes": %s, "archive_bytes": %s, "tarzstd_bytes": %s, "runs": %s,\n "package": %s, "tar_zstd": %s, "openssl": %s, "sha256sum": %s, "upload": %s, "hash_floor": %s, "server_peak_kib": %s}\n' \
    "$files" "$tree_bytes" "$archive_bytes" "$(stat -c %s tarzstd.tar.zst)" "$RUNS" \
    "$(jl "${pack[@]}")" "$(jl "${tarz[@]}")" "$(jl "${ossl[@]}")" "$(jl "${sums[@]}")" "$(jl "${up[@]}")" "$(jl "${hfloor[@]}")" "$peak_kib" >"$BENCH_JSON"
fi
