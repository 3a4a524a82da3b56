//! Round trips of every message through the frame codec, and malformed frames that must
//! be errors (never panics, never unbounded allocations).

use bytes::{BufMut, Bytes, BytesMut};
use lemur_protocol::blob::{BlobMeta, Encoding, OpRef};
use lemur_protocol::wire::{
    decode_payload, encode_payload, Frame, FrameCodec, FrameError, Hello, KvMove, Message, RankInfo, Segment,
    TensorMeta, WireDType, MAGIC, PROTOCOL_VERSION,
};
use lemur_protocol::{ModelConfig, Phase, Plan};
use tokio_util::codec::{Decoder, Encoder};

fn tensor(dtype: WireDType, shape: &[usize], seed: u8) -> (TensorMeta, Bytes) {
    let meta = TensorMeta { dtype, shape: shape.to_vec() };
    let n = meta.nbytes().unwrap();
    (meta, Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>()))
}

fn tiny_plan() -> Plan {
    serde_json::from_value(serde_json::json!({
        "format_version": 1, "model": ModelConfig::tiny(), "dtype": "f32",
        "workload": {"mode": "infer", "seq": 4, "batch": 1, "gen_tokens": 2, "finetune": null,
                     "lora_rank": null, "lora_targets": null, "micro_batches": 1},
        "machines": [], "links": [], "ops": [], "edges": [], "objective": "latency", "objective_ms": 1.0,
        "bound": 1.0, "gap": 0.0, "solve_seconds": 0.0,
        "predicted": {"ttft_ms": null, "tpot_ms": null, "step_ms": null, "handover_ms": 0.0, "handover_bytes": 0, "per_machine": []},
        "baselines": []
    }))
    .unwrap()
}

