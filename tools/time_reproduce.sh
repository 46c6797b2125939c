#!/usr/bin/env bash
# The README's stated time of `make reproduce` (issue 38): a fresh clone of this checkout's HEAD, its environment
# built by `make setup` (not timed), then `make reproduce PRESET=$1` timed end to end with an empty model cache.
# Prints the date, the machine, the total and each stage's seconds as the preset's `[seconds]` table. Run on an
# idle machine:  tools/time_reproduce.sh quick [workdir]
set -euo pipefail
preset=${1:-quick}
work=${2:-$(mktemp -d /tmp/time-reproduce.XXXXXX)}
here=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
git clone -q "$here" "$work/clone"
cd "$work/clone"
make setup > "$work/setup.log" 2>&1
export SKIPBENCH_CACHE="$work/cache"  # empty: the model conversion is timed too
rm -rf "$SKIPBENCH_CACHE"
began=$(date +%s)
make reproduce PRESET="$preset" > "$work/reproduce.log" 2>&1
took=$(( $(date +%s) - began ))
echo "# $(date -u +%Y-%m-%d) · $(git rev-parse --short HEAD) · $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
echo "# make reproduce PRESET=$preset from a fresh clone, empty cache: $took s ($(( took / 60 )) min $(( took % 60 )) s)"
echo "[seconds]"
echo "machine = \"$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(date -u +%Y-%m-%d)\""
# the run's "NAME: N s" lines, one per stage
sed -n 's/^\([a-z][a-z0-9 -]*\): \([0-9][0-9]*\) s$/"\1" = \2/p' "$work/reproduce.log"
