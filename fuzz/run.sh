#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target in this directory for a bounded time, one after the other.
#
#   fuzz/run.sh [SECONDS]      # seconds per target, default 60
#
# Each target runs as one libFuzzer process (one job, no -jobs/-fork) with -max_total_time=SECONDS,
# after a single up-front build, so the build time is not counted. Corpora grow run after run under
# fuzz/corpus/<target>/, crashing inputs land in fuzz/artifacts/<target>/, full logs in
# fuzz/artifacts/<target>.log (all three gitignored). Exits non-zero, naming the crashing input and
# how to reproduce it, if any target crashed, timed out (an input taking over 10 s) or ran out of
# memory; a crash becomes a regression test in the module under test.
#
# Toolchain. `cargo fuzz` builds with `-Zsanitizer=address` (AddressSanitizer, its default), a -Z flag
# that only a nightly rustc accepts:
#   - if rustup lists a nightly toolchain, the script uses `cargo +nightly fuzz` (this is the way it
#     takes on a developer machine with nightly installed);
#   - otherwise (a CI machine with stable only) it uses the default toolchain with RUSTC_BOOTSTRAP=1,
#     which lets stable rustc accept the -Z flags. Tested: stable 1.95 builds and runs all four targets
#     with AddressSanitizer that way. (`--sanitizer none` also builds on plain stable without
#     RUSTC_BOOTSTRAP; set FUZZ_SANITIZER=none to fuzz without AddressSanitizer.)
# The script prints which way it took. The first build takes a few minutes; switching toolchain or
# sanitizer rebuilds from scratch (fuzz/target/ is per crate, not shared with the main workspace).
#
# Environment: FUZZ_SANITIZER (default address), FUZZ_TARGETS (space-separated subset; default: all
# targets `cargo fuzz list` shows).
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS]   (seconds per fuzz target, a positive integer; default 60)" >&2
    exit 2
fi

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$fuzz_dir"
# Where `cargo install` puts cargo-fuzz, in case it is not on PATH yet (appended: never overrides).
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> cargo-fuzz is missing: cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

# `rustup toolchain list` rather than trying `cargo +nightly`: a newer rustup may try to download a
# missing toolchain instead of failing.
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
    cargo=(cargo +nightly)
    how="nightly toolchain ($(cargo +nightly --version))"
else
    cargo=(cargo)
    export RUSTC_BOOTSTRAP=1
    how="default toolchain with RUSTC_BOOTSTRAP=1 ($(cargo --version))"
fi
sanitizer="${FUZZ_SANITIZER:-address}"
echo "==> $(cargo fuzz --version) on the $how, sanitizer: $sanitizer"

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
fi
[[ ${#targets[@]} -gt 0 ]] || { echo "no fuzz targets found" >&2; exit 1; }

echo "==> building ${targets[*]}"
"${cargo[@]}" fuzz build --fuzz-dir "$fuzz_dir" --sanitizer "$sanitizer"

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t.log"
    echo "==> fuzzing $t for ${seconds}s (corpus fuzz/corpus/$t, log fuzz/$log)"
    status=0
    "${cargo[@]}" fuzz run --fuzz-dir "$fuzz_dir" --sanitizer "$sanitizer" "$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    # libFuzzer's last status line ("#N DONE cov: ... corp: ... exec/s: ...") and its final stats.
    last="$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)"
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    echo "    ${last:-no status line}"
    if [[ $status -eq 0 ]]; then
        summary+=("$(printf '%-9s ok     %10s runs  %s' "$t" "${execs:-?}" "$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [^ ]+' <<<"$last" || true)")")
    else
        input="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        input="${input:-(no input written; see fuzz/$log)}"
        input="${input#./}"
        echo "    FAILED (exit $status): $(grep -m1 -oE 'panicked at .*|ERROR: .*|==[0-9]+== ?ERROR: .*' "$log" || echo 'see the log')"
        grep -A3 -m1 'panicked at' "$log" | sed 's/^/      /' || true
        echo "    crashing input: fuzz/${input#"$fuzz_dir"/}"
        echo "    reproduce: (cd fuzz && ${cargo[*]} fuzz run $t ${input#"$fuzz_dir"/})"
        failed+=("$t: fuzz/${input#"$fuzz_dir"/}")
        summary+=("$(printf '%-9s FAILED %10s runs  %s' "$t" "${execs:-?}" "fuzz/${input#"$fuzz_dir"/}")")
    fi
done

echo "==> summary (${seconds}s per target, $how, sanitizer $sanitizer)"
printf '    %s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "==> ${#failed[@]} fuzz target(s) failed:" >&2
    printf '    %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "==> all ${#targets[@]} fuzz targets ran ${seconds}s without a crash"