fn every_message() -> Vec<Frame> {
    let (tok, tok_b) = tensor(WireDType::U32, &[1, 6], 1);
    let (a, a_b) = tensor(WireDType::F32, &[1, 3, 64], 2);
    let (b, b_b) = tensor(WireDType::F16, &[1, 3, 32], 3);
    let (k, k_b) = tensor(WireDType::Bf16, &[1, 2, 3, 16], 4);
    let (v, v_b) = tensor(WireDType::Bf16, &[1, 2, 3, 16], 5);
    let (l, l_b) = tensor(WireDType::F32, &[1, 256], 6);
    vec![
        Frame::control(Message::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            rank: 2,
            keyed: true,
            nonce: "ab".repeat(32),
        })),
        Frame::control(Message::Challenge { rank: 1, keyed: true, nonce: "cd".repeat(32), proof: "ef".repeat(32) }),
        Frame::control(Message::Proof { proof: "01".repeat(32) }),
        Frame::control(Message::Welcome { machine: "m5-pro".into() }),
        Frame::control(Message::Refused { reason: "no".into() }),
        Frame::control(Message::Setup {
            plan: Box::new(tiny_plan()),
            ranks: vec![RankInfo { rank: 0, addr: "127.0.0.1:1".into(), machine: "a".into() }],
            checkpoint: Box::new(lemur_protocol::blob::CheckpointRef {
                hash: "0f".repeat(32),
                config: lemur_protocol::ModelConfig::tiny(),
            }),
            dtype: WireDType::F32,
            timing: true,
            train: Some(lemur_protocol::wire::TrainSetup {
                alpha: 32.0,
                seed: 3,
                zero_b: true,
                rank: Some(8),
                targets: Some(vec![lemur_protocol::OpKind::QProj]),
                dropout: 0.1,
            }),
            dequantize: true,
            quantize: Some(lemur_protocol::WeightFormat::Q8_0),
            dense_matmul: lemur_protocol::wire::DenseMatmul::Prefill,
            alternatives: vec![tiny_plan()],
        }),
        Frame::control(Message::FetchWeights {
            ops: vec![
                OpRef { kind: lemur_protocol::OpKind::Embedding, layer: None },
                OpRef { kind: lemur_protocol::OpKind::DownProj, layer: Some(3) },
            ],
        }),
        Frame::control(Message::WeightBlob {
            blob: BlobMeta {
                op: OpRef { kind: lemur_protocol::OpKind::QProj, layer: Some(1) },
                shape: vec![64, 256],
                encoding: Encoding::Blocks(lemur_protocol::WeightFormat::Q4K),
                len: 64 * 144,
                sha256: "ab".repeat(32),
            },
        }),
        {
            let (c, c_b) = tensor(WireDType::U8, &[1000], 11);
            Frame {
                message: Message::WeightChunk { offset: 4 << 20, sha256: "cd".repeat(32), data: c },
                tensors: vec![c_b],
            }
        },
        Frame::control(Message::Ready { rank: 1, weight_bytes: 10, load_seconds: 0.5 }),
        Frame {
            message: Message::Start {
                step_id: 7,
                phase: Phase::Prefill,
                tokens: tok,
                segments: vec![
                    Segment { request_id: 3, position: 0, len: 5, last: false },
                    Segment { request_id: 4, position: 17, len: 1, last: true },
                ],
                placement: 2,
                moves: vec![KvMove { request_id: 4, layer: 1, from: 1, to: 0 }],
                keep_kv: true,
            },
            tensors: vec![tok_b],
        },
        Frame {
            message: Message::Activation { request_id: 7, step: 3, from_op: 42, tensors: vec![a.clone(), b.clone()] },
            tensors: vec![a_b.clone(), b_b.clone()],
        },
        Frame {
            message: Message::Gradient { opt_step: 7, micro_batch: 3, from_op: 42, to_op: 9, tensors: vec![a, b] },
            tensors: vec![a_b, b_b],
        },
        {
            let (t, t_b) = tensor(WireDType::U32, &[2, 9], 10);
            Frame { message: Message::StartMicroBatch { opt_step: 7, micro_batch: 1, tokens: t }, tensors: vec![t_b] }
        },
        Frame {
            message: Message::KvHandover { request_id: 7, layer: 1, start: 0, step_id: 9, tensors: vec![k, v] },
            tensors: vec![k_b, v_b],
        },
        Frame { message: Message::Logits { step_id: 7, logits: l }, tensors: vec![l_b] },
        Frame::control(Message::Finish { request_id: 7 }),
        Frame::control(Message::Loss { opt_step: 7, micro_batch: 2, loss: 3.25 }),
        Frame::control(Message::MicroBatchDone { rank: 1, opt_step: 7, micro_batch: 1, sumsq: 0.5 }),
        Frame::control(Message::Update { t: 3, lr: 2e-4, clip: 0.9, weight_decay: 0.01 }),
        Frame::control(Message::Gather { opt_step: 7, what: lemur_protocol::wire::Gather::State }),
        Frame::control(Message::Gather { opt_step: 7, what: lemur_protocol::wire::Gather::Grads }),
        {
            let (g, g_b) = tensor(WireDType::F32, &[4, 8], 9);
            Frame {
                message: Message::LoadAdapters { names: vec!["x.lora_B.weight".into()], tensors: vec![g] },
                tensors: vec![g_b],
            }
        },
        {
            let (g, g_b) = tensor(WireDType::F32, &[16, 64], 8);
            Frame {
                message: Message::Adapters { rank: 1, opt_step: 7, names: vec!["lora_A".into()], tensors: vec![g] },
                tensors: vec![g_b],
            }
        },
        Frame::control(Message::Stats {
            rank: 1,
            request_id: 7,
            bytes_sent: 1 << 40,
            frames_sent: 3,
            handover_bytes: 9,
            handover_ms: 1.5,
            op_ms: vec![(3, 0.25), (4, 1.5)],
            peak_runs: 4,
            peak_rss_bytes: 123 << 20,
            kernel_paths: vec!["Q8_0: Lemurian's AVX2 (2 calls, 9 rows)".into()],
        }),
        Frame::control(Message::Error { rank: 1, message: "boom".into() }),
        Frame::control(Message::Heartbeat { rank: 1, seq: 99 }),
        Frame::control(Message::Shutdown { reason: "done".into() }),
        // An empty tensor is legal.
        Frame {
            message: Message::Activation {
                request_id: 1,
                step: 0,
                from_op: 0,
                tensors: vec![TensorMeta { dtype: WireDType::F32, shape: vec![0, 4] }],
            },
            tensors: vec![Bytes::new()],
        },
    ]
}

#[test]
fn every_message_round_trips() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let frames = every_message();
    for f in &frames {
        codec.encode(f.clone(), &mut buf).unwrap();
    }
    for f in &frames {
        let got = codec.decode(&mut buf).unwrap().expect("a whole frame");
        assert_eq!(&got, f);
    }
    assert!(codec.decode(&mut buf).unwrap().is_none());
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let mut codec = FrameCodec::default();
    let mut whole = BytesMut::new();
    let f = every_message().swap_remove(5);
    codec.encode(f.clone(), &mut whole).unwrap();
    let mut buf = BytesMut::new();
    for (i, byte) in whole.iter().enumerate() {
        buf.put_u8(*byte);
        let got = codec.decode(&mut buf).unwrap();
        assert_eq!(got.is_some(), i + 1 == whole.len());
        if let Some(g) = got {
            assert_eq!(g, f);
        }
    }
}

