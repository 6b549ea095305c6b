#!/usr/bin/env bash
# A real four-node Slurm cluster on loopback for the tests: one slurmctld, four
# `slurmd -N nX`, munge, and (by default) slurmdbd + MariaDB so that `sacct` works.
#
#   tests/slurm/cluster.sh start    # install if needed, configure, start, wait for 4 nodes
#   tests/slurm/cluster.sh status   # print daemons and sinfo; non-zero unless the cluster is up
#   tests/slurm/cluster.sh stop     # cancel jobs, stop the daemons this script started
#
# Runs as root on Debian 12 (slurm-wlm 22.05). See README.md next to this file.
set -euo pipefail

NODES=(n1 n2 n3 n4)
NODE_RANGE="n[1-4]"
FIRST_PORT=17001
CPUS_PER_NODE=2
CLUSTER=loopback
PARTITION="batch"
# slurmdbd (sacct works) or filetxt (no database; finished jobs go to $JOBCOMP_FILE only).
ACCOUNTING=${SLURM_LOOPBACK_ACCOUNTING:-slurmdbd}
TIMEOUT=${SLURM_LOOPBACK_TIMEOUT:-90}

CONF_DIR=/etc/slurm                 # where Debian's clients look, so sinfo/sbatch/Parsl need no SLURM_CONF
STATE_DIR=/var/lib/slurm-loopback
LOG_DIR=/var/log/slurm-loopback
RUN_DIR=/run/slurm-loopback
JOBCOMP_FILE=$LOG_DIR/jobcomp.log
DB_USER=slurm
DB_PASS=slurm-loopback               # MariaDB only listens on 127.0.0.1; a test-only password
DB_NAME=slurm_acct_db

HOST=$(hostname -s 2>/dev/null || uname -n)
HOST=${HOST%%.*}

