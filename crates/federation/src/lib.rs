//! Federation for media, both directions, with no HTTP server types:
//!
//! - `xmatrix`: the `Authorization: X-Matrix ...` header, parsed as Synapse accepts it;
//! - `multipart`: the `multipart/mixed` body of `/_matrix/federation/v1/media/*`, written as
//!   Synapse's parser needs it and read as a stream (never a whole file in memory);
//! - `discovery`: server-name resolution (IP literals, ports, `.well-known/matrix/server`, SRV);
//! - `keyring`: the origins' published keys, fetched, checked and cached, to verify requests;
//! - `client`: signed requests to other servers, remote media fetched with the spec's fallbacks.

pub mod discovery;
pub mod keyring;
pub mod multipart;
pub mod remote;
pub mod xmatrix;

mod client;

pub use client::{Client, Error, Signer};
