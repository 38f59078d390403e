#!/usr/bin/env bash
# The PKI core's issue path (CSR PEM in, chain PEM out) next to the crypto
# ceiling measured by `openssl speed` in the same run, as a markdown table.
#
#   bench/pki.sh            # ~2 minutes
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"

speed="$(mktemp)"
trap 'rm -f "$speed"' EXIT
echo "openssl speed (one core)..." >&2
openssl speed -seconds 5 -mr rsa2048 ecdsap256 2>/dev/null >"$speed"
echo "cargo bench -p meshca-pki --bench issue..." >&2
cargo bench -p meshca-pki --bench issue -- --warm-up-time 2 --measurement-time 10 >&2

python3 - "$speed" <<'PY'
import json, sys, pathlib
rsa = ecdsa = None
for line in open(sys.argv[1]):
    f = line.strip().split(":")
    # -mr summary lines: +F2:<n>:<bits>:<sign/s>:<verify/s> (RSA), +F4:... (ECDSA)
    if f[0] == "+F2" and f[2] == "2048":
        rsa = (float(f[3]), float(f[4]))
    elif f[0] == "+F4" and f[2] == "256":
        ecdsa = (float(f[3]), float(f[4]))
if not rsa or not ecdsa:
    sys.exit("could not parse openssl speed output")
print(f"openssl speed: RSA-2048 sign {rsa[0]:.0f}/s verify {rsa[1]:.0f}/s; "
      f"ECDSA P-256 sign {ecdsa[0]:.0f}/s verify {ecdsa[1]:.0f}/s\n")
print("| CA key | CSR key | meshca certs/s | ceiling 1/(t_sign+t_verify) | share of ceiling |")
print("|---|---|---|---|---|")
sign = {"rsa-2048": rsa[0], "ecdsa-p256": ecdsa[0]}
verify = {"rsa-2048": rsa[1], "ecdsa-p256": ecdsa[1]}
for ca in ["rsa-2048", "ecdsa-p256"]:
    for csr in ["rsa-2048", "ecdsa-p256"]:
        est = pathlib.Path(f"target/criterion/issue/ca={ca}_csr={csr}/new/estimates.json")
        if not est.exists():
            est = next(pathlib.Path("target/criterion/issue").glob(f"ca={ca}*csr={csr}/new/estimates.json"))
        ns = json.loads(est.read_text())["median"]["point_estimate"]
        rate = 1e9 / ns
        ceiling = 1 / (1 / sign[ca] + 1 / verify[csr])
        print(f"| {ca} | {csr} | {rate:.0f} | {ceiling:.0f} | {100 * rate / ceiling:.0f}% |")
PY
