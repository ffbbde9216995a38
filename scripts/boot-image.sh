#!/usr/bin/env bash
# Builds (once) the Debian 12 root file system `make boot` boots droplets from, like
# DigitalOcean's debian-12-x64 as far as the user data relies on it. Prints its path.
#
#   scripts/boot-image.sh [CACHE_DIR]     default: $WEBSTACK_BOOT_CACHE or /var/cache/webstack-boot
#
# The image is keyed by a hash of this file: edit the package list and the next run builds a
# new one. What is in it, and why:
#   systemd, systemd-sysv, dbus    PID 1, systemctl, the units the user data installs
#   cloud-init                     runs the user data (NoCloud datasource here; DigitalOcean's own
#                                  datasource on a droplet)
#   locales (en_US.UTF-8)          cloud-init's locale module sets it; without it the boot fails
#   curl                           the rollout's health gate and the LB's certbot unit call it
#   openssl                        the nginx LB's user data makes its self-signed certificate
#   ca-certificates                apt and pip over HTTPS
#   iproute2, iputils-ping         a droplet's networking tools
#   sudo                           cloud-init's default user is a sudoer
#   gzip, tar (minbase)            the app bundle is unpacked by runcmd
#   python3 (cloud-init's)         the user data's `python3 -m venv`
set -euo pipefail

CACHE=${1:-${WEBSTACK_BOOT_CACHE:-/var/cache/webstack-boot}}
MIRROR=${WEBSTACK_BOOT_MIRROR:-http://deb.debian.org/debian}
BASE=systemd,systemd-sysv,dbus,ca-certificates
PACKAGES=(cloud-init locales curl openssl iproute2 iputils-ping sudo gzip tar)

key=$(sha256sum "$0" | cut -c1-12)
image="$CACHE/debian-12-$key"
if [ -e "$image/.complete" ]; then
  echo "$image"
  exit 0
fi

mkdir -p "$CACHE"
rm -rf "$image" "$image.tmp"
root="$image.tmp"
echo "building the Debian 12 image in $image (debootstrap, a few minutes, once)" >&2
log="$CACHE/build.log"
timeout 1200 debootstrap --variant=minbase --include="$BASE" bookworm "$root" "$MIRROR" \
  >"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }

# The sources a droplet has: the release, its updates and security.
cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
# The rest through apt, which resolves virtual packages (debootstrap does not: cloud-init's
# python3-cryptography needs python3-cffi-backend-api-*). No service starts in the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
DEBIAN_FRONTEND=noninteractive timeout 1200 chroot "$root" apt-get install -y -q \
  --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
rm "$root/usr/sbin/policy-rc.d"
echo "en_US.UTF-8 UTF-8" >"$root/etc/locale.gen"
chroot "$root" locale-gen >/dev/null
echo 'LANG=en_US.UTF-8' >"$root/etc/default/locale"

# cloud-init: the NoCloud seed stands in for DigitalOcean's metadata service. The network is
# configured by make boot (systemd-networkd, a static VPC address), as DigitalOcean's
# datasource does from its metadata.
cat >"$root/etc/cloud/cloud.cfg.d/90-webstack-boot.cfg" <<EOF
datasource_list: [NoCloud, None]
network: {config: disabled}
EOF
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
# An empty machine-id: systemd makes one at first boot, as on a fresh droplet.
: >"$root/etc/machine-id"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*

touch "$root/.complete"
mv "$root" "$image"
echo "$image"
