#!/usr/bin/env bash
# The man pages: every man/*.pod passes podchecker, was built into
# $CBD_BUILD_DIR/man/NAME.1 and renders with man(1); and the pages cannot
# drift from the code: every parameter that `cbd-proxy SUBCOMMAND --help`
# and `nbdkit cbd --help` list is documented under its subcommand in
# cbd-proxy.1 and in nbdkit-cbd-plugin.1, and every parameter the pages
# document is one the programs know.
source "$(dirname "$0")/functions.sh"
require man pod2man podchecker col
require_built

MAN_SOURCE_DIR=$CBD_SOURCE_DIR/man
MAN_BUILD_DIR=$CBD_BUILD_DIR/man
problems=0
problem() { log "FAIL: $*"; problems=$((problems + 1)); }

# render PAGE: the page as plain text, 200 columns wide so that no
# parameter is broken across lines. groff's warnings go to $TEST_DIR.
render() {
    MANWIDTH=200 man --warnings -l "$1" 2>"$TEST_DIR/groff.err" | col -bx
}

# --- podchecker, build, rendering --------------------------------------------

shopt -s nullglob
pods=("$MAN_SOURCE_DIR"/*.pod)
((${#pods[@]} > 0)) || fail "no man/*.pod files found in $MAN_SOURCE_DIR"

for pod in "${pods[@]}"; do
    name=$(basename "$pod" .pod)
    if ! podchecker "$pod" >"$TEST_DIR/podchecker.out" 2>&1; then
        cat "$TEST_DIR/podchecker.out" >&2
        problem "podchecker rejects man/$name.pod"
    fi
    page=$MAN_BUILD_DIR/$name.1
    if [[ ! -f $page ]]; then
        problem "man/$name.pod was not built into $page (is man/CMakeLists.txt's glob up to date? rebuild)"
        continue
    fi
    [[ $page -nt $pod ]] || problem "$page is older than man/$name.pod: the build did not regenerate it"
    grep -q "^\.TH \"\?$name\"\? 1 " "$page" ||
        problem "$page has no '.TH $name 1' header"
    if ! MANWIDTH=80 man -l "$page" >"$TEST_DIR/$name.txt" 2>"$TEST_DIR/groff.err"; then
        cat "$TEST_DIR/groff.err" >&2
        problem "man -l $page failed"
        continue
    fi
    # NAME section: "NAME" then "name - summary".
    grep -q "^NAME" "$TEST_DIR/$name.txt" || problem "$name.1 renders without a NAME section"
    grep -Eq "^ +$name - [^ ]" "$TEST_DIR/$name.txt" ||
        problem "$name.1: the NAME section does not read '$name - ...'"
    for section in SYNOPSIS DESCRIPTION "SEE ALSO"; do
        grep -q "^$section" "$TEST_DIR/$name.txt" || problem "$name.1 has no $section section"
    done
    render "$page" >/dev/null
    if [[ -s $TEST_DIR/groff.err ]]; then
        cat "$TEST_DIR/groff.err" >&2
        problem "groff warns while rendering $name.1"
    fi
done

# --- drift between the code and the pages ------------------------------------

# help_keys: the keys of "key[=value]  help" lines on stdin, in order.
help_keys() {
    sed -nE 's/^ *([a-z][a-z0-9-]*)(=[^ ]*)?( .*)?$/\1/p'
}

# documented_keys: the parameters a POD section documents, i.e. its
# "=item B<key=>..." and "=item [B<key=>]..." lines, in order.
documented_keys() {
    sed -nE 's/^=item \[?B<([a-z][a-z0-9-]*)=?>.*/\1/p'
}

# pod_section FILE START: the lines of a POD file from the heading that
# reads START up to the next heading of the same or a higher level.
pod_section() {
    awk -v start="$2" '
        /^=head[1-4] / {
            level = substr($1, 6) + 0
            if (inside && level <= start_level) { inside = 0; done = 1 }
            if (!inside && !done && substr($0, length($1) + 2) == start) { inside = 1; start_level = level; next }
        }
        inside { print }
    ' "$1"
}

# page_section TEXT START: the lines of a rendered page from the heading
# line that reads START (a section at column 0, a subsection indented) up to
# the next non-blank line indented no deeper than that heading.
page_section() {
    awk -v start="$2" '
        function indent(line) { match(line, /^ */); return RLENGTH }
        done { next }
        !inside {
            if (substr($0, indent($0) + 1) == start) { inside = 1; level = indent($0) }
            next
        }
        /[^ ]/ && indent($0) <= level { inside = 0; done = 1; next }
        { print }
    ' "$1"
}

