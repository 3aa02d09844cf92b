//! Server discovery against a real DNS server ([`testkit::DnsServer`], which only ever answers
//! loopback addresses) and real listeners on loopback addresses this file owns
//! (127.0.0.90-127.0.0.119). The client's filter allows loopback only, so even a bug cannot
//! send a packet elsewhere. Nothing listens on port 443 of the names below unless a test says
//! so: their `.well-known` fails and discovery falls to SRV, as for a server with no
//! delegation. (The HTTPS `.well-known` path is tested end to end through the server binary.)

#![allow(clippy::unwrap_used)] // Tests fail by panicking.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use federation::discovery::{Destination, Discovery, Error};
use outbound::{Client, Method, NetworkFilter, Purpose, Resolver};
use testkit::DnsServer;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Loopback only, less `refused`.
fn loopback_filter(refused: &[&str]) -> NetworkFilter {
    NetworkFilter::new(&["127.0.0.0/8", "::1/128"], refused).unwrap()
}

fn setup(dns: &DnsServer, filter: NetworkFilter) -> (Client, Discovery) {
    let http = Client::builder("discovery-test")
        .filter(Arc::new(filter))
        .resolver(Resolver::nameservers(&[dns.addr()]).unwrap())
        .build()
        .unwrap();
    let discovery = Discovery::new(http.clone()).unwrap();
    (http, discovery)
}

/// A listener that accepts connections, counts them and closes them at once.
struct Counting {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

fn counting(ip: Ipv4Addr, port: u16) -> Counting {
    let listener = TcpListener::bind((ip, port))
        .unwrap_or_else(|e| panic!("bind {ip}:{port} (port 443 needs root): {e}"));
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            count.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    Counting { addr, accepted }
}

fn dest(base_url: &str, host_header: &str) -> Destination {
    Destination {
        base_url: base_url.to_owned(),
        host_header: host_header.to_owned(),
    }
}

fn purpose() -> Purpose {
    Purpose {
        total: Some(Duration::from_secs(5)),
        read: Duration::from_secs(5),
        max_bytes: Some(1024),
        redirects: 0,
    }
}

#[tokio::test]
async fn ip_literals_and_explicit_ports_need_no_dns() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    for (name, base, host) in [
        ("127.0.0.90", "https://127.0.0.90:8448", "127.0.0.90"),
        (
            "127.0.0.90:1234",
            "https://127.0.0.90:1234",
            "127.0.0.90:1234",
        ),
        ("[::1]", "https://[::1]:8448", "[::1]"),
        ("[::1]:443", "https://[::1]:443", "[::1]:443"),
        (
            "example.test:20448",
            "https://example.test:20448",
            "example.test:20448",
        ),
        (
            "localhost:20448",
            "https://localhost:20448",
            "localhost:20448",
        ),
        (
            "Mixed.Case.test:8448",
            "https://Mixed.Case.test:8448",
            "Mixed.Case.test:8448",
        ),
    ] {
        assert_eq!(
            discovery.resolve(name).await.unwrap(),
            dest(base, host),
            "{name}"
        );
    }
    assert_eq!(dns.total_queries(), 0);
    assert_eq!(http.overrides().unwrap().get("example.test"), None);
}

#[tokio::test]
async fn a_server_name_with_a_port_connects_there() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    let listener = counting(ip(1), 0);
    let name = format!("localhost:{}", listener.addr.port());
    let d = discovery.resolve(&name).await.unwrap();
    assert_eq!(d, dest(&format!("https://{name}"), &name));
    // No TLS on the listener: the request fails, after connecting where it should.
    let sent = http
        .send(Method::GET, &format!("{}/x", d.base_url), purpose(), |r| r)
        .await;
    assert!(sent.is_err());
    assert_eq!(listener.accepted.load(Ordering::SeqCst), 1);
    // `localhost` is answered by the resolver itself (RFC 6761).
    assert_eq!(dns.total_queries(), 0);
}

#[tokio::test]
async fn invalid_server_names_are_refused_before_any_lookup() {
    let dns = DnsServer::start();
    let (_http, discovery) = setup(&dns, loopback_filter(&[]));
    for bad in [
        "",
        "a b.test",
        "x.test:",
        "x.test:99999",
        "[::1",
        "x..test",
        "x.test.",
    ] {
        let e = discovery.resolve(bad).await.unwrap_err();
        assert!(matches!(e, Error::InvalidServerName { .. }), "{bad}: {e}");
    }
    assert_eq!(dns.total_queries(), 0);
}

