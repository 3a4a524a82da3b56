//! The handshake's state machines against each other and against forgeries: the right
//! key passes both ways, a wrong key, a replayed or reflected proof, a keyed/keyless mix
//! and an old version are refused with messages that reveal nothing about the cluster;
//! key files are written 0600, never overwritten, and refused when others can read them.

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use lemur_protocol::auth::{
    Acceptor, ClusterKey, Credentials, Dialer, HandshakeError, KeyError, Refusal, KEY_BYTES, PRE_AUTH_MAX_FRAME,
};
use lemur_protocol::wire::{Frame, FrameCodec, FrameError, FrameLimit, Hello, Message, MAGIC, PROTOCOL_VERSION};
use sha2::Sha256;
use tokio_util::codec::{Decoder, Encoder};

const CLUSTER: &str = "desk-cluster";

fn key() -> ClusterKey {
    ClusterKey::generate().unwrap()
}

/// Runs a whole handshake: dialer rank `d` to acceptor rank 1 of 3.
fn shake(dialer: Credentials, acceptor: Credentials, d: u32) -> (Result<String, HandshakeError>, Option<Refusal>) {
    let dial = Dialer::new(dialer, d, 1).unwrap();
    let mut acc = Acceptor::new(acceptor, 1, 3, "m5-pro").unwrap();
    let challenge = match acc.on_hello(dial.hello()) {
        Ok(c) => c,
        Err(r) => {
            let reason = Message::Refused { reason: r.reason.clone() };
            return (dial.on_challenge(reason).map(|_| String::new()), Some(r));
        }
    };
    let proof = match dial.on_challenge(challenge) {
        Ok(p) => p,
        Err(e) => return (Err(e), None),
    };
    match acc.on_proof(proof) {
        Ok((rank, welcome)) => {
            assert_eq!(rank, d);
            (dial.on_welcome(welcome), None)
        }
        Err(r) => (dial.on_welcome(Message::Refused { reason: r.reason.clone() }), Some(r)),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn the_same_key_authenticates_both_ways() {
    let k = key();
    let (got, refusal) = shake(Credentials::keyed(&k, CLUSTER), Credentials::keyed(&k, CLUSTER), 0);
    assert_eq!(got, Ok("m5-pro".to_string()));
    assert_eq!(refusal, None);
    // Keyless (loopback) clusters run the same exchange.
    let (got, _) = shake(Credentials::keyless(CLUSTER), Credentials::keyless(CLUSTER), 2);
    assert_eq!(got, Ok("m5-pro".to_string()));
}

#[test]
fn the_acceptor_proof_is_the_documented_hmac() {
    // Computed here from auth.rs's layout, not through its code: a peer written in another
    // language can interoperate from the module doc alone.
    let k = key();
    let dial = Dialer::new(Credentials::keyed(&k, CLUSTER), 0, 1).unwrap();
    let mut acc = Acceptor::new(Credentials::keyed(&k, CLUSTER), 1, 2, "m").unwrap();
    let Message::Hello(h) = dial.hello() else { panic!("hello") };
    let Message::Challenge { nonce, proof, .. } = acc.on_hello(Message::Hello(h.clone())).unwrap() else {
        panic!("challenge")
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&unhex(k.to_text().trim())).unwrap();
    mac.update(b"lemurian handshake v1\0");
    mac.update(&[2]); // the acceptor's role
    mac.update(&(CLUSTER.len() as u64).to_le_bytes());
    mac.update(CLUSTER.as_bytes());
    mac.update(&0u32.to_le_bytes());
    mac.update(&1u32.to_le_bytes());
    mac.update(&unhex(&h.nonce));
    mac.update(&unhex(&nonce));
    assert_eq!(proof, hex(&mac.finalize().into_bytes()));
    assert_eq!(h.nonce.len(), 2 * KEY_BYTES);
}

#[test]
fn a_wrong_key_fails_on_both_sides_and_the_refusal_tells_nothing() {
    let (ours, theirs) = (key(), key());
    // The dialer holds the wrong key: the acceptor's proof does not verify for it.
    let (got, _) = shake(Credentials::keyed(&theirs, CLUSTER), Credentials::keyed(&ours, CLUSTER), 0);
    assert_eq!(got, Err(HandshakeError::BadProof));
    // An attacker dialer that ignores the acceptor's proof and sends one of its own.
    let dial = Dialer::new(Credentials::keyed(&theirs, CLUSTER), 0, 1).unwrap();
    let mut acc = Acceptor::new(Credentials::keyed(&ours, CLUSTER), 1, 3, "m5-pro").unwrap();
    let Message::Challenge { nonce, .. } = acc.on_hello(dial.hello()).unwrap() else { panic!("challenge") };
    let forged = Dialer::new(Credentials::keyed(&theirs, CLUSTER), 0, 1).unwrap();
    let mut acc2 = Acceptor::new(Credentials::keyed(&theirs, CLUSTER), 1, 3, "x").unwrap();
    let challenge = acc2.on_hello(forged.hello()).unwrap();
    let Message::Proof { proof } = forged.on_challenge(challenge).unwrap() else { panic!("proof") };
    let r = acc.on_proof(Message::Proof { proof }).unwrap_err();
    assert_eq!(r.reason, "authentication failed");
    assert!(r.detail.contains("claimed rank 0"), "{}", r.detail);
    for text in [&r.reason, &nonce] {
        assert!(!text.contains(CLUSTER) && !text.contains("m5-pro"), "{text}");
    }
    // A cluster id that differs with the same key fails the same way.
    let (got, _) = shake(Credentials::keyed(&ours, "other"), Credentials::keyed(&ours, CLUSTER), 0);
    assert_eq!(got, Err(HandshakeError::BadProof));
    assert!(HandshakeError::BadProof.to_string().contains("key fingerprints"));
}

#[test]
fn a_recorded_proof_fails_on_the_next_connection() {
    let k = key();
    let cred = || Credentials::keyed(&k, CLUSTER);
    // Record an honest exchange.
    let dial = Dialer::new(cred(), 0, 1).unwrap();
    let mut acc = Acceptor::new(cred(), 1, 3, "m5-pro").unwrap();
    let hello = dial.hello();
    let proof = dial.on_challenge(acc.on_hello(hello.clone()).unwrap()).unwrap();
    assert!(acc.on_proof(proof.clone()).is_ok());
    // Replay the hello and the proof to a fresh acceptor: its nonce is new.
    let mut acc = Acceptor::new(cred(), 1, 3, "m5-pro").unwrap();
    acc.on_hello(hello).unwrap();
    assert_eq!(acc.on_proof(proof).unwrap_err().reason, "authentication failed");
}

#[test]
fn an_acceptor_proof_reflected_back_is_not_a_dialer_proof() {
    // The attacker dials with a victim's nonce... it has no key, so it can only reflect:
    // it opens a second connection to the same acceptor with the acceptor's own nonce as
    // its nonce, and sends back the proof that acceptor made.
    let k = key();
    let cred = || Credentials::keyed(&k, CLUSTER);
    let mut acc = Acceptor::new(cred(), 1, 3, "m5-pro").unwrap();
    let hello =
        |nonce: String| Message::Hello(Hello { magic: MAGIC, version: PROTOCOL_VERSION, rank: 0, keyed: true, nonce });
    let Message::Challenge { nonce: nonce_a, .. } = acc.on_hello(hello("11".repeat(32))).unwrap() else {
        panic!("challenge")
    };
    let mut acc2 = Acceptor::new(cred(), 1, 3, "m5-pro").unwrap();
    let Message::Challenge { proof: reflected, .. } = acc2.on_hello(hello(nonce_a)).unwrap() else {
        panic!("challenge")
    };
    assert_eq!(acc.on_proof(Message::Proof { proof: reflected }).unwrap_err().reason, "authentication failed");
}

#[test]
fn mismatches_before_the_proofs_say_what_differs_and_nothing_else() {
    let k = key();
    // Keyed against keyless, both ways round.
    let (got, r) = shake(Credentials::keyless(CLUSTER), Credentials::keyed(&k, CLUSTER), 0);
    let r = r.unwrap();
    assert!(r.reason.contains("has no cluster key") && r.reason.contains("--key-file"), "{}", r.reason);
    assert!(matches!(got, Err(HandshakeError::Refused(ref m)) if m == &r.reason), "{got:?}");
    let (got, r) = shake(Credentials::keyed(&k, CLUSTER), Credentials::keyless(CLUSTER), 0);
    assert!(r.unwrap().reason.contains("holds a cluster key"));
    assert!(got.is_err());
    // A rank outside the cluster, or the acceptor's own.
    for rank in [1, 3, 99] {
        let (got, r) = shake(Credentials::keyed(&k, CLUSTER), Credentials::keyed(&k, CLUSTER), rank);
        let r = r.unwrap();
        assert_eq!(r.reason, "not a peer of this worker");
        assert!(r.detail.contains(&format!("claimed rank {rank}")), "{}", r.detail);
        assert!(got.is_err());
    }
    let mut acc = Acceptor::new(Credentials::keyed(&k, CLUSTER), 1, 3, "m5-pro").unwrap();
    let old = Hello { magic: MAGIC, version: PROTOCOL_VERSION - 1, rank: 0, keyed: true, nonce: "00".repeat(32) };
    let r = acc.on_hello(Message::Hello(old.clone())).unwrap_err();
    let (theirs, mine) = (format!("speaks {}", PROTOCOL_VERSION - 1), format!("this worker {PROTOCOL_VERSION}"));
    assert!(r.reason.contains(&theirs) && r.reason.contains(&mine), "{}", r.reason);
    let r = acc.on_hello(Message::Hello(Hello { magic: MAGIC ^ 1, ..old.clone() })).unwrap_err();
    assert_eq!(r.reason, "not a Lemurian handshake");
    let r = acc.on_hello(Message::Hello(Hello { nonce: "zz".into(), version: PROTOCOL_VERSION, ..old })).unwrap_err();
    assert_eq!(r.reason, "malformed handshake");
    let r = acc.on_hello(Message::Heartbeat { rank: 0, seq: 1 }).unwrap_err();
    assert!(r.detail.contains("heartbeat"), "{}", r.detail);
    // A proof with no hello before it.
    let mut fresh = Acceptor::new(Credentials::keyed(&k, CLUSTER), 1, 3, "m5-pro").unwrap();
    assert!(fresh.on_proof(Message::Proof { proof: "00".into() }).is_err());
    // The dialer checks who answered.
    let dial = Dialer::new(Credentials::keyed(&k, CLUSTER), 0, 2).unwrap();
    let challenge = acc_for(&k, 1).on_hello(dial.hello()).unwrap();
    assert_eq!(dial.on_challenge(challenge), Err(HandshakeError::WrongRank { expected: 2, found: 1 }));
}

fn acc_for(k: &ClusterKey, me: u32) -> Acceptor {
    Acceptor::new(Credentials::keyed(k, CLUSTER), me, 3, "m5-pro").unwrap()
}

#[test]
fn random_messages_never_panic_either_side() {
    // Every message kind, with random fields, fed to both machines at every step.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let k = key();
    for _ in 0..2000 {
        let text = |n: u64| {
            (0..n % 80).map(|i| char::from(b"0123456789abcdefxyz"[((n >> (i % 40)) % 19) as usize])).collect::<String>()
        };
        let msg = match next() % 5 {
            0 => Message::Hello(Hello {
                magic: if next() % 2 == 0 { MAGIC } else { next() as u32 },
                version: PROTOCOL_VERSION - (next() % 2) as u32,
                rank: (next() % 5) as u32,
                keyed: next() % 2 == 0,
                nonce: text(next()),
            }),
            1 => Message::Challenge {
                rank: (next() % 4) as u32,
                keyed: next() % 2 == 0,
                nonce: text(next()),
                proof: text(next()),
            },
            2 => Message::Proof { proof: text(next()) },
            3 => Message::Welcome { machine: text(next()) },
            _ => Message::Refused { reason: text(next()) },
        };
        let mut acc = acc_for(&k, 1);
        let dial = Dialer::new(Credentials::keyed(&k, CLUSTER), 0, 1).unwrap();
        let _ = acc.on_hello(msg.clone());
        assert!(acc.on_proof(msg.clone()).is_err(), "{msg:?} authenticated without the key");
        assert!(dial.on_challenge(msg.clone()).is_err(), "{msg:?} passed as the acceptor's proof");
        let _ = dial.on_welcome(msg);
    }
}

#[test]
fn a_length_prefix_over_the_pre_auth_limit_is_refused_from_four_bytes() {
    let limit = FrameLimit::new(PRE_AUTH_MAX_FRAME);
    let mut codec = FrameCodec::with_limit(limit.clone(), 1 << 30);
    let mut buf = BytesMut::from(&(1u32 << 30).to_le_bytes()[..]);
    match codec.decode(&mut buf) {
        Err(FrameError::TooLarge { len, max }) => assert_eq!((len, max), (1 << 30, PRE_AUTH_MAX_FRAME)),
        other => panic!("expected too large, got {other:?}"),
    }
    // A handshake message fits; once the peer authenticated, large frames do too.
    let mut enc = FrameCodec::new(1 << 30);
    let mut hello = BytesMut::new();
    let dial = Dialer::new(Credentials::keyless(CLUSTER), 0, 1).unwrap();
    enc.encode(Frame::control(dial.hello()), &mut hello).unwrap();
    assert!(hello.len() < PRE_AUTH_MAX_FRAME / 4, "{} bytes", hello.len());
    let mut codec = FrameCodec::with_limit(limit.clone(), 1 << 30);
    assert!(codec.decode(&mut hello).unwrap().is_some());
    let big = Frame::control(Message::Welcome { machine: "m".repeat(PRE_AUTH_MAX_FRAME) });
    let mut bytes = BytesMut::new();
    enc.encode(big.clone(), &mut bytes).unwrap();
    assert!(matches!(codec.decode(&mut bytes.clone()), Err(FrameError::TooLarge { .. })));
    limit.set(1 << 20);
    assert_eq!(codec.decode(&mut bytes).unwrap().map(|f| f.message), Some(big.message));
}

#[test]
fn key_files_are_private_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.key");
    let k = ClusterKey::write_new(&path).unwrap();
    assert_eq!(ClusterKey::load(&path).unwrap(), k);
    assert_eq!(k.fingerprint().len(), 16);
    assert!(matches!(ClusterKey::write_new(&path), Err(KeyError::Exists { .. })));
    assert_eq!(ClusterKey::load(&path).unwrap(), k, "the refused write left the key as it was");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("cluster.key") && e.contains("644") && e.contains("chmod 600"), "{e}");
    }
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let e = ClusterKey::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.key") && e.contains("64 hex digits"), "{e}");
    let e = ClusterKey::load(&dir.path().join("missing.key")).unwrap_err().to_string();
    assert!(e.contains("missing.key"), "{e}");
}
