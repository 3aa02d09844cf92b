//! A real S3-compatible server for one test: moto's standalone server (`moto_server`, from the tools
//! venv) on a free loopback port, with a bucket created.
//!
//! moto keeps everything in memory: [`S3Server::restart`] brings back an empty server on the same
//! port (with the bucket created again), so a test of an outage checks that the server recovers for
//! new requests, not that old objects survive.

use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::{self, Response};
use crate::tools::tool;

/// moto checks no signature, but answers anonymous requests on objects with 403: any SigV4-looking
/// `Authorization` header makes a request "signed".
const FAKE_AUTH: &str = "AWS4-HMAC-SHA256 Credential=testkit/20250101/us-east-1/s3/aws4_request, \
                         SignedHeaders=host;x-amz-date, Signature=0000";

/// The credentials to configure (moto accepts any).
pub const ACCESS_KEY_ID: &str = "testkit-access-key";
pub const ACCESS_SECRET: &str = "testkit-secret-key";

/// A running `moto_server`, stopped when dropped.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    bucket: String,
    dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts `moto_server` on a free loopback port and creates `bucket`.
    pub fn start(bucket: &str) -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("testkit-s3-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let mut server = S3Server {
            child: None,
            port: free_port(),
            bucket: bucket.to_owned(),
            dir,
        };
        server.launch();
        server
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    fn launch(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path().display()));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone a file handle: {e}"));
        let child = Command::new(tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server: {e}; run `cargo xtask test`, which installs it")
            });
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60));
        let r = self.request("PUT", &format!("/{}", self.bucket), &[]);
        assert_eq!(
            r.status,
            200,
            "creating bucket {} failed: {}",
            self.bucket,
            r.text()
        );
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "moto_server exited ({status}) before it answered. Its log:\n{}",
                    self.log()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && http::get(&self.url("/"), &[]).status == 200
            {
                eprintln!(
                    "testkit: moto_server ready on {} after {:.1} s",
                    self.endpoint(),
                    start.elapsed().as_secs_f64()
                );
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "moto_server did not answer on {} within {} s. Its log:\n{}",
                    self.endpoint(),
                    timeout.as_secs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:PORT`: the datastore's `endpoint` (with `ssl: false`).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The datastore `opts` for this server (path-style, plain HTTP), with a temp path.
    pub fn datastore_opts(&self, temp_path: &std::path::Path) -> serde_json::Value {
        serde_json::json!({
            "tempPath": temp_path,
            "endpoint": self.endpoint(),
            "accessKeyId": ACCESS_KEY_ID,
            "accessSecret": ACCESS_SECRET,
            "ssl": false,
            "bucketName": self.bucket,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.endpoint())
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> Response {
        http::send(
            method,
            &self.url(path),
            &[("Authorization", FAKE_AUTH)],
            Some("application/octet-stream"),
            body,
        )
    }

    /// Writes an object behind the media repo's back.
    pub fn put_object(&self, key: &str, body: &[u8]) {
        let r = self.request("PUT", &format!("/{}/{key}", self.bucket), body);
        assert_eq!(r.status, 200, "PUT {key}: {}", r.text());
    }

    /// An object's bytes, or `None` when there is no such object.
    pub fn get_object(&self, key: &str) -> Option<Vec<u8>> {
        let r = http::get(
            &self.url(&format!("/{}/{key}", self.bucket)),
            &[("Authorization", FAKE_AUTH)],
        );
        match r.status {
            200 => Some(r.body),
            404 => None,
            s => panic!("GET {key}: {s} {}", r.text()),
        }
    }

    /// Deletes an object behind the media repo's back.
    pub fn delete_object(&self, key: &str) {
        let r = self.request("DELETE", &format!("/{}/{key}", self.bucket), &[]);
        assert_eq!(r.status, 204, "DELETE {key}: {}", r.text());
    }

    /// Every key in the bucket, with its size and storage class.
    pub fn objects(&self) -> Vec<S3Object> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{}?list-type=2", self.bucket);
            if let Some(t) = &token {
                path.push_str("&continuation-token=");
                path.push_str(&http::encode(t));
            }
            let r = http::get(&self.url(&path), &[("Authorization", FAKE_AUTH)]);
            assert_eq!(r.status, 200, "listing {}: {}", self.bucket, r.text());
            let xml = r.text();
            for contents in xml.split("<Contents>").skip(1) {
                out.push(S3Object {
                    key: xml_text(contents, "Key").unwrap_or_default(),
                    size: xml_text(contents, "Size")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                    storage_class: xml_text(contents, "StorageClass").unwrap_or_default(),
                });
            }
            token = xml_text(&xml, "NextContinuationToken");
            if token.is_none() || xml_text(&xml, "IsTruncated").as_deref() != Some("true") {
                return out;
            }
        }
    }

    /// The keys of the bucket.
    pub fn keys(&self) -> Vec<String> {
        self.objects().into_iter().map(|o| o.key).collect()
    }

    /// Whether the server saw a request line containing `needle` (for example
    /// `POST /bucket/key?uploads`, the start of a multipart upload).
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log().contains(needle)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the server (SIGTERM, then SIGKILL): the port refuses connections until
    /// [`S3Server::restart`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts an empty server again on the same port and creates the bucket again (moto keeps
    /// nothing across restarts).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "testkit: moto_server log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"))
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    pub key: String,
    pub size: u64,
    pub storage_class: String,
}

/// The text of the first `<tag>` element in `xml` (entities decoded: keys may hold `&`).
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(
        xml[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listing_elements() {
        let xml = "<R><IsTruncated>true</IsTruncated><Contents><Key>a&amp;b</Key><Size>3</Size>\
                   </Contents><NextContinuationToken>x/y=</NextContinuationToken></R>";
        assert_eq!(xml_text(xml, "Key").as_deref(), Some("a&b"));
        assert_eq!(
            xml_text(xml, "NextContinuationToken").as_deref(),
            Some("x/y=")
        );
        assert_eq!(xml_text(xml, "Missing"), None);
        assert_eq!(http::encode("x/y="), "x%2Fy%3D");
    }
}