#[tokio::test]
async fn matrix_fed_srv_sends_the_connection_to_its_target() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    let target = counting(ip(92), 0);
    dns.add_a("fed.test", ip(91)); // nothing listens on 127.0.0.91:443
    dns.add_srv(
        "_matrix-fed._tcp.fed.test",
        10,
        0,
        target.addr.port(),
        "target.fed.test",
    );
    dns.add_a("target.fed.test", ip(92));
    let d = discovery.resolve("fed.test").await.unwrap();
    assert_eq!(d, dest("https://fed.test", "fed.test"));
    assert_eq!(
        http.overrides().unwrap().get("fed.test"),
        Some(vec![target.addr])
    );
    assert_eq!(dns.queries_of("_matrix-fed._tcp.fed.test", "SRV"), 1);
    assert_eq!(dns.queries("_matrix._tcp.fed.test"), 0);
    // The URL has no port: the override's decides, and the name stays the URL's (for SNI).
    let sent = http
        .send(Method::GET, &format!("{}/x", d.base_url), purpose(), |r| r)
        .await;
    assert!(sent.is_err());
    assert_eq!(target.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn legacy_matrix_srv_is_used_when_it_is_the_only_one() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    dns.add_srv("_matrix._tcp.legacy.test", 5, 0, 8449, "old.legacy.test");
    dns.add_a("old.legacy.test", ip(93));
    let d = discovery.resolve("legacy.test").await.unwrap();
    assert_eq!(d, dest("https://legacy.test", "legacy.test"));
    assert_eq!(
        http.overrides().unwrap().get("legacy.test"),
        Some(vec![SocketAddr::from((ip(93), 8449))])
    );
    assert_eq!(dns.queries_of("_matrix-fed._tcp.legacy.test", "SRV"), 1);
    assert_eq!(dns.queries_of("_matrix._tcp.legacy.test", "SRV"), 1);
}

#[tokio::test]
async fn matrix_fed_wins_over_legacy() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    dns.add_srv("_matrix-fed._tcp.both.test", 10, 0, 8450, "new.both.test");
    dns.add_srv("_matrix._tcp.both.test", 10, 0, 8451, "old.both.test");
    dns.add_a("new.both.test", ip(94));
    dns.add_a("old.both.test", ip(95));
    discovery.resolve("both.test").await.unwrap();
    assert_eq!(
        http.overrides().unwrap().get("both.test"),
        Some(vec![SocketAddr::from((ip(94), 8450))])
    );
    assert_eq!(dns.queries("_matrix._tcp.both.test"), 0);
}

#[tokio::test]
async fn without_srv_the_host_is_reached_on_8448() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    dns.add_a("plain.test", ip(96));
    let d = discovery.resolve("plain.test").await.unwrap();
    assert_eq!(d, dest("https://plain.test:8448", "plain.test"));
    assert_eq!(http.overrides().unwrap().get("plain.test"), None);
    assert_eq!(dns.queries_of("_matrix-fed._tcp.plain.test", "SRV"), 1);
    assert_eq!(dns.queries_of("_matrix._tcp.plain.test", "SRV"), 1);
    // A name that does not exist at all gets the same answer (and fails when connecting).
    let d = discovery.resolve("nowhere.test").await.unwrap();
    assert_eq!(d, dest("https://nowhere.test:8448", "nowhere.test"));
}

#[tokio::test]
async fn srv_answers_and_the_failed_well_known_are_cached() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    // The name's port 443 counts the well-known attempts (and closes them: no TLS).
    let well_known = counting(ip(97), 443);
    dns.add_a("cached.test", ip(97));
    dns.add_srv("_matrix-fed._tcp.cached.test", 10, 0, 8452, "t.cached.test");
    dns.add_a("t.cached.test", ip(98));
    let first = discovery.resolve("cached.test").await.unwrap();
    let second = discovery.resolve("cached.test").await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first, dest("https://cached.test", "cached.test"));
    assert_eq!(dns.queries_of("_matrix-fed._tcp.cached.test", "SRV"), 1);
    assert_eq!(dns.queries_of("t.cached.test", "A"), 1);
    assert_eq!(well_known.accepted.load(Ordering::SeqCst), 1);
    // The override is set again on every resolution (a table bounded in entries may drop it).
    http.overrides().unwrap().remove("cached.test");
    discovery.resolve("cached.test").await.unwrap();
    assert_eq!(
        http.overrides().unwrap().get("cached.test"),
        Some(vec![SocketAddr::from((ip(98), 8452))])
    );
}

