#!/usr/bin/env bash
# One call of a GPU session (issue 39): `make gpu-check DEVICE=cuda OUT=dir`, or tools/gpu_check.sh DEVICE OUT.
# On cuda: installs .gpu-bundle/ (make gpu-bundle, built where there is a network) over the image's packages, runs the
# device lane (pytest --device cuda -m lane), then bench on a random model of Llama-3-8B's shape in bf16 (full depth
# beside model.generate, uniform:16 beside the removed-layer model, random-token:24, an early-exit draft of 24 layers
# with K=4; batch 1 and 8; 128 new tokens) and full depth compiled at batch 1, each variant's share of the bound
# printed. On cpu: the same on a small random shape, 16 new tokens, as the test suite's rehearsal (a few minutes).
# The device tool sends the working tree without ignored folders: name .gpu-bundle in the run's `carry`.
# Writes to OUT at most five files (the device tool brings back eight): summary.md, lane.txt, bench.parquet,
# bench-compile.parquet, gpu-check.log. Exits non-zero when any part failed; every part runs regardless.
set -uo pipefail
device=${1:-cuda}
out=${2:-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d)
log="$out/gpu-check.log"
: > "$log"
failed=()
if [ "$device" = cuda ]; then
    model=random:llama-3-8b; tokens=128; batches=1,8; policies=full,uniform:16,random-token:24; draft=early-exit:24
    if [ -d .gpu-bundle ]; then
        $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-bundle/*.whl >> "$log" 2>&1 \
            || failed+=("bundle install")
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
        export SKIPBENCH_TOKENIZER=$PWD/.gpu-bundle/tokenizer
    fi
else
    model=random:llama-small; tokens=16; batches=1,2; policies=full,uniform:4,random-token:6; draft=early-exit:6
fi
began=$(date +%s)
$py -m pytest --device "$device" -m lane -q -p no:cacheprovider -o addopts="" > "$out/lane.txt" 2>&1 || failed+=("lane")
lane_s=$(( $(date +%s) - began ))
$py -m skipbench bench --model "$model" --device "$device" --dtype bfloat16 --policy "$policies" \
    --batch-sizes "$batches" --max-new-tokens "$tokens" --repeats 1 --warmup 1 --draft "$draft" --speculate 4 \
    --out "$work/bench.parquet" >> "$log" 2>&1 || failed+=("bench")
$py -m skipbench bench --model "$model" --device "$device" --dtype bfloat16 --policy full --batch-sizes 1 \
    --max-new-tokens "$tokens" --repeats 1 --warmup 2 --compile --out "$work/bench-compile.parquet" >> "$log" 2>&1 \
    || failed+=("bench --compile")
cp "$work"/bench.parquet "$work"/bench-compile.parquet "$out"/ 2>/dev/null
$py - "$out" "$device" "$model" "$lane_s" "${failed[*]:-}" <<'PY' >> "$log" 2>&1 || failed+=("summary")
import sys
from pathlib import Path

import pandas as pd
import torch

out, device, model, lane_s, failed = Path(sys.argv[1]), *sys.argv[2:]
lane = (out / "lane.txt").read_text().strip().splitlines()
where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
lines = [f"# gpu-check on {where}", "",
         f"torch {torch.__version__}; model {model} in bf16; lane: {lane[-1] if lane else 'no output'} ({lane_s} s)",
         f"failed parts: {failed or 'none'}", ""]
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
rm -rf "$work"
if [ ${#failed[@]} -gt 0 ]; then echo "gpu-check: failed: ${failed[*]}" | tee -a "$log" >&2; exit 1; fi
echo "gpu-check: done, $out/summary.md"
