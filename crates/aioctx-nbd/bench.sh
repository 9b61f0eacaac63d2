#!/usr/bin/env bash
# Compares aioctx-nbd with qemu-nbd (--aio=threads and --aio=io_uring) and
# nbdkit's file plugin using `qemu-img bench` over NBD on loopback.
#
# Every server serves the same raw image with the host page cache, and
# every run uses the same parameters. Each cell is the median of a few
# rounds (BENCH_ROUNDS) that interleave the servers. On a small VM single
# runs are noisy, queue depth 1 most of all: its latency depends on
# whether client and server threads share a CPU (a cross-CPU wake-up of an
# idle vCPU costs tens of µs), so the same server can vary by 5x between
# runs, and 64 KiB writes by 30%.
#
# Usage: crates/aioctx-nbd/bench.sh [IMAGE_SIZE_MIB]   (default 1024)
# Environment: BENCH_ROUNDS=N runs every cell N times, interleaving the
# servers, and prints medians (default 3), BENCH_SCALE=N multiplies the
# request counts (default 1), BENCH_DIV=N divides them (default 1),
# SERVERS="..." picks the servers (default: aioctx-nbd and the three
# peers), TESTS="..." picks the lines by name (default: all five, e.g.
# TESTS="64k-write-d32 4k-read-d1"). aioctx-nbd runs with its defaults
# (epoll, --poll-max-ns 65536, sendfile for reads from 16 KiB, splice for
# page-aligned writes from 32 KiB); it can also run as
# aioctx-nbd-nopoll (--poll-max-ns 0), aioctx-nbd-copy (--no-sendfile:
# every read copied through a buffer), aioctx-nbd-nosplice (--no-splice:
# every write payload read into a buffer), aioctx-nbd-io_uring
# (AIOCTX_BACKEND=io_uring) and aioctx-nbd-io_uring-nopoll. POLL_MAX_NS=N
# sets the window of every aioctx-nbd variant that polls, e.g.:
#   SERVERS="aioctx-nbd aioctx-nbd-nopoll aioctx-nbd-copy nbdkit-file" \
#     BENCH_DIV=4 crates/aioctx-nbd/bench.sh 256
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
size_mib=${1:-1024}
scale=${BENCH_SCALE:-1}
div=${BENCH_DIV:-1}
rounds=${BENCH_ROUNDS:-3}
poll_args=()
if [ -n "${POLL_MAX_NS:-}" ]; then poll_args=(--poll-max-ns "$POLL_MAX_NS"); fi

for tool in qemu-img qemu-nbd nbdkit; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool not found" >&2; exit 1; }
done

echo "Building aioctx-nbd (release)..." >&2
cargo build --release -q -p aioctx-nbd --manifest-path "$root/Cargo.toml"
aioctx_nbd="$root/target/release/aioctx-nbd"

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

img="$work/bench.img"
echo "Creating a ${size_mib} MiB image with data..." >&2
dd if=/dev/urandom of="$img" bs=1M count="$size_mib" status=none

# A free loopback port: bind port 0 and read back what the kernel chose.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits (at most 10 s) until something accepts connections on the port.
wait_port() {
    for _ in $(seq 100); do
        if qemu-img info "nbd://127.0.0.1:$1" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    return 1
}

# start_server NAME: starts the server in the background and records its
# port in port[NAME] ("unavailable" if it did not come up).
declare -A port
start_server() {
    local p; p=$(free_port)
    # `exec` makes the background job the server itself, so $! is its pid.
    launch() {
        case "$1" in
            aioctx-nbd)
                exec "$aioctx_nbd" "${poll_args[@]}" -t -b 127.0.0.1 -p "$p" "$img" ;;
            aioctx-nbd-nopoll)
                exec "$aioctx_nbd" --poll-max-ns 0 -t -b 127.0.0.1 -p "$p" "$img" ;;
            aioctx-nbd-copy)
                exec "$aioctx_nbd" "${poll_args[@]}" --no-sendfile -t -b 127.0.0.1 -p "$p" "$img" ;;
            aioctx-nbd-nosplice)
                exec "$aioctx_nbd" "${poll_args[@]}" --no-splice -t -b 127.0.0.1 -p "$p" "$img" ;;
            aioctx-nbd-io_uring)
                AIOCTX_BACKEND=io_uring exec "$aioctx_nbd" "${poll_args[@]}" -t -b 127.0.0.1 -p "$p" "$img" ;;
            aioctx-nbd-io_uring-nopoll)
                AIOCTX_BACKEND=io_uring exec "$aioctx_nbd" --poll-max-ns 0 -t -b 127.0.0.1 -p "$p" "$img" ;;
            qemu-nbd-threads)
                exec qemu-nbd -t -f raw --cache=writeback --aio=threads -b 127.0.0.1 -p "$p" "$img" ;;
            qemu-nbd-io_uring)
                exec qemu-nbd -t -f raw --cache=writeback --aio=io_uring -b 127.0.0.1 -p "$p" "$img" ;;
            nbdkit-file)
                exec nbdkit -f -i 127.0.0.1 -p "$p" file "$img" ;;
        esac
    }
    launch "$1" >/dev/null 2>"$work/$1.log" &
    pids+=($!)
    if wait_port "$p"; then port[$1]=$p; else port[$1]=unavailable; fi
}

