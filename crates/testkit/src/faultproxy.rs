//! A TCP proxy on loopback in front of an HTTP service (moto's S3, say) that a test turns bad
//! on purpose: every request answered with an error status, or every connection slowed down.
//! A connection opened while it was good is closed at its next request once it is bad, so that
//! pooled connections see the fault too.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Passed through as it is.
    None,
    /// Every request answered with this status (an S3 `InternalError`/`SlowDown` body).
    Status(u16),
    /// Every piece the client sends waits this long before it goes on.
    Delay(Duration),
}

pub struct FaultProxy {
    port: u16,
    fault: Arc<Mutex<Fault>>,
    requests_faulted: Arc<Mutex<u64>>,
}

impl FaultProxy {
    /// Proxies `127.0.0.1:PORT` to `upstream` (`host:port` on loopback).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let fault = Arc::new(Mutex::new(Fault::None));
        let requests_faulted = Arc::new(Mutex::new(0));
        let (f, n, upstream) = (fault.clone(), requests_faulted.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (f, n, upstream) = (f.clone(), n.clone(), upstream.clone());
                std::thread::spawn(move || serve(client, &upstream, &f, &n));
            }
        });
        FaultProxy {
            port,
            fault,
            requests_faulted,
        }
    }

    /// `127.0.0.1:PORT`, to use instead of the upstream's address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// Requests answered with an error status so far.
    pub fn faulted(&self) -> u64 {
        *self
            .requests_faulted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn current(fault: &Mutex<Fault>) -> Fault {
    *fault.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(mut client: TcpStream, upstream: &str, fault: &Mutex<Fault>, faulted: &Mutex<u64>) {
    if let Fault::Status(status) = current(fault) {
        answer(&mut client, status, faulted);
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let (Ok(mut client_back), Ok(mut server_back)) = (client.try_clone(), server.try_clone())
    else {
        return;
    };
    // Answers flow back untouched.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_back, &mut client_back);
        let _ = client_back.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match current(fault) {
            Fault::None => {}
            Fault::Delay(d) => std::thread::sleep(d),
            // Turned bad while open: closed, so the client opens a new (bad) connection.
            Fault::Status(_) => break,
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

/// Reads the request head, answers `status` and closes.
fn answer(client: &mut TcpStream, status: u16, faulted: &Mutex<u64>) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let code = if status == 503 {
        "SlowDown"
    } else {
        "InternalError"
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test</Message></Error>"
    );
    let response = format!(
        "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(response.as_bytes());
    *faulted.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    let _ = client.shutdown(Shutdown::Both);
}
