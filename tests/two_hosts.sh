#!/bin/bash
# Two-host test cluster on one Linux machine (root needed): network + UTS + mount namespaces
# h1, h2 on a private bridge, one munged, slurmctld on h1, slurmd on h1 and h2, optionally SGE.
#
#   tests/two_hosts.sh up            build everything (SGE too unless SLM_HOSTS_SGE=0)
#   tests/two_hosts.sh down          stop what `up` started (by pid), remove namespaces/links/state
#   tests/two_hosts.sh exec HOST CMD run CMD "on" HOST (its net/uts/mount namespaces), with the cluster env
#   tests/two_hosts.sh env           print the `export ...` lines for the root-namespace shell
#   tests/two_hosts.sh status        namespaces, links, pids
#   tests/two_hosts.sh selftest      srun -N2 hostname, sbatch --nodes=2 job with a TCP check, SGE checks
#
# Knobs (environment): SLM_HOSTS_DIR (state dir, default /tmp/slm-hosts),
# SLM_HOSTS_SHARED (colon list of paths under /tmp that stay shared across hosts; SLM_HOSTS_DIR always is),
# SLM_HOSTS_SGE (1/0).
set -u -o pipefail

PREFIX=slmhost
TESTS=$(cd "$(dirname "$0")" && pwd)  # tests/slurm-common.conf
DIR=${SLM_HOSTS_DIR:-/tmp/slm-hosts}
SHARED=${SLM_HOSTS_SHARED:-}
NET=10.235.0
BR=${PREFIX}br
HOSTS=(h1 h2)
declare -A IP=([h1]=$NET.1 [h2]=$NET.2)
BRIDGE_IP=$NET.254
SLURMCTLD_PORT=16917
SLURMD_PORT=16918
SGE_QMASTER_PORT=16944
SGE_EXECD_PORT=16945
SGE_WANTED=${SLM_HOSTS_SGE:-1}
SGE_CELL=slmhost
SGE_SYS=/var/lib/gridengine