#[tokio::test]
async fn concurrent_resolutions_of_one_name_are_one() {
    let dns = DnsServer::start();
    let (_http, discovery) = setup(&dns, loopback_filter(&[]));
    let well_known = counting(ip(99), 443);
    dns.add_a("busy.test", ip(99));
    dns.add_srv("_matrix-fed._tcp.busy.test", 10, 0, 8453, "t.busy.test");
    dns.add_a("t.busy.test", ip(100));
    let all = futures_util::future::join_all((0..16).map(|_| discovery.resolve("busy.test"))).await;
    for d in all {
        assert_eq!(d.unwrap(), dest("https://busy.test", "busy.test"));
    }
    assert_eq!(well_known.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(dns.queries_of("_matrix-fed._tcp.busy.test", "SRV"), 1);
    // Different names resolve independently.
    let (a, b) = tokio::join!(
        discovery.resolve("busy.test"),
        discovery.resolve("other.test")
    );
    assert_eq!(a.unwrap().base_url, "https://busy.test");
    assert_eq!(b.unwrap().base_url, "https://other.test:8448");
}

#[tokio::test]
async fn srv_targets_are_tried_by_priority() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    dns.add_srv(
        "_matrix-fed._tcp.prio.test",
        20,
        0,
        8002,
        "second.prio.test",
    );
    dns.add_srv("_matrix-fed._tcp.prio.test", 10, 0, 8001, "first.prio.test");
    dns.add_srv("_matrix-fed._tcp.prio.test", 30, 0, 8003, "gone.prio.test"); // no address
    dns.add_a("first.prio.test", ip(101));
    dns.add_a("first.prio.test", ip(102));
    dns.add_a("second.prio.test", ip(103));
    discovery.resolve("prio.test").await.unwrap();
    assert_eq!(
        http.overrides().unwrap().get("prio.test"),
        Some(vec![
            SocketAddr::from((ip(101), 8001)),
            SocketAddr::from((ip(102), 8001)),
            SocketAddr::from((ip(103), 8002)),
        ])
    );
}

#[tokio::test]
async fn srv_without_usable_targets_is_an_error() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    dns.add_srv("_matrix-fed._tcp.dot.test", 0, 0, 0, ".");
    let e = discovery.resolve("dot.test").await.unwrap_err();
    assert!(matches!(e, Error::NoService(_)), "{e}");
    dns.add_srv("_matrix-fed._tcp.empty.test", 0, 0, 8448, "void.empty.test");
    let e = discovery.resolve("empty.test").await.unwrap_err();
    assert!(matches!(e, Error::NoService(_)), "{e}");
    assert!(e.to_string().contains("no address"), "{e}");
    assert_eq!(http.overrides().unwrap().get("empty.test"), None);
}

#[tokio::test]
async fn a_refused_srv_target_is_never_connected_to() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&["127.0.0.105/32"]));
    let target = counting(ip(105), 0);
    dns.add_srv(
        "_matrix-fed._tcp.denied.test",
        10,
        0,
        target.addr.port(),
        "t.denied.test",
    );
    dns.add_a("t.denied.test", ip(105));
    // Discovery itself does not filter: the client does, when it connects.
    let d = discovery.resolve("denied.test").await.unwrap();
    assert_eq!(d, dest("https://denied.test", "denied.test"));
    let e = http
        .send(Method::GET, &format!("{}/x", d.base_url), purpose(), |r| r)
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("no allowed address") && text.contains("127.0.0.105"),
        "{text}"
    );
    // Also with the port in the URL (the override's addresses still go through the filter).
    let e = http
        .send(
            Method::GET,
            &format!("https://denied.test:{}/x", target.addr.port()),
            purpose(),
            |r| r,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no allowed address"), "{e}");
    assert_eq!(target.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_srv_that_disappears_leaves_no_override_behind() {
    let dns = DnsServer::start();
    let (http, discovery) = setup(&dns, loopback_filter(&[]));
    dns.add_srv("_matrix-fed._tcp.moved.test", 10, 0, 8454, "t.moved.test");
    dns.add_a("t.moved.test", ip(106));
    assert_eq!(
        discovery.resolve("moved.test").await.unwrap().base_url,
        "https://moved.test"
    );
    assert!(http.overrides().unwrap().get("moved.test").is_some());
    // A second discovery on the same client, with a fresh DNS cache, finds no SRV now.
    dns.remove("_matrix-fed._tcp.moved.test");
    let fresh = Client::builder("discovery-test")
        .filter(Arc::new(loopback_filter(&[])))
        .resolver(Resolver::nameservers(&[dns.addr()]).unwrap())
        .overrides(http.overrides().unwrap().clone())
        .build()
        .unwrap();
    let again = Discovery::new(fresh).unwrap();
    assert_eq!(
        again.resolve("moved.test").await.unwrap().base_url,
        "https://moved.test:8448"
    );
    assert_eq!(http.overrides().unwrap().get("moved.test"), None);
}

#[tokio::test]
async fn a_client_without_a_resolver_cannot_discover() {
    let http = Client::new("discovery-test", None).unwrap();
    let e = Discovery::new(http).unwrap_err();
    assert!(matches!(e, Error::Setup(_)), "{e}");
}
