//! The outbound client against listeners on loopback: size caps while streaming, redirects only
//! when asked, a stalled body, and the address filter refusing before any packet is sent (a
//! listener on the refused address counts the connections that reach it: none).

#![allow(clippy::unwrap_used)] // Tests fail by panicking.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt as _;
use outbound::{AddressFilter, Client, Error, Method, Purpose};

mod support;

use support::Canned;

/// A canned server on `ip`, any port.
fn serve(ip: &str, response: impl Fn(u16) -> Vec<u8> + Send + 'static, stall: bool) -> Canned {
    support::serve((ip, 0), response, stall)
}

fn purpose(max_bytes: Option<u64>, redirects: usize) -> Purpose {
    Purpose {
        total: Some(Duration::from_secs(10)),
        read: Duration::from_secs(1),
        max_bytes,
        redirects,
    }
}

struct Deny(Vec<IpAddr>);

impl AddressFilter for Deny {
    fn refuses(&self, ip: IpAddr) -> Option<String> {
        self.0
            .contains(&ip)
            .then(|| "denied by the test".to_owned())
    }
}

fn client(deny: &[&str]) -> Client {
    let filter = Deny(deny.iter().map(|s| s.parse().unwrap()).collect());
    Client::new("outbound-test", Some(Arc::new(filter))).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_body_over_the_cap_fails_while_streaming() {
    let big = serve(
        "127.0.0.1",
        |_| {
            let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..4 {
                r.extend_from_slice(b"1f4\r\n");
                r.extend_from_slice(&[b'x'; 500]);
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"0\r\n\r\n");
            r
        },
        false,
    );
    let url = format!("http://127.0.0.1:{}/", big.port());
    rt().block_on(async {
        let c = client(&[]);
        let r = c
            .send(Method::GET, &url, purpose(Some(1000), 0), |r| r)
            .await
            .unwrap();
        let mut stream = r.stream();
        let mut got = 0;
        let mut error = None;
        while let Some(piece) = stream.next().await {
            match piece {
                Ok(b) => got += b.len(),
                Err(e) => error = Some(e),
            }
        }
        assert!(got <= 1000, "{got} bytes passed the cap");
        assert!(
            matches!(error, Some(Error::TooLarge { max: 1000 })),
            "{error:?}"
        );
        let r = c
            .send(Method::GET, &url, purpose(Some(2000), 0), |r| r)
            .await
            .unwrap();
        assert_eq!(
            r.bytes().await.unwrap().len(),
            2000,
            "exactly the cap passes"
        );
    });
}

#[test]
fn redirects_are_followed_only_when_the_purpose_asks() {
    let target = serve(
        "127.0.0.1",
        |_| b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        false,
    );
    let target_port = target.port();
    let redirect = serve(
        "127.0.0.1",
        move |_| {
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{target_port}/there\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes()
        },
        false,
    );
    let url = format!("http://127.0.0.1:{}/", redirect.port());
    rt().block_on(async {
        let c = client(&[]);
        let r = c
            .send(Method::GET, &url, purpose(None, 0), |r| r)
            .await
            .unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(target.connections.load(Ordering::SeqCst), 0);
        let r = c
            .send(Method::GET, &url, purpose(None, 3), |r| r)
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(&r.bytes().await.unwrap()[..], b"ok");
    });
}

#[test]
fn a_stalled_body_times_out() {
    let stalled = serve(
        "127.0.0.1",
        |_| b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf".to_vec(),
        true,
    );
    let url = format!("http://127.0.0.1:{}/", stalled.port());
    rt().block_on(async {
        let mut p = purpose(None, 0);
        p.total = None;
        let r = client(&[]).send(Method::GET, &url, p, |r| r).await.unwrap();
        let e = r.bytes().await.unwrap_err();
        assert!(e.to_string().contains("no data received for 1 s"), "{e}");
    });
}

#[test]
fn refused_addresses_are_never_connected_to() {
    // Listeners on the refused addresses, counting whatever reaches them.
    let denied = serve(
        "127.0.0.2",
        |_| b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        false,
    );
    let named = serve(
        "127.0.0.1",
        |_| b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        false,
    );
    let denied_port = denied.port();
    let redirect = serve(
        "127.0.0.3",
        move |_| {
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2:{denied_port}/\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes()
        },
        false,
    );
    rt().block_on(async {
        let c = client(&["127.0.0.2", "127.0.0.1", "::1"]);
        // An IP literal.
        let e = c
            .send(
                Method::GET,
                &format!("http://127.0.0.2:{denied_port}/"),
                purpose(None, 0),
                |r| r,
            )
            .await
            .unwrap_err();
        assert!(e.never_sent(), "{e}");
        // A name that resolves only to refused addresses (localhost: 127.0.0.1 and ::1).
        let e = c
            .send(
                Method::GET,
                &format!("http://localhost:{}/", named.port()),
                purpose(None, 0),
                |r| r,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no allowed address"), "{e}");
        // A redirect from an allowed address to a refused one.
        let e = c
            .send(
                Method::GET,
                &format!("http://127.0.0.3:{}/", redirect.port()),
                purpose(None, 2),
                |r| r,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("127.0.0.2 is not allowed"), "{e}");
    });
    assert_eq!(
        redirect.connections.load(Ordering::SeqCst),
        1,
        "the allowed one was asked"
    );
    assert_eq!(
        denied.connections.load(Ordering::SeqCst),
        0,
        "a refused address was reached"
    );
    assert_eq!(
        named.connections.load(Ordering::SeqCst),
        0,
        "a refused name was reached"
    );
}

#[test]
fn a_purpose_follows_as_many_redirects_as_it_allows_and_no_more() {
    let end = serve(
        "127.0.0.2",
        |_| b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nend".to_vec(),
        false,
    );
    let end_port = end.port();
    // Redirects to itself forever, by a relative Location.
    let endless = serve(
        "127.0.0.1",
        // Closed after each answer, so that every hop is one connection to count.
        |_| {
            b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec()
        },
        false,
    );
    // One hop, to another origin.
    let elsewhere = serve(
        "127.0.0.1",
        move |_| {
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2:{end_port}/\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes()
        },
        false,
    );
    rt().block_on(async {
        let c = client(&[]);
        let url = format!("http://127.0.0.1:{}/", endless.port());
        let e = c
            .send(Method::GET, &url, purpose(None, 2), |r| r)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("more than 2 redirects"), "{e}");
        assert_eq!(
            endless.connections.load(Ordering::SeqCst) + endless.heads.lock().unwrap().len(),
            2 * 3,
            "the request and two hops, no more"
        );
        let url = format!("http://127.0.0.1:{}/", elsewhere.port());
        let r = c
            .send(Method::GET, &url, purpose(None, 1), |r| {
                r.header("Authorization", "Bearer secret")
            })
            .await
            .unwrap();
        assert_eq!(&r.bytes().await.unwrap()[..], b"end");
    });
    let heads = end.heads.lock().unwrap();
    assert_eq!(heads.len(), 1);
    assert!(
        !heads[0].to_ascii_lowercase().contains("authorization"),
        "credentials went to another origin: {}",
        heads[0]
    );
    let first = elsewhere.heads.lock().unwrap();
    assert!(
        first[0]
            .to_ascii_lowercase()
            .contains("authorization: bearer secret")
    );
}

#[test]
fn redirects_share_the_purposes_total_time() {
    // Every hop takes 700 ms and redirects again: within a total of 1.5 s, the second or third
    // hop runs out of time (each alone would fit).
    let slow = serve(
        "127.0.0.1",
        |_| {
            std::thread::sleep(Duration::from_millis(700));
            b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec()
        },
        false,
    );
    rt().block_on(async {
        let c = client(&[]);
        let within = Purpose {
            total: Some(Duration::from_millis(1500)),
            read: Duration::from_secs(5),
            max_bytes: None,
            redirects: 10,
        };
        let url = format!("http://127.0.0.1:{}/", slow.port());
        let e = c.send(Method::GET, &url, within, |r| r).await.unwrap_err();
        assert!(!e.to_string().contains("redirects"), "{e}");
        let hops = slow.heads.lock().unwrap().len();
        assert!(hops <= 3, "{hops} hops within 1.5 s of 700 ms each");
    });
}
