#!/bin/sh
# Build real Kubernetes binaries once per machine and print their paths, one a
# line, in the order asked:
#   scripts/build-kube.sh [COMPONENT...]     (default: kube-apiserver)
# COMPONENT is a cmd/ directory of the Kubernetes tree. The tests use two:
#   kube-apiserver  a real Kubernetes API (tests/fixtures/kube.py)
#   kube-proxy      the real Service rules in the lab (cttrace lab run --proxy kube-proxy)
# kube-controller-manager is deliberately not built: the lab writes the
# Endpoints object itself at the moment it flips a pod's readiness, which is
# what the endpoint controller does with its default batch period of 0, and a
# controller-manager would also need nodes, a scheduler and pod ownership the
# lab does not model.
#
# Source: Debian bookworm's own `kubernetes` source package (1.20.x, full
# vendor/ tree, builds offline). Cached outside the repository; nothing built
# here is ever committed. Idempotent: a second run only prints the path.
#
# The one trap (docs/DESIGN.md, "A real kube-apiserver can be built here"): the
# vendored github.com/modern-go/reflect2 v1.0.1 reads Go runtime internals
# that changed in Go 1.18 and segfaults as soon as a custom resource is served;
# Debian's golang-github-modern-go-reflect2-dev (1.0.2) replaces it.
#
# Environment:
#   CTTRACE_KUBE_CACHE  cache root (default /var/cache/cttrace)
#   KUBE_SRC_VERSION    Debian source version (default below)
set -eu

KUBE_SRC_VERSION="${KUBE_SRC_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}"
CACHE="${CTTRACE_KUBE_CACHE:-/var/cache/cttrace}"
BUILD="$CACHE/build"
[ "$#" -gt 0 ] || set -- kube-apiserver

log() { echo "build-kube: $*" >&2; }

# Each binary is cached as $CACHE/<component>-<version>/<component>.
out_of() { echo "$CACHE/$1-$KUBE_SRC_VERSION/$1"; }

missing=""
for c in "$@"; do
    case "$c" in
        *[!a-z-]* | "") log "not a cmd/ component name: '$c'"; exit 2 ;;
    esac
    [ -x "$(out_of "$c")" ] || missing="$missing $c"
done
print_all() { for c in "$@"; do out_of "$c"; done; }
if [ -z "$missing" ]; then
    print_all "$@"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "needs root (apt-get and $CACHE); run it with sudo"
    exit 1
fi

# --- deb-src for the same mirror(s) the machine already uses -----------------
# bookworm keeps its sources in deb822 form (/etc/apt/sources.list.d/*.sources);
# older images use one-line form in sources.list. Add deb-src entries for the
# same URIs/suites in a file of our own, never editing the machine's files.
SRC_LIST=/etc/apt/sources.list.d/cttrace-deb-src.sources
have_deb_src() {
    grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/
}
if ! have_deb_src; then
    tmp="$SRC_LIST.tmp"
    : >"$tmp"
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        # Keep only stanzas for Debian's own archive (they carry the Debian
        # keyring); rewrite their Types line to deb-src.
        awk -v RS= -v ORS='\n\n' \
            '/Signed-By: *\/usr\/share\/keyrings\/debian-archive-keyring.gpg/ && /(^|\n)Types:[^\n]*deb/ {
                 gsub(/(^|\n)#[^\n]*/, "");
                 sub(/Types:[^\n]*/, "Types: deb-src");
                 print
             }' "$f" >>"$tmp"
    done
    if [ -f /etc/apt/sources.list ]; then
        sed -n 's/^deb \(.*debian.*\)$/deb-src \1/p' /etc/apt/sources.list |
            awk '{ sub(/^deb-src /, ""); print "Types: deb-src\nURIs: " $1 "\nSuites: " $2 "\nComponents: " substr($0, index($0, $3)) "\n" }' >>"$tmp"
    fi
    if ! [ -s "$tmp" ]; then
        rm -f "$tmp"
        log "found no Debian mirror in /etc/apt/sources.list(.d) to add a deb-src entry for"
        exit 1
    fi
    mv "$tmp" "$SRC_LIST"
    log "added deb-src entries in $SRC_LIST"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
fi

# --- tools -------------------------------------------------------------------
need_pkgs=""
# rsync: hack/lib/golang.sh copies the code generators it builds with it.
for p in golang-go etcd-server etcd-client dpkg-dev golang-github-modern-go-reflect2-dev make rsync; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need_pkgs="$need_pkgs $p"
done
if [ -n "$need_pkgs" ]; then
    log "installing:$need_pkgs"
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $need_pkgs >&2 ||
        { apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $need_pkgs >&2; }
fi

# --- source ------------------------------------------------------------------
mkdir -p "$BUILD"
upstream="${KUBE_SRC_VERSION%-*}"     # 1.20.5+really1.20.2
src="$BUILD/kubernetes-$upstream"
if ! [ -d "$src" ]; then
    log "fetching source kubernetes=$KUBE_SRC_VERSION into $BUILD"
    (cd "$BUILD" && apt-get source -qq "kubernetes=$KUBE_SRC_VERSION" >&2)
fi
for c in $missing; do
    [ -d "$src/cmd/$c" ] || { log "unexpected source layout: no $src/cmd/$c"; exit 1; }
done

# --- reflect2 1.0.1 -> Debian's 1.0.2 -------------------------------------------
debian_reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
vendored="$src/vendor/github.com/modern-go/reflect2"
if ! grep -qs 'cttrace: replaced' "$vendored/CTTRACE-REPLACED"; then
    [ -d "$debian_reflect2" ] || { log "missing $debian_reflect2"; exit 1; }
    rm -rf "$vendored"
    cp -r "$debian_reflect2" "$vendored"
    # Vendored packages must not carry their own module file.
    rm -f "$vendored/go.mod" "$vendored/go.sum"
    echo "cttrace: replaced with Debian's reflect2 from $debian_reflect2" >"$vendored/CTTRACE-REPLACED"
    log "replaced vendored reflect2 with Debian's"
fi

# --- build ---------------------------------------------------------------------
what=""
for c in $missing; do what="$what cmd/$c"; done
what="${what# }"
log "building $what (several minutes each on 2 cores)"
start=$(date +%s)
(
    cd "$src"
    # A failed earlier attempt can leave empty tool binaries that make then
    # trusts; the Go build cache (GOCACHE) keeps what was compiled anyway.
    rm -rf _output .make
    export GOCACHE="$BUILD/gocache"
    CGO_ENABLED=0 make WHAT="$what" >&2
)
log "built in $(( $(date +%s) - start )) s"

arch="$(dpkg --print-architecture)"
for c in $missing; do
    built="$src/_output/local/bin/linux/$arch/$c"
    [ -x "$built" ] || built="$src/_output/bin/$c"
    [ -x "$built" ] || { log "build finished but no $c binary found under $src/_output"; exit 1; }
    out="$(out_of "$c")"
    mkdir -p "$(dirname "$out")"
    cp "$built" "$out.tmp"
    mv "$out.tmp" "$out"
done

# The source tree, Go caches and _output are ~2 GB: drop them, keep the binaries.
rm -rf "$BUILD"
print_all "$@"
