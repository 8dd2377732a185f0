#!/usr/bin/env bash
# The whole pipeline on the embedded sandbox, on CPU: world (with a base model pretrained on the
# world's film facts) -> RRA demonstrations -> SFT -> Rank-GRPO -> greedy evaluation on the test
# split, next to the popularity list and the raw simulated teacher. Every stage is one of the four
# scripts (or the sandbox's own command) with explicit flags; rerunning resumes finished runs.
#   SEED=3408 make demo      the same pipeline at another training seed (world and demonstrations fixed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/demo}
SEED=${SEED:-3407}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
N_TEST=${N_TEST:-500}   # conversations scored, the first of the world's 1,000 test conversations
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# A small world (200 films) whose tokenizer gives each title and each year one token, and a 2.7M-
# parameter base model (output head untied) pretrained on what the world writes about its films
# (facts, co-preference sentences, catalog questions in chat form), so that it knows its catalog
# before SFT. World, SFT and RL settings are those of benchmarks/paper_tables.py, whose report
# judges them at three seeds.
stamp "1/7 sandbox world and knowledge pretraining of the base model"
$PY -m rankgrpo.sandbox --out "$RUN/world" --n-films 200 --n-train 6000 --n-validation 300 --n-test 1000 \
    --title-tokens --no-tie-embeddings --pretrain-steps 800 --pretrain-chat-questions 8000

stamp "2/7 build_demos.py (Remap-Reflect-Adjust with the simulated teacher)"
$PY build_demos.py --world "$RUN/world" --out "$RUN/demos" --train-fraction 1.0 --report-train 0

stamp "3/7 train_sft.py (seed $SEED)"
$PY train_sft.py --model "$RUN/world/base_model" --train-data "$RUN/demos/train.jsonl" \
    --val-data "$RUN/demos/validation.jsonl" --catalog "$RUN/world/catalog.jsonl" --out "$RUN/seed$SEED/sft" \
    --max-steps 1200 --lr 3e-3 --seed "$SEED" --eval-every 0 --save-every 200 \
    --max-new-tokens 100 --resume

stamp "4/7 train_rankgrpo.py (seed $SEED)"
$PY train_rankgrpo.py --model "$RUN/seed$SEED/sft/final" --data "$RUN/world/train.jsonl" \
    --val-data "$RUN/world/validation.jsonl" --catalog "$RUN/world/catalog.jsonl" --out "$RUN/seed$SEED/rankgrpo" \
    --steps 30 --lr 1e-4 --prompts-per-step 8 --group-size 8 --beta 0.001 --seed "$SEED" --max-new-tokens 100 \
    --stop-after-lines 21 --eval-every 0 --save-every 10 --resume

stamp "5/7 baselines on the test split: popularity and the raw simulated teacher"
for kind in popularity teacher; do
  $PY -m rankgrpo.sandbox baseline --world "$RUN/world" --kind $kind --limit "$N_TEST" \
      --out "$RUN/baselines/$kind.jsonl" > /dev/null
  $PY evaluate.py --predictions "$RUN/baselines/$kind.jsonl" --data "$RUN/world/test.jsonl" \
      --catalog "$RUN/world/catalog.jsonl" --name "$kind" --out "$RUN/eval/$kind" --limit "$N_TEST" > "$RUN/eval_$kind.log"
done

stamp "6/7 evaluate.py on the test split"
for pair in "base (zero-shot):$RUN/world/base_model:base" "SFT:$RUN/seed$SEED/sft/final:seed$SEED/sft" \
            "Rank-GRPO:$RUN/seed$SEED/rankgrpo/final:seed$SEED/rankgrpo"; do
  IFS=: read -r name model dir <<< "$pair"
  if [ ! -f "$RUN/eval/$dir/results.json" ]; then
    $PY evaluate.py --model "$model" --data "$RUN/world/test.jsonl" --catalog "$RUN/world/catalog.jsonl" \
        --name "$name" --out "$RUN/eval/$dir" --limit "$N_TEST" --max-new-tokens 100 --stop-after-items 30 \
        > "$RUN/eval_${dir//\//_}.log"
  fi
done

stamp "7/7 results (test split, $N_TEST conversations, greedy, mean ±standard error; seed $SEED)"
$PY evaluate.py --compare "$RUN/eval/base" "$RUN/eval/popularity" "$RUN/eval/seed$SEED/sft" "$RUN/eval/seed$SEED/rankgrpo"
$PY evaluate.py --compare "$RUN/eval/teacher" "$RUN/eval/seed$SEED/rankgrpo" | tail -2
stamp "done"