ns() { echo "$PREFIX-$1"; }
log() { echo "[$(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# wait_for TIMEOUT_S DESCRIPTION CMD...: poll CMD every 0.25 s, at most TIMEOUT_S seconds.
wait_for() {
    local timeout=$1 what=$2 i n; shift 2
    n=$((timeout * 4))
    for ((i = 0; i < n; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    log "timed out after ${timeout}s waiting for $what"
    return 1
}

alive() { [ -d "/proc/$1" ] && ! grep -q '^[^)]*) Z' "/proc/$1/stat" 2>/dev/null; }

# kill_pid PID EXPECTED_COMM: SIGTERM, wait <= 15 s, SIGKILL. Only if /proc/PID/comm matches
# (guards against a recycled pid).
kill_pid() {
    local pid=$1 comm=$2
    [ -n "$pid" ] && alive "$pid" || return 0
    local actual; actual=$(cat "/proc/$pid/comm" 2>/dev/null)
    if [ "$actual" != "$comm" ]; then log "pid $pid is '$actual', not '$comm': left alone"; return 0; fi
    kill -TERM "$pid" 2>/dev/null
    wait_for 15 "pid $pid ($comm) to exit" bash -c "! [ -d /proc/$pid ] || grep -q '^[^)]*) Z' /proc/$pid/stat" ||
        kill -KILL "$pid" 2>/dev/null
}

pidfile_pid() { [ -s "$1" ] && head -c 32 "$1" | tr -dc '0-9'; }

anchor_pid() { pidfile_pid "$DIR/hosts/$1/anchor.pid"; }

# on HOST CMD...: run CMD in HOST's namespaces (net via the anchor's netns, uts, mnt), cwd kept.
on() {
    local host=$1; shift
    local pid; pid=$(anchor_pid "$host")
    [ -n "$pid" ] && alive "$pid" || die "host $host is not up"
    nsenter -t "$pid" -n -u -m -- /bin/sh -c 'cd "$0" 2>/dev/null || cd /; exec "$@"' "$PWD" "$@"
}

cluster_env() {
    cat <<EOF
export SLURM_CONF=$DIR/slurm/slurm.conf
export SGE_ROOT=$DIR/sge/root SGE_CELL=$SGE_CELL SGE_QMASTER_PORT=$SGE_QMASTER_PORT SGE_EXECD_PORT=$SGE_EXECD_PORT
export PATH=$DIR/sge/root/bin/lx-amd64:\$PATH
EOF
}

# ---------------------------------------------------------------- network + hosts
net_up() {
    ip link add "$BR" type bridge || return 1
    ip addr add "$BRIDGE_IP/24" dev "$BR"
    ip link set "$BR" up
    for h in "${HOSTS[@]}"; do
        local n; n=$(ns "$h")
        ip netns add "$n" || return 1
        ip link add "${PREFIX}v-$h" type veth peer name "${PREFIX}p-$h" || return 1
        ip link set "${PREFIX}v-$h" master "$BR"
        ip link set "${PREFIX}v-$h" up
        ip link set "${PREFIX}p-$h" netns "$n"
        ip -n "$n" link set "${PREFIX}p-$h" name eth0
        ip -n "$n" addr add "${IP[$h]}/24" dev eth0
        ip -n "$n" link set eth0 up
        ip -n "$n" link set lo up
    done
}

# Runs as the anchor process of one host, inside `nsenter --net=NS unshare --uts --mount`:
# sets the hostname, /etc/hosts, private /dev/shm and /tmp (shared dirs bound back), then sleeps.
anchor_main() {
    local h=$1 hd=$DIR/hosts/$1
    set -e
    hostname "$h"
    mount --bind "$DIR/etc/hosts" /etc/hosts
    mount -t tmpfs -o mode=1777,size=1g "$PREFIX-shm-$h" /dev/shm
    # a fresh tmpfs built beside the old /tmp, shared dirs bound into it, then moved over /tmp
    mkdir -p "$hd/newtmp"
    mount -t tmpfs -o mode=1777,size=2g "$PREFIX-tmp-$h" "$hd/newtmp"
    local IFS=: d
    for d in $DIR $SHARED; do
        [ -n "$d" ] || continue
        case $d in /tmp/*) ;; *) continue ;; esac   # outside /tmp: shared anyway
        [ -d "$d" ] || continue
        mkdir -p "$hd/newtmp/${d#/tmp/}"
        mount --bind "$d" "$hd/newtmp/${d#/tmp/}"
    done
    mount --move "$hd/newtmp" /tmp
    echo $$ >"$hd/anchor.pid"
    exec sleep infinity
}

hosts_up() {
    mkdir -p "$DIR/etc"
    { echo "127.0.0.1 localhost"
      for h in "${HOSTS[@]}"; do echo "${IP[$h]} $h $h.$PREFIX"; done
    } >"$DIR/etc/hosts"
    for h in "${HOSTS[@]}"; do
        mkdir -p "$DIR/hosts/$h"
        rm -f "$DIR/hosts/$h/anchor.pid"
        # nsenter --net, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup (slurmd needs it)
        setsid nsenter --net="/run/netns/$(ns "$h")" unshare --uts --mount --propagation private -- \
            "$SELF" _anchor "$h" </dev/null >"$DIR/hosts/$h/anchor.log" 2>&1 &
    done
    for h in "${HOSTS[@]}"; do
        wait_for 10 "host $h" test -s "$DIR/hosts/$h/anchor.pid" || return 1
        [ "$(on "$h" hostname)" = "$h" ] || { log "hostname on $h is wrong"; return 1; }
    done
}

# ---------------------------------------------------------------- munge
munge_up() {
    local m=$DIR/munge
    mkdir -p "$m"; chown munge:munge "$m"; chmod 0755 "$m"   # munged wants x for all on the socket dir
    runuser -u munge -- mungekey --create --keyfile="$m/munge.key" || return 1
    runuser -u munge -- munged --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
        --num-threads=2 || return 1
    wait_for 10 "munged" test -S "$m/munge.socket" || return 1
    wait_for 10 "munge to answer" bash -c "munge -n -S '$m/munge.socket' | unmunge -S '$m/munge.socket'"
}

# ---------------------------------------------------------------- slurm
slurm_up() {
    local s=$DIR/slurm
    mkdir -p "$s/state" "$s/log"
    touch "$s/gpu0" "$s/gpu1"
    echo "NodeName=h[1-2] Name=gpu File=$s/gpu[0-1]" >"$s/gres.conf"
    cat >"$s/slurm.conf" <<EOF
Include $TESTS/slurm-common.conf
ClusterName=$PREFIX
SlurmctldHost=h1(${IP[h1]})
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$s/state
SlurmdSpoolDir=$s/spool-%n
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd-%n.pid
SlurmctldLogFile=$s/log/slurmctld.log
SlurmdLogFile=$s/log/slurmd-%n.log
KillWait=30
NodeName=h1 NodeAddr=${IP[h1]} NodeHostname=h1 CPUs=16 RealMemory=64000 Gres=gpu:2 State=UNKNOWN
NodeName=h2 NodeAddr=${IP[h2]} NodeHostname=h2 CPUs=16 RealMemory=64000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=h[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$s/slurm.conf
    on h1 slurmctld || return 1
    wait_for 20 "slurmctld pid file" test -s "$s/slurmctld.pid" || return 1
    for h in "${HOSTS[@]}"; do
        mkdir -p "$s/spool-$h"
        on "$h" slurmd -N "$h" || return 1
    done
    for h in "${HOSTS[@]}"; do wait_for 20 "slurmd $h pid file" test -s "$s/slurmd-$h.pid" || return 1; done
    wait_for 60 "both Slurm nodes idle" bash -c '[ "$(sinfo -h -N -o "%N %T" | grep -c " idle")" = 2 ]' || return 1
}

slurm_down() {
    local s=$DIR/slurm
    [ -f "$s/slurm.conf" ] || return 0
    export SLURM_CONF=$s/slurm.conf
    local ctld; ctld=$(pidfile_pid "$s/slurmctld.pid")
    if [ -n "$ctld" ] && alive "$ctld"; then
        timeout 10 scancel --user=root 2>/dev/null
        wait_for 20 "Slurm jobs to end" bash -c '[ -z "$(timeout 5 squeue -h 2>/dev/null)" ]'
    fi
    for h in "${HOSTS[@]}"; do kill_pid "$(pidfile_pid "$s/slurmd-$h.pid")" slurmd & done
    kill_pid "$ctld" slurmctld &
    wait
}

# ---------------------------------------------------------------- SGE (own SGE_ROOT and cell)
sge_up() {
    local g=$DIR/sge r=$DIR/sge/root
    local c=$r/$SGE_CELL/common
    mkdir -p "$r" "$c" "$g/qmaster" "$g/execd" "$g/spooldb"
    for d in bin lib utilbin util; do ln -sfn "$SGE_SYS/$d" "$r/$d"; done
    cat >"$c/bootstrap" <<EOF
admin_user              sgeadmin
default_domain          none
ignore_fqdn             true
spooling_method         berkeleydb
spooling_lib            libspoolb
spooling_params         $g/spooldb
binary_path             /usr/sbin
qmaster_spool_dir       $g/qmaster
security_mode           none
listener_threads        2
worker_threads          2
scheduler_threads       1
EOF
    echo h1 >"$c/act_qmaster"
    # gid_range: an execd finds its jobs' processes by the extra group id it gives each, in every process of the
    # machine (one PID namespace). The one-node cluster's (tests/clusters.py) has the default 65400-65500: with the
    # same range its execd took this cluster's job for its own and waited for it to end.
    sed -e "s#^execd_spool_dir .*#execd_spool_dir        $g/execd#" \
        -e 's#^min_uid .*#min_uid                0#' -e 's#^min_gid .*#min_gid                0#' \
        -e 's#^load_report_time .*#load_report_time       00:00:05#' \
        -e 's#^gid_range .*#gid_range              65300-65399#' \
        /usr/share/gridengine/default-configuration >"$g/global.conf"
    chown -R sgeadmin:sgeadmin "$g"
    (   export SGE_ROOT=$r SGE_CELL
        set -e
        /usr/lib/gridengine/spoolinit berkeleydb libspoolb "$g/spooldb" init
        /usr/lib/gridengine/spooldefaults configuration "$g/global.conf"
        /usr/lib/gridengine/spooldefaults complexes /usr/share/gridengine/util/resources/centry
        /usr/lib/gridengine/spooldefaults usersets /usr/share/gridengine/util/resources/usersets
        /usr/lib/gridengine/spooldefaults managers root sgeadmin
    ) >"$g/init.log" 2>&1 || { log "SGE spool init failed, see $g/init.log"; return 1; }
    chown -R sgeadmin:sgeadmin "$g"
    eval "$(cluster_env)"
    on h1 sge_qmaster || return 1
    wait_for 30 "sge_qmaster" "$SELF" exec h1 qconf -sh || return 1
    local q
    qconf_retry() { for q in 1 2 3 4 5 6 7 8 9 10; do on h1 qconf "$@" && return 0; sleep 0.5; done; return 1; }
    for h in "${HOSTS[@]}"; do qconf_retry -ah "$h" >/dev/null; qconf_retry -as "$h" >/dev/null; done
    on h1 qconf -ssconf | sed -e 's#^schedule_interval .*#schedule_interval 0:0:1#' \
        -e 's#^flush_submit_sec .*#flush_submit_sec 1#' -e 's#^flush_finish_sec .*#flush_finish_sec 1#' >"$g/sched"
    qconf_retry -Msconf "$g/sched" >/dev/null
    printf '%s\n' "pe_name mpi" "slots 9999" "user_lists NONE" "xuser_lists NONE" "start_proc_args NONE" \
        "stop_proc_args NONE" 'allocation_rule 1' "control_slaves TRUE" "job_is_first_task FALSE" \
        "urgency_slots min" "accounting_summary FALSE" "qsort_args NONE" >"$g/pe.mpi"
    qconf_retry -Ap "$g/pe.mpi" >/dev/null
    # GPUs as sites define them (a count consumed per job), as tests/clusters.py's one-host cell does
    { on h1 qconf -sc | grep -v '^gpu '; echo "gpu gpu INT <= YES JOB 0 0"; } >"$g/complexes"
    qconf_retry -Mc "$g/complexes" >/dev/null
    for h in "${HOSTS[@]}"; do
        printf '%s\n' "hostname $h" "load_scaling NONE" "complex_values gpu=2" "user_lists NONE" "xuser_lists NONE" \
            "projects NONE" "xprojects NONE" "usage_scaling NONE" "report_variables NONE" >"$g/exechost.$h"
        qconf_retry -Ae "$g/exechost.$h" >/dev/null || qconf_retry -Me "$g/exechost.$h" >/dev/null
    done
    on h1 qconf -sq | sed -e 's#^qname .*#qname all.q#' -e 's#^hostlist .*#hostlist h1 h2#' \
        -e 's#^slots .*#slots 4#' -e 's#^pe_list .*#pe_list mpi#' -e 's#^shell .*#shell /bin/bash#' \
        -e 's#^load_thresholds .*#load_thresholds NONE#' -e 's#^rerun .*#rerun TRUE#' \
        -e 's#^notify .*#notify 00:00:30#' >"$g/all.q"
    qconf_retry -Aq "$g/all.q" >/dev/null || return 1
    for h in "${HOSTS[@]}"; do
        mkdir -p "$g/execd/$h"; chown sgeadmin:sgeadmin "$g/execd/$h"
        on "$h" sge_execd || return 1
    done
    for h in "${HOSTS[@]}"; do wait_for 20 "sge_execd $h pid" test -s "$g/execd/$h/execd.pid" || return 1; done
    wait_for 60 "SGE queues on h1 and h2" env SELF="$SELF" bash -c \
        '[ "$("$SELF" exec h1 qstat -f 2>/dev/null | grep -E "^all\.q@h[12] +BIP +[0-9]+/[0-9]+/[0-9]+ +[0-9.]+ +lx-amd64 *$" | wc -l)" = 2 ]'
}

sge_down() {
    local g=$DIR/sge
    [ -d "$g/root" ] || return 0
    eval "$(cluster_env)"
    local qm; qm=$(pidfile_pid "$g/qmaster/qmaster.pid")
    if [ -n "$qm" ] && alive "$qm"; then
        timeout 10 "$SELF" exec h1 qdel -f -u root >/dev/null 2>&1
        wait_for 20 "SGE jobs to end" bash -c "[ -z \"\$(timeout 5 '$SELF' exec h1 qstat 2>/dev/null)\" ]"
    fi
    # in parallel: sge_qmaster alone takes ~5 s to shut down
    for h in "${HOSTS[@]}"; do kill_pid "$(pidfile_pid "$g/execd/$h/execd.pid")" sge_execd & done
    kill_pid "$qm" sge_qmaster &
    wait
}

# ---------------------------------------------------------------- up / down
up() {
    [ "$(id -u)" = 0 ] || die "needs root"
    [ -e "$DIR" ] && die "$DIR exists: run '$SELF down' first"
    ip netns list | grep -q "^$PREFIX-" && die "namespaces $PREFIX-* exist: run '$SELF down' first"
    local t0=$SECONDS
    mkdir -p "$DIR"
    # `ip netns add` makes /run/netns a mount point the first time; undo that in `down` if it was us
    mountpoint -q /run/netns || touch "$DIR/made-run-netns"
    net_up || { down; die "network setup failed"; }
    hosts_up || { down; die "host namespaces failed"; }
    log "network + hosts: $((SECONDS - t0)) s"
    munge_up || { down; die "munged failed"; }
    slurm_up || { down; die "Slurm failed (logs in $DIR/slurm/log)"; }
    log "Slurm up: $((SECONDS - t0)) s"
    if [ "$SGE_WANTED" = 1 ]; then
        if sge_up; then log "SGE up: $((SECONDS - t0)) s"
        else log "SGE failed (see $DIR/sge); Slurm stays up"; sge_down; touch "$DIR/sge.failed"; fi
    fi
    cluster_env >"$DIR/env.sh"
    log "cluster up in $((SECONDS - t0)) s; 'source $DIR/env.sh', or '$SELF exec h1 CMD'"
}

down() {
    local t0=$SECONDS
    sge_down; log "SGE down: $((SECONDS - t0)) s"
    slurm_down; log "Slurm down: $((SECONDS - t0)) s"
    kill_pid "$(pidfile_pid "$DIR/munge/munged.pid")" munged
    # anything still inside our namespaces (job steps, slurmstepd, shepherds, anchors) was started by
    # us: the namespaces are ours, so every pid in them is; kill them by pid, bounded
    local h n pids round
    for h in "${HOSTS[@]}"; do
        n=$(ns "$h")
        ip netns list | grep -q "^$n\b" || continue
        for round in TERM TERM KILL; do
            pids=$(ip netns pids "$n" 2>/dev/null | tr '\n' ' ')
            [ -z "$pids" ] && break
            kill -"$round" $pids 2>/dev/null
            wait_for 5 "processes in $n to exit" bash -c "[ -z \"\$(ip netns pids $n)\" ]" && break
        done
        pids=$(ip netns pids "$n" 2>/dev/null | tr '\n' ' ')
        [ -n "$pids" ] && log "still in $n: $pids"
        ip netns del "$n"
    done
    for h in "${HOSTS[@]}"; do ip link show "${PREFIX}v-$h" >/dev/null 2>&1 && ip link del "${PREFIX}v-$h"; done
    ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
    if [ -e "$DIR/made-run-netns" ] && mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ]; then
        umount /run/netns && rmdir /run/netns
    fi
    # mounts lived only in the hosts' private mount namespaces and went with their last process;
    # check none leaked into this namespace before removing the state dir
    if findmnt -rn -o TARGET | grep -q "^$DIR"; then
        log "mounts under $DIR remain: $(findmnt -rn -o TARGET | grep "^$DIR" | tr '\n' ' '); $DIR kept"
        return 1
    fi
    # keep the logs of the last run beside the state dir, for post-mortems
    rm -rf "$DIR.logs"; mkdir -p "$DIR.logs"
    (cd "$DIR" 2>/dev/null && find . \( -name '*.log' -o -name messages -o -name '*.out' \) -type f |
        xargs -r cp --parents -t "$DIR.logs" 2>/dev/null)
    case $DIR in /tmp/?*) rm -rf "$DIR" ;; esac
    return 0
}

status() {
    echo "namespaces:"; ip netns list | grep "^$PREFIX-" || true
    echo "links:"; ip -br link | grep "^$PREFIX" || true
    echo "pid files:"
    find "$DIR" -name '*.pid' 2>/dev/null | while read -r f; do
        p=$(pidfile_pid "$f"); printf '  %s %s %s\n' "$f" "$p" "$(alive "$p" && cat /proc/$p/comm)"
    done
}

selftest() {
    eval "$(cluster_env)"
    local s=$DIR/test; mkdir -p "$s"; cd "$s" || return 1
    local ok=0
    echo "== srun -N2 hostname (from h1)"
    on h1 timeout 60 srun -N2 -l hostname | sort || ok=1
    echo "== srun -N2 hostname (from the root namespace, via the bridge)"
    timeout 60 srun -N2 -l hostname | sort || ok=1
    cat >"$s/job.sh" <<'EOF'
#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --time=5 --output=job-%j.out
echo "batch on $(hostname), nodes $SLURM_JOB_NODELIST"
srun -l bash -c 'echo "$(hostname) /tmp=$(findmnt -n -o SOURCE /tmp) shm=$(findmnt -n -o SOURCE /dev/shm)"; ip -4 -o addr show eth0'
srun -l bash -c 'touch /tmp/only-on-$(hostname) /dev/shm/only-on-$(hostname); ls /tmp /dev/shm | grep only-on | tr "\n" " "; echo'
srun --overlap -N1 -n1 -w h1 timeout 30 /usr/bin/python3 -c '
import socket; s = socket.create_server(("0.0.0.0", 17001)); s.settimeout(25)
c, a = s.accept(); print("h1 got", c.recv(100).decode(), "from", a[0])' &
listener=$!
srun --overlap -N1 -n1 -w h2 timeout 30 /usr/bin/python3 -c '
import socket, time
for i in range(40):
    try: c = socket.create_connection(("h1", 17001), timeout=2); break
    except OSError: time.sleep(0.5)
c.sendall(("hello from " + socket.gethostname()).encode()); print("h2 sent")'
wait $listener && echo TCP-OK
EOF
    echo "== sbatch --nodes=2"
    local id; id=$(sbatch --parsable "$s/job.sh") || ok=1
    wait_for 90 "job $id" bash -c "[ -z \"\$(squeue -h -j $id 2>/dev/null)\" ]" || ok=1
    cat "$s/job-$id.out"; grep -q TCP-OK "$s/job-$id.out" || ok=1
    if [ -d "$DIR/sge/root" ] && [ ! -e "$DIR/sge.failed" ]; then
        echo "== SGE: qstat -f (on h1)"; on h1 qstat -f
        cat >"$s/sge.sh" <<'EOF'
#!/bin/bash
#$ -S /bin/bash -cwd -j y -o sge.out -pe mpi 2
echo "master on $(hostname); PE_HOSTFILE:"; cat $PE_HOSTFILE
# qrsh -inherit joins its arguments into one command line for a shell: pass a script, not bash -c '...'
for h in $(awk '{print $1}' $PE_HOSTFILE); do
  echo "qrsh -inherit $h:"; timeout 30 qrsh -inherit $h $PWD/where.sh
done
echo SGE-DONE
EOF
        printf '%s\n' '#!/bin/sh' 'echo "  ran on $(hostname) $(ip -4 -o addr show eth0 | awk "{print \$4}") tmp=$(findmnt -n -o SOURCE /tmp)"' >"$s/where.sh"
        chmod +x "$s/where.sh"
        rm -f "$s/sge.out"
        local jid; jid=$(on h1 qsub -terse "$s/sge.sh") || ok=1
        wait_for 90 "SGE job $jid" bash -c "! '$SELF' exec h1 qstat | grep -q \"^ *$jid \"" || ok=1
        cat "$s/sge.out"; [ "$(grep -c 'ran on' "$s/sge.out")" = 2 ] || ok=1
    fi
    return $ok
}

SELF=$(readlink -f "$0")
case ${1:-} in
    up) up ;;
    down) down ;;
    _anchor) anchor_main "$2" ;;
    exec) shift; h=$1; shift; eval "$(cluster_env)"; on "$h" "$@" ;;
    env) cluster_env ;;
    status) status ;;
    selftest) selftest ;;
    *) sed -n '2,14p' "$SELF"; exit 2 ;;
esac
