//! Fuzz target: arbitrary bytes through the frame decoder, as a stream (any split) and as
//! one payload. It must return frames or errors, never panic or allocate without bound.
#![no_main]

use bytes::{Bytes, BytesMut};
use lemur_protocol::wire::{decode_payload, FrameCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let _ = decode_payload(Bytes::copy_from_slice(data));
    let mut codec = FrameCodec::new(1 << 20);
    let split = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let mut buf = BytesMut::from(&data[..split]);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(_) => return,
        }
    }
    buf.extend_from_slice(&data[split..]);
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
});
