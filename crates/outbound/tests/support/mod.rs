//! A canned HTTP server on loopback for the outbound tests: it answers every connection with a
//! fixed response (after reading the request head) and counts what reaches it, so that a test can
//! prove a refused address was never connected to.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // Each test file uses a part; helpers panic to fail tests.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Canned {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// The request heads received, in order.
    pub heads: Arc<Mutex<Vec<String>>>,
}

impl Canned {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Listens at `at`; answers each connection with `response(port)`, then (with `stall`) keeps it
/// open for 30 s without sending more.
pub fn serve(
    at: impl ToSocketAddrs,
    response: impl Fn(u16) -> Vec<u8> + Send + 'static,
    stall: bool,
) -> Canned {
    let listener = TcpListener::bind(at).unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (count, seen) = (connections.clone(), heads.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let _ = stream.write_all(&response(addr.port()));
            if stall {
                std::thread::sleep(Duration::from_secs(30));
            }
        }
    });
    Canned {
        addr,
        connections,
        heads,
    }
}
