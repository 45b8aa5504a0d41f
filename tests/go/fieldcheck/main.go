// fieldcheck: a relying party written against Go's standard library only (crypto/x509,
// crypto/tls), as a cloud or broker written in Go would check device certificates.
//
//	go run main.go verify -root root.pem -intermediate pca.pem [-crl f.crl]... [-at unix] dev.pem...
//	go run main.go serve  -root root.pem -cert server.pem -key server.key [-crl f.crl]...
//
// verify prints one JSON object per certificate and per CRL: parsed (x509.ParseCertificate,
// x509.ParseRevocationList), verified for client authentication (Certificate.Verify with
// ExtKeyUsageClientAuth at -at), revoked (the serial is on a CRL whose signature verifies
// under the certificate's issuer; with -crl given, a missing CRL for the issuer fails
// closed, as OpenSSL's crl_check does). serve runs a crypto/tls server on 127.0.0.1 that
// requires and verifies a client certificate (tls.RequireAndVerifyClientCert) with the same
// CRL check, prints "READY <addr>" and one JSON object per handshake, and greets each client.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

type files []string

func (f *files) String() string     { return strings.Join(*f, ",") }
func (f *files) Set(v string) error { *f = append(*f, v); return nil }

func pemBlocks(path, kind string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type == kind {
			out = append(out, b.Bytes)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no %s", path, kind)
	}
	return out, nil
}

func certs(paths []string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for _, p := range paths {
		blocks, err := pemBlocks(p, "CERTIFICATE")
		if err != nil {
			return nil, err
		}
		for _, b := range blocks {
			c, err := x509.ParseCertificate(b)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
			out = append(out, c)
		}
	}
	return out, nil
}

func crls(paths []string) ([]*x509.RevocationList, error) {
	var out []*x509.RevocationList
	for _, p := range paths {
		blocks, err := pemBlocks(p, "X509 CRL")
		if err != nil {
			return nil, err
		}
		for _, b := range blocks {
			l, err := x509.ParseRevocationList(b)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
			out = append(out, l)
		}
	}
	return out, nil
}

// revoked: is cert on a CRL signed by issuer? (RFC 5280 §6.3, a complete direct CRL)
func revoked(cert, issuer *x509.Certificate, lists []*x509.RevocationList) (bool, error) {
	found := false
	for _, l := range lists {
		if l.CheckSignatureFrom(issuer) != nil {
			continue
		}
		found = true
		for _, r := range l.RevokedCertificates {
			if r.SerialNumber.Cmp(cert.SerialNumber) == 0 {
				return true, nil
			}
		}
	}
	if !found {
		return false, errors.New("no CRL of the issuer " + issuer.Subject.String())
	}
	return false, nil
}

type result struct {
	File     string   `json:"file"`
	Parsed   bool     `json:"parsed"`
	Verified bool     `json:"verified"`
	Revoked  bool     `json:"revoked"`
	Error    string   `json:"error,omitempty"`
	Subject  string   `json:"subject,omitempty"`
	URIs     []string `json:"uris,omitempty"`
	CRLDP    []string `json:"crl_dp,omitempty"`
	OCSP     []string `json:"ocsp,omitempty"`
	Entries  int      `json:"entries,omitempty"`
}

func emit(r result) {
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
}

func verifyCmd(args []string) error {
	fs := flag.NewFlagSet("verify", flag.ExitOnError)
	var roots, inters, crlFiles files
	fs.Var(&roots, "root", "trust anchor (PEM)")
	fs.Var(&inters, "intermediate", "intermediate CA certificate (PEM)")
	fs.Var(&crlFiles, "crl", "CRL (PEM)")
	at := fs.Int64("at", 0, "validation time, Unix seconds (default now)")
	fs.Parse(args)
	rootCerts, err := certs(roots)
	if err != nil {
		return err
	}
	interCerts, err := certs(inters)
	if err != nil {
		return err
	}
	lists, err := crls(crlFiles)
	if err != nil {
		return err
	}
	for i, l := range lists {
		r := result{File: crlFiles[min(i, len(crlFiles)-1)], Parsed: true, Entries: len(l.RevokedCertificates)}
		for _, c := range append(append([]*x509.Certificate{}, rootCerts...), interCerts...) {
			if l.CheckSignatureFrom(c) == nil {
				r.Verified = true
				r.Subject = c.Subject.String()
			}
		}
		emit(r)
	}
	opts := x509.VerifyOptions{
		Roots:         x509.NewCertPool(),
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if *at != 0 {
		opts.CurrentTime = time.Unix(*at, 0)
	}
	for _, c := range rootCerts {
		opts.Roots.AddCert(c)
	}
	for _, c := range interCerts {
		opts.Intermediates.AddCert(c)
	}
	for _, p := range fs.Args() {
		r := result{File: p}
		cs, err := certs([]string{p})
		if err != nil {
			r.Error = err.Error()
			emit(r)
			continue
		}
		c := cs[0]
		r.Parsed, r.Subject, r.CRLDP, r.OCSP = true, c.Subject.String(), c.CRLDistributionPoints, c.OCSPServer
		for _, u := range c.URIs {
			r.URIs = append(r.URIs, u.String())
		}
		chains, err := c.Verify(opts)
		if err != nil {
			r.Error = err.Error()
			emit(r)
			continue
		}
		r.Verified = true
		if len(lists) > 0 {
			rev, err := revoked(c, chains[0][1], lists)
			r.Revoked = rev
			if err != nil {
				r.Verified, r.Error = false, err.Error()
			}
		}
		emit(r)
	}
	return nil
}

func serveCmd(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	var roots, crlFiles files
	fs.Var(&roots, "root", "trust anchor for client certificates (PEM)")
	fs.Var(&crlFiles, "crl", "CRL (PEM)")
	certFile := fs.String("cert", "", "server certificate (PEM)")
	keyFile := fs.String("key", "", "server key (PEM)")
	fs.Parse(args)
	rootCerts, err := certs(roots)
	if err != nil {
		return err
	}
	lists, err := crls(crlFiles)
	if err != nil {
		return err
	}
	pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	for _, c := range rootCerts {
		pool.AddCert(c)
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS12,
		VerifyPeerCertificate: func(_ [][]byte, chains [][]*x509.Certificate) error {
			if len(lists) == 0 {
				return nil
			}
			rev, err := revoked(chains[0][0], chains[0][1], lists)
			if err != nil {
				return err
			}
			if rev {
				return errors.New("certificate revoked")
			}
			return nil
		},
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		return err
	}
	fmt.Println("READY", ln.Addr().String())
	for {
		conn, err := ln.Accept()
		if err != nil {
			return err
		}
		tc := conn.(*tls.Conn)
		tc.SetDeadline(time.Now().Add(20 * time.Second))
		r := result{File: conn.RemoteAddr().String()}
		if err := tc.Handshake(); err != nil {
			r.Error = err.Error()
			emit(r)
		} else {
			peer := tc.ConnectionState().PeerCertificates[0]
			r.Parsed, r.Verified, r.Subject = true, true, peer.Subject.String()
			for _, u := range peer.URIs {
				r.URIs = append(r.URIs, u.String())
			}
			line, _ := bufio.NewReader(tc).ReadString('\n')
			emit(r) // before the greeting: a client that has it knows the line is out
			fmt.Fprintf(tc, "welcome %s, you said %s", peer.Subject.CommonName, line)
		}
		tc.Close()
	}
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: fieldcheck verify|serve ...")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "verify":
		err = verifyCmd(os.Args[2:])
	case "serve":
		err = serveCmd(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fieldcheck:", err)
		os.Exit(1)
	}
}
