# Sourced by the job scripts (not a job itself): the repository's environment and the wait for training.

# The stack the jobs run on: .venv (pinned, `make venv`), or SLM_VENV=.venv-current (`make venv STACK=current`),
# set at submission (sbatch and `qsub -V` pass it on).
SLM_VENV="${SLM_VENV:-.venv}"

# The card's example, what a job script trains when given no argument (`qsub jobs/train.sh`, `sbatch
# jobs/train.sbatch`), and the data it reads (`make data` writes it).
SLM_EXAMPLE=yamls/mamba-100k.yaml
SLM_EXAMPLE_DATA="data/mds/train data/mds/validation"

# Say that the example is trained, once its data is there; one line and exit 2 if not: the data is made on a login
# node (`make data`), not on a compute node.
slm_example() {
    local folder
    for folder in $SLM_EXAMPLE_DATA; do
        if [ ! -f "$folder/index.json" ]; then
            echo "slm job: no config given, so the example $SLM_EXAMPLE, which reads $folder: not found in $PWD; run" \
                 "'make data' there (on a login node), then submit again" >&2
            exit 2
        fi
    done
    echo "slm job: no config given: training the example, $SLM_EXAMPLE"
}

# Activate $SLM_VENV in the submission folder (the repository root) and check the config exists; one line
# and exit 2 otherwise, before anything starts.
slm_job_setup() {
    if [ $# -lt 1 ] || [[ "$1" != *.y*ml ]]; then
        echo "slm job: usage: $SLM_JOB_USAGE" >&2
        exit 2
    fi
    if [ ! -x "$SLM_VENV/bin/python" ]; then
        echo "slm job: no $SLM_VENV in $PWD: submit from the repository root, after 'make venv' there" >&2
        exit 2
    fi
    if [ ! -f "$1" ]; then
        echo "slm job: config $1 not found in $PWD" >&2
        exit 2
    fi
    # shellcheck disable=SC1091
    source "$SLM_VENV/bin/activate"
    echo "slm job: $SLM_JOB_ID on $(hostname) at $(date -Is): python -m slm.cluster.launch slm/train.py $*"
}

# The suite scripts' checks (jobs/suite.sbatch, jobs/suite.sh): a yaml among the arguments (else the usage line,
# $SLM_JOB_USAGE) and $SLM_VENV in the submission folder, exit 2 otherwise; with --dry-run, print the tasks and
# exit. The tasks themselves come from slm/cluster/sweep.py ($SLM_VENV/bin/python -m slm.cluster.sweep --count / --task N ARGS).
slm_suite_setup() {
    local arg yaml=""
    for arg in "$@"; do
        if [[ "$arg" != *=* && "$arg" == *.y*ml ]]; then yaml=1; fi
    done
    if [ -z "$yaml" ]; then
        echo "slm suite: usage: $SLM_JOB_USAGE" >&2
        exit 2
    fi
    if [ ! -x "$SLM_VENV/bin/python" ]; then
        echo "slm suite: no $SLM_VENV in $PWD: submit from the repository root, after 'make venv' there" >&2
        exit 2
    fi
    for arg in "$@"; do
        if [ "$arg" = --dry-run ]; then exec "$SLM_VENV/bin/python" -m slm.cluster.sweep "$@"; fi
    done
}

# Wait for the background process $1 and return its exit status. `wait` also returns when a trapped
# signal arrives, so wait again while it runs; bash keeps the status for the last `wait`.
slm_wait() {
    while kill -0 "$1" 2>/dev/null; do
        wait "$1"
    done
    wait "$1"
}

# Exit status of a training run that stopped on a signal after saving a checkpoint (slm/cluster/launch.py).
SLM_EXIT_PREEMPTED=75

# The tokenize scripts' checks (jobs/tokenize.sbatch, jobs/tokenize.sh): `--parts N` among the arguments (N, the
# array's size, in $SLM_PARTS) and --out-dir (the parts are written beside it), $SLM_VENV in the submission folder;
# the usage line ($SLM_JOB_USAGE) and exit 2 otherwise. Activates $SLM_VENV.
slm_tokenize_setup() {
    local previous="" arg out=""
    SLM_PARTS=""
    for arg in "$@"; do
        if [ "$previous" = --parts ]; then SLM_PARTS="$arg"; fi
        if [ "$previous" = --out-dir ]; then out=1; fi
        if [ "$arg" = --part ] || [ "$arg" = --merge ]; then
            echo "slm tokenize: the job gives --part and --merge itself: usage: $SLM_JOB_USAGE" >&2
            exit 2
        fi
        previous="$arg"
    done
    if ! [[ "$SLM_PARTS" =~ ^[1-9][0-9]*$ ]] || [ -z "$out" ]; then
        echo "slm tokenize: usage: $SLM_JOB_USAGE" >&2
        exit 2
    fi
    if [ ! -x "$SLM_VENV/bin/python" ]; then
        echo "slm tokenize: no $SLM_VENV in $PWD: submit from the repository root, after 'make venv' there" >&2
        exit 2
    fi
    # shellcheck disable=SC1091
    source "$SLM_VENV/bin/activate"
}

# Before submitting: check the arguments, the tokenizer and the input's first document (`slm tokenize --check`), so
# that a typo fails here in one line, not in every array task.
slm_tokenize_check() {
    slm tokenize "$@" --check > /dev/null || exit 2
}
