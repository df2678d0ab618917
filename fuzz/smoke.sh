#!/usr/bin/env bash
# Short fuzz smoke run for CI: builds every target with libFuzzer's coverage instrumentation on
# the stable toolchain (cargo-fuzz itself needs nightly) and runs each for a few seconds.
# Usage: fuzz/smoke.sh [seconds-per-target]   (default 15)
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-15}
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps these flags off build scripts and proc macros.
target=$(rustc -vV | sed -n "s/^host: //p")
cargo build --release --bins --quiet --target "$target"
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^mailfront-fuzz$')
passed=0 failed=0
for t in $targets; do
  mkdir -p "corpus/$t" artifacts
  # A dictionary (<protocol>.dict) hands libFuzzer the words the gates care about; tracked
  # seeds (seeds/<target>) start the search from real sessions. New inputs go to corpus/ only.
  args=()
  dict="${t%%_*}.dict"
  [ -f "$dict" ] && args+=(-dict="$dict")
  args+=("corpus/$t")
  [ -d "seeds/$t" ] && args+=("seeds/$t")
  if ./target/"$target"/release/"$t" -max_total_time="$seconds" -rss_limit_mb=1024 -artifact_prefix=artifacts/ \
      "${args[@]}" >"artifacts/$t.log" 2>&1; then
    echo "PASS fuzz $t ($(grep -o "Done [0-9]* runs" "artifacts/$t.log" | awk "{print \$2}") runs in ${seconds}s)"
    passed=$((passed + 1))
  else
    echo "FAIL fuzz $t"; tail -30 "artifacts/$t.log"
    failed=$((failed + 1))
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
