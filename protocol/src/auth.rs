//! Peer authentication: the cluster key file and the handshake every connection opens
//! with, as plain state machines (no I/O) that the runtime drives over its connections.
//!
//! Every member of a cluster holds the same 32-byte key (`lemur-worker keygen` writes one).
//! A connection authenticates both ways before any plan, path or tensor is accepted:
//!
//! ```text
//! dialer                                   acceptor
//!   Hello { rank, keyed, nonce_d }   ──►     checks magic, version, rank, keyed
//!                                    ◄──   Challenge { rank, nonce_a, proof_a }
//!   checks proof_a                           proof_x = HMAC-SHA256(key, role x, cluster id,
//!   Proof { proof_d }                ──►             dialer rank, acceptor rank,
//!                                    ◄──   Welcome { machine }     nonce_d, nonce_a)
//! ```
//!
//! Each side's proof covers both fresh nonces, the cluster id and both ranks, under its own
//! role label: a recorded proof fails on the next connection (new nonces), and an acceptor's
//! proof cannot be reflected back as a dialer's. A cluster without a key (loopback only: the
//! runtime refuses anything else) runs the same exchange under a key derived from its id, so
//! the code path is one. Refusals ([`Refusal::reason`]) say what class of thing went wrong
//! (version, key, rank) but never the cluster's id, its machines or its paths; the detail
//! for the acceptor's own log is in [`Refusal::detail`]. Until the handshake ends, frames are
//! capped at [`PRE_AUTH_MAX_FRAME`] bytes.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::wire::{Hello, Message, MAGIC, PROTOCOL_VERSION};

/// The largest frame either side accepts before the handshake is over: a handshake
/// message is a few hundred bytes, so a peer cannot make a worker buffer more than this.
pub const PRE_AUTH_MAX_FRAME: usize = 4 << 10;
/// Bytes in a key and in a nonce.
pub const KEY_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// A key file that cannot be read, written or trusted; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("key file {path}: {problem}")]
    Malformed { path: String, problem: String },
    #[error("key file {path} is readable by other users (mode {mode:03o}); run `chmod 600 {path}`")]
    Exposed { path: String, mode: u32 },
    #[error("key file {path} already exists; remove it first, or use it as it is")]
    Exists { path: String },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// A cluster's shared secret. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; KEY_BYTES]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self(random_bytes()?))
    }

    /// The key from its text: 64 hex digits (surrounding whitespace ignored).
    pub fn from_text(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let bytes = from_hex(t).ok_or_else(|| {
            format!(
                "expected {} hex digits (as `lemur-worker keygen` writes), found {} characters",
                KEY_BYTES * 2,
                t.len()
            )
        })?;
        let key: [u8; KEY_BYTES] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("expected {} hex digits, found {}", KEY_BYTES * 2, b.len() * 2))?;
        Ok(Self(key))
    }

    /// The key's file text.
    pub fn to_text(&self) -> String {
        to_hex(&self.0) + "\n"
    }

    /// Reads a key file; refuses one that other users can read (as ssh does).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: name.clone(), source })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|source| KeyError::Io { path: name.clone(), source })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Exposed { path: name, mode });
            }
        }
        Self::from_text(&text).map_err(|problem| KeyError::Malformed { path: name, problem })
    }

    /// Writes a new key to `path`, readable by its owner only; never overwrites a file.
    pub fn write_new(path: &Path) -> Result<Self, KeyError> {
        use std::io::Write;
        let name = path.display().to_string();
        let key = Self::generate()?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: name.clone() },
            _ => KeyError::Io { path: name.clone(), source },
        })?;
        f.write_all(key.to_text().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|source| KeyError::Io { path: name, source })?;
        Ok(key)
    }

    /// A short fingerprint for logs (the first 8 bytes of the key's SHA-256): two machines
    /// hold the same key when their fingerprints agree, and it reveals nothing usable.
    pub fn fingerprint(&self) -> String {
        to_hex(&Sha256::digest(self.0)[..8])
    }
}

/// What one side brings to a handshake: the key (or the keyless stand-in) and the
/// cluster id both proofs cover.
#[derive(Clone)]
pub struct Credentials {
    secret: [u8; KEY_BYTES],
    keyed: bool,
    cluster_id: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("keyed", &self.keyed).finish_non_exhaustive()
    }
}

impl Credentials {
    /// Keyed with `key` when there is one, else keyless.
    pub fn new(key: Option<&ClusterKey>, cluster_id: &str) -> Self {
        key.map_or_else(|| Self::keyless(cluster_id), |k| Self::keyed(k, cluster_id))
    }

    /// A keyed cluster's credentials.
    pub fn keyed(key: &ClusterKey, cluster_id: &str) -> Self {
        Self { secret: key.0, keyed: true, cluster_id: cluster_id.into() }
    }