log() { printf '[slurm-loopback] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- process helpers ---------------------------------------------------------------

# alive PIDFILE: the pid file names a running process whose name is the file's name up to
# the first dot (slurmd.n1.pid -> slurmd); guards against stale files, reused pids and
# zombies (a daemon's parent is init, which may be slow to reap in containers).
alive() {
    local pid stat comm=${1##*/}
    comm=${comm%%.*}
    [[ -r $1 ]] || return 1
    pid=$(<"$1") || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    # /proc/PID/stat is "PID (COMM) STATE ..."
    [[ $stat == "$pid ($comm) "* && $stat != "$pid ($comm) Z"* ]]
}

pid_running() { [[ -r /proc/$1/stat && $(cat "/proc/$1/stat" 2>/dev/null) != "$1 ("*") Z"* ]]; }

# stop_pidfiles PIDFILE...: TERM them all at once (each Slurm daemon takes ~2 s to exit),
# wait up to 15 s, then KILL what is left.
stop_pidfiles() {
    local f pid pids=() i
    for f in "$@"; do
        if alive "$f"; then
            pid=$(<"$f")
            pids+=("$pid")
            kill -TERM "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 150; i++)); do
            pid_running "$pid" || break
            sleep 0.1
        done
        if pid_running "$pid"; then
            log "process $pid ignored TERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s; die with the logs.
wait_for() {
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 2; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    dump_logs
    die "timed out after ${secs}s waiting for $what"
}

dump_logs() {
    local f
    for f in "$LOG_DIR"/*.log; do
        [[ -f $f && $f != "$JOBCOMP_FILE" ]] || continue
        printf '\n===== tail %s =====\n' "$f" >&2
        # Without libpmix2 every daemon logs that the mpi/pmix plugins cannot load; harmless here.
        grep -vE 'pmix|MPI: Cannot create context' "$f" | tail -n 25 >&2 || true
    done
}

# --- packages ----------------------------------------------------------------------

install_packages() {
    local pkgs=(slurm-wlm munge) missing=() p created_policy=0
    [[ $ACCOUNTING == slurmdbd ]] && pkgs+=(slurmdbd mariadb-server)
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    # Keep the packaged services from starting: on a systemd machine they would come up with
    # Debian's defaults (mariadb, munge) before our configuration exists. We start everything.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq &&
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    } || rc=$?
    ((created_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get failed ($rc)"
}

# --- configuration -----------------------------------------------------------------

# put_file PATH MODE: write stdin to PATH if different; returns 0 when the file changed.
put_file() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 1
    fi
    install -m "$2" -o root -g root "$tmp" "$1"
    rm -f "$tmp"
    return 0
}

slurm_conf() {
    local last_port=$((FIRST_PORT + ${#NODES[@]} - 1))
    cat <<EOF
# Written by tests/slurm/cluster.sh; rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge

StateSaveLocation=$STATE_DIR/ctld
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
# Several slurmd on one host: every per-daemon path carries the node name.
SlurmdSpoolDir=$STATE_DIR/slurmd.%n
SlurmdPidFile=$RUN_DIR/slurmd.%n.pid
SlurmdLogFile=$LOG_DIR/slurmd.%n.log

# No cgroups: works in containers and VMs alike, and nothing here needs confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
# The nodes claim more CPUs than the machine has; accept the declared layout.
SlurmdParameters=config_overrides
ReturnToService=2

# Short timeouts so tests do not wait on defaults meant for real machines.
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=2
Waittime=0
MinJobAge=300
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0

$(accounting_conf)
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_FILE

NodeName=$NODE_RANGE NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$FIRST_PORT-$last_port CPUs=$CPUS_PER_NODE RealMemory=2048 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE_RANGE Default=YES MaxTime=INFINITE State=UP
EOF
}

accounting_conf() {
    if [[ $ACCOUNTING == slurmdbd ]]; then
        cat <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
EOF
    else
        echo "AccountingStorageType=accounting_storage/none"
    fi
}

slurmdbd_conf() {
    cat <<EOF
# Written by tests/slurm/cluster.sh; rewritten on every start.
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
}

# Sets CONFIG_CHANGED=1 when slurm.conf or slurmdbd.conf changed.
CONFIG_CHANGED=0
write_configs() {
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$LOG_DIR" "$RUN_DIR"
    for n in "${NODES[@]}"; do mkdir -p "$STATE_DIR/slurmd.$n"; done
    if slurm_conf | put_file "$CONF_DIR/slurm.conf" 644; then CONFIG_CHANGED=1; fi
    if [[ $ACCOUNTING == slurmdbd ]]; then
        # slurmdbd refuses a world-readable config (it holds the database password).
        if slurmdbd_conf | put_file "$CONF_DIR/slurmdbd.conf" 600; then CONFIG_CHANGED=1; fi
    fi
}

# --- daemons -----------------------------------------------------------------------

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating munge key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    munge_ok && return 0
    install -d -o munge -g munge -m 755 /run/munge
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
    touch "$RUN_DIR/started-munged"
    wait_for 10 munged munge_ok
}

db_ok() { mariadb-admin --protocol=socket ping >/dev/null 2>&1; }

start_mariadb() {
    if ! db_ok; then
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
        fi
        install -d -o mysql -g mysql -m 755 /run/mysqld
        setsid /usr/sbin/mariadbd --user=mysql --innodb-lock-wait-timeout=900 \
            </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 &
        touch "$RUN_DIR/started-mariadb"
        wait_for 30 mariadb db_ok
    fi
    # Debian's root account authenticates over the socket, so this needs no password.
    mariadb --protocol=socket <<EOF
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

dbd_ok() { sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }

start_slurmdbd() {
    if ! alive "$RUN_DIR/slurmdbd.pid"; then
        slurmdbd </dev/null >/dev/null 2>&1
    fi
    # The first start creates the schema, which takes a few seconds.
    wait_for 60 slurmdbd dbd_ok
    # Register the cluster before slurmctld first connects, so it reports to it at once.
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    alive "$RUN_DIR/slurmctld.pid" && return 0
    # -i: ignore state files that no longer fit (e.g. an edited node list); keep job ids.
    slurmctld -i </dev/null >/dev/null 2>&1 || { dump_logs; die "slurmctld did not start"; }
    wait_for 30 slurmctld ctld_ok
}

start_slurmd() {
    local n
    for n in "${NODES[@]}"; do
        alive "$RUN_DIR/slurmd.$n.pid" && continue
        slurmd -N "$n" </dev/null >/dev/null 2>&1 || { dump_logs; die "slurmd -N $n did not start"; }
    done
}

# Nodes that answer: idle, or busy with jobs (a start while tests run must not wait for idle).
nodes_up() {
    local states
    states=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -cE ' (idle|mix|alloc|comp)$' <<<"$states") -eq ${#NODES[@]} ]]
}

any_slurm_alive() {
    local f
    for f in "$RUN_DIR"/*.pid; do alive "$f" && return 0; done
    return 1
}

daemons_alive() {
    local n
    munge_ok || return 1
    if [[ $ACCOUNTING == slurmdbd ]]; then
        db_ok && alive "$RUN_DIR/slurmdbd.pid" || return 1
    fi
    alive "$RUN_DIR/slurmctld.pid" || return 1
    for n in "${NODES[@]}"; do alive "$RUN_DIR/slurmd.$n.pid" || return 1; done
}

stop_slurm() {
    local n ids i
    if alive "$RUN_DIR/slurmctld.pid"; then
        # slurmstepd and job processes outlive slurmd: end the jobs while the controller can.
        ids=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $ids ]]; then
            log "cancelling jobs: ${ids//$'\n'/ }"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    # Controller and nodes go down together; slurmdbd after them, so the controller can
    # still hand it the last job records.
    local pidfiles=("$RUN_DIR/slurmctld.pid")
    for n in "${NODES[@]}"; do pidfiles+=("$RUN_DIR/slurmd.$n.pid"); done
    stop_pidfiles "${pidfiles[@]}"
    stop_pidfiles "$RUN_DIR/slurmdbd.pid"
}

# --- commands ----------------------------------------------------------------------

cmd_start() {
    local t0=$SECONDS
    [[ $EUID -eq 0 ]] || die "must run as root"
    [[ $ACCOUNTING == slurmdbd || $ACCOUNTING == filetxt ]] ||
        die "SLURM_LOOPBACK_ACCOUNTING must be slurmdbd or filetxt, not '$ACCOUNTING'"
    install_packages
    write_configs

    if ((!CONFIG_CHANGED)) && daemons_alive && nodes_up; then
        log "already running"
        return 0
    fi
    if ((CONFIG_CHANGED)) && any_slurm_alive; then
        log "configuration changed; restarting Slurm daemons"
        stop_slurm
    fi

    start_munge
    if [[ $ACCOUNTING == slurmdbd ]]; then
        start_mariadb
        start_slurmdbd
    fi
    start_slurmctld
    start_slurmd
    local deadline=$((SECONDS + TIMEOUT)) grace=$((SECONDS + 5))
    until nodes_up; do
        # Drained nodes stay drained across restarts (saved state); a test cluster starts clean.
        if sinfo -h -N -t drain,drng -o %N 2>/dev/null | grep -q .; then
            scontrol update NodeName="$NODE_RANGE" State=RESUME 2>/dev/null || true
        fi
        # Fail fast when a daemon died (e.g. its port is taken); the grace covers pid files
        # that daemons write only after forking.
        if ((SECONDS > deadline)) || { ((SECONDS > grace)) && ! daemons_alive; }; then
            dump_logs
            sinfo -N -l >&2 || true
            cmd_status >&2 || true
            die "cluster did not come up (waited $((SECONDS - t0))s)"
        fi
        sleep 0.5
    done
    log "up in $((SECONDS - t0))s (accounting: $ACCOUNTING)"
    sinfo
}

cmd_stop() {
    local db_pid=
    stop_slurm
    # Only what this script started: a MariaDB or munged that was already running stays.
    if [[ -e $RUN_DIR/started-mariadb ]]; then
        mariadb-admin --protocol=socket shutdown 2>/dev/null &
        db_pid=$!
        rm -f "$RUN_DIR/started-mariadb"
    fi
    if [[ -e $RUN_DIR/started-munged ]]; then
        stop_pidfiles /run/munge/munged.pid
        rm -f "$RUN_DIR/started-munged"
    fi
    [[ -z $db_pid ]] || wait "$db_pid" || true
    log "stopped"
}

cmd_status() {
    local n rc=0
    report() {
        local name=$1
        shift
        if "$@"; then printf '%-10s up\n' "$name"; else printf '%-10s DOWN\n' "$name"; rc=1; fi
    }
    report munged munge_ok
    if [[ $ACCOUNTING == slurmdbd ]]; then
        report mariadb db_ok
        report slurmdbd alive "$RUN_DIR/slurmdbd.pid"
    fi
    report slurmctld alive "$RUN_DIR/slurmctld.pid"
    for n in "${NODES[@]}"; do report "slurmd-$n" alive "$RUN_DIR/slurmd.$n.pid"; done
    sinfo -N 2>/dev/null || rc=1
    nodes_up || rc=1
    return $rc
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
