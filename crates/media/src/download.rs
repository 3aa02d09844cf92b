//! Finding the media a download names: ours (waiting for a pending upload), or remote media
//! (cached, else fetched over federation: `remote`).

use std::time::Duration;

use config::Config;
use store::Media;

use crate::{Error, Fetch, Found, Service};

/// How long a download waits for a pending upload's content (`timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait(Duration);

impl Wait {
    /// When the client gives no `timeout_ms`, and the most we wait whatever it asks (as Synapse).
    const DEFAULT: Duration = Duration::from_secs(20);
    const MAX: Duration = Duration::from_secs(60);

    /// The client's `timeout_ms`, if it gave one, bounded.
    pub fn from_millis(ms: Option<u64>) -> Wait {
        Wait(
            ms.map_or(Self::DEFAULT, Duration::from_millis)
                .min(Self::MAX),
        )
    }
}

impl Service {
    /// The media `origin`/`media_id` with its content. Ours waits up to `wait` for a pending
    /// upload to complete (woken at once when it does, on any instance); remote media comes from
    /// the cache, or is fetched when `fetch` allows.
    pub async fn media(
        &self,
        config: &Config,
        origin: &str,
        media_id: &str,
        wait: Wait,
        fetch: Fetch<'_>,
    ) -> Result<Media, Error> {
        match self
            .find(config, origin, media_id, wait, fetch, false)
            .await?
        {
            Found::Stored(media) => Ok(media),
            Found::Live(_) => Err(Error::Remote("a live transfer was not asked for".into())),
        }
    }

    /// As [`Service::media`]; with `live_ok`, the request that starts a remote fetch gets the
    /// file as it arrives ([`Found::Live`]) instead of waiting until it is stored.
    pub async fn find(
        &self,
        config: &Config,
        origin: &str,
        media_id: &str,
        wait: Wait,
        fetch: Fetch<'_>,
        live_ok: bool,
    ) -> Result<Found, Error> {
        if !store::ids::is_valid_server_name(origin) || !store::ids::is_valid_media_id(media_id) {
            return Err(Error::NotFound("Invalid server name or media id".into()));
        }
        if config.homeserver(origin).is_some() {
            let media = self.local(origin, media_id, wait).await?;
            return not_quarantined(media).map(Found::Stored);
        }
        if let Some(media) = self.store.media(origin, media_id).await?
            && media.object.is_some()
        {
            return not_quarantined(media).map(Found::Stored);
        }
        match (fetch, &self.remote) {
            (Fetch::As(hs), Some(remote)) => {
                match remote
                    .media(&self.store, config, origin, media_id, hs, live_ok)
                    .await?
                {
                    Found::Stored(media) => not_quarantined(media).map(Found::Stored),
                    live => Ok(live),
                }
            }
            _ => Err(Error::NotFound(format!(
                "Media from {origin} is not cached here"
            ))),
        }
    }

    async fn local(&self, origin: &str, media_id: &str, wait: Wait) -> Result<Media, Error> {
        let look = async || {
            self.store
                .media(origin, media_id)
                .await?
                .ok_or_else(|| Error::NotFound("Not found".into()))
        };
        // Subscribed before the first look, so that a completion in between is not missed.
        let mut uploads = self.store.subscribe_uploads();
        let media = look().await?;
        if media.object.is_some() {
            return Ok(media);
        }
        let deadline = tokio::time::Instant::now() + wait.0;
        let key = format!("{origin}/{media_id}");
        loop {
            if media.expires_ts.is_some_and(|t| t <= store::now_ms()) {
                return Err(Error::Expired);
            }
            match tokio::time::timeout_at(deadline, uploads.recv()).await {
                Err(_) => return Err(Error::NotYetUploaded),
                Ok(Ok(done)) if done != key => continue,
                // A match, or missed messages (lagged): look again.
                Ok(_) => {
                    let media = look().await?;
                    if media.object.is_some() {
                        return Ok(media);
                    }
                }
            }
        }
    }
}

fn not_quarantined(media: Media) -> Result<Media, Error> {
    if media.quarantined {
        return Err(Error::Quarantined);
    }
    Ok(media)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_bounded() {
        assert_eq!(Wait::from_millis(None), Wait(Duration::from_secs(20)));
        assert_eq!(
            Wait::from_millis(Some(1500)),
            Wait(Duration::from_millis(1500))
        );
        assert_eq!(
            Wait::from_millis(Some(u64::MAX)),
            Wait(Duration::from_secs(60))
        );
    }
}
