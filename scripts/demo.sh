#!/usr/bin/env bash
# The whole pipeline on the embedded sandbox, on CPU: world (with a base model pretrained on the
# world's film facts) -> RRA demonstrations -> SFT -> Rank-GRPO -> greedy evaluation on the test
# split, next to the popularity list and the raw simulated teacher; SFT and Rank-GRPO are scored in
# two decodings: the paper's protocol (greedy lists as they come) and without repeats (greedy lists
# that cannot name a film twice, evaluate.py --constrained; not the paper's protocol). Every stage is one of the four
# scripts (or the sandbox's own command) at its sandbox preset: the settings of every stage are in
# rankgrpo/sandbox/settings.py (`python -m rankgrpo.sandbox settings` prints them), the ones
# benchmarks/paper_tables.py judges at three seeds. This script passes paths and the seed only;
# rerunning resumes finished runs. The tables also go to $RUN/results/seed$SEED/*/comparison.json (the
# README's results table is checked against the committed copy, benchmarks/results/demo/).
#   SEED=3408 make demo      the same pipeline at another training seed (world and demonstrations fixed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/demo}
SEED=${SEED:-$($PY -m rankgrpo.sandbox settings sft.seed)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# conversations scored: the first N_TEST of the world's test split (default: the sandbox preset's --limit)
N_TEST=${N_TEST:-$($PY -m rankgrpo.sandbox settings evaluate.limit)}
start=$(date +%s)
last=$start
times=()
# stamp "title": close the stage before (its seconds go into the closing summary) and open this one
stamp() {
  local now; now=$(date +%s)
  [ -n "${stage:-}" ] && times+=("$(printf '%5ds  %s' $(( now - last )) "$stage")")
  last=$now; stage=$1
  echo "== [$(( now - start ))s] $1"
}

# A small world whose tokenizer gives each title and each year one token, and a 2.7M-parameter base
# model (output head untied) pretrained on what the world writes about its films (facts,
# co-preference sentences, catalog questions in chat form), so that it knows its catalog before SFT.
stamp "1/7 sandbox world and knowledge pretraining of the base model"
$PY -m rankgrpo.sandbox --out "$RUN/world" --preset demo --resume

stamp "2/7 build_demos.py (Remap-Reflect-Adjust with the simulated teacher)"
$PY build_demos.py --world "$RUN/world" --out "$RUN/demos"

stamp "3/7 train_sft.py (seed $SEED)"
$PY train_sft.py --model "$RUN/world/base_model" --train-data "$RUN/demos/train.jsonl" \
    --val-data "$RUN/demos/validation.jsonl" --catalog "$RUN/world/catalog.jsonl" --out "$RUN/seed$SEED/sft" \
    --seed "$SEED" --resume

stamp "4/7 train_rankgrpo.py (seed $SEED)"
$PY train_rankgrpo.py --model "$RUN/seed$SEED/sft/final" --data "$RUN/world/train.jsonl" \
    --val-data "$RUN/world/validation.jsonl" --catalog "$RUN/world/catalog.jsonl" --out "$RUN/seed$SEED/rankgrpo" \
    --seed "$SEED" --resume

stamp "5/7 baselines on the test split: popularity and the raw simulated teacher"
for kind in popularity teacher; do
  $PY -m rankgrpo.sandbox baseline --world "$RUN/world" --kind $kind --limit "$N_TEST" \
      --out "$RUN/baselines/$kind.jsonl" > /dev/null
  $PY evaluate.py --predictions "$RUN/baselines/$kind.jsonl" --data "$RUN/world/test.jsonl" \
      --catalog "$RUN/world/catalog.jsonl" --name "$kind" --out "$RUN/eval/$kind" --limit "$N_TEST" > "$RUN/eval_$kind.log"
done

stamp "6/7 evaluate.py on the test split, both decodings (two at a time, one thread each)"
# name:checkpoint:directory under eval/:extra flags
pids=()
for entry in "base (zero-shot):$RUN/world/base_model:base:" \
             "SFT:$RUN/seed$SEED/sft/final:seed$SEED/sft:" \
             "Rank-GRPO:$RUN/seed$SEED/rankgrpo/final:seed$SEED/rankgrpo:" \
             "SFT, no repeats:$RUN/seed$SEED/sft/final:seed$SEED/sft_no_repeats:--constrained --no-exclude-seen" \
             "Rank-GRPO, no repeats:$RUN/seed$SEED/rankgrpo/final:seed$SEED/rankgrpo_no_repeats:--constrained --no-exclude-seen"; do
  IFS=: read -r name model dir flags <<< "$entry"
  if [ ! -f "$RUN/eval/$dir/results.json" ]; then
    # on 2 cores two 1-thread evaluations finish sooner than one 2-thread one after another
    while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done  # a failed evaluation stops the script here...
    # shellcheck disable=SC2086  # $flags is a list of flags
    OMP_NUM_THREADS=1 $PY evaluate.py --model "$model" --data "$RUN/world/test.jsonl" --catalog "$RUN/world/catalog.jsonl" \
        --name "$name" --out "$RUN/eval/$dir" --limit "$N_TEST" $flags > "$RUN/eval_${dir//\//_}.log" &
    pids+=($!)
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done  # ... or here

stamp "7/7 results (test split, $N_TEST conversations, greedy, mean ±standard error clustered by prompt; seed $SEED)"
echo "-- the paper's protocol"
$PY evaluate.py --compare "$RUN/eval/base" "$RUN/eval/popularity" "$RUN/eval/seed$SEED/sft" "$RUN/eval/seed$SEED/rankgrpo" \
    --out "$RUN/results/seed$SEED/paper_protocol"
$PY evaluate.py --compare "$RUN/eval/teacher" "$RUN/eval/seed$SEED/rankgrpo" --out "$RUN/results/seed$SEED/teacher" | tail -3
echo "-- decoded without repeats (not the paper's protocol)"
$PY evaluate.py --compare "$RUN/eval/seed$SEED/sft_no_repeats" "$RUN/eval/seed$SEED/rankgrpo_no_repeats" \
    --out "$RUN/results/seed$SEED/no_repeats"
stamp "done"
echo "stage times (seconds, wall clock):"
printf '  %s\n' "${times[@]}"
