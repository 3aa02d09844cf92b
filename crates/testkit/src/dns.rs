//! [`DnsServer`]: a small authoritative DNS server on `127.0.0.1:<random UDP port>` for tests,
//! with the records a test sets and nothing else. It can only ever answer loopback addresses
//! (setting any other panics), so whatever a resolver pointed at it does, a test connects only
//! to this machine.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// The TTL of every answer, and the negative TTL of every "no such record" (its SOA's).
pub const DNS_TTL: u32 = 300;

#[derive(Default)]
struct Zone {
    records: HashMap<String, Vec<RData>>,
    /// (name, type) -> queries received.
    queries: HashMap<(String, RecordType), usize>,
}

/// An authoritative DNS server for loopback test records. Answers A, AAAA and SRV records set
/// with [`DnsServer::add_a`] and friends; `NXDOMAIN` for a name with no record, an empty
/// answer for a name with records of other types (both with an SOA, so resolvers cache them
/// for [`DNS_TTL`]). Counts the queries per name. Stops when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    /// Binds `127.0.0.1:0` (UDP) and serves in a thread.
    pub fn start() -> DnsServer {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the test DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set a read timeout");
        let addr = socket.local_addr().expect("the test DNS server's address");
        let zone = Arc::new(Mutex::new(Zone::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let zone = zone.clone();
            let stop = stop.clone();
            std::thread::spawn(move || serve(&socket, &zone, &stop))
        };
        DnsServer {
            addr,
            zone,
            stop,
            thread: Some(thread),
        }
    }

    /// Where to send queries (a resolver's name server).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn zone(&self) -> MutexGuard<'_, Zone> {
        self.zone.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, name: &str, data: RData) {
        self.zone().records.entry(key(name)).or_default().push(data);
    }

    /// An A record. Panics unless `ip` is loopback (127.0.0.0/8).
    pub fn add_a(&self, name: &str, ip: Ipv4Addr) {
        assert!(
            ip.is_loopback(),
            "the test DNS server only serves loopback addresses, not {ip}"
        );
        self.add(name, RData::A(A(ip)));
    }

    /// An AAAA record. Panics unless `ip` is `::1`.
    pub fn add_aaaa(&self, name: &str, ip: Ipv6Addr) {
        assert!(
            ip.is_loopback(),
            "the test DNS server only serves loopback addresses, not {ip}"
        );
        self.add(name, RData::AAAA(AAAA(ip)));
    }

    /// An SRV record for `name` (`_matrix-fed._tcp.example.test`). Its target's addresses are
    /// this server's A/AAAA records (so loopback too), or `localhost`'s.
    pub fn add_srv(&self, name: &str, priority: u16, weight: u16, port: u16, target: &str) {
        let target = Name::from_ascii(format!("{}.", key(target)))
            .unwrap_or_else(|e| panic!("`{target}` is not a DNS name: {e}"));
        self.add(name, RData::SRV(SRV::new(priority, weight, port, target)));
    }

    /// Forgets every record of `name`.
    pub fn remove(&self, name: &str) {
        self.zone().records.remove(&key(name));
    }

    /// The queries received for `name`, of any type.
    pub fn queries(&self, name: &str) -> usize {
        let name = key(name);
        self.zone()
            .queries
            .iter()
            .filter(|((n, _), _)| *n == name)
            .map(|(_, count)| count)
            .sum()
    }

    /// The queries received for `name` of `record_type` (`"A"`, `"AAAA"`, `"SRV"`).
    pub fn queries_of(&self, name: &str, record_type: &str) -> usize {
        let rtype: RecordType = record_type
            .parse()
            .unwrap_or_else(|_| panic!("`{record_type}` is not a record type"));
        self.zone()
            .queries
            .get(&(key(name), rtype))
            .copied()
            .unwrap_or(0)
    }

    /// Every query received.
    pub fn total_queries(&self) -> usize {
        self.zone().queries.values().sum()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, zone: &Mutex<Zone>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue; // the read timeout: look at `stop` again
        };
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let mut zone = zone.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(answer) = answer(&query, &mut zone)
            && let Ok(bytes) = answer.to_vec()
        {
            let _ = socket.send_to(&bytes, from);
        }
    }
}

fn answer(query: &Message, zone: &mut Zone) -> Option<Message> {
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_queries(query.queries.iter().cloned());
    let Some(q) = query.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return Some(response);
    };
    if query.metadata.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return Some(response);
    }
    let name = key(&q.name().to_ascii());
    *zone
        .queries
        .entry((name.clone(), q.query_type()))
        .or_default() += 1;
    let records = zone.records.get(&name);
    let matching: Vec<Record> = records
        .into_iter()
        .flatten()
        .filter(|d| d.record_type() == q.query_type())
        .map(|d| Record::from_rdata(q.name().clone(), DNS_TTL, d.clone()))
        .collect();
    if matching.is_empty() {
        response.metadata.response_code = if records.is_some() {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        let soa = SOA::new(Name::root(), Name::root(), 1, 3600, 600, 86400, DNS_TTL);
        response.add_authority(Record::from_rdata(Name::root(), DNS_TTL, RData::SOA(soa)));
    } else {
        response.add_answers(matching);
    }
    Some(response)
}