    /// A keyless cluster's: the proofs run under a key derived from the id, which anyone
    /// who knows the id can compute. Loopback clusters only; they check the peer's
    /// version, rank and cluster id, not who it is.
    pub fn keyless(cluster_id: &str) -> Self {
        let secret = Sha256::new().chain_update(b"lemurian keyless cluster\0").chain_update(cluster_id).finalize();
        Self { secret: secret.into(), keyed: false, cluster_id: cluster_id.into() }
    }

    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    fn proof(&self, role: Role, dialer: u32, acceptor: u32, nonce_d: &[u8], nonce_a: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(b"lemurian handshake v1\0");
        mac.update(&[role as u8]);
        mac.update(&(self.cluster_id.len() as u64).to_le_bytes());
        mac.update(self.cluster_id.as_bytes());
        mac.update(&dialer.to_le_bytes());
        mac.update(&acceptor.to_le_bytes());
        mac.update(nonce_d);
        mac.update(nonce_a);
        mac
    }

    fn prove(&self, role: Role, dialer: u32, acceptor: u32, nonce_d: &[u8], nonce_a: &[u8]) -> String {
        to_hex(&self.proof(role, dialer, acceptor, nonce_d, nonce_a).finalize().into_bytes())
    }

    /// Checks a peer's proof in constant time.
    fn verify(&self, role: Role, dialer: u32, acceptor: u32, nonce_d: &[u8], nonce_a: &[u8], proof: &str) -> bool {
        match from_hex(proof) {
            Some(p) => self.proof(role, dialer, acceptor, nonce_d, nonce_a).verify_slice(&p).is_ok(),
            None => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Role {
    Dialer = 1,
    Acceptor = 2,
}

/// Why the dialing side gave up on a handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("refused us: {0}")]
    Refused(String),
    #[error("sent `{0}` instead of the handshake's next step")]
    Unexpected(&'static str),
    #[error("expected rank {expected} at this address, found rank {found}")]
    WrongRank { expected: u32, found: u32 },
    #[error("{0}")]
    Keys(String),
    #[error(
        "failed authentication: it does not hold this cluster's key, or its cluster file's `id` differs (compare \
         the key fingerprints the workers log at start)"
    )]
    BadProof,
    #[error("sent a malformed nonce")]
    BadNonce,
}

/// A handshake the acceptor refused: `reason` goes to the peer (nothing about the
/// cluster in it), `detail` to the acceptor's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub detail: String,
}

impl Refusal {
    fn new(reason: &str, detail: String) -> Self {
        Self { reason: reason.into(), detail }
    }
}

fn keys_differ(peer_keyed: bool) -> String {
    if peer_keyed {
        "holds a cluster key and this side has none: give every rank the same --key-file".into()
    } else {
        "has no cluster key and this side has one: give every rank the same --key-file".into()
    }
}

/// The dialing side of a handshake: [`Dialer::hello`] first, then the acceptor's
/// challenge, then its welcome.
#[derive(Debug)]
pub struct Dialer {
    cred: Credentials,
    me: u32,
    expect: u32,
    nonce: [u8; KEY_BYTES],
}

impl Dialer {
    /// Dialing rank `expect` as rank `me`.
    pub fn new(cred: Credentials, me: u32, expect: u32) -> Result<Self, KeyError> {
        Ok(Self { cred, me, expect, nonce: random_bytes()? })
    }

    /// The first message.
    pub fn hello(&self) -> Message {
        Message::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            rank: self.me,
            keyed: self.cred.keyed,
            nonce: to_hex(&self.nonce),
        })
    }

    /// Checks the acceptor's challenge; returns our proof to send.
    pub fn on_challenge(&self, msg: Message) -> Result<Message, HandshakeError> {
        let (rank, keyed, nonce, proof) = match msg {
            Message::Challenge { rank, keyed, nonce, proof } => (rank, keyed, nonce, proof),
            Message::Refused { reason } => return Err(HandshakeError::Refused(reason)),
            other => return Err(HandshakeError::Unexpected(other.name())),
        };
        if rank != self.expect {
            return Err(HandshakeError::WrongRank { expected: self.expect, found: rank });
        }
        if keyed != self.cred.keyed {
            return Err(HandshakeError::Keys(keys_differ(keyed)));
        }
        let nonce_a = from_hex(&nonce).filter(|n| n.len() == KEY_BYTES).ok_or(HandshakeError::BadNonce)?;
        if !self.cred.verify(Role::Acceptor, self.me, rank, &self.nonce, &nonce_a, &proof) {
            return Err(HandshakeError::BadProof);
        }
        Ok(Message::Proof { proof: self.cred.prove(Role::Dialer, self.me, rank, &self.nonce, &nonce_a) })
    }

    /// The acceptor's last word: its machine name, or its refusal.
    pub fn on_welcome(&self, msg: Message) -> Result<String, HandshakeError> {
        match msg {
            Message::Welcome { machine } => Ok(machine),
            Message::Refused { reason } => Err(HandshakeError::Refused(reason)),
            other => Err(HandshakeError::Unexpected(other.name())),
        }
    }
}

