#!/usr/bin/env bash
# Installs the Debian packages the tests, the lab and the plan's diagram need.
# Services are never started by the packages (policy-rc.d): the project starts
# its own instances on loopback, in temp directories.
set -euo pipefail

PACKAGES=(nginx pgbouncer cloud-init haproxy graphviz postgresql-15 postgresql-client-15 wrk systemd
          openssl procps debootstrap systemd-container iproute2 curl nftables)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  created_policy=1
fi
trap '[ $created_policy -eq 1 ] && $SUDO rm -f "$policy"' EXIT

echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
