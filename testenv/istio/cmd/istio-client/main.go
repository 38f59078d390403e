// Command istio-client requests a workload certificate from an Istio-compatible CA
// (the IstioCertificateService gRPC API) using Istio's own client code: the Citadel
// CA client (NewCitadelClient, CSRSign) and Istio's CSR generator (GenCSR).
//
// On success it prints the certificate chain (PEM elements concatenated), or with
// -json a JSON object {"chain": [...], "key": "...", "csr": "..."}. On error it
// prints "<grpc code name>: <message>" on stderr (e.g. "Unauthenticated: ...")
// and exits with status 1 (2 for usage errors).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc/status"

	"istio.io/istio/pkg/log"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher/plugin"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"
)

type headerFlags map[string]string

func (h headerFlags) String() string { return fmt.Sprint(map[string]string(h)) }

func (h headerFlags) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("header must be NAME=VALUE, got %q", v)
	}
	h[k] = val
	return nil
}

// Istio's client wraps the gRPC error with %v, which drops the status; recover the
// code name and message from the text ("rpc error: code = X desc = Y").
var statusRe = regexp.MustCompile(`rpc error: code = (\w+) desc = (?s)(.*)`)

func errorCodeAndMessage(err error) (string, string) {
	if st, ok := status.FromError(err); ok && st != nil {
		return st.Code().String(), st.Message()
	}
	if m := statusRe.FindStringSubmatch(err.Error()); m != nil {
		return m[1], strings.TrimSpace(m[2])
	}
	return "Unknown", err.Error()
}

func main() {
	var (
		addr       = flag.String("addr", "", "CA address host:port (required)")
		tokenFile  = flag.String("token", "", "file holding the bearer token (JWT); empty sends no token")
		rootCert   = flag.String("root-cert", "", "PEM file of the root(s) that verify the CA server's TLS certificate (required unless -plaintext)")
		plaintext  = flag.Bool("plaintext", false, "connect without TLS (testing only)")
		san        = flag.String("server-name", "", "TLS server name to verify (default: host of -addr; 'localhost' maps to istiod.istio-system.svc as in Istio)")
		keyType    = flag.String("key-type", "ecdsa-p256", "key type: rsa-2048, ecdsa-p256, ecdsa-p384")
		ttl        = flag.Duration("ttl", 24*time.Hour, "requested certificate lifetime")
		host       = flag.String("host", "spiffe://cluster.local/ns/default/sa/default", "identity (SAN) put into the CSR; comma-separated")
		clientCert = flag.String("client-cert", "", "PEM certificate chain for mTLS (renewal with an existing certificate)")
		clientKey  = flag.String("client-key", "", "PEM private key for -client-cert")
		clusterID  = flag.String("cluster-id", "", "value of the ClusterID gRPC metadata header")
		certSigner = flag.String("cert-signer", "", "value of the CertSigner request metadata")
		jsonOut    = flag.Bool("json", false, "print JSON {chain, key, csr} instead of the chain PEM")
		timeout    = flag.Duration("timeout", 30*time.Second, "overall deadline")
		verbose    = flag.Bool("v", false, "show Istio's client logs on stderr")
	)
	headers := headerFlags{}
	flag.Var(headers, "header", "extra gRPC metadata NAME=VALUE (repeatable)")
	flag.Parse()

	if !*verbose {
		opts := log.DefaultOptions()
		opts.SetDefaultOutputLevel(log.OverrideScopeName, log.NoneLevel)
		_ = log.Configure(opts)
	}
	if *addr == "" {
		fmt.Fprintln(os.Stderr, "istio-client: -addr is required")
		flag.Usage()
		os.Exit(2)
	}
	if !*plaintext && *rootCert == "" {
		fmt.Fprintln(os.Stderr, "istio-client: -root-cert is required (or -plaintext)")
		os.Exit(2)
	}
	if (*clientCert == "") != (*clientKey == "") {
		fmt.Fprintln(os.Stderr, "istio-client: -client-cert and -client-key go together")
		os.Exit(2)
	}

	certOpts := util.CertOptions{Host: *host}
	switch *keyType {
	case "rsa-2048":
		certOpts.RSAKeySize = 2048
	case "ecdsa-p256":
		certOpts.ECSigAlg, certOpts.ECCCurve = util.EcdsaSigAlg, util.P256Curve
	case "ecdsa-p384":
		certOpts.ECSigAlg, certOpts.ECCCurve = util.EcdsaSigAlg, util.P384Curve
	default:
		fmt.Fprintf(os.Stderr, "istio-client: unknown -key-type %q\n", *keyType)
		os.Exit(2)
	}
	csrPEM, keyPEM, err := util.GenCSR(certOpts)
	if err != nil {
		fail(fmt.Errorf("generate CSR: %w", err))
	}

	secOpts := &security.Options{
		CAEndpoint:    *addr,
		CAEndpointSAN: *san,
		ClusterID:     *clusterID,
		CertSigner:    *certSigner,
		CAHeaders:     map[string]string(headers),
	}
	if *tokenFile != "" {
		secOpts.CredFetcher = plugin.CreateTokenPlugin(*tokenFile)
	}
	var tlsOpts *citadel.TLSOptions
	if !*plaintext {
		tlsOpts = &citadel.TLSOptions{RootCert: *rootCert, Cert: *clientCert, Key: *clientKey}
	}
	client, err := citadel.NewCitadelClient(secOpts, tlsOpts)
	if err != nil {
		fail(err)
	}
	defer client.Close()

	type result struct {
		chain []string
		err   error
	}
	done := make(chan result, 1)
	go func() {
		chain, err := client.CSRSign(csrPEM, int64(ttl.Seconds()))
		done <- result{chain, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(*timeout):
		res.err = errors.New("rpc error: code = DeadlineExceeded desc = istio-client: no answer within " + timeout.String())
	}
	if res.err != nil {
		fail(res.err)
	}

	if *jsonOut {
		out, _ := json.MarshalIndent(map[string]any{
			"chain": res.chain,
			"key":   string(keyPEM),
			"csr":   string(csrPEM),
		}, "", "  ")
		fmt.Println(string(out))
		return
	}
	for _, c := range res.chain {
		s := strings.TrimRight(c, "\n")
		fmt.Println(s)
	}
}

func fail(err error) {
	code, msg := errorCodeAndMessage(err)
	fmt.Fprintf(os.Stderr, "%s: %s\n", code, msg)
	os.Exit(1)
}