# One benchmark: name, then qemu-img bench arguments.
tests=(
    "4k-read-d32|-c $((200000 * scale / div)) -d 32 -s 4k"
    "4k-write-d32|-c $((200000 * scale / div)) -d 32 -s 4k -w"
    "64k-read-d32|-c $((40000 * scale / div)) -d 32 -s 64k"
    "64k-write-d32|-c $((40000 * scale / div)) -d 32 -s 64k -w"
    "4k-read-d1|-c $((50000 * scale / div)) -d 1 -s 4k"
)
read -r -a servers <<<"${SERVERS:-aioctx-nbd qemu-nbd-threads qemu-nbd-io_uring nbdkit-file}"
for s in "${servers[@]}"; do
    case "$s" in
        aioctx-nbd | aioctx-nbd-nopoll | aioctx-nbd-copy | aioctx-nbd-nosplice | aioctx-nbd-io_uring | aioctx-nbd-io_uring-nopoll) ;;
        qemu-nbd-threads | qemu-nbd-io_uring | nbdkit-file) ;;
        *) echo "bench.sh: unknown server $s" >&2; exit 1 ;;
    esac
done
names=" ${tests[*]%%|*} "
for t in ${TESTS:-}; do
    [[ "$names" == *" $t "* ]] || { echo "bench.sh: unknown test $t (one of:$names)" >&2; exit 1; }
done

for s in "${servers[@]}"; do
    start_server "$s"
    [ "${port[$s]}" = unavailable ] && echo "note: $s did not start (see its log)" >&2
done

iops() { # count seconds
    awk -v c="$1" -v t="$2" 'BEGIN { if (t > 0) printf "%d", c / t; else print 0 }'
}

median() { # values...
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%d\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

printf '%-14s' "test"
for s in "${servers[@]}"; do printf '%26s' "$s"; done
printf '%12s\n' "ratio"
for t in "${tests[@]}"; do
    name=${t%%|*}
    args=${t#*|}
    if [ -n "${TESTS:-}" ] && [[ " $TESTS " != *" $name "* ]]; then continue; fi
    count=$(sed -E 's/.*-c ([0-9]+).*/\1/' <<<"$args")
    declare -A runs=()
    # Rounds interleave the servers, so that a slow spell of this noisy
    # machine hits every server alike.
    for _ in $(seq "$rounds"); do
        for s in "${servers[@]}"; do
            [ "${port[$s]}" = unavailable ] && continue
            # Some VMs evict cold pages on their own (DAMON): bring the
            # image back into the page cache so every run measures cached
            # reads. Write back what the previous run dirtied, so that
            # its writeback (due 30 s later) does not land in this run.
            cat "$img" >/dev/null
            sync "$img"
            # shellcheck disable=SC2086
            if out=$(qemu-img bench -f raw $args "nbd://127.0.0.1:${port[$s]}" 2>&1); then
                secs=$(sed -nE 's/.*Run completed in ([0-9.]+) seconds.*/\1/p' <<<"$out")
                runs[$s]+="$(iops "$count" "${secs:-0}") "
            else
                runs[$s]+="failed "
            fi
        done
    done
    printf '%-14s' "$name"
    best=0
    mine=0
    for s in "${servers[@]}"; do
        if [ "${port[$s]}" = unavailable ]; then
            printf '%26s' "n/a"
            continue
        fi
        # shellcheck disable=SC2086
        if [[ " ${runs[$s]}" == *" failed "* ]]; then
            printf '%26s' "failed"
            continue
        fi
        # shellcheck disable=SC2086
        v=$(median ${runs[$s]})
        printf '%26s' "$v"
        # The ratio compares aioctx-nbd with its defaults against the best
        # peer; other aioctx-nbd variants are shown for reference only.
        case "$s" in
            aioctx-nbd) mine=$v ;;
            aioctx-nbd-*) ;;
            *) if [ "$v" -gt "$best" ]; then best=$v; fi ;;
        esac
    done
    awk -v m="$mine" -v b="$best" 'BEGIN { if (b > 0) printf "%12.2f\n", m / b; else print "         n/a" }'
    unset runs
done
echo "(IOPS, median of $rounds interleaved rounds; ratio = aioctx-nbd / best peer: qemu-nbd or nbdkit)"
