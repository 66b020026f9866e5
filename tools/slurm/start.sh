#!/usr/bin/env bash
# Start a private single-node Slurm cluster (munged, slurmctld, slurmd) in DIR, as root.
#   bash tools/slurm/start.sh DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   bash tools/slurm/stop.sh DIR
# Needs Debian's slurm-wlm and munge (tools/install.sh --test installs them). Exits non-zero
# with one line on stderr saying why when the cluster cannot start.
set -euo pipefail
dir=$(realpath -m "${1:?usage: start.sh DIR}")
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "slurm: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "the daemons must start as root (uid $(id -u))"
for exe in munged slurmctld slurmd sbatch squeue sinfo; do
  command -v "$exe" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin"
  command -v "$exe" >/dev/null 2>&1 || die "$exe not found; run 'bash tools/install.sh --test'"
done
mkdir -p "$dir/state" "$dir/spool"
chmod 700 "$dir"

# munge: a fresh key and a private socket, so nothing clashes with a system munged
dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" \
  || die "munged did not start (see $dir/munged.log)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)  # MB offered to jobs
sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|$host|g" -e "s|@CPUS@|$(nproc)|g" -e "s|@MEM@|$mem|g" \
  -e "s|@CTLD_PORT@|$(free_port)|g" -e "s|@SLURMD_PORT@|$(free_port)|g" \
  "$here/slurm.conf.in" > "$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf"

slurmctld -f "$SLURM_CONF" -i || die "slurmctld did not start (see $dir/slurmctld.log)"
slurmd -f "$SLURM_CONF" -N "$host" || die "slurmd did not start (see $dir/slurmd.log)"
for _ in $(seq 100); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
  case "$state" in idle*|mix*|alloc*) echo "slurm: node $host $state; SLURM_CONF=$SLURM_CONF"; exit 0;; esac
  sleep 0.2
done
die "node $host did not become idle (state '${state:-none}'; see $dir/slurmctld.log, $dir/slurmd.log)"
