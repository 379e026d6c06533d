#!/bin/bash
# Train one config on SGE (Grid Engine):
#
#   qsub jobs/train.sh yamls/mamba-100k.yaml [key=value ...]
#
# Submit from the repository root after `make venv`: the job activates .venv there (SLM_VENV=.venv-current:
# that one). run_name is the yaml's stem unless given (run_name=...), so submitting the same command again
# resumes the run.
#
# Resources, each overridable on the qsub command line (qsub -l gpu=4 -pe smp 16 jobs/train.sh ...):
#   -l gpu=1              GPUs, as the per-job consumable complex sites define for them; one training
#                         process per GPU granted (-l gpu=0 on a CPU-only host: one process on the CPU)
#   -pe smp 8             CPU cores on one host (multi-host parallel environments: not supported here)
#   -l mem_free=16G       free memory the host must have
#   -l h_rt=24:00:00,s_rt=23:55:00   wall-clock limit. At s_rt SGE sends USR1 to every process of
#                         the job: training checkpoints at the next batch and stops, the job exits 99,
#                         which makes SGE requeue it, and the next start resumes.
#   -notify               USR2 before a qdel, suspend or preemption kills the job: the same stop
#                         (the queue's `notify` time must leave room for a checkpoint)
#   -r y                  rerun the job if its host fails
#   -o logs/ -j y         one log file, logs/slm-train.oJOBID (logs/ is in the repository)
#$ -N slm-train
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

SLM_JOB_USAGE="qsub jobs/train.sh CONFIG.yaml [key=value ...]"
task=${SGE_TASK_ID:-undefined}
SLM_JOB_ID="SGE job ${JOB_ID:-?}$([ "$task" = undefined ] || echo ".$task") (restarted: ${RESTARTED:-0})"
source jobs/common.sh
slm_job_setup "$@"
if [ -n "${PE_HOSTFILE:-}" ] && [ "$(wc -l < "$PE_HOSTFILE")" -gt 1 ]; then
    echo "slm job: the parallel environment spans $(wc -l < "$PE_HOSTFILE") hosts; jobs/train.sh runs on one" \
         "(use a one-host PE such as smp, or Slurm for several nodes)" >&2
    exit 2
fi
# SGE grants GPUs as a count without hiding the others: training uses at most that many.
SLM_GPUS=$(qstat -j "$JOB_ID" 2>/dev/null | sed -n 's/^hard resource_list:.*gpu=\([0-9]*\).*/\1/p' | head -1)
[ -n "$SLM_GPUS" ] && export SLM_GPUS

# SGE signals the whole job (every process): the launcher ignores it, training stops; this shell
# only has to survive it.
trap 'echo "slm job: USR1 (s_rt) at $(date -Is): training checkpoints at the next batch and stops"' USR1
trap 'echo "slm job: USR2 (notify) at $(date -Is): training checkpoints at the next batch and stops"' USR2
python -m slm.launch slm/train.py "$@" &
slm_wait $!
status=$?
if [ "$status" -eq "$SLM_EXIT_PREEMPTED" ]; then
    echo "slm job: stopped with a checkpoint; exit 99 asks SGE to requeue the job to resume"
    exit 99
fi
exit "$status"
