#!/bin/sh
# Builds the tailscale TEST DOUBLE as a real .deb named `tailscale` and publishes it in a
# flat local apt repository, usable as: deb [trusted=yes] file:REPO ./
# Usage: build-deb.sh REPO_DIR [VERSION]   (needs dpkg-deb and apt-ftparchive)
set -eu
src="$(cd "$(dirname "$0")" && pwd)"
repo="${1:?usage: build-deb.sh REPO_DIR [VERSION]}"
version="${2:-1.90.0~double}"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

install -d -m 0755 "$root/DEBIAN" "$root/usr/lib/tailscale-double" "$root/usr/bin" \
  "$root/usr/sbin" "$root/usr/lib/systemd/system" "$root/etc/default" \
  "$root/usr/share/doc/tailscale"
sed "s/@VERSION@/$version/" "$src/debian/control" > "$root/DEBIAN/control"
install -m 0644 "$src/debian/conffiles" "$root/DEBIAN/conffiles"
install -m 0755 "$src/debian/postinst" "$src/debian/prerm" "$src/debian/postrm" "$root/DEBIAN/"
install -m 0755 "$src/tailscale_double.py" "$root/usr/lib/tailscale-double/tailscale_double.py"
ln -s ../lib/tailscale-double/tailscale_double.py "$root/usr/bin/tailscale"
ln -s ../lib/tailscale-double/tailscale_double.py "$root/usr/sbin/tailscaled"
install -m 0644 "$src/tailscaled.service" "$root/usr/lib/systemd/system/tailscaled.service"
install -m 0644 "$src/tailscaled.default" "$root/etc/default/tailscaled"
install -m 0644 "$src/README.md" "$root/usr/share/doc/tailscale/README.md"

install -d -m 0755 "$repo"
dpkg-deb --root-owner-group --build "$root" "$repo/tailscale_${version}_all.deb" >/dev/null
cd "$repo"
apt-ftparchive packages . > Packages
apt-ftparchive release . > Release
echo "published tailscale $version in $repo"
