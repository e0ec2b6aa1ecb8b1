// TLS settings of a client's connection: which servers to trust and, for mutual TLS, the client's certificate.
import { readFileSync } from "node:fs";
import type { SecureClientSessionOptions } from "node:http2";

/**
 * Connect over TLS. `rootCertificates` are the PEM CA certificates that may sign the server's certificate
 * (unset: Node's bundled trust store). `clientCertificate` and `clientKey` are the PEM certificate chain and
 * private key this client presents to a server that requires mutual TLS. `serverName` checks the server's
 * certificate against this name instead of the target's host, e.g. when connecting by IP address to a
 * certificate issued for a DNS name.
 */
export interface TlsOptions {
  rootCertificates?: string | Buffer;
  clientCertificate?: string | Buffer;
  clientKey?: string | Buffer;
  serverName?: string;
}

/** Read the PEM files: `ca` to verify the server, `cert` and `key` to identify this client. */
export function tlsFromFiles(files: { ca?: string; cert?: string; key?: string; serverName?: string }): TlsOptions {
  const read = (path: string | undefined): Buffer | undefined => (path === undefined ? undefined : readFileSync(path));
  return {
    rootCertificates: read(files.ca),
    clientCertificate: read(files.cert),
    clientKey: read(files.key),
    serverName: files.serverName,
  };
}

/** The options of Node's http2.connect() for these settings. */
export function sessionOptions(tls: TlsOptions): SecureClientSessionOptions {
  if ((tls.clientCertificate === undefined) !== (tls.clientKey === undefined)) {
    throw new TypeError("mutual TLS needs both clientCertificate and clientKey");
  }
  return {
    ca: tls.rootCertificates,
    cert: tls.clientCertificate,
    key: tls.clientKey,
    servername: tls.serverName,
  };
}
