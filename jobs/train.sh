#!/bin/bash
# Train one config on SGE (Grid Engine):
#
#   qsub jobs/train.sh yamls/mamba-100k.yaml [key=value ...]
#   qsub jobs/train.sh             # no argument: the example, yamls/mamba-100k.yaml, on `make data`'s data
#
# Submit from the repository root after `make venv`: the job activates .venv there (SLM_VENV=.venv-current:
# that one). run_name is the yaml's stem unless given (run_name=...), so submitting the same command again
# resumes the run.
#
# Resources, each overridable on the qsub command line (qsub -l gpu=4 -pe smp 16 jobs/train.sh ...):
#   -l gpu=1              GPUs, as the per-job consumable complex sites define for them; one training
#                         process per GPU granted (-l gpu=0 on a CPU-only host: one process on the CPU)
#   -pe smp 8             CPU cores on one host. A parallel environment spanning hosts (e.g. -pe mpi 2 with
#                         allocation_rule 1 and control_slaves TRUE) trains one run on all of
#                         them: one launcher per host, the others started by `qrsh -inherit` (SGE's own way,
#                         no ssh), all told the job's hosts
#   -l mem_free=16G       free memory the host must have
#   -l h_rt=24:00:00,s_rt=23:55:00   wall-clock limit. At s_rt SGE sends USR1 to every process of
#                         the job: training checkpoints at the next batch and stops, the job exits 99,
#                         which makes SGE requeue it, and the next start resumes (across hosts: a copy of
#                         the job, qresub, since SGE does not restart a requeued one where qrsh -inherit ran).
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

SLM_JOB_USAGE="qsub jobs/train.sh [CONFIG.yaml [key=value ...]]"
task=${SGE_TASK_ID:-undefined}
SLM_JOB_ID="SGE job ${JOB_ID:-?}$([ "$task" = undefined ] || echo ".$task") (restarted: ${RESTARTED:-0})"
source jobs/common.sh
[ $# -gt 0 ] || { slm_example; set -- "$SLM_EXAMPLE"; }
slm_job_setup "$@"
# SGE grants GPUs as a count without hiding the others: training uses at most that many.
SLM_GPUS=$(qstat -j "$JOB_ID" 2>/dev/null | sed -n 's/^hard resource_list:.*gpu=\([0-9]*\).*/\1/p' | head -1)
[ -n "$SLM_GPUS" ] && export SLM_GPUS

# SGE signals the whole job (every process): the launcher ignores it, training stops; this shell
# only has to survive it.
trap 'echo "slm job: USR1 (s_rt) at $(date -Is): training checkpoints at the next batch and stops"' USR1
trap 'echo "slm job: USR2 (notify) at $(date -Is): training checkpoints at the next batch and stops"' USR2
# A parallel environment spanning hosts: one launcher on each, the others started on theirs by qrsh -inherit
# (which hands its command to a shell: every word quoted), each given the job's hosts (slm/cluster/launch.py). SGE signals
# each host's processes of the job itself; the qrsh clients here ignore those signals, which would end them.
others=()
if [ -n "${PE_HOSTFILE:-}" ] && [ "$(wc -l < "$PE_HOSTFILE")" -gt 1 ]; then
    SLM_PE_HOSTS=$(awk '{print $1}' "$PE_HOSTFILE" | tr '\n' ' ')
    export SLM_PE_HOSTS
    for host in $SLM_PE_HOSTS; do
        [ "${host%%.*}" = "$(hostname -s)" ] && continue
        (trap '' USR1 USR2 TERM
         exec qrsh -inherit -nostdin "$host" "cd $(printf %q "$PWD") && SLM_PE_HOSTS=$(printf %q "$SLM_PE_HOSTS")" \
             "$(printf '%q ' "$SLM_VENV/bin/python" -m slm.cluster.launch slm/train.py "$@")") &
        others+=($!)
    done
fi
python -m slm.cluster.launch slm/train.py "$@" &
slm_wait $!
status=$?
for pid in "${others[@]}"; do  # the first failure's status, as on one host
    slm_wait "$pid"
    other=$?
    [ "$status" -eq 0 ] && status=$other
done
if [ "$status" -eq "$SLM_EXIT_PREEMPTED" ] && [ ${#others[@]} -gt 0 ]; then
    # SGE does not start a requeued job again on a host where it ran a `qrsh -inherit` task ("cannot run on host
    # ... until clean up of a previous run has finished", Grid Engine 8.1): a copy of the job resumes instead.
    if copy=$(qresub "$JOB_ID" 2>&1); then
        echo "slm job: stopped with a checkpoint; a copy of job $JOB_ID resumes it: $copy"
        exit 0
    fi
    echo "slm job: stopped with a checkpoint, but qresub $JOB_ID failed ($copy): submit the job again to resume" >&2
fi
if [ "$status" -eq "$SLM_EXIT_PREEMPTED" ]; then
    echo "slm job: stopped with a checkpoint; exit 99 asks SGE to requeue the job to resume"
    exit 99
fi
exit "$status"
