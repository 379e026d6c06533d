#!/bin/bash
# Tokenize a corpus on SGE in parts: an array task per part (contiguous ranges of documents, or of a streamed
# input's files), then a merge job held until the array is done. The shards are byte for byte those of one
# process (`slm tokenize --parts N`, docs/design.md "Tokenizing in parts"):
#
#   bash jobs/tokenize.sh --parts 8 -i CORPUS -f text -t TOKENIZER -l 512 --out-dir data/mds/train
#                                                        submits the 8 parts and the merge for you
#   qsub -t 1-8 jobs/tokenize.sh --parts 8 [...]                         the parts, by hand; then the merge:
#   SLM_TOKENIZE_MERGE=1 qsub -N slm-tokenize-merge jobs/tokenize.sh --parts 8 [...]
#
# The arguments, tokenizer and input are checked (`--check`) before anything is submitted. The parts are written
# beside --out-dir (OUT.parts/), which every host must see. Submitting the same command
# again runs only what is missing: finished parts are kept, a killed one is redone. The merge refuses a part
# missing (SGE starts it when the array ends, failed tasks too) or made from other input, another tokenizer or
# seq_len, naming it. Resources: the directives below; to change them, submit by hand with qsub's options. Logs
# in logs/slm-tokenize.oJOBID.TASK and logs/slm-tokenize-merge.oJOBID.
#$ -N slm-tokenize
#$ -S /bin/bash
#$ -cwd
#$ -V
#$ -pe smp 4
#$ -l mem_free=8G
#$ -l h_rt=12:00:00
#$ -r y
#$ -j y
#$ -o logs/

SLM_JOB_USAGE="bash jobs/tokenize.sh --parts N [slm tokenize arguments: -i, -t, --out-dir, ...]"
source jobs/common.sh || exit 2
slm_tokenize_setup "$@"
if [ -z "${JOB_ID:-}" ]; then  # run with bash: submit the parts, then the merge held on them
    unset SLM_TOKENIZE_MERGE  # -V passes the environment on: the parts must not see it
    slm_tokenize_check "$@"
    array=$(qsub -terse -t 1-"$SLM_PARTS" "$0" "$@") || exit 2
    echo "Your job-array ${array%%.*} (the parts, tasks 1-$SLM_PARTS) has been submitted"
    SLM_TOKENIZE_MERGE=1 exec qsub -N slm-tokenize-merge -hold_jid "${array%%.*}" "$0" "$@"
fi
echo "slm job: SGE job $JOB_ID on $(hostname) at $(date -Is)"
task=${SGE_TASK_ID:-undefined}
if [ "$task" != undefined ]; then
    exec slm tokenize "$@" --part "$task"
fi
if [ -n "${SLM_TOKENIZE_MERGE:-}" ]; then
    exec slm tokenize "$@" --merge
fi
echo "slm tokenize: neither an array task nor the merge: submit with bash jobs/tokenize.sh, or qsub -t 1-N" >&2
exit 2
