#!/usr/bin/env bash
# farm's benchmark, one command (as root, on loopback only):
#
#   bench/run.sh [--quick] [farm-bench options...]
#
# Installs what it needs through `deploy/install.sh --test-deps` (buildah, docker-registry, QEMU
# handlers, the busybox fixture's packages), builds farm and farm-bench in release mode, runs the
# Criterion benchmarks of the pure parts, then `farm-bench all`: its own registry, coordinator and
# agents on 127.0.0.1, every comparison side by side, a table of medians and ratios on stdout and
# the same as JSON in bench/results.json.
#
# --quick   each row once with smaller sizes: a smoke test (a few minutes), not a measurement.
# Other options go to `farm-bench all` (see `target/release/farm-bench all --help`), e.g.
# `--only builds` or `--keep`.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    -h|--help) sed -n '2,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
  esac
done
[[ $EUID -eq 0 ]] || { echo "bench/run.sh: run as root (buildah storage, QEMU handlers)" >&2; exit 1; }

started=$(date +%s)
deploy/install.sh --test-deps
cargo build --release --locked -p farm -p farm-bench

rm -rf target/criterion
if ((quick)); then
  cargo bench --locked -p farm-bench --bench pure -- --quick
else
  cargo bench --locked -p farm-bench --bench pure -- --warm-up-time 1 --measurement-time 3
fi

target/release/farm-bench all --json bench/results.json --criterion target/criterion "$@"
echo "bench/run.sh: done in $(( $(date +%s) - started )) s"
