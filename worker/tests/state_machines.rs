//! The step runners without actors or sockets: each rank's `Program` and `StepRun` are
//! plain values; the test is the network, handing every output to the rank it names.

mod common;

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::*;
use lemur_protocol::Phase;
use lemur_worker::exec::{Executor, StepInput};
use lemur_worker::program::{Outbound, Program, Progress, StepRun};
use lemur_worker::weights::Checkpoint;

#[test]
fn two_ranks_driven_by_hand_give_the_reference_logits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(2);
    let model = model(dir.path(), &cfg, 11)?;
    let prompt = [3u32, 1, 4, 1, 5, 9];
    let (want, want_logits) = reference_generate(&model, &prompt, 4)?;
    // Prefill wholly on rank 1, decode alternating op by op (shifted by one per layer, so
    // one layer's decode attention is on rank 0): activations cross both ways and that
    // layer's KV cache is handed over after prefill.
    let plan = infer_plan(&cfg, 2, 4, |op| match op.phase {
        Phase::Prefill => 1,
        _ => (op.id + op.layer.unwrap_or(0) as usize) % 2,
    })?;
    let map = HashMap::from([("m4-pro".to_string(), 0), ("m5-pro".to_string(), 1)]);
    let progs = [Program::new(&plan, 0, &map)?, Program::new(&plan, 1, &map)?];
    let ck = Checkpoint::open(&model)?;
    let mut execs = Vec::new();
    for p in &progs {
        let mut e = Executor::new(ck.config.clone(), Device::Cpu, DType::F32)?;
        ck.load_into(&mut e, &p.local_weights(), None)?;
        execs.push(e);
    }
    let (mut tokens, mut logits_seen) = (Vec::new(), Vec::new());
    let mut input_ids = prompt.to_vec();
    let mut position = 0;
    let mut handovers = 0;
    for step in 0..4u32 {
        let phase = if step == 0 { Phase::Prefill } else { Phase::Decode };
        let ids = Tensor::new(input_ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let input = StepInput::single(1, ids, position)?;
        let mut runs =
            [StepRun::new(u64::from(step), phase, input.clone()), StepRun::new(u64::from(step), phase, input)];
        let mut done = [false, false];
        let mut logits = None;
        let mut rounds = 0;
        while !done.iter().all(|d| *d) {
            rounds += 1;
            assert!(rounds < 1000, "the runners stopped making progress");
            for r in 0..2 {
                if done[r] {
                    continue;
                }
                let mut out = Vec::new();
                let progress = runs[r].advance(&progs[r], &mut execs[r], &mut |o| out.push(o))?;
                done[r] = progress == Progress::Done;
                for o in out {
                    match o {
                        Outbound::Activation { to, from_op, tensors } => {
                            runs[to as usize].deliver(from_op, tensors.to_vec())
                        }
                        Outbound::Logits { logits: l } => logits = Some(l.flatten_all()?.to_vec1::<f32>()?),
                        Outbound::Kv { to, request, layer, cache } => {
                            handovers += 1;
                            execs[to as usize].kv.insert((request, layer), cache);
                        }
                        other => panic!("an inference step sent {other:?}"),
                    }
                }
            }
        }
        let logits = logits.expect("the head ran");
        let next = lemur_worker::sampling::argmax(&logits);
        tokens.push(next);
        logits_seen.push(logits);
        position += input_ids.len();
        input_ids = vec![next];
    }
    assert_eq!(tokens, want);
    let d = max_diff(&logits_seen, &want_logits);
    assert!(d < 1e-4, "logits differ by {d}");
    assert!(handovers > 0, "no KV cache was handed over");
    Ok(())
}
