#!/bin/sh
# mailfront benchmark suite: bench/run.sh (full, ~15 min, writes BENCHMARKS.md) or bench/run.sh --quick.
# Everything is in bench/run.py (Python standard library only); see bench/README.md.
exec python3 "$(dirname "$0")/run.py" "$@"
