# Shared settings for testenv/build, testenv/up and testenv/down. Sourced, not run.
# shellcheck shell=bash

TESTENV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Versions. The go.mod/go.sum files of the wrapper modules pin the code; these
# are the version strings stamped into the binaries and checked after building.
KUBE_VERSION=v1.35.4
KUBE_MAJOR=1
KUBE_MINOR=35
HELM_VERSION=v3.22.0

TESTENV_CACHE="${MESHCA_TESTENV_CACHE:-$HOME/.cache/meshca-testenv}"

# Go environment: everything inside the cache, never the user's own GOPATH.
export GOMODCACHE="$TESTENV_CACHE/gomod"
export GOCACHE="$TESTENV_CACHE/gocache"
export GOTOOLCHAIN=local
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOWORK=off
# go.sum (committed) pins every module's content, so the checksum database is
# never needed: -mod=readonly refuses anything missing from go.sum.
export GOSUMDB="${GOSUMDB:-off}"

log() { printf 'testenv: %s\n' "$*" >&2; }
die() { printf 'testenv: ERROR: %s\n' "$*" >&2; exit 1; }

# The cache key: changes whenever a wrapper module, the client source, or the
# build recipe (this file and build) changes.
testenv_key() {
  (
    cd "$TESTENV_ROOT" || exit 1
    {
      cat lib.sh build
      for f in kube/go.mod kube/go.sum etcd/go.mod etcd/go.sum zlint/go.mod zlint/go.sum \
               istio/go.mod istio/go.sum helm/go.mod helm/go.sum spiffe/go.mod spiffe/go.sum; do
        printf '%s\n' "$f"; cat "$f"
      done
      find istio/cmd spiffe/cmd -type f -name '*.go' | LC_ALL=C sort | while read -r f; do
        printf '%s\n' "$f"; cat "$f"
      done
      go env GOVERSION GOOS GOARCH
    } | sha256sum | cut -c1-16
  )
}

TESTENV_BIN="${MESHCA_TESTENV_BIN_OVERRIDE:-$TESTENV_CACHE/bin-$(testenv_key)}"
