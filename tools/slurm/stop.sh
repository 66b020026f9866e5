#!/usr/bin/env bash
# Stop the cluster started by tools/slurm/start.sh DIR (daemons found by their pid files).
set -uo pipefail
dir=$(realpath -m "${1:?usage: stop.sh DIR}")
for daemon in slurmd slurmctld munged; do
  pidfile="$dir/$daemon.pid"
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
done
exit 0
