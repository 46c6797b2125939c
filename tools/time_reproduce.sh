#!/usr/bin/env bash
# The README's stated time of `make reproduce` (issue 38): a fresh clone of this checkout's HEAD, its environment
# built by `make setup` (not timed), then `make reproduce PRESET=$1` timed end to end with an empty model cache.
# Prints the date, the machine, the total and each stage's seconds as the preset's `[seconds]` table. Run on an
# idle machine:  tools/time_reproduce.sh quick [an empty or new workdir]
set -euo pipefail
preset=${1:-quick}
work=${2:-$(mktemp -d /tmp/time-reproduce.XXXXXX)}
mkdir -p "$work" && work=$(cd "$work" && pwd)
trap 'echo "time_reproduce: failed; logs in $work" >&2' ERR
if [ -e "$work/clone" ]; then echo "time_reproduce: $work/clone exists; give a new workdir" >&2; exit 1; fi
here=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
git clone -q "$here" "$work/clone"
cd "$work/clone"
make setup > "$work/setup.log" 2>&1
export SKIPBENCH_CACHE="$work/cache"  # empty: the model conversion is timed too
rm -rf "$SKIPBENCH_CACHE"
began=$(date +%s)
make reproduce PRESET="$preset" > "$work/reproduce.log" 2>&1
took=$(( $(date +%s) - began ))
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
echo "# $(date -u +%Y-%m-%d) · $(git rev-parse --short HEAD) · $cpu, $(nproc) cores"
echo "# make reproduce PRESET=$preset from a fresh clone, empty cache: $took s ($(( took / 60 )) min $(( took % 60 )) s)"
echo "[seconds]"
echo "machine = \"$cpu, $(nproc) cores, $(date -u +%Y-%m-%d)\""
# a stage's "NAME: N s" line, for the NAMEs reproduce announced ("stage I/N: NAME · ..."); the commands' own lines
# in the same log are left out
awk '/^stage [0-9]+\/[0-9]+: / { sub(/^stage [0-9]+\/[0-9]+: /, ""); sub(/ · .*/, ""); named[$0] = 1; next }
     match($0, /: [0-9]+ s$/) { name = substr($0, 1, RSTART - 1); if (name in named) print "\"" name "\" = " substr($0, RSTART + 2, RLENGTH - 4) }' \
    "$work/reproduce.log"
