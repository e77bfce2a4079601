#!/usr/bin/env bash
# Build the prunelab base image without a registry: a minimal Debian root filesystem from Debian's own
# packages (debootstrap), with the Python the image runs on, imported as a Docker image.
#
#   docker/base-image.sh TAG SUITE PYTHON_VERSION     e.g. prunelab-base:bookworm bookworm 3.11
#
# The package mirror is read from this machine's apt configuration (deb822 .sources files or
# sources.list), so no host name is written in the repository; MIRROR=... overrides it. Needs root
# (debootstrap creates device nodes and chowns files) and the debootstrap package.
set -euo pipefail
tag=${1:?usage: base-image.sh TAG SUITE PYTHON_VERSION}
suite=${2:?usage: base-image.sh TAG SUITE PYTHON_VERSION}
python=${3:?usage: base-image.sh TAG SUITE PYTHON_VERSION}

die() { echo "base-image: $*" >&2; exit 2; }

# The first 'deb' source whose suites include $suite, from the deb822 files, then the one-line lists.
apt_mirror() {
  local files=(/etc/apt/sources.list.d/*.sources)
  [ -e "${files[0]}" ] && awk -v suite="$1" '
    function flush() { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uri != "") { print uri; found = 1; exit } types = suites = uri = "" }
    /^[ \t]*$/ { flush(); next }
    tolower($1) == "types:"  { types = substr($0, index($0, ":") + 2) }
    tolower($1) == "suites:" { suites = substr($0, index($0, ":") + 2) }
    tolower($1) == "uris:"   { uri = $2 }
    END { if (!found) flush() }' "${files[@]}" 
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -e 's/\[[^]]*\]//' | awk -v suite="$1" '$1 == "deb" && $3 == suite { print $2; exit }' || true
}

[ "$(id -u)" = 0 ] || die "debootstrap needs root: run 'sudo make base-image'"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
mirror=${MIRROR:-$(apt_mirror "$suite" | head -n1 || true)}
[ -n "$mirror" ] || die "no '$suite' source in /etc/apt (sources.list or sources.list.d/*.sources); set MIRROR=<debian mirror URL>"

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/prunelab-base.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
echo "base-image: debootstrap $suite from $mirror with python$python" >&2
debootstrap --variant=minbase --include="python$python,ca-certificates" \
  "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (log above)"; }
# The venv module's pip comes from python3.X-venv, whose dependency on a virtual package debootstrap
# cannot resolve: apt inside the new root does.
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
chroot "$rootfs" sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends python$python-venv" \
  >>"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; die "installing python$python-venv failed (log above)"; }
chroot "$rootfs" apt-get clean
: >"$rootfs/etc/resolv.conf"
rm -f "$rootfs.log"
# No package caches or lists in the image; apt in a derived image runs apt-get update first anyway.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/*
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $suite + python$python" - "$tag" >/dev/null
docker image inspect --format '{{.Id}}' "$tag"
