#!/usr/bin/env bash
# CA keys in a PKCS#11 token (SoftHSM2) in one run:
#  1. crates/hsm/examples/pkcs11_bench: SoftHSM's raw C_Sign rate against
#     meshca's signatures through the same key, and certs/s with the key in
#     the token against the same key as a file (RSA-2048, P-256);
#  2. `meshca server` (release, standalone, plugged-in CA) driven by
#     `meshca loadgen` at 64 clients, CA key in the token and the same
#     kind of CA with a file key, alternating, median of 3 rounds.
#
#   bench/hsm.sh [seconds-per-case] [threads] [requests]     # defaults 5 2 5000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"
seconds="${1:-5}" threads="${2:-2}" requests="${3:-5000}"
scripts/softhsm
cargo build --release -p meshca -p meshca-hsm --example pkcs11_bench >&2
target="${CARGO_TARGET_DIR:-target}/release"
meshca="$target/meshca"

echo "== signatures and certificates (pkcs11_bench)"
"$target/examples/pkcs11_bench" "$seconds" "$threads"

echo
echo "== meshca server at 64 clients"
work="$(mktemp -d)"
pid=""
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/tokens"
echo "directories.tokendir = $work/tokens" >"$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf"
softhsm2-util --init-token --free --label bench --pin 1234 --so-pin 87654321 >/dev/null
printf 1234 >"$work/pin"
export MESHCA_PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so MESHCA_PKCS11_PIN_FILE="$work/pin"
cd "$work"
for key in rsa-2048 ecdsa-p256; do
  "$meshca" ca init --out "token-$key" --key-type "$key" --pkcs11 "pkcs11:token=bench;object=$key" >/dev/null
  "$meshca" ca init --out "file-$key" --key-type "$key" >/dev/null
done
port=35012
run() { # kind key -> certs/s
  "$meshca" server --listen "127.0.0.1:$port" --monitoring-listen none --root-ca-dir "$1-$2" \
    --state-dir "state-$1-$2" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  "$meshca" token --state-dir "state-$1-$2" --namespace default --service-account bench >"token-$1-$2"
  "$meshca" loadgen --addr "127.0.0.1:$port" --root "$1-$2/root-cert.pem" --token-file "token-$1-$2" \
    --concurrency 64 --requests "$requests" --json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["certs_per_second"]))'
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}
echo "| CA key | round | token key certs/s | file key certs/s |"
echo "|---|---|---|---|"
for key in rsa-2048 ecdsa-p256; do
  for round in 1 2 3; do
    echo "| $key | $round | $(run token "$key") | $(run file "$key") |"
  done
done
