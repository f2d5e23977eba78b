#!/usr/bin/env bash
# Start a one-node SLURM (slurm-wlm + munge) on this machine for the cluster test.
# Installs the Debian packages when missing. Exits non-zero if SLURM cannot start; the test
# then skips with the reason instead of passing silently.
set -uo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null || { echo "slurm: cannot install slurm-wlm/munge"; exit 1; }
fi
host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge /etc/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=tokens-ci
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
chown -R root:root /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || munged --force || { echo "slurm: munged did not start"; exit 1; }
pgrep -x slurmctld >/dev/null || slurmctld || { echo "slurm: slurmctld did not start"; exit 1; }
pgrep -x slurmd >/dev/null || slurmd || { echo "slurm: slurmd did not start"; exit 1; }
for _ in $(seq 30); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then echo "slurm: up"; exit 0; fi
  scontrol update nodename="${host}" state=resume >/dev/null 2>&1
  sleep 1
done
echo "slurm: node did not become idle: $(sinfo 2>&1 | tail -n 2)"
exit 1
