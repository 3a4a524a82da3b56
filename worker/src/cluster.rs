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
use std::net::SocketAddr;
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
    /// Reads and validates a cluster file.
    pub fn load(path: &Path) -> Result<Self, WorkerError> {
        let err = |m: String| WorkerError::Cluster { path: path.display().to_string(), message: m };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let f: ClusterFile = toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
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
            r.addr
                .parse::<SocketAddr>()
                .map_err(|e| format!("rank {}: field `addr`: `{}` is not host:port ({e})", r.rank, r.addr))?;
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
