//! A client with its own resolver ([`testkit::DnsServer`], which only answers loopback
//! addresses) and overrides, against plain-HTTP listeners on loopback addresses this file owns
//! (127.0.0.120-127.0.0.139): names resolve through the given name server, an override wins
//! over DNS (its port too when the URL has none), the filter decides every address either
//! gives, and a `Host` header set by the caller does not follow a redirect to another origin.

#![allow(clippy::unwrap_used)] // Tests fail by panicking.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outbound::{Client, Method, NetworkFilter, Overrides, Purpose, Resolver, header};
use testkit::DnsServer;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

mod support;

use support::Canned;

/// A canned server at `ip:port` (0: any) answering `response(port)`.
fn serve(ip: Ipv4Addr, port: u16, response: impl Fn(u16) -> String + Send + 'static) -> Canned {
    support::serve((ip, port), move |p| response(p).into_bytes(), false)
}

fn ok(body: &'static str) -> impl Fn(u16) -> String {
    move |_| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

fn purpose(redirects: usize) -> Purpose {
    Purpose {
        total: Some(Duration::from_secs(5)),
        read: Duration::from_secs(5),
        max_bytes: Some(1024),
        redirects,
    }
}

fn client(dns: &DnsServer, refused: &[&str]) -> Client {
    let filter = NetworkFilter::new(&["127.0.0.0/8", "::1/128"], refused).unwrap();
    Client::builder("outbound-test")
        .filter(Arc::new(filter))
        .resolver(Resolver::nameservers(&[dns.addr()]).unwrap())
        .build()
        .unwrap()
}

async fn body(c: &Client, url: &str) -> Result<String, outbound::Error> {
    let r = c.send(Method::GET, url, purpose(0), |r| r).await?;
    Ok(String::from_utf8(r.bytes().await?.to_vec()).unwrap())
}

#[tokio::test]
async fn names_resolve_through_the_given_name_server() {
    let dns = DnsServer::start();
    let server = serve(ip(120), 0, ok("dns"));
    dns.add_a("www.dns.test", ip(120));
    let c = client(&dns, &[]);
    let url = format!("http://www.dns.test:{}/", server.addr.port());
    assert_eq!(body(&c, &url).await.unwrap(), "dns");
    assert_eq!(dns.queries_of("www.dns.test", "A"), 1);
    // Cached for its TTL.
    assert_eq!(body(&c, &url).await.unwrap(), "dns");
    assert_eq!(dns.queries_of("www.dns.test", "A"), 1);
    // A name the server does not know fails, having asked it.
    let e = body(&c, "http://missing.dns.test/").await.unwrap_err();
    assert!(e.to_string().contains("no address"), "{e}");
    assert!(dns.queries("missing.dns.test") >= 1);
}

#[tokio::test]
async fn lookups_give_addresses_and_srv_records() {
    let dns = DnsServer::start();
    dns.add_a("both.dns.test", ip(121));
    dns.add_aaaa("both.dns.test", "::1".parse().unwrap());
    dns.add_srv("_x._tcp.dns.test", 1, 2, 3, "both.dns.test");
    let r = Resolver::nameservers(&[dns.addr()]).unwrap();
    let mut ips = r.lookup_ip("both.dns.test").await.unwrap();
    ips.sort();
    assert_eq!(
        ips,
        [
            "127.0.0.121".parse::<std::net::IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert!(r.lookup_ip("none.dns.test").await.unwrap().is_empty());
    let srv = r.lookup_srv("_x._tcp.dns.test").await.unwrap();
    assert_eq!(
        srv,
        [outbound::SrvRecord {
            priority: 1,
            weight: 2,
            port: 3,
            target: "both.dns.test.".to_owned()
        }]
    );
    assert!(r.lookup_srv("_y._tcp.dns.test").await.unwrap().is_empty());
    // Names with records of other types only: empty too.
    assert!(r.lookup_srv("both.dns.test").await.unwrap().is_empty());
    assert!(Resolver::nameservers(&[]).is_err());
}

#[tokio::test]
async fn an_override_wins_over_dns_with_its_port_when_the_url_has_none() {
    let dns = DnsServer::start();
    let by_dns = serve(ip(122), 0, ok("dns"));
    let by_override = serve(ip(123), 0, ok("override"));
    dns.add_a("o.dns.test", ip(122));
    let c = client(&dns, &[]);
    c.overrides()
        .unwrap()
        .set("O.dns.test", vec![by_override.addr]);
    // No port in the URL: the override's.
    assert_eq!(body(&c, "http://o.dns.test/").await.unwrap(), "override");
    // An explicit port wins over the override's, on the override's address.
    let url = format!("http://o.dns.test:{}/", by_override.addr.port());
    assert_eq!(body(&c, &url).await.unwrap(), "override");
    assert_eq!(dns.queries("o.dns.test"), 0);
    assert_eq!(by_dns.connections.load(Ordering::SeqCst), 0);
    // Removed: DNS again.
    c.overrides().unwrap().remove("o.dns.test");
    let url = format!("http://o.dns.test:{}/", by_dns.addr.port());
    assert_eq!(body(&c, &url).await.unwrap(), "dns");
    // A client without overrides shares the resolver, not the table.
    c.overrides()
        .unwrap()
        .set("o.dns.test", vec![by_override.addr]);
    let plain = c.without_overrides().unwrap();
    assert!(plain.overrides().is_none());
    assert_eq!(body(&plain, &url).await.unwrap(), "dns");
    // A table given to the builder is the one used.
    let shared = Overrides::new(10);
    let c2 = Client::builder("outbound-test")
        .resolver(Resolver::nameservers(&[dns.addr()]).unwrap())
        .overrides(shared.clone())
        .build()
        .unwrap();
    shared.set("shared.dns.test", vec![by_override.addr]);
    assert_eq!(
        body(&c2, "http://shared.dns.test/").await.unwrap(),
        "override"
    );
}

#[tokio::test]
async fn the_filter_decides_addresses_from_dns_and_from_overrides() {
    let dns = DnsServer::start();
    let refused = serve(ip(124), 0, ok("refused"));
    dns.add_a("r.dns.test", ip(124));
    let c = client(&dns, &["127.0.0.124/32"]);
    let url = format!("http://r.dns.test:{}/", refused.addr.port());
    let e = body(&c, &url).await.unwrap_err();
    assert!(e.to_string().contains("no allowed address"), "{e}");
    c.overrides().unwrap().set("o.dns.test", vec![refused.addr]);
    let e = body(&c, "http://o.dns.test/").await.unwrap_err();
    assert!(e.to_string().contains("127.0.0.124"), "{e}");
    assert_eq!(refused.connections.load(Ordering::SeqCst), 0);
    // An allowed address among refused ones is used.
    let allowed = serve(ip(125), 0, ok("allowed"));
    c.overrides()
        .unwrap()
        .set("m.dns.test", vec![refused.addr, allowed.addr]);
    assert_eq!(body(&c, "http://m.dns.test/").await.unwrap(), "allowed");
    assert_eq!(refused.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_host_header_does_not_follow_a_redirect_to_another_origin() {
    let dns = DnsServer::start();
    let target = serve(ip(126), 0, ok("moved"));
    let to = format!("http://127.0.0.126:{}/there", target.addr.port());
    let from = serve(ip(127), 0, move |_| {
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n")
    });
    let c = client(&dns, &[]);
    let url = format!("http://127.0.0.127:{}/here", from.addr.port());
    let r = c
        .send(Method::GET, &url, purpose(1), |r| {
            r.header(header::HOST, "origin.test")
        })
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = from.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(first.contains("host: origin.test\r\n"), "{first}");
    let second = target.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(!second.contains("origin.test"), "{second}");
    assert!(
        second.contains(&format!("host: 127.0.0.126:{}\r\n", target.addr.port())),
        "{second}"
    );
}
