#!/usr/bin/env bash
# Vendor onnxruntime-web's WASM build into static/vendor/onnxruntime-web/ for the page's
# "run in this browser" mode: no CDN, the page works offline. Run by `make vendor` (and so by
# `make serve` and `make test`) and by .ci/run; the files are not committed (14 MB).
#
# Only three files of the package's dist/ are needed (ort.min.js would pull a 28 MB WebGPU
# build): ort.wasm.min.js (the API), ort-wasm-simd-threaded.mjs and .wasm (the runtime, which
# app.js finds through ort.env.wasm.wasmPaths). The npm tarball is checked against the
# registry's sha512 integrity pinned here; to upgrade, change VERSION and INTEGRITY
# (`npm view onnxruntime-web@X dist.integrity`).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.30.0
INTEGRITY=sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==
DEST=static/vendor/onnxruntime-web
FILES="ort.wasm.min.js ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm"

if [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
    exit 0  # already there
fi
if ! command -v npm >/dev/null; then
    echo "vendor_ort.sh: npm not found; the page will not offer the in-browser mode" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tarball=$(cd "$tmp" && npm pack --silent "onnxruntime-web@$VERSION" 2>/dev/null | tail -1)
actual="sha512-$(openssl dgst -sha512 -binary "$tmp/$tarball" | base64 -w0)"
if [ "$actual" != "$INTEGRITY" ]; then
    echo "vendor_ort.sh: onnxruntime-web@$VERSION does not match its pinned integrity" >&2
    exit 1
fi
tar xzf "$tmp/$tarball" -C "$tmp" $(for f in $FILES; do echo "package/dist/$f"; done) \
    package/package.json
rm -rf "$DEST.part"
mkdir -p "$DEST.part"
for f in $FILES; do cp "$tmp/package/dist/$f" "$DEST.part/"; done
cp "$tmp/package/package.json" "$DEST.part/"  # name, version and licence (MIT)
echo "$VERSION" > "$DEST.part/VERSION"
rm -rf "$DEST"
mv "$DEST.part" "$DEST"
echo "vendored onnxruntime-web $VERSION into $DEST ($(du -sh "$DEST" | cut -f1))"
