#!/usr/bin/env bash
# Install Debian's Slurm and munge for the real-Slurm integration tests (tests/test_slurm.py), when absent.
# Needs root and apt; otherwise it says so and those tests skip. Starts nothing: the tests run a private cluster.
set -uo pipefail
need=()
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$bin")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: missing ${need[*]} and cannot apt-get install as $(id -un): Slurm tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
  || echo "install_slurm.sh: apt-get install failed: Slurm tests will skip" >&2
exit 0
