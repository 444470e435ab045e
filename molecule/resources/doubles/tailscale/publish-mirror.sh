#!/bin/sh
# Publishes a built tailscale double .deb in a SIGNED apt repository laid out like
# pkgs.tailscale.com/stable/<distribution>: dists/<codename>/main/binary-<arch>/ and the
# unarmored key at <codename>.noarmor.gpg, so a role can be pointed at it with its
# repository switch on (signed-by, get_url of the key) as at a real mirror.
# The signing key is a throwaway made here; it signs nothing else.
# Usage: publish-mirror.sh DEB MIRROR_DIR CODENAME   (needs gpg and apt-ftparchive)
set -eu
deb="${1:?usage: publish-mirror.sh DEB MIRROR_DIR CODENAME}"
mirror="${2:?}"
codename="${3:?}"
arch="$(dpkg --print-architecture)"
GNUPGHOME="$(mktemp -d)"
export GNUPGHOME
trap 'gpgconf --kill all >/dev/null 2>&1 || true; rm -rf "$GNUPGHOME"' EXIT

gpg --batch --quiet --passphrase '' --quick-gen-key 'comfyume test mirror (tailscale double)' \
  ed25519 sign never
install -d -m 0755 "$mirror/pool" "$mirror/dists/$codename/main/binary-$arch"
install -m 0644 "$deb" "$mirror/pool/"
gpg --batch --export > "$mirror/$codename.noarmor.gpg"
cd "$mirror"
apt-ftparchive packages pool > "dists/$codename/main/binary-$arch/Packages"
apt-ftparchive \
  -o APT::FTPArchive::Release::Suite="$codename" \
  -o APT::FTPArchive::Release::Codename="$codename" \
  -o APT::FTPArchive::Release::Components=main \
  -o APT::FTPArchive::Release::Architectures="$arch" \
  release "dists/$codename" > "dists/$codename/Release"
gpg --batch --yes --clearsign -o "dists/$codename/InRelease" "dists/$codename/Release"
echo "published $(basename "$deb") in signed mirror $mirror ($codename, $arch)"
