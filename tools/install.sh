#!/usr/bin/env bash
# Install dkiharm and its system tools on a Debian machine (run as root, from anywhere).
#   bash tools/install.sh          # package + MRtrix3 + graphviz in ./.venv
#   bash tools/install.sh --test   # ... plus the test and docs extras and Chromium
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test,docs]"

need_apt=()
command -v dwidenoise >/dev/null 2>&1 || need_apt+=(mrtrix3)
command -v dot >/dev/null 2>&1 || need_apt+=(graphviz)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv python3-pip)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need_apt+=(python3-venv)
# headless Chromium renders the HTML report in tests/test_report.py
if [ -n "$extras" ]; then command -v chromium >/dev/null 2>&1 || need_apt+=(chromium); fi
# a single-node Slurm cluster for tests/test_slurm.py (started by tools/slurm/start.sh)
if [ -n "$extras" ]; then [ -x /usr/sbin/slurmctld ] || need_apt+=(slurm-wlm munge); fi
# buildah and debootstrap build the container image in tests/test_container.py (-m slow)
if [ -n "$extras" ]; then
  command -v buildah >/dev/null 2>&1 || need_apt+=(buildah)
  command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[install] apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned to the CPU build through the constraints file (an unpinned torch
# would pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extras}" 2>&1 \
  | grep -vE "is ignored|^\s*$|!!|wheel_obj|strategy" || true
.venv/bin/python -c "import dkiharm_nipype, torch; print('[install] dkiharm', dkiharm_nipype.__version__, '| torch', torch.__version__)"