#[test]
fn decoded_tensors_share_the_receive_buffer() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let two = every_message().into_iter().find(|f| f.tensors.len() >= 2).unwrap();
    codec.encode(two, &mut buf).unwrap();
    let frame = codec.decode(&mut buf).unwrap().unwrap();
    // Two slices of one allocation: the second starts where the first ends.
    let (a, b) = (&frame.tensors[0], &frame.tensors[1]);
    assert_eq!(distance(a, b), a.len());
}

fn distance(a: &Bytes, b: &Bytes) -> usize {
    b.as_ptr() as usize - a.as_ptr() as usize
}

fn payload(header: &[u8], tail: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32_le(header.len() as u32);
    b.put_slice(header);
    b.put_slice(tail);
    b.freeze()
}

#[test]
fn malformed_frames_are_errors() {
    // Too short for the header length.
    assert!(matches!(decode_payload(Bytes::from_static(&[1, 0])), Err(FrameError::Short { .. })));
    // Header length beyond the frame.
    let mut b = BytesMut::new();
    b.put_u32_le(1000);
    b.put_slice(b"{}");
    assert!(matches!(decode_payload(b.freeze()), Err(FrameError::HeaderLength { .. })));
    // Unknown message type, and a known type with an unknown field.
    let err = decode_payload(payload(br#"{"type":"teleport"}"#, b"")).unwrap_err();
    assert!(err.to_string().contains("teleport"), "{err}");
    let err = decode_payload(payload(br#"{"type":"heartbeat","rank":1,"seq":2,"extra":3}"#, b"")).unwrap_err();
    assert!(matches!(err, FrameError::Message(_)));
    // Truncated tensor: the shape needs 12 bytes, 8 are there.
    let h = br#"{"type":"logits","step_id":1,"logits":{"dtype":"f32","shape":[3]}}"#;
    let err = decode_payload(payload(h, &[0; 8])).unwrap_err();
    assert!(matches!(err, FrameError::TensorBytes { declared: 12, carried: 8 }), "{err}");
    // Trailing garbage after the tensors.
    assert!(matches!(decode_payload(payload(h, &[0; 13])), Err(FrameError::TensorBytes { .. })));
    // A shape that overflows usize is refused before any allocation.
    let h =
        format!(r#"{{"type":"logits","step_id":1,"logits":{{"dtype":"f32","shape":[{},{}]}}}}"#, u64::MAX, u64::MAX);
    assert!(matches!(decode_payload(payload(h.as_bytes(), b"")), Err(FrameError::Overflow { .. })));
    // A frame that claims more than the limit is refused from its length alone.
    let mut codec = FrameCodec::new(1024);
    let mut buf = BytesMut::new();
    buf.put_u32_le(u32::MAX);
    buf.put_slice(&[0; 16]);
    assert!(matches!(codec.decode(&mut buf), Err(FrameError::TooLarge { .. })));
    // Encoding checks tensors against their metadata.
    let mut f = every_message().into_iter().find(|f| matches!(f.message, Message::Start { .. })).unwrap();
    f.tensors[0] = Bytes::from_static(&[1, 2, 3]);
    assert!(encode_payload(&f, &mut BytesMut::new()).is_err());
    f.tensors.clear();
    assert!(matches!(encode_payload(&f, &mut BytesMut::new()), Err(FrameError::TensorCount { .. })));
}

#[test]
fn random_and_mutated_frames_never_panic() {
    // Deterministic xorshift; mutate valid frames byte by byte and feed random garbage.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut valid = Vec::new();
    for f in every_message() {
        let mut b = BytesMut::new();
        encode_payload(&f, &mut b).unwrap();
        valid.push(b.to_vec());
    }
    for round in 0..20_000 {
        let mut bytes = valid[round % valid.len()].clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() as usize) % bytes.len();
            bytes[i] = next() as u8;
        }
        if round % 3 == 0 {
            let cut = (next() as usize) % (bytes.len() + 1);
            bytes.truncate(cut);
        }
        let _ = decode_payload(Bytes::from(bytes));
        let garbage: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
        let mut codec = FrameCodec::new(4096);
        let mut buf = BytesMut::from(&garbage[..]);
        let _ = codec.decode(&mut buf);
    }
}
