//! A URL a user asks to preview: parsed as the preview does, checked against the test rules
//! (127.0.0.1 allowed; 127.0.0.2 and ::1 denied; one extra port), and matched against the oEmbed
//! providers. No panic, and whatever notation it uses, a URL whose host is an IP literal the
//! networks refuse is refused.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outbound::{NetworkFilter, UrlFilter, refusal};

fn rules() -> &'static UrlFilter {
    static RULES: OnceLock<UrlFilter> = OnceLock::new();
    RULES.get_or_init(|| UrlFilter {
        networks: NetworkFilter::new(&["127.0.0.1/32"], &["127.0.0.2/32", "::1/128"]).unwrap(),
        ports: vec![8080],
    })
}

fn providers() -> &'static preview::Providers {
    static PROVIDERS: OnceLock<preview::Providers> = OnceLock::new();
    PROVIDERS.get_or_init(preview::Providers::builtin)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(url) = url::Url::parse(text) else {
        return;
    };
    let refused = refusal(Some(rules()), &url);
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    };
    if let Some(ip) = ip
        && rules().networks.check(ip).is_err()
    {
        assert!(refused.is_some(), "{url} reaches {ip}, which is refused");
    }
    if !matches!(url.scheme(), "http" | "https") {
        assert!(refused.is_some(), "{url}: not http(s)");
    }
    let _ = providers().endpoint(&url);
});
