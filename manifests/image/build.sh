#!/bin/sh
# Builds the spright node image from binaries the workspace already built.
#
#   cargo build --release --workspace --lib --bins
#   cargo build --release -p spright-cni --target x86_64-unknown-linux-musl
#   manifests/image/build.sh                 # -> ghcr.io/spright-dev/spright:<version>
#
# (`cargo xtask build` runs both builds in the debug profile: PROFILE=debug.)
#
# Environment:
#   PROFILE   cargo profile directory under target/ (default: release)
#   TARGET    cargo target directory (default: <repo>/target)
#   IMAGE     image name (default: ghcr.io/spright-dev/spright:<workspace version>)
#   PODMAN    podman command with options, e.g. "podman --root /tmp/r --runroot /tmp/rr"
#             (default: podman)
# shm-csi is packaged when it has been built; the others are required.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
profile=${PROFILE:-release}
target=${TARGET:-$repo/target}
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
image=${IMAGE:-ghcr.io/spright-dev/spright:$version}
podman=${PODMAN:-podman}

ctx=$(mktemp -d "${TMPDIR:-/tmp}/spright-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/bin" "$root/etc" "$root/tmp" "$root/var/lib/spright"
chmod 1777 "$root/tmp"

stage_libs() {
    # The dynamic loader and every library the binary links (glibc, libgcc_s).
    ldd "$1" | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
        [ -e "$root$lib" ] || cp -L --parents "$lib" "$root/"
    done
}

# spright-cni is the static (musl) build: install-cni copies it onto hosts
# whose libc may be older, different or absent.
static_target=x86_64-unknown-linux-musl
for bin in meshd spright spright-cni shm-csi spright-webhook; do
    src=$target/$profile/$bin
    [ "$bin" = spright-cni ] && src=$target/$static_target/$profile/$bin
    if [ ! -x "$src" ]; then
        if [ "$bin" = spright-cni ]; then
            echo "build.sh: $src not found; run cargo build -p spright-cni --target $static_target${profile:+ (profile $profile)}" >&2
            exit 1
        fi
        if [ "$bin" = shm-csi ]; then
            echo "build.sh: $src not built; the image has no shm-csi" >&2
            continue
        fi
        echo "build.sh: $src not found; run cargo build --workspace --bins${profile:+ (profile $profile)}" >&2
        exit 1
    fi
    strip --strip-debug -o "$root/usr/local/bin/$bin" "$src"
    if [ "$bin" = spright-cni ]; then
        if ldd "$src" 2>/dev/null | grep -q '=>'; then
            echo "build.sh: $src links shared libraries; it must be static" >&2
            exit 1
        fi
    else
        stage_libs "$src"
    fi
done

# The opt-in preload shim (docs/RELIABILITY.md, "Preload shim"): function
# images copy it from here.
shim=$target/$profile/libspright_preload.so
if [ -e "$shim" ]; then
    mkdir -p "$root/usr/local/lib/spright"
    strip --strip-debug -o "$root/usr/local/lib/spright/libspright_preload.so" "$shim"
else
    echo "build.sh: $shim not built (cargo build --lib); the image has no preload shim" >&2
fi

cp /bin/busybox "$root/bin/busybox"
# chroot: `spright uninstall --host-root` runs the host's iptables.
for tool in sh cat chroot cp mv rm mkdir ls sed printf echo sleep test true; do
    ln -s busybox "$root/bin/$tool"
done
printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' > "$root/etc/group"

cp "$here/Containerfile" "$ctx/Containerfile"
# shellcheck disable=SC2086 # PODMAN may carry options
$podman build --quiet --network none -t "$image" -f "$ctx/Containerfile" "$ctx" >/dev/null
echo "$image"
