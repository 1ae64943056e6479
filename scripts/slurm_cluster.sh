#!/usr/bin/env bash
# A single-node SLURM cluster in a folder of its own, for the tests (tests/conftest.py) or a try by hand:
#   scripts/slurm_cluster.sh start <dir>   # writes <dir>/slurm.conf, starts munged, MariaDB and slurmdbd (accounting:
#                                          # sacct, which submitit asks for its jobs' states), slurmctld and slurmd,
#                                          # and returns once sinfo shows the node idle;
#                                          # then: export SLURM_CONF=<dir>/slurm.conf
#   scripts/slurm_cluster.sh stop <dir>    # stops the daemons it started
# Needs Debian's slurm-wlm, slurmdbd, mariadb-server and munge (apt-get install slurm-wlm slurmdbd mariadb-server
# munge), run as root. Ports: SLURMCTLD_PORT (6817), SLURMD_PORT (6818), SLURMDBD_PORT (6819), MARIADB_PORT (6820).
set -euo pipefail
action=${1:?start or stop}
dir=$(realpath -m "${2:?a folder for the cluster}")
export SLURM_CONF=$dir/slurm.conf

stop() {
  for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
    [[ -f $dir/$daemon.pid ]] && kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    pgrep -f "$SLURM_CONF|$dir/" > /dev/null || return 0
    sleep 0.1
  done
  pkill -9 -f "$SLURM_CONF|$dir/" || true
}

if [[ $action == stop ]]; then stop; exit 0; fi

mkdir -p "$dir"/{state,spool,munge}
dbd_port=${SLURMDBD_PORT:-6819} db_port=${MARIADB_PORT:-6820}
node=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # the cores; nproc alone obeys OMP_NUM_THREADS (1 in the tests)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
cat > "$SLURM_CONF" <<CONF
ClusterName=autoencoders
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStoragePass=$dir/munge/munge.socket
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
NodeName=$node CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
  --seed-file="$dir/munge/seed"
mariadb-install-db --no-defaults --datadir="$dir/db" --user=root --auth-root-authentication-method=socket \
  --skip-test-db > "$dir/mariadb-install.log"
mariadbd --no-defaults --datadir="$dir/db" --socket="$dir/db.sock" --bind-address=127.0.0.1 --port="$db_port" \
  --user=root --pid-file="$dir/mariadbd.pid" --log-error="$dir/mariadbd.log" > "$dir/mariadbd.out" 2>&1 &
for _ in $(seq 100); do [[ -S $dir/db.sock ]] && break; sleep 0.1; done
mariadb --socket="$dir/db.sock" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
cat > "$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$dir/slurmdbd.pid
LogFile=$dir/slurmdbd.log
CONF
chmod 600 "$dir/slurmdbd.conf"
slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
for _ in $(seq 100); do timeout 2 sacctmgr --noheader list cluster > /dev/null 2>&1 && break; sleep 0.1; done
sacctmgr --immediate add cluster autoencoders > /dev/null
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 300); do  # up to 30 s
  if [[ $(sinfo --noheader --format=%t 2>/dev/null) == idle ]]; then
    echo "SLURM $(sinfo --version | cut -d' ' -f2): node $node idle; export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.1
done
echo "error: the node did not become idle within 30 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
stop
exit 1
