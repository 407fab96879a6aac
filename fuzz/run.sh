#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 30) on the stable
# toolchain (RUSTC_BOOTSTRAP=1 lets it use the nightly-only sanitizer flags).
# Crashes land in fuzz/artifacts/<target>/; copy each into
# tests/fuzz-regressions/<target>/ so `cargo test` replays it forever.
#   fuzz/run.sh 30            # CI
#   fuzz/run.sh 3600          # a long run: an hour per target
#   RUSTC_BOOTSTRAP=1 cargo fuzz run relay_sync -- -max_total_time=86400   # one target, a day
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET="${1:-30}"
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# Start from valid inputs (written by the seeded tests) on the first run.
if [ ! -d corpus ]; then
    (cd .. && SAMVERKAN_WRITE_CORPUS="$PWD/fuzz/corpus" cargo test --test fuzz_decoders write_seed_corpus -q) || mkdir -p corpus
fi
for target in wire_frame relay_sync bundle_import bundle_docs markdown_import signed_directory; do
    mkdir -p "corpus/$target"
    echo "== fuzz $target for ${SECONDS_PER_TARGET}s"
    log="$(mktemp)"
    if ! cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1; then
        tail -60 "$log" >&2
        echo "fuzz target $target failed: crash input in fuzz/artifacts/$target" >&2
        exit 1
    fi
    grep -E "^Done [0-9]+ runs" "$log" || tail -3 "$log"
    rm -f "$log"
    if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
        echo "crash found in $target: see fuzz/artifacts/$target" >&2
        exit 1
    fi
done
