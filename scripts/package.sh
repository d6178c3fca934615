#!/usr/bin/env bash
# Builds the Debian package dist/cbd_VERSION_ARCH.deb: cbd-proxy in
# /usr/bin, the nbdkit plugin and filter in nbdkit's own plugin and filter
# directories (so `nbdkit cbd` and `nbdkit --filter=cbd` find them by name),
# and the man pages. Depends lists the Debian packages of every shared
# library the binaries link (dpkg-shlibdeps) and the exact nbdkit they were
# built for (filters have no stable ABI).
#
# Usage: scripts/package.sh [--build-dir DIR]
#   --build-dir DIR  package an existing (non-sanitizer) build in DIR
#                    instead of configuring and building one in
#                    <source>/build-package
#
# Environment: CBD_PACKAGE_MAINTAINER (default "cbd maintainers
# <cbd@example.org>") for the Maintainer field and the changelog.
# Needs dpkg-dev (dpkg-shlibdeps) besides the build dependencies. Prints the
# path of the package on its last line.
set -euo pipefail

SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=""
while (($#)); do
    case $1 in
        --build-dir) BUILD_DIR=${2:?--build-dir needs a directory}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "package: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
say() { echo "package: $*"; }
die() { echo "package: $*" >&2; exit 1; }

command -v dpkg-shlibdeps >/dev/null || die "dpkg-shlibdeps not found — install dpkg-dev"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (is this Debian?)"
VERSION=$(sed -n 's/^project(cbd VERSION \([0-9.]*\).*/\1/p' "$SOURCE_DIR/CMakeLists.txt")
[[ -n $VERSION ]] || die "no 'project(cbd VERSION x.y.z' line in $SOURCE_DIR/CMakeLists.txt"
ARCH=$(dpkg --print-architecture)
MAINTAINER=${CBD_PACKAGE_MAINTAINER:-cbd maintainers <cbd@example.org>}
# Reproducible: dates come from the last commit.
BUILD_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$SOURCE_DIR" log -1 --format=%ct 2>/dev/null || date +%s)}
NBDKIT_VERSION=$(dpkg-query -W -f='${Version}' nbdkit 2>/dev/null) ||
    die "the Debian package nbdkit is not installed (the filter is built for the installed nbdkit)"

if [[ -z $BUILD_DIR ]]; then
    BUILD_DIR=$SOURCE_DIR/build-package
    say "building in $BUILD_DIR"
    # Debian's hardening flags (fortify, stack protector, relro, bindnow).
    export DEB_BUILD_MAINT_OPTIONS=hardening=+all
    CXXFLAGS="$(dpkg-buildflags --get CPPFLAGS) $(dpkg-buildflags --get CXXFLAGS)" \
    LDFLAGS=$(dpkg-buildflags --get LDFLAGS) \
        cmake -S "$SOURCE_DIR" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=/usr >/dev/null
fi
[[ -f $BUILD_DIR/CMakeCache.txt ]] || die "$BUILD_DIR is not a cmake build directory"
! grep -q '^CBD_SANITIZE:BOOL=ON' "$BUILD_DIR/CMakeCache.txt" ||
    die "$BUILD_DIR is a sanitizer build: package a plain build"
cmake --build "$BUILD_DIR" -j"$(nproc)" --target cbd-proxy nbdkit-cbd-plugin nbdkit-cbd-filter man >/dev/null

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cbd-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/cbd_${VERSION}_$ARCH
DESTDIR=$STAGE cmake --install "$BUILD_DIR" --prefix /usr --strip >/dev/null
# What dh_strip would also drop: the compilers' version notes.
find "$STAGE/usr" -type f \( -name cbd-proxy -o -name '*.so' \) -exec objcopy --remove-section=.comment {} \;
# Debian policy: man pages compressed, a copyright file and a changelog
# (changelog.gz: a version without a Debian revision is a native package).
find "$STAGE/usr/share/man" -type f -name '*.[0-9]' -exec gzip -9n {} +
DOC=$STAGE/usr/share/doc/cbd
mkdir -p "$DOC"
cat >"$DOC/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: cbd
Comment: cbd, a userspace CXL block device: NBD over shared memory.
 Built from the cbd source tree by scripts/package.sh.

Files: *
Copyright: $(date -u -d "@$BUILD_EPOCH" +%Y) the cbd authors
License: see the cbd source tree
COPYRIGHT
{
    echo "cbd ($VERSION) unstable; urgency=medium"
    echo
    echo "  * Built from the cbd source tree by scripts/package.sh."
    echo
    echo " -- $MAINTAINER  $(date -R -u -d "@$BUILD_EPOCH")"
} | gzip -9n >"$DOC/changelog.gz"
chmod -R u=rwX,go=rX "$STAGE"

# Depends: the packages of the shared libraries, and the nbdkit built for.
mkdir -p "$WORK/shlibs/debian"
printf 'Source: cbd\n\nPackage: cbd\nArchitecture: any\n' >"$WORK/shlibs/debian/control"
binaries=("$STAGE/usr/bin/cbd-proxy")
mapfile -t -O 1 binaries < <(find "$STAGE/usr/lib" -name '*.so')
shlibs=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O "${binaries[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[[ -n $shlibs ]] || die "dpkg-shlibdeps found no dependencies for ${binaries[*]}"
# nbdkit loads a filter only if it was built for the same upstream version
# (its _version string); Debian revisions of that version (security
# updates: 1.32.5-1+deb12u1) keep it, so pin the upstream version only.
# "U.~" sorts after every Debian version of upstream U and before U.1, U+1.
NBDKIT_UPSTREAM=${NBDKIT_VERSION#*:}
NBDKIT_UPSTREAM=${NBDKIT_UPSTREAM%-*}
DEPENDS="$shlibs, nbdkit (>= $NBDKIT_UPSTREAM), nbdkit (<< $NBDKIT_UPSTREAM.~)"

mkdir -p "$STAGE/DEBIAN"
(cd "$STAGE" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$STAGE/DEBIAN/md5sums"
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: cbd
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
Depends: $DEPENDS
Section: admin
Priority: optional
Description: block device over CXL shared memory (nbdkit plugin, filter and proxy)
 cbd exports a disk of a storage node to compute nodes through a region of
 shared memory (CXL device-DAX, /dev/daxX.Y, or a file in /dev/shm) instead
 of a network.  The nbdkit plugin "cbd" and the nbdkit filter "cbd" serve the
 backend; cbd-proxy on the compute node serves it as a local NBD export or
 attaches a kernel nbd device (/dev/nbdN) itself.
CONTROL

mkdir -p "$SOURCE_DIR/dist"
OUT=$SOURCE_DIR/dist/cbd_${VERSION}_$ARCH.deb
dpkg-deb --build --root-owner-group "$STAGE" "$OUT" >/dev/null
say "Depends: $DEPENDS"
say "files:"
dpkg-deb -c "$OUT" | awk '$6 !~ /\/$/ {print "  " $6}'
echo "$OUT"
