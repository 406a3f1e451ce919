#!/bin/sh
# Build the bundled example image with no Nix on the machine:
#   sh examples/hello/build.sh [OUTPUT.tar]
# compiles hello.c into the example's hello-2.12 store path (a static,
# freestanding binary: the image holds nothing else to run it), then streams
# the image with `fastlayer stream-nix`, exactly as nixpkgs' script would.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-hello.tar}
store="$here/root/nix/store"
bin="$store/m0w6c9xwqpf2kh6r2lq6hsvj7gwnrdx1-hello-2.12/bin/hello"
cc=${CC:-cc}
command -v "$cc" >/dev/null || { echo "build.sh: no C compiler ($cc); set CC" >&2; exit 1; }
mkdir -p "$(dirname "$bin")"
# -static -nostdlib: no libc and no loader in the image; -s: small and reproducible.
"$cc" -Os -static -nostdlib -fno-stack-protector -fno-builtin -s \
    -Wl,--build-id=none -o "$bin.tmp" "$here/hello.c"
chmod 0555 "$bin.tmp"
mv -f "$bin.tmp" "$bin"
case $(uname -m) in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) echo "build.sh: hello.c supports x86_64 and aarch64, not $(uname -m)" >&2; exit 1 ;;
esac
conf="$here/conf.json"
if [ "$arch" != amd64 ]; then
    conf=$(mktemp)
    trap 'rm -f "$conf"' EXIT
    sed "s/\"amd64\"/\"$arch\"/" "$here/conf.json" >"$conf"
fi
fastlayer stream-nix --root "$here/root" "$conf" -o "$out"
echo "wrote $out: podman load -i $out && podman run --rm hello:latest" >&2
