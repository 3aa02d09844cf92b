//! A throwaway test CA and one server certificate it signed, made with the `openssl` CLI, and an
//! HTTPS client that trusts that CA (Synapse federates over TLS only, so the federation tests
//! need real certificates).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::http::Response;

/// A test CA (`ca.pem`) and a server certificate (`server.pem`, `server.key`) for `localhost` and
/// `127.0.0.1` (plus any extra DNS names), in a temp dir removed on drop. Valid for 2 days.
pub struct TestCerts {
    dir: tempfile::TempDir,
}

impl TestCerts {
    /// Makes the CA and a server certificate for `DNS:localhost, IP:127.0.0.1`.
    pub fn new() -> Self {
        Self::with_dns_names(&[])
    }

    /// As [`TestCerts::new`], with `extra_dns` added to the subject alternative names.
    pub fn with_dns_names(extra_dns: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-tls-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let d = dir.path();
        let san: String = std::iter::once("DNS:localhost".to_owned())
            .chain(extra_dns.iter().map(|name| format!("DNS:{name}")))
            .chain(std::iter::once("IP:127.0.0.1".to_owned()))
            .collect::<Vec<_>>()
            .join(",");
        let ext = format!(
            "subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\n"
        );
        std::fs::write(d.join("ext.cnf"), ext)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", d.join("ext.cnf").display()));
        // No argument has a space: [`openssl`] splits on whitespace.
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(
            d,
            &format!(
                "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=testkit-CA \
                 -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        );
        openssl(
            d,
            &format!("req {ec} -keyout server.key -out server.csr -subj /CN=localhost"),
        );
        openssl(
            d,
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
             -days 2 -extfile ext.cnf",
        );
        Self { dir }
    }

    /// The CA certificate (PEM): what clients and Synapse's `federation_custom_ca_list` trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (PEM), signed by the CA.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server certificate's private key (PEM, unencrypted).
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// `GET url` with `headers`, trusting only this CA; any status is returned.
    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> Response {
        self.send("GET", url, headers, None, &[])
    }

    /// `method url` with `headers` and `body` (with a `Content-Type` header when given), trusting
    /// only this CA; any status is returned, it panics only when no response came.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        content_type: Option<&str>,
        body: &[u8],
    ) -> Response {
        crate::http::send_with(&self.agent(), method, url, headers, content_type, body)
    }

    fn agent(&self) -> ureq::Agent {
        let path = self.ca_path();
        let pem =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let ca = ureq::tls::Certificate::from_pem(&pem)
            .unwrap_or_else(|e| panic!("{} is not a PEM certificate: {e}", path.display()));
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
            .build();
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into()
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `openssl` with the whitespace-separated `args` in `dir`; panics with its output when it
/// fails.
fn openssl(dir: &Path, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    let output = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `openssl` ({e}): the TLS tests make their certificates with it; \
                 install it (Debian/Ubuntu: `apt-get install openssl`)"
            )
        });
    assert!(
        output.status.success(),
        "`openssl {}` failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
