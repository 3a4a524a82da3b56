//! Fuzz target: arbitrary bytes as a peer's handshake frames, to both sides of the
//! handshake under the pre-authentication frame cap. Neither side may panic, and neither
//! may accept a peer that does not hold the key.
#![no_main]

use bytes::BytesMut;
use lemur_protocol::auth::{Acceptor, ClusterKey, Credentials, Dialer, PRE_AUTH_MAX_FRAME};
use lemur_protocol::wire::FrameCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let key = ClusterKey::from_text(&"5a".repeat(32)).expect("a key");
    let cred = || Credentials::keyed(&key, "fuzz");
    let mut codec = FrameCodec::new(PRE_AUTH_MAX_FRAME);
    let mut buf = BytesMut::from(data);
    let mut acc = Acceptor::new(cred(), 1, 4, "m").expect("randomness");
    let dial = Dialer::new(cred(), 0, 1).expect("randomness");
    for step in 0.. {
        let msg = match codec.decode(&mut buf) {
            Ok(Some(f)) => f.message,
            _ => return,
        };
        // The acceptor's nonce is fresh, so no input can hold a valid proof for it.
        if step == 0 {
            let _ = acc.on_hello(msg.clone());
        } else {
            assert!(acc.on_proof(msg.clone()).is_err(), "authenticated without the key");
        }
        // Nor can any input carry the acceptor's proof for the dialer's fresh nonce.
        assert!(dial.on_challenge(msg.clone()).is_err(), "accepted a forged challenge");
        let _ = dial.on_welcome(msg);
    }
});
