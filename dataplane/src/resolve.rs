//! Name resolution of backends given by hostname. Owns: the addresses of every such backend,
//! looked up on a thread of its own at start, after each config change and every
//! `REFRESH`, so workers connect without calling the resolver.
//! Must not: run on a worker: `getaddrinfo` blocks, and a slow resolver would stall every
//! connection on that worker (a worker still looks a name up itself when it has no addresses
//! for it yet).

use crate::snapshot::SharedSnapshot;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often names are looked up again (about a typical DNS record's lifetime).
const REFRESH: Duration = Duration::from_secs(30);
/// How often the thread looks for a new config.
const CONFIG_POLL: Duration = Duration::from_secs(1);

/// host -> (port, addresses): looked up by a borrowed host name.
type Addresses = HashMap<String, Vec<(u16, Arc<[SocketAddr]>)>>;

/// The last addresses found for each (host, port) of a backend given by name.
#[derive(Default)]
pub struct Resolved(ArcSwap<Addresses>);

impl Resolved {
    pub fn get(&self, host: &str, port: u16) -> Option<Arc<[SocketAddr]>> {
        let addresses = self.0.load();
        let ports = addresses.get(host)?;
        ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, a)| a.clone())
    }

    /// Looks up every backend name of the config in `snapshot`; a name that fails keeps the
    /// addresses it had (a resolver hiccup does not take a backend away), or has none: then
    /// connections to it fail at once instead of asking the resolver on a worker.
    fn refresh(&self, snapshot: &SharedSnapshot) {
        let snap = snapshot.load();
        let mut next = Addresses::new();
        let names = snap
            .table
            .backends
            .iter()
            .filter(|b| b.host.parse::<std::net::IpAddr>().is_err());
        for b in names {
            let found = (b.host.as_str(), b.port)
                .to_socket_addrs()
                .map(Iterator::collect::<Vec<_>>);
            let addrs = match found {
                Ok(addrs) if !addrs.is_empty() => addrs.into(),
                _ => self.get(&b.host, b.port).unwrap_or_else(|| Arc::from([])),
            };
            next.entry(b.host.clone())
                .or_default()
                .push((b.port, addrs));
        }
        self.0.store(Arc::new(next));
    }
}

/// Starts the thread that keeps `resolved` current for the configs `snapshot` publishes.
pub fn spawn_refresher(snapshot: SharedSnapshot, resolved: Arc<Resolved>) {
    let spawned = std::thread::Builder::new()
        .name("switchyard-resolver".into())
        .spawn(move || {
            let mut version = None;
            let mut refreshed = Instant::now();
            loop {
                let now = snapshot.load().table.version;
                if version != Some(now) || refreshed.elapsed() >= REFRESH {
                    resolved.refresh(&snapshot);
                    version = Some(now);
                    refreshed = Instant::now();
                }
                std::thread::sleep(CONFIG_POLL);
            }
        });
    if let Err(e) = spawned {
        eprintln!("switchyard: cannot start the name resolver thread ({e}); workers look names up themselves");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    #[test]
    fn backend_names_are_looked_up_and_addresses_kept() {
        let text = r#"
[[backends]]
name = "named"
url = "http://localhost:8000"
models = [{ name = "m" }]
[[backends]]
name = "numeric"
url = "http://127.0.0.1:9000"
models = [{ name = "m" }]
[[tiers]]
name = "t"
targets = ["named/m", "numeric/m"]
"#;
        let table = switchyard_shared::config::load_str(text, "test.toml", &|_| None).unwrap();
        let snapshot: SharedSnapshot =
            Arc::new(ArcSwap::from_pointee(Snapshot::new(table, false).unwrap()));
        let resolved = Resolved::default();
        resolved.refresh(&snapshot);
        let addrs = resolved.get("localhost", 8000).expect("localhost resolves");
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8000));
        assert!(
            resolved.get("127.0.0.1", 9000).is_none(),
            "addresses need no lookup"
        );
    }
}
