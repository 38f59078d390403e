// spiffe-client: a real SPIFFE consumer for meshca's tests, on go-spiffe's
// federation client. It fetches a trust domain's bundle from an https_web
// bundle endpoint and verifies an X.509-SVID chain against it.
//
//	spiffe-client -trust-domain cluster.local -url https://127.0.0.1:8443/ \
//	    -web-roots endpoint-ca.pem [-svid chain.pem]
//
// Prints `sequence N`, `refresh_hint S`, `x509_authorities K` and, with
// -svid, `verified spiffe://...`; exits 1 on any failure.
package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func main() {
	td := flag.String("trust-domain", "", "trust domain of the bundle")
	url := flag.String("url", "", "bundle endpoint URL (https_web)")
	webRoots := flag.String("web-roots", "", "PEM roots that authenticate the endpoint")
	svid := flag.String("svid", "", "PEM X.509-SVID chain (leaf first) to verify")
	flag.Parse()
	if err := run(*td, *url, *webRoots, *svid); err != nil {
		fmt.Fprintln(os.Stderr, "spiffe-client:", err)
		os.Exit(1)
	}
}

func run(td, url, webRoots, svidPath string) error {
	trustDomain, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return err
	}
	roots, err := os.ReadFile(webRoots)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(roots) {
		return fmt.Errorf("no certificate in %s", webRoots)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	bundle, err := federation.FetchBundle(ctx, trustDomain, url, federation.WithWebPKIRoots(pool))
	if err != nil {
		return fmt.Errorf("fetching the bundle: %w", err)
	}
	seq, _ := bundle.SequenceNumber()
	hint, _ := bundle.RefreshHint()
	fmt.Printf("sequence %d\n", seq)
	fmt.Printf("refresh_hint %d\n", int64(hint/time.Second))
	fmt.Printf("x509_authorities %d\n", len(bundle.X509Authorities()))
	if svidPath == "" {
		return nil
	}
	return verify(bundle, svidPath)
}

func verify(bundle *spiffebundle.Bundle, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var chain []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return err
		}
		chain = append(chain, cert)
	}
	id, _, err := x509svid.Verify(chain, bundle)
	if err != nil {
		return fmt.Errorf("verifying the SVID: %w", err)
	}
	fmt.Printf("verified %s\n", id)
	return nil
}
