#!/bin/sh
# Installs the C SDK (header, libspright_shm.so and .a, spright_shm.pc) under
# a prefix, from a cargo build:
#
#   cargo build --release -p spright-shm-c
#   shm-csi/sdk/c/install.sh [--prefix /usr/local] [--destdir DIR] [--from target/release]
#
# --prefix   where the files will live (default /usr/local); spright_shm.pc
#            names it, so `pkg-config --cflags --libs spright_shm` finds them
# --destdir  a staging root prepended to every path written (packaging);
#            the .pc still names --prefix
# --from     the cargo output directory holding the built libraries
#            (default <repo>/target/release)
#
# Prints each file it installs. Re-running overwrites; nothing else is
# touched.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
prefix=/usr/local
destdir=
from=$repo/target/release
usage="usage: $0 [--prefix DIR] [--destdir DIR] [--from DIR]"
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || { echo "$0: $1 needs a value" >&2; echo "$usage" >&2; exit 2; }
    case $1 in
        --prefix) prefix=$2 ;;
        --destdir) destdir=$2 ;;
        --from) from=$2 ;;
        *) echo "$0: unknown option $1" >&2; echo "$usage" >&2; exit 2 ;;
    esac
    shift 2
done
case $prefix in
    /*) ;;
    *) echo "$0: --prefix must be an absolute path, got $prefix" >&2; exit 2 ;;
esac
for f in libspright_shm.so libspright_shm.a; do
    if [ ! -f "$from/$f" ]; then
        echo "$0: $from/$f not found; build it first: cargo build --release -p spright-shm-c (or give --from)" >&2
        exit 1
    fi
done
# build.rs writes spright_shm.pc into the profile directory (beside the
# libraries after `cargo build`, one level up from deps/ in `cargo test`).
pc=$from/spright_shm.pc
[ -f "$pc" ] || pc=$from/../spright_shm.pc
if [ ! -f "$pc" ]; then
    echo "$0: spright_shm.pc not found in $from or its parent (written by the crate's build.rs)" >&2
    exit 1
fi
root=$destdir$prefix
put() { # mode source destination
    install -Dm"$1" "$2" "$3"
    echo "installed $3"
}
put 644 "$here/include/spright_shm.h" "$root/include/spright_shm.h"
put 755 "$from/libspright_shm.so" "$root/lib/libspright_shm.so"
put 644 "$from/libspright_shm.a" "$root/lib/libspright_shm.a"
tmp=$(mktemp "${TMPDIR:-/tmp}/spright_shm.pc.XXXXXX")
trap 'rm -f "$tmp"' EXIT
sed "s|^prefix=.*|prefix=$prefix|" "$pc" > "$tmp"
put 644 "$tmp" "$root/lib/pkgconfig/spright_shm.pc"
