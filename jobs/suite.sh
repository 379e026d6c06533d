#!/bin/bash
# Train a suite on SGE, one array task per yaml and combination of grid values, each run as
# jobs/train.sh runs one:
#
#   bash jobs/suite.sh yamls/mamba-*.yaml [key=value ...]         submits the array for you
#   bash jobs/suite.sh yamls/mamba-100k.yaml --grid optimizer.lr=1e-3,3e-3 seed=0,1
#                                                                 a 2 x 2 grid: 4 tasks
#   bash jobs/suite.sh --dry-run [...]                            prints the tasks, submits nothing
#   bash jobs/suite.sh --per-device 4 yamls/llama-*.yaml          four runs at once in each array task
#   qsub -t 1-4 jobs/suite.sh [...]                               the same array, by hand
#
# --per-device K: each array task trains K runs at once on its GPU (CUDA MPS where the node has it) or
# its CPU cores split between them, so the array has N/K tasks; each run still resumes by its own
# run_name, and the array task requeues when any of its runs was stopped by a signal.
# key=value overrides apply to every task. --grid KEY=V1,V2,... is an axis, as is each KEY=V1,V2,...
# right after it; a yaml's `sweep:` block (KEY: [V1, V2]) adds axes to its tasks. A task's run_name
# is the yaml's stem (or run_name=...) plus its combination, mamba-100k_lr1e-3_seed0, so submitting
# the same command again resumes every run (slm/cluster/sweep.py has the rules; `slm sweep --help`). On
# submission every task's config is loaded first: a typo fails here, not in the array. Each task
# resumes, checkpoints on USR1/USR2 and is requeued alone. Resources per task as in jobs/train.sh
# (same overrides); logs in logs/slm-suite.oJOBID.TASK.
#$ -N slm-suite
#$ -S /bin/bash
#$ -cwd
#$ -V
#$ -l gpu=1
#$ -pe smp 8
#$ -l mem_free=16G
#$ -l h_rt=24:00:00,s_rt=23:55:00
#$ -notify
#$ -r y
#$ -j y
#$ -o logs/

SLM_JOB_USAGE="bash jobs/suite.sh [--dry-run] [--per-device K] [--grid KEY=V1,V2,...]... CONFIG.yaml... [key=value ...]"
source jobs/common.sh || exit 2
slm_suite_setup "$@"
if [ -z "${JOB_ID:-}" ]; then  # run with bash: submit this file as an array of the right size
    count=$("$SLM_VENV/bin/python" -m slm.cluster.sweep --count "$@") || exit 2
    exec qsub -t 1-"$count" "$0" "$@"
fi
task=${SGE_TASK_ID:-undefined}
if [ "$task" = undefined ]; then
    echo "slm suite: not an array task: submit with bash jobs/suite.sh, or qsub -t 1-N" >&2
    exit 2
fi
task_args=$("$SLM_VENV/bin/python" -m slm.cluster.sweep --task "$((task - 1))" "$@") || exit 2  # SGE counts from 1
mapfile -t task_args <<< "$task_args"
exec bash jobs/train.sh "${task_args[@]}"
