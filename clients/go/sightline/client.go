// Package sightline is a thin layer over the generated Sightline API (package sightlinev1):
// dialing with an API key and TLS, typed errors, prompt and explanation builders, and decoding of
// explanations (attribution matrices, top sources). The generated stubs stay the way to call the
// API; Client holds one for each service.
package sightline

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

// Client is a connection to a Sightline gateway with a stub for each of its services. Calls made
// through the stubs return *Error on failure.
type Client struct {
	conn         *grpc.ClientConn
	Inference    sightlinev1.InferenceServiceClient
	Explanations sightlinev1.ExplanationsServiceClient
	Audit        sightlinev1.AuditServiceClient
}

// Option configures Dial.
type Option func(*dialSettings)

type dialSettings struct {
	apiKey      string
	tls         *TLS
	dialOptions []grpc.DialOption
}

// WithAPIKey sends key as "authorization: Bearer <key>" on every call.
func WithAPIKey(key string) Option {
	return func(settings *dialSettings) { settings.apiKey = key }
}

// WithTLS connects over TLS (the default is plaintext).
func WithTLS(config TLS) Option {
	return func(settings *dialSettings) { settings.tls = &config }
}

// WithDialOptions passes further options to grpc.Dial, e.g. grpc.WithBlock().
func WithDialOptions(options ...grpc.DialOption) Option {
	return func(settings *dialSettings) { settings.dialOptions = append(settings.dialOptions, options...) }
}

// TLS says which servers to trust and, for mutual TLS, the certificate this client presents.
type TLS struct {
	// RootCertificates are PEM CA certificates that may sign the server's certificate; empty
	// trusts the system's roots.
	RootCertificates []byte
	// ClientCertificate and ClientKey are a PEM certificate chain and its private key, for a
	// server that requires mutual TLS. Both or neither.
	ClientCertificate []byte
	ClientKey         []byte
	// ServerName checks the server's certificate against this name instead of the target's host.
	ServerName string
}

// TLSFromFiles reads PEM files: ca to verify the server (empty: the system's roots), cert and key
// to identify this client (empty: none).
func TLSFromFiles(ca, cert, key, serverName string) (TLS, error) {
	config := TLS{ServerName: serverName}
	for _, file := range []struct {
		path string
		into *[]byte
	}{{ca, &config.RootCertificates}, {cert, &config.ClientCertificate}, {key, &config.ClientKey}} {
		if file.path == "" {
			continue
		}
		contents, err := os.ReadFile(file.path)
		if err != nil {
			return TLS{}, err
		}
		*file.into = contents
	}
	return config, nil
}

// Config builds the crypto/tls configuration.
func (t TLS) Config() (*tls.Config, error) {
	config := &tls.Config{ServerName: t.ServerName, MinVersion: tls.VersionTLS12}
	if len(t.RootCertificates) > 0 {
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(t.RootCertificates) {
			return nil, fmt.Errorf("sightline: no PEM certificate in the TLS root certificates")
		}
	}
	if (len(t.ClientCertificate) == 0) != (len(t.ClientKey) == 0) {
		return nil, fmt.Errorf("sightline: mutual TLS needs both a client certificate and its key")
	}
	if len(t.ClientCertificate) > 0 {
		pair, err := tls.X509KeyPair(t.ClientCertificate, t.ClientKey)
		if err != nil {
			return nil, fmt.Errorf("sightline: client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// Dial connects to the gateway at target ("host:port"). Like grpc.Dial it does not wait for the
// connection unless asked to (WithDialOptions(grpc.WithBlock())).
func Dial(target string, options ...Option) (*Client, error) {
	settings := dialSettings{}
	for _, option := range options {
		option(&settings)
	}
	dialOptions := []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(typedUnaryErrors),
		grpc.WithChainStreamInterceptor(typedStreamErrors),
	}
	if settings.tls != nil {
		config, err := settings.tls.Config()
		if err != nil {
			return nil, err
		}
		dialOptions = append(dialOptions, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	} else {
		dialOptions = append(dialOptions, grpc.WithInsecure())
	}
	if settings.apiKey != "" {
		dialOptions = append(dialOptions, grpc.WithPerRPCCredentials(bearerKey(settings.apiKey)))
	}
	conn, err := grpc.Dial(target, append(dialOptions, settings.dialOptions...)...)
	if err != nil {
		return nil, AsError(err)
	}
	return &Client{
		conn:         conn,
		Inference:    sightlinev1.NewInferenceServiceClient(conn),
		Explanations: sightlinev1.NewExplanationsServiceClient(conn),
		Audit:        sightlinev1.NewAuditServiceClient(conn),
	}, nil
}

// Conn is the underlying connection, for other services the gateway serves (health, reflection).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// bearerKey sends an API key with each call. The gateway accepts keys over plaintext too (local
// and test deployments), so it does not insist on TLS, as the Python SDK does not.
type bearerKey string

func (key bearerKey) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(key)}, nil
}

func (bearerKey) RequireTransportSecurity() bool { return false }

func typedUnaryErrors(
	ctx context.Context, method string, request, reply interface{}, conn *grpc.ClientConn,
	invoker grpc.UnaryInvoker, options ...grpc.CallOption,
) error {
	return AsError(invoker(ctx, method, request, reply, conn, options...))
}

func typedStreamErrors(
	ctx context.Context, description *grpc.StreamDesc, conn *grpc.ClientConn, method string,
	streamer grpc.Streamer, options ...grpc.CallOption,
) (grpc.ClientStream, error) {
	stream, err := streamer(ctx, description, conn, method, options...)
	if err != nil {
		return nil, AsError(err)
	}
	return typedErrorStream{stream}, nil
}

// typedErrorStream returns a stream's failures as *Error; io.EOF, its normal end, passes unchanged.
type typedErrorStream struct{ grpc.ClientStream }

func (s typedErrorStream) RecvMsg(message interface{}) error {
	return AsError(s.ClientStream.RecvMsg(message))
}

func (s typedErrorStream) SendMsg(message interface{}) error {
	return AsError(s.ClientStream.SendMsg(message))
}
