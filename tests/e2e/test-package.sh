#!/usr/bin/env bash
# The Debian package: scripts/package.sh builds dist/cbd_VERSION_ARCH.deb
# from this build; `dpkg -i` installs it; then nbdkit finds the plugin and
# the filter by name, the installed cbd-proxy serves through them, and
# man finds cbd-proxy(1); `dpkg -r` removes it and leaves nbdkit's plugin
# and filter directories exactly as they were.
# Needs root and dpkg; skips when a cbd package is installed already (its
# removal would take the user's installation away) and in a sanitizer
# build (a package is built from a plain one).
source "$(dirname "$0")/functions.sh"
require_built
require dpkg dpkg-deb dpkg-shlibdeps man nbdinfo pkg-config
((EUID == 0)) || skip "installing a package needs root"
[[ -z ${CBD_SANITIZER_RUNTIME:-} ]] || skip "sanitizer build: packages are built from a plain build"
status=$(dpkg-query -W -f='${db:Status-Status}' cbd 2>/dev/null || true)
[[ -z $status || $status == not-installed ]] ||
    skip "a cbd package is installed already ($status): not replacing it"

plugindir=$(pkg-config --variable=plugindir nbdkit)
filterdir=$(pkg-config --variable=filterdir nbdkit)
[[ -d $plugindir && -d $filterdir ]] || fail "nbdkit's plugin or filter directory is missing ($plugindir, $filterdir)"
# listing DIR...: every file with its checksum, to compare before and after.
listing() { find "$@" -type f -print0 | sort -z | xargs -0 -r sha256sum; find "$@" ! -type f | sort; }
listing "$plugindir" "$filterdir" >"$TEST_DIR/before"

bash "$CBD_SOURCE_DIR/scripts/package.sh" --build-dir "$CBD_BUILD_DIR" >"$TEST_DIR/package.log" 2>&1 ||
    { cat "$TEST_DIR/package.log" >&2; fail "scripts/package.sh failed"; }
deb=$(tail -n 1 "$TEST_DIR/package.log")
[[ -f $deb && $deb == */dist/cbd_*_*.deb ]] || fail "scripts/package.sh did not name a dist/cbd_VERSION_ARCH.deb (got '$deb')"
log "built $deb"
version=$(dpkg-deb -f "$deb" Version)
# The version the built programs report, not one derived the way package.sh does.
built=$("$CBD_BUILD_DIR/client/cbd-proxy" --version | sed -n 's/^cbd-proxy //p')
[[ -n $built && $version == "$built" ]] || fail "package version $version is not the built cbd-proxy's ($built)"
depends=$(dpkg-deb -f "$deb" Depends)
log "Depends: $depends"
for lib in libc6 libstdc++6 liburing2 libdaxctl1 libnl-genl-3-200 nbdkit; do
    [[ $depends == *"$lib "* || $depends == *"$lib," || $depends == *"$lib" ]] ||
        fail "Depends lacks $lib, which the binaries link: $depends"
done

on_exit 'dpkg -r cbd >/dev/null 2>&1 || true'
dpkg -i "$deb" >"$TEST_DIR/dpkg-i.log" 2>&1 || { cat "$TEST_DIR/dpkg-i.log" >&2; fail "dpkg -i $deb failed"; }
log "installed: $(dpkg-query -W -f='${Package} ${Version} ${db:Status-Status}' cbd)"
[[ -f $plugindir/nbdkit-cbd-plugin.so ]] || fail "the plugin is not in nbdkit's plugin directory $plugindir"
[[ -f $filterdir/nbdkit-cbd-filter.so ]] || fail "the filter is not in nbdkit's filter directory $filterdir"

nbdkit cbd --version >"$TEST_DIR/version" 2>&1 || { cat "$TEST_DIR/version" >&2; fail "nbdkit cbd --version failed"; }
grep -qx "cbd $version" "$TEST_DIR/version" || { cat "$TEST_DIR/version" >&2; fail "nbdkit cbd --version does not say 'cbd $version'"; }
log "nbdkit cbd --version: $(tr '\n' ' ' <"$TEST_DIR/version")"
[[ $(command -v cbd-proxy) == /usr/bin/cbd-proxy ]] || fail "cbd-proxy is not /usr/bin/cbd-proxy on PATH"
/usr/bin/cbd-proxy --version | grep -qx "cbd-proxy $version" || fail "cbd-proxy --version is not $version"

# The filter by name in front of nbdkit's memory plugin, read through the
# installed proxy: the export is the 1 GiB the memory plugin has.
/usr/bin/cbd-proxy format transport="$TRANSPORT" size=32M force >/dev/null || fail "cbd-proxy format"
size=$(run_client nbdkit -U - --filter=cbd memory 1G transport="$TRANSPORT" \
    --run "nbdinfo --size -- [ /usr/bin/cbd-proxy connect transport=$TRANSPORT ]" 2>"$TEST_DIR/filter.log") ||
    { cat "$TEST_DIR/filter.log" >&2; fail "nbdkit --filter=cbd memory 1G, read through cbd-proxy, failed"; }
[[ $size == 1073741824 ]] || fail "the export through the filter is $size bytes, not 1 GiB"
log "nbdkit --filter=cbd memory 1G through cbd-proxy: $size bytes"

for page in cbd-proxy nbdkit-cbd-plugin nbdkit-cbd-filter; do
    where=$(man -w "$page") || fail "man -w $page finds nothing"
    [[ $where == /usr/share/man/man1/$page.1.gz ]] || fail "man -w $page is $where"
done
MANWIDTH=80 man cbd-proxy 2>/dev/null | grep -q 'device=/dev/nbdN' || fail "man cbd-proxy does not render the page"
log "man pages: $(man -w cbd-proxy)"

files=$(dpkg -L cbd | while read -r f; do [[ -f $f ]] && echo "$f"; done)
dpkg -r cbd >"$TEST_DIR/dpkg-r.log" 2>&1 || { cat "$TEST_DIR/dpkg-r.log" >&2; fail "dpkg -r cbd failed"; }
for f in $files; do
    [[ ! -e $f ]] || fail "dpkg -r left $f behind"
done
listing "$plugindir" "$filterdir" >"$TEST_DIR/after"
diff -u "$TEST_DIR/before" "$TEST_DIR/after" >&2 || fail "nbdkit's plugin or filter directory differs after dpkg -r"
log "dpkg -r removed $(echo "$files" | wc -l) files; nbdkit's plugin and filter directories are as before"
log "PASS"
