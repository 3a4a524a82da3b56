//! `cluster.toml`: which rank listens where and runs which of the plan's machines.
//!
//! ```toml
//! id = "desk"
//! [[rank]]
//! rank = 0
//! addr = "127.0.0.1:7070"
//! machine = "m4-pro"
//! [[rank]]
//! rank = 1
//! addr = "127.0.0.1:7071"
//! machine = "m5-pro"
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use lemur_protocol::wire::RankInfo;
use serde::Deserialize;

use crate::error::WorkerError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    id: String,
    rank: Vec<RankEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RankEntry {
    rank: u32,
    addr: String,
    machine: String,
}

/// A validated cluster description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub id: String,
    /// Sorted by rank; ranks are 0..n.
    pub ranks: Vec<RankInfo>,
}

impl Cluster {
    /// Refuses a keyless cluster with an address other than loopback: anyone on that
    /// network could connect and act as its leader.
    pub fn check_exposure(&self, keyed: bool) -> Result<(), WorkerError> {
        if keyed {
            return Ok(());
        }
        match self.ranks.iter().find(|r| !is_loopback(&r.addr)) {
            None => Ok(()),
            Some(r) => Err(WorkerError::Insecure(format!(
                "rank {} is at {}, not a loopback address, and no cluster key was given: anyone on that \
                 network could act as the leader. Write a key with `lemur-worker keygen KEYFILE`, copy it to every \
                 machine, and start every rank with --key-file KEYFILE (or LEMUR_KEY_FILE=KEYFILE)",
                r.rank, r.addr
            ))),
        }
    }

    /// Reads and validates a cluster file.
    pub fn load(path: &Path) -> Result<Self, WorkerError> {
        let err = |m: String| WorkerError::Cluster { path: path.display().to_string(), message: m };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let f: ClusterFile = toml::from_str(&text).map_err(|e| err(toml_message(&text, &e)))?;
        Self::from_parts(
            f.id,
            f.rank.into_iter().map(|r| RankInfo { rank: r.rank, addr: r.addr, machine: r.machine }).collect(),
        )
        .map_err(err)
    }

    /// Validates ranks 0..n, parseable unique addresses and unique machine names.
    pub fn from_parts(id: String, mut ranks: Vec<RankInfo>) -> Result<Self, String> {
        if id.trim().is_empty() {
            return Err("field `id` must not be empty".into());
        }
        if ranks.is_empty() {
            return Err("no [[rank]] entries".into());
        }
        ranks.sort_by_key(|r| r.rank);
        for (i, r) in ranks.iter().enumerate() {
            if r.rank as usize != i {
                return Err(format!(
                    "ranks must be 0..{} with no gaps or repeats; found rank {} at position {i}",
                    ranks.len(),
                    r.rank
                ));
            }
            check_addr(&r.addr).map_err(|e| format!("rank {}: field `addr`: `{}` {e}", r.rank, r.addr))?;
            if r.machine.trim().is_empty() {
                return Err(format!("rank {}: field `machine` must not be empty", r.rank));
            }
            if let Some(o) = ranks[..i].iter().find(|o| o.machine == r.machine) {
                return Err(format!("ranks {} and {} both claim machine `{}`", o.rank, r.rank, r.machine));
            }
            if let Some(o) = ranks[..i].iter().find(|o| o.addr == r.addr) {
                return Err(format!("ranks {} and {} both listen on {}", o.rank, r.rank, r.addr));
            }
        }
        Ok(Self { id, ranks })
    }

    pub fn get(&self, rank: u32) -> Result<&RankInfo, WorkerError> {
        self.ranks.get(rank as usize).ok_or_else(|| {
            WorkerError::Plan(format!("rank {rank} is not in the cluster (it has ranks 0..{})", self.ranks.len()))
        })
    }

    /// Plan machine name -> rank.
    pub fn rank_of_machine(&self) -> HashMap<String, u32> {
        self.ranks.iter().map(|r| (r.machine.clone(), r.rank)).collect()
    }

    /// Writes a cluster file for `n` ranks on loopback from `base_port` (tests and examples).
    pub fn loopback(id: &str, machines: &[&str], base_port: u16) -> Self {
        let ranks = machines
            .iter()
            .enumerate()
            .map(|(i, m)| RankInfo {
                rank: i as u32,
                addr: format!("127.0.0.1:{}", base_port + i as u16),
                machine: m.to_string(),
            })
            .collect();
        Self { id: id.into(), ranks }
    }

    /// The TOML text of this cluster.
    pub fn to_toml(&self) -> String {
        let mut s = format!("id = \"{}\"\n", self.id);
        for r in &self.ranks {
            s += &format!("\n[[rank]]\nrank = {}\naddr = \"{}\"\nmachine = \"{}\"\n", r.rank, r.addr, r.machine);
        }
        s
    }
}

/// A toml error as `line L, column C: message` (toml's own text spans several lines).
pub fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {msg}")
        }
        None => msg.to_string(),
    }
}

/// Whether `addr` (`host:port`, checked) is on this machine only: a loopback IP, or
/// `localhost`. Any other name may resolve to a network address, so it counts as one.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return a.ip().is_loopback();
    }
    addr.rsplit_once(':').is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

/// `host:port`: an IP address (IPv6 in brackets) or a host name, and a port 1..=65535.
fn check_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("is not host:port (no port)".into());
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("is not host:port (`{port}` is not a port 1..65535)")),
    }
    if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return Err("is not host:port (IPv6 addresses go in brackets: [::1]:7070)".into());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("is not host:port (`{host}` is not a host name or IP address)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ip_or_host_name_with_a_port() {
        for ok in ["127.0.0.1:7070", "[::1]:7070", "localhost:7070", "mac-mini.local:7070", "10.0.0.2:1"] {
            assert!(check_addr(ok).is_ok(), "{ok}: {:?}", check_addr(ok));
        }
        // (address, what the message must say)
        let bad = [
            ("localhost", "no port"),
            ("localhost:0", "not a port"),
            ("localhost:70000", "not a port"),
            ("localhost:http", "not a port"),
            (":7070", "not a host name"),
            ("::1:7070", "brackets"),
            ("my_host:7070", "not a host name"),
            ("a..b:7070", "not a host name"),
        ];
        for (addr, says) in bad {
            let e = check_addr(addr).unwrap_err();
            assert!(e.contains(says), "{addr}: {e}");
        }
    }

    #[test]
    fn only_loopback_addresses_count_as_loopback() {
        for yes in ["127.0.0.1:7070", "127.3.4.5:1", "[::1]:7070", "localhost:7070", "LocalHost:9"] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in ["0.0.0.0:7070", "10.0.0.2:7070", "[::]:7070", "mac-mini.local:7070", "localhost.evil.com:1"] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn malformed_toml_is_reported_with_its_line() {
        let text = "id = \"desk\"\n[[rank]]\nrank = 0\naddr = 127.0.0.1:7070\n";
        let e = toml::from_str::<ClusterFile>(text).unwrap_err();
        let m = toml_message(text, &e);
        assert!(m.starts_with("line 4, column 13: expected newline"), "{m}");
    }
}