# check_keys WHAT HELP_KEYS_FILE DOC_KEYS_FILE RENDERED_SECTION_FILE
check_keys() {
    local what=$1 help_file=$2 doc_file=$3 text_file=$4 key
    [[ -s $help_file ]] || { problem "$what: --help lists no parameters (has its format changed?)"; return; }
    while read -r key; do
        # Rendered item header: "key=...", "[key=]..." or a bare "key".
        grep -Eq "^ +\[?$key(=|\]|$)" "$text_file" ||
            problem "$what: parameter '$key' (listed by --help) is not documented in the man page"
    done <"$help_file"
    while read -r key; do
        grep -qx -- "$key" "$help_file" ||
            problem "$what: the man page documents '$key', which --help does not list"
    done <"$doc_file"
}

# cbd-proxy: each subcommand's parameters, under "cbd-proxy SUBCOMMAND".
proxy_page=$MAN_BUILD_DIR/cbd-proxy.1
proxy_pod=$MAN_SOURCE_DIR/cbd-proxy.pod
if [[ -f $proxy_page && -f $proxy_pod ]]; then
    render "$proxy_page" >"$TEST_DIR/cbd-proxy.wide.txt"
    for sub in format list gc connect disconnect; do
        "$CBD_PROXY" "$sub" --help >"$TEST_DIR/proxy-$sub.help" 2>&1 ||
            fail "cbd-proxy $sub --help failed"
        sed -n '/^Parameters/,$p' "$TEST_DIR/proxy-$sub.help" | sed 1d | help_keys >"$TEST_DIR/proxy-$sub.keys"
        pod_section "$proxy_pod" "cbd-proxy $sub" | documented_keys >"$TEST_DIR/proxy-$sub.doc"
        page_section "$TEST_DIR/cbd-proxy.wide.txt" "cbd-proxy $sub" >"$TEST_DIR/proxy-$sub.section"
        [[ -s $TEST_DIR/proxy-$sub.section ]] ||
            { problem "cbd-proxy.1 has no 'cbd-proxy $sub' subsection"; continue; }
        check_keys "cbd-proxy $sub" "$TEST_DIR/proxy-$sub.keys" "$TEST_DIR/proxy-$sub.doc" \
            "$TEST_DIR/proxy-$sub.section"
        # Options (--json and the like) besides --help.
        sed -nE 's/^ +(-[a-z],)?(--[a-z-]+).*/\2/p' "$TEST_DIR/proxy-$sub.help" >"$TEST_DIR/proxy-$sub.options"
        while read -r option; do
            [[ $option == --help ]] && continue
            grep -qF -- "$option" "$TEST_DIR/proxy-$sub.section" ||
                problem "cbd-proxy $sub: option '$option' is not documented in the man page"
        done <"$TEST_DIR/proxy-$sub.options"
    done
else
    problem "cbd-proxy.pod or cbd-proxy.1 is missing"
fi

# nbdkit-cbd-plugin: every key of `nbdkit PLUGIN --help`, under PARAMETERS.
plugin_page=$MAN_BUILD_DIR/nbdkit-cbd-plugin.1
plugin_pod=$MAN_SOURCE_DIR/nbdkit-cbd-plugin.pod
if [[ -f $plugin_page && -f $plugin_pod ]]; then
    nbdkit "$CBD_PLUGIN" --help >"$TEST_DIR/plugin.help" 2>&1 || fail "nbdkit $CBD_PLUGIN --help failed"
    sed -nE 's/^([a-z][a-z0-9-]*)=.*/\1/p' "$TEST_DIR/plugin.help" >"$TEST_DIR/plugin.keys"
    pod_section "$plugin_pod" PARAMETERS | documented_keys >"$TEST_DIR/plugin.doc"
    render "$plugin_page" >"$TEST_DIR/plugin.wide.txt"
    page_section "$TEST_DIR/plugin.wide.txt" PARAMETERS >"$TEST_DIR/plugin.section"
    [[ -s $TEST_DIR/plugin.section ]] || problem "nbdkit-cbd-plugin.1 has no PARAMETERS section"
    check_keys "nbdkit-cbd-plugin" "$TEST_DIR/plugin.keys" "$TEST_DIR/plugin.doc" "$TEST_DIR/plugin.section"
else
    problem "nbdkit-cbd-plugin.pod or nbdkit-cbd-plugin.1 is missing"
fi

((problems == 0)) || fail "$problems problem(s) with the man pages"
log "man pages OK: ${#pods[@]} page(s)"