/// The accepting side: [`Acceptor::on_hello`] answers a hello with a challenge,
/// [`Acceptor::on_proof`] checks the dialer's proof and welcomes it.
#[derive(Debug)]
pub struct Acceptor {
    cred: Credentials,
    me: u32,
    ranks: u32,
    machine: String,
    nonce: [u8; KEY_BYTES],
    /// The dialer's claimed rank and nonce, once its hello passed.
    peer: Option<(u32, Vec<u8>)>,
}

impl Acceptor {
    /// Rank `me` of a cluster of `ranks`, running `machine` (told to the dialer once it
    /// has authenticated).
    pub fn new(cred: Credentials, me: u32, ranks: u32, machine: &str) -> Result<Self, KeyError> {
        Ok(Self { cred, me, ranks, machine: machine.into(), nonce: random_bytes()?, peer: None })
    }

    /// Checks the dialer's hello; returns the challenge to send.
    pub fn on_hello(&mut self, msg: Message) -> Result<Message, Refusal> {
        let Message::Hello(h) = msg else {
            return Err(Refusal::new("expected a handshake", format!("sent `{}` instead of a handshake", msg.name())));
        };
        if h.magic != MAGIC {
            let detail = format!("sent magic {:#x}, expected {MAGIC:#x}: not a Lemurian worker", h.magic);
            return Err(Refusal::new("not a Lemurian handshake", detail));
        }
        if h.version != PROTOCOL_VERSION {
            let m = format!("protocol version mismatch: the peer speaks {}, this worker {PROTOCOL_VERSION}", h.version);
            return Err(Refusal { reason: m.clone(), detail: m });
        }
        if h.rank >= self.ranks || h.rank == self.me {
            let detail =
                format!("claimed rank {}, not a peer of rank {} in a cluster of {}", h.rank, self.me, self.ranks);
            return Err(Refusal::new("not a peer of this worker", detail));
        }
        if h.keyed != self.cred.keyed {
            let m = format!("the peer {}", keys_differ(h.keyed));
            return Err(Refusal { reason: m.clone(), detail: m });
        }
        let nonce_d = from_hex(&h.nonce)
            .filter(|n| n.len() == KEY_BYTES)
            .ok_or_else(|| Refusal::new("malformed handshake", "sent a malformed nonce".into()))?;
        let proof = self.cred.prove(Role::Acceptor, h.rank, self.me, &nonce_d, &self.nonce);
        self.peer = Some((h.rank, nonce_d));
        Ok(Message::Challenge { rank: self.me, keyed: self.cred.keyed, nonce: to_hex(&self.nonce), proof })
    }

    /// Checks the dialer's proof; returns its (now authenticated) rank and the welcome.
    pub fn on_proof(&mut self, msg: Message) -> Result<(u32, Message), Refusal> {
        let Some((rank, nonce_d)) = self.peer.take() else {
            return Err(Refusal::new("expected a handshake", "sent a proof before its hello".into()));
        };
        let Message::Proof { proof } = msg else {
            return Err(Refusal::new("expected a proof", format!("sent `{}` instead of its proof", msg.name())));
        };
        if !self.cred.verify(Role::Dialer, rank, self.me, &nonce_d, &self.nonce, &proof) {
            let detail = format!("claimed rank {rank} but failed authentication (wrong key or cluster id)");
            return Err(Refusal::new("authentication failed", detail));
        }
        Ok((rank, Message::Welcome { machine: self.machine.clone() }))
    }
}

fn random_bytes() -> Result<[u8; KEY_BYTES], KeyError> {
    let mut b = [0u8; KEY_BYTES];
    getrandom::fill(&mut b).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(b)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_what_is_not_hex() {
        assert_eq!(from_hex(&to_hex(&[0, 1, 0xab, 0xff])), Some(vec![0, 1, 0xab, 0xff]));
        for bad in ["abc", "zz", "+1", "é1"] {
            assert_eq!(from_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn key_text_round_trips_and_bad_text_says_what_was_expected() {
        let k = ClusterKey::generate().unwrap();
        assert_eq!(ClusterKey::from_text(&k.to_text()).unwrap(), k);
        let e = ClusterKey::from_text("abcd").unwrap_err();
        assert!(e.contains("expected 64 hex digits"), "{e}");
        assert_eq!(format!("{k:?}"), "ClusterKey(..)");
    }
}
