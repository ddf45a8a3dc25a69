#!/usr/bin/env bash
# Train a draft model: python train.py --config <file> --opts <key.path=value> ...
#
# train.py spawns one worker per visible GPU (CUDA_VISIBLE_DEVICES), or
# train.num_cpu_workers gloo workers on a machine without GPUs. For several nodes, run
# this script on every node with NODE_RANK = node rank and NNODES = number of nodes
# (torchrun's names), or RANK / WORLD_SIZE meaning the same (the DeepSpec reference's
# train.sh: node rank and node count, not process rank and count); MASTER_ADDR /
# MASTER_PORT: node 0's address and a free port. Under torchrun (LOCAL_RANK set) each
# process is one worker instead.
#
# Shipped configs, one per algorithm and target (each is config/<algo>/base.py, the
# algorithm, plus its target's row of config/targets.py: hub id, layer ids, mask token;
# the smollm2_135m ones add the tuned CPU recipe; docs/training.md "Configs"):
## dspark
#   config/dspark/dspark_qwen3_4b.py   config/dspark/dspark_qwen3_8b.py
#   config/dspark/dspark_qwen3_14b.py  config/dspark/dspark_gemma4_12b.py
#   config/dspark/dspark_smollm2_135m.py   (CPU, embedded target)
## dflash
#   config/dflash/dflash_qwen3_4b.py   config/dflash/dflash_qwen3_8b.py
#   config/dflash/dflash_qwen3_14b.py  config/dflash/dflash_gemma4_12b.py
#   config/dflash/dflash_smollm2_135m.py   (CPU, embedded target)
## eagle3
#   config/eagle3/eagle3_qwen3_4b.py   config/eagle3/eagle3_qwen3_8b.py
#   config/eagle3/eagle3_qwen3_14b.py  config/eagle3/eagle3_gemma4_12b.py
#   config/eagle3/eagle3_smollm2_135m.py   (CPU, embedded target)
#
# Usage:
#   bash scripts/train/train.sh [config] [more --opts ...]
#   target_cache_dir=/data/qwen3_4b_cache bash scripts/train/train.sh config/dspark/dspark_qwen3_4b.py
#
# --opts overrides any config key (values are YAML scalars or lists); repeat it:
#   --opts train.lr=3e-4 --opts train.local_batch_size=2
#   --opts train.max_train_steps=1000 --opts logging.checkpointing_steps=200
#   --opts data.mode=online --opts data.train_data_paths=[data/regen/train.jsonl]
#   --opts train.sharding_strategy=full_shard        # FSDP instead of DDP
#   --opts train.resume=false                         # ignore step_latest, start fresh
# SIGTERM or Ctrl-C saves a checkpoint and exits with code 75; rerun the same command to
# resume (a second Ctrl-C aborts at once, keeping the earlier checkpoints).
# Checkpoints: ~/checkpoints/<project_name>/<exp_name>/step_<N> and step_latest.
#
# Runs where you stand: relative paths (target_cache_dir, paths in --opts) name places in
# your current directory, never inside this checkout. The config is looked up where you
# stand first; a shipped one named from the repository root (config/dspark/...) is found
# from anywhere. No config argument (or options only): config/dspark/dspark_smollm2_135m.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export RANK=${RANK:-0}
export WORLD_SIZE=${WORLD_SIZE:-1}

config_path=$ROOT/config/dspark/dspark_smollm2_135m.py
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  [ -n "$1" ] && config_path=$1
  shift
  # a shipped config named from the repository root, when no such file is where you stand
  if [[ "$config_path" != /* ]] && [ ! -e "$config_path" ] && [ -f "$ROOT/$config_path" ]; then
    config_path=$ROOT/$config_path
  fi
fi
target_cache_dir=${target_cache_dir:-${HOME}/.cache/deepspec/smollm2_target_cache}

"${PYTHON:-python3}" "$ROOT/train.py" \
    --config "${config_path}" \
    --opts "data.target_cache_path=${target_cache_dir}" \
    "$@"
