#!/usr/bin/env bash
# Install the real services the test suite starts on 127.0.0.1: Ceph RGW (S3), Slurm (two slurmd acting
# as two nodes), Prometheus with promtool, shellcheck, and the npm packages that type-check the Grafana
# dashboards. Needs root (apt-get); skips whatever is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(radosgw ceph-mon ceph-osd ceph-common uuid-runtime
          slurmctld slurmd slurm-client munge
          prometheus shellcheck iproute2 procps)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Grafana's published dashboard types, for the schema check of monitoring/grafana/dashboards/*.json.
if command -v npm >/dev/null && [ ! -d monitoring/schema/node_modules/@grafana/schema ]; then
  (cd monitoring/schema && npm install --no-audit --no-fund --silent >/dev/null)
fi
echo "services installed"
