#!/usr/bin/env bash
# Bit-identity probe (issue 24): run the demo, a 2-epoch kd_ig_at distill and a cohort-of-2 ablation on digits with
# the igkd code in SRC/src, on one thread, into OUT; then print a hash of every model, IG map, metrics line (without
# its timings) and checkpoint (without its wall time and random save id). Run it on two versions, diff the outputs:
#   bash benchmarks/bit_identity.sh /path/to/old/checkout /tmp/before
#   bash benchmarks/bit_identity.sh "$PWD" /tmp/after && diff /tmp/before/hashes.txt /tmp/after/hashes.txt
set -euo pipefail
SRC=$(cd "$1" && pwd); OUT=$2; HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH=$SRC/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-python}
mkdir -p "$OUT"; rm -rf "$OUT/distill" "$OUT/cohort"
cd "$OUT"
printf 'width: 0.35\n' > width.yaml
[ -f demo/demo.json ] || $PY -m igkd.cli demo --out demo > demo.txt 2> demo.err
$PY -m igkd.cli distill --method kd_ig_at --dataset digits --teacher demo/teacher --attributions demo/attributions --student k9 --width 0.35 \
    --epochs 2 --out distill --json > distill.json 2> distill.err
$PY -m igkd.cli ablation --dataset digits --teacher demo/teacher --attributions demo/attributions --student k9 --methods student,kd_ig \
    --seeds 2 --epochs 1 --cohort-size 2 --config width.yaml --out cohort > cohort.txt 2> cohort.err
$PY "$HERE/bit_identity_hashes.py" > hashes.txt
cat hashes.txt
