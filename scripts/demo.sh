#!/usr/bin/env bash
# The whole pipeline on the embedded sandbox, on CPU: world -> RRA demonstrations -> SFT ->
# Rank-GRPO -> greedy evaluation of the base model, SFT and Rank-GRPO on the test split.
# Every stage is one of the four scripts with explicit flags; rerunning resumes finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/demo}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
N_TEST=${N_TEST:-500}
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# A small world (200 films) so that a 2.2M-parameter model learns the catalog in minutes.
stamp "1/6 sandbox world"
$PY -m rankgrpo.sandbox --out "$RUN/world" --n-films 200 --n-train 6000 --n-validation 300 --n-test "$N_TEST"

stamp "2/6 build_demos.py (Remap-Reflect-Adjust with the simulated teacher)"
$PY build_demos.py --world "$RUN/world" --out "$RUN/demos" --train-fraction 1.0 --report-train 0

stamp "3/6 train_sft.py"
$PY train_sft.py --model "$RUN/world/base_model" --train-data "$RUN/demos/train.jsonl" \
    --val-data "$RUN/demos/validation.jsonl" --catalog "$RUN/world/catalog.jsonl" --out "$RUN/sft" \
    --max-steps ${SFT_STEPS:-300} --lr ${SFT_LR:-3e-3} --eval-every 100 --val-gen-examples 100 --save-every 100 --resume

stamp "4/6 train_rankgrpo.py"
$PY train_rankgrpo.py --model "$RUN/sft/final" --data "$RUN/world/train.jsonl" \
    --val-data "$RUN/world/validation.jsonl" --catalog "$RUN/world/catalog.jsonl" --out "$RUN/rankgrpo" \
    --steps ${RL_STEPS:-30} --lr ${RL_LR:-3e-5} --max-new-tokens 220 --stop-after-lines 21 \
    --eval-every 15 --val-examples 100 --save-every 10 --resume

stamp "5/6 evaluate.py on the test split"
for pair in "base (zero-shot):$RUN/world/base_model:base" "SFT:$RUN/sft/final:sft" "Rank-GRPO:$RUN/rankgrpo/final:rankgrpo"; do
  IFS=: read -r name model dir <<< "$pair"
  $PY evaluate.py --model "$model" --data "$RUN/world/test.jsonl" --catalog "$RUN/world/catalog.jsonl" \
      --name "$name" --out "$RUN/eval/$dir" --max-new-tokens 220 --stop-after-items 30 > "$RUN/eval_$dir.log"
done

stamp "6/6 results (test split, $N_TEST conversations, greedy, mean ±standard error)"
$PY evaluate.py --compare "$RUN/eval/base" "$RUN/eval/sft" "$RUN/eval/rankgrpo"
stamp "done"
