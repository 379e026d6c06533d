#!/bin/bash
# Train a suite on SGE, one array task per yaml, each run as jobs/train.sh runs one:
#
#   bash jobs/suite.sh yamls/mamba-*.yaml [key=value ...]         submits the array for you
#   qsub -t 1-4 jobs/suite.sh yamls/mamba-*.yaml [key=value ...]  the same, by hand
#
# key=value overrides apply to every yaml. Each task resumes, checkpoints on USR1/USR2 and is
# requeued alone. Resources per task as in jobs/train.sh (same overrides); logs in
# logs/slm-suite.oJOBID.TASK.
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

configs=() overrides=()
for arg in "$@"; do
    if [[ "$arg" == *=* ]]; then overrides+=("$arg"); else configs+=("$arg"); fi
done
if [ ${#configs[@]} -eq 0 ]; then
    echo "slm suite: usage: qsub -t 1-N jobs/suite.sh CONFIG.yaml... [key=value ...]" >&2
    exit 2
fi
if [ -z "${JOB_ID:-}" ]; then  # run with bash: submit this file as an array of the right size
    exec qsub -t 1-${#configs[@]} "$0" "$@"
fi
task=${SGE_TASK_ID:-undefined}
if [ "$task" = undefined ] || [ "$task" -gt ${#configs[@]} ]; then
    echo "slm suite: task '${task}' has no yaml: submit with -t 1-${#configs[@]}" >&2
    exit 2
fi
exec bash jobs/train.sh "${configs[$((task - 1))]}" "${overrides[@]}"
