#!/usr/bin/env bash
# One call of a GPU session (issue 39): `bash tools/gpu_check.sh cuda OUT` there (or `make gpu-check DEVICE=cuda`
# where make exists), with `.gpu-bundle` named in the device tool's `carry` (the working tree travels without ignored
# folders). It installs the bundle's wheels over the image's packages, runs the device lane
# (pytest --device cuda -m lane), then bench on a random model of Llama-3-8B's shape in bf16: full depth beside
# model.generate, uniform:16 beside the removed-layer model, random-token:24 and an early-exit:24 draft with K=4, at
# batch 1 and 8 with 128 new tokens, then full depth compiled at batch 1; summary.md gives each part's seconds and
# each variant's tokens/s, speed against model.generate and share of the bound (bench's: weight bytes per step over a
# matrix-vector read rate measured in the run, not a device-to-device copy).
# FlexiDepth and MindSkip run with routers after one optimiser step on 2 items (near their initialisation: their
# skipping, not their quality, is what is timed). Left out, and why: the draft is a fixed early exit, since on random weights every draft's acceptance is meaningless and `--draft auto` would spend
# minutes searching; the compiled step runs at batch 1 only.
# On cpu: the same on the small shape random:llama-small with 16 new tokens, the rehearsal the test suite runs.
# OUT gets seven files (the device tool brings back eight): summary.md, lane.txt, gpu-check.log, and bench's parquet
# and manifest for each bench. Every part runs, each under a time limit; the exit code is non-zero if any failed.
set -uo pipefail
device=${1:-cuda}
out=${2:-gpu-check}
py=${PYTHON:-python3}
case $device in
    cpu|cuda|cuda:[0-9]|cuda:[0-9][0-9]) ;;
    *) echo "gpu-check: DEVICE must be cpu, cuda or cuda:N, got '$device'" >&2; exit 1 ;;
esac
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
rm -f "$out"/summary.md "$out"/lane.txt "$out"/gpu-check.log "$out"/bench*.parquet "$out"/bench*.json "$out"/bench*.png
log="$out/gpu-check.log"
: > "$log"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
times=()
began=$(date +%s)
part() {  # NAME LIMIT COMMAND...: run, time and record a part
    local name=$1 limit=$2 t0 rc; shift 2
    t0=$(date +%s)
    timeout "$limit" "$@"; rc=$?
    [ $rc -eq 0 ] || failed+=("$name")
    times+=("$name=$(( $(date +%s) - t0 ))s")
    return $rc
}
case $device in
    cuda*)
        model=random:llama-3-8b; tokens=128; batches=1,8; policies=full,uniform:16,random-token:24; draft=early-exit:24
        limits=(120 45 150 90)  # 450 s in all: inside the device call's 600 s, with room for the install
        if [ ! -d .gpu-bundle ]; then
            echo "gpu-check: no .gpu-bundle here: build it with make gpu-bundle and name it in the run's carry" | tee -a "$log" >&2
            exit 1
        fi
        if $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu-bundle/*.whl >> "$log" 2>&1; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
            export SKIPBENCH_TOKENIZER=$PWD/.gpu-bundle/tokenizer
        else
            echo "gpu-check: the bundle did not install (see $log)" | tee -a "$log" >&2
            exit 1
        fi
        ;;
    *)
        model=random:llama-small; tokens=16; batches=1,2; policies=full,uniform:4,random-token:6; draft=early-exit:6
        limits=(150 60 100 100)
        ;;
esac
part lane "${limits[0]}" bash -c "$py -m pytest --device $device -m lane -q -p no:cacheprovider -o addopts='' > '$out/lane.txt' 2>&1"
routers=()
for kind in flexidepth mindskip; do
    part "$kind routers" "${limits[1]}" $py -m skipbench "$kind" train --model "$model" --device "${device%%:*}" \
        --dtype bfloat16 --dataset arith --limit 2 --steps 1 --batch-size 1 --max-new-tokens 2 \
        --out "$work/$kind" >> "$log" 2>&1 && routers+=("$kind:$work/$kind")
done
[ ${#routers[@]} -gt 0 ] && policies="$policies,$(IFS=,; echo "${routers[*]}")"
part bench "${limits[2]}" $py -m skipbench bench --model "$model" --device "${device%%:*}" --dtype bfloat16 \
    --policy "$policies" --batch-sizes "$batches" --max-new-tokens "$tokens" --repeats 1 --warmup 1 --draft "$draft" \
    --speculate 4 --out "$out/bench.parquet" >> "$log" 2>&1
part compile "${limits[3]}" $py -m skipbench bench --model "$model" --device "${device%%:*}" --dtype bfloat16 \
    --policy full --batch-sizes 1 --max-new-tokens "$tokens" --repeats 1 --warmup 2 --compile \
    --out "$out/bench-compile.parquet" >> "$log" 2>&1
rm -f "$out"/bench*.png
total=$(( $(date +%s) - began ))
$py - "$out" "$device" "$model" "${times[*]} total=${total}s" "${failed[*]:-}" <<'PY' 2>> "$log" | tee -a "$log" || failed+=("summary")
import sys
from pathlib import Path

import pandas as pd
import torch

out, device, model, times, failed = Path(sys.argv[1]), *sys.argv[2:]
lane = (out / "lane.txt").read_text().strip().splitlines() if (out / "lane.txt").exists() else []
where = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
lines = [f"# gpu-check on {where}", "",
         f"torch {torch.__version__}; model {model} in bf16; lane: {lane[-1] if lane else 'no output'}",
         f"seconds: {times}", f"failed parts: {failed or 'none'}", ""]
for name in ("bench.parquet", "bench-compile.parquet"):
    path = out / name
    if not path.exists():
        lines += [f"{name}: not written", ""]
        continue
    rows = pd.read_parquet(path)
    decode = rows[rows["phase"] == "decode"]
    table = decode.groupby(["batch_size", "variant"]).agg(tok_s=("tokens_per_s", "median"),
                                                          bound=("bound_fraction", "mean")).reset_index()
    generate = table[table["variant"] == "hf-generate"].set_index("batch_size")["tok_s"]
    table["vs_generate"] = table["tok_s"] / table["batch_size"].map(generate)
    lines += [f"## {name}", "", table.to_markdown(index=False, floatfmt=".3f"), ""]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
if [ ${#failed[@]} -gt 0 ]; then echo "gpu-check: failed: ${failed[*]}" | tee -a "$log" >&2; exit 1; fi
echo "gpu-check: done, $out/summary.md"
