#!/usr/bin/env bash
# Debian 12 has no ONNX Runtime headers; Debian 13 ships them as libonnxruntime-dev (1.21, ABI
# compatible with the 1.2x/1.3x wheels). Download that .deb with apt-get from the mirror this
# machine already uses, with a private apt state (the system's sources stay untouched), and
# unpack only the headers into DEST. Usage: fetch_ort_headers.sh DEST
set -euo pipefail
dest=${1:?usage: fetch_ort_headers.sh DEST}
[ -f "$dest/onnxruntime_cxx_api.h" ] && exit 0
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "fetch_ort_headers: $tool not found (not a Debian system)" >&2; exit 1; }
done
mirror=$(grep -h -m1 -oP '^URIs:\s*\K\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 || true)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "fetch_ort_headers: no Debian mirror found in /etc/apt" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1
      -o APT::Sandbox::User=root)
echo "fetch_ort_headers: downloading libonnxruntime-dev (trixie) for its headers" >&2
apt-get "${opts[@]}" -qq update
(cd "$work" && apt-get "${opts[@]}" -qq download libonnxruntime-dev)
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$work/x"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
cp -r "$work/x/usr/include/onnxruntime" "$dest.partial"
mv -T "$dest.partial" "$dest"
echo "fetch_ort_headers: headers in $dest" >&2
