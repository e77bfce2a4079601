#!/usr/bin/env bash
# Gather the image's wheels (requirements.lock, hash-checked) for one Python and glibc into the build
# context, so the image installs them with `pip --no-index` and never reaches an index from inside a
# container (air-gapped builds work the same once the wheelhouse is filled).
#
#   docker/wheelhouse.sh LOCK PYTHON_VERSION GLIBC CACHE OUT      e.g. requirements.lock 3.11 2.36 ~/.cache/prunelab/wheelhouse wheelhouse/py3.11
#
# Wheels are downloaded once into CACHE (kept between builds and clones: torch and its CUDA wheels are
# about 3.5 GB) and hard-linked into OUT, which holds exactly this lock's files for this Python. The
# list of files per (lock, Python, glibc) is remembered in CACHE, so a warm run does not even ask the
# index. PYTHON (default python3) runs pip.
set -euo pipefail
lock=${1:?usage}; py=${2:?usage}; glibc=${3:?usage}; cache=${4:?usage}; out=${5:?usage}
die() { echo "wheelhouse: $*" >&2; exit 2; }
[ -f "$lock" ] || die "$lock not found"

abi="cp${py/./}"
key=$(cat <(grep -v "^ *#" "$lock") <(echo "$py $glibc") | sha256sum | cut -c1-16)  # comments do not matter
mkdir -p "$cache/.sets"
set_file="$cache/.sets/$abi-$key.txt"

complete() { [ -s "$set_file" ] && while read -r f; do [ -f "$cache/$f" ] || return 1; done <"$set_file"; }

if ! complete; then
  # Every manylinux tag this glibc accepts: pip does not widen an explicit --platform by itself.
  minor=${glibc#2.}
  platforms=()
  for ((m = minor; m >= 17; m--)); do platforms+=(--platform "manylinux_2_${m}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  "${PYTHON:-python3}" -m pip download --disable-pip-version-check --require-hashes --only-binary=:all: \
    "${platforms[@]}" --python-version "$py" --implementation cp --abi "$abi" \
    -d "$cache" -r "$lock" >"$log" 2>&1 || { tail -n 5 "$log" >&2; die "pip download failed (above)"; }
  sed -nE 's/^ *(Saved|File was already downloaded) (.*)$/\2/p' "$log" | xargs -r -n1 basename | sort -u >"$set_file.tmp"
  [ -s "$set_file.tmp" ] || die "pip download named no files (its output format changed?)"
  mv "$set_file.tmp" "$set_file"
fi

rm -rf "$out"
mkdir -p "$out"
while read -r f; do
  ln "$cache/$f" "$out/$f" 2>/dev/null || cp "$cache/$f" "$out/$f"  # a hard link when on one file system
done <"$set_file"
# The lock without its comments: what the image installs (--require-hashes), so that a change to the
# lock's annotations alone does not reinstall torch in the image.
grep -v '^ *#' "$lock" >"$out/requirements.lock"
echo "wheelhouse: $(wc -l <"$set_file") wheels for CPython $py in $out" >&2
