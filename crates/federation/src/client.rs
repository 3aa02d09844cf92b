//! Requests to other servers: the destination resolved (`discovery`), the request signed as one
//! of our homeservers when a signer is given, sent through the filtered outbound client.

use std::sync::Arc;
use std::time::Duration;

use keys::SigningKey;
use outbound::{Method, Purpose, header};

use crate::discovery::{Destination, Discovery};

/// Who signs a request: one of our homeservers, with the media repo's key from its key file.
#[derive(Clone)]
pub struct Signer {
    pub origin: String,
    pub key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} with {})", self.origin, self.key.id())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server name could not be resolved to somewhere to connect to.
    #[error("cannot find {server}: {reason}")]
    Discovery { server: String, reason: String },
    #[error("cannot sign the request to {server}: {reason}")]
    Signing { server: String, reason: String },
    /// Refused before sending (address filter, bad URL): nothing reached the remote end.
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Http(String),
    #[error("the response is larger than {max} bytes")]
    TooLarge { max: u64 },
}

impl Error {
    pub(crate) fn from_outbound(e: outbound::Error) -> Error {
        match e {
            outbound::Error::TooLarge { max } => Error::TooLarge { max },
            e if e.never_sent() => Error::Denied(e.to_string()),
            e => Error::Http(e.to_string()),
        }
    }
}

/// The federation client: cheap to clone, shared by every request of the process.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: outbound::Client,
    /// `http` without the SRV overrides: for URLs a remote hands us (`Location` parts), which
    /// must go where DNS says, not where a server name's SRV record points.
    plain: outbound::Client,
    discovery: Discovery,
}

/// Resolving a server name (well-known, SRV, addresses) takes at most this.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(20);

impl Client {
    /// `http` is the federation outbound client (address filter, the resolver `discovery` feeds).
    pub fn new(http: outbound::Client, discovery: Discovery) -> Result<Client, Error> {
        let plain = http
            .without_overrides()
            .map_err(|e| Error::Http(e.to_string()))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                plain,
                discovery,
            }),
        })
    }

    /// The client for URLs a remote gave us (no SRV overrides).
    pub(crate) fn plain(&self) -> &outbound::Client {
        &self.inner.plain
    }

    pub async fn resolve(&self, server: &str) -> Result<Destination, Error> {
        let failed = |reason: String| Error::Discovery {
            server: server.to_owned(),
            reason,
        };
        tokio::time::timeout(RESOLVE_TIMEOUT, self.inner.discovery.resolve(server))
            .await
            .map_err(|_| failed(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs())))?
            .map_err(|e| failed(e.to_string()))
    }

    /// `GET path_and_query` on `destination` (a server name), signed by `signer` when given.
    /// Returns the destination it went to with the response (a relative `Location` resolves
    /// against it).
    pub async fn get(
        &self,
        destination: &str,
        path_and_query: &str,
        signer: Option<&Signer>,
        purpose: Purpose,
    ) -> Result<(Destination, outbound::Response), Error> {
        let dest = self.resolve(destination).await?;
        let authorization = signer
            .map(|s| {
                keys::sign_request(&s.key, &s.origin, destination, "GET", path_and_query, None)
                    .map_err(|e| Error::Signing {
                        server: destination.to_owned(),
                        reason: e.to_string(),
                    })
            })
            .transpose()?;
        let url = format!("{}{path_and_query}", dest.base_url);
        let host = dest.host_header.clone();
        let response = self
            .inner
            .http
            .send(Method::GET, &url, purpose, |r| {
                let r = r.header(header::HOST, host);
                match authorization {
                    Some(a) => r.header(header::AUTHORIZATION, a),
                    None => r,
                }
            })
            .await
            .map_err(Error::from_outbound)?;
        Ok((dest, response))
    }
}
