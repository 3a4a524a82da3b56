//! Serving plan sets on the Apple pair: each bucket's placement is never worse than the
//! best single machine, the placement follows the load as the seed's measurements say
//! (batch-1 decode on the bandwidth-rich M4 Pro, batched decode and prefill toward the
//! GEMM-rich M5 Pro), and memory counts every bucket's weights once.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use lemur_planner::serving::{plan_set, Buckets};
use lemur_planner::{Planner, Roofline};
use lemur_protocol::{Phase, WeightFormat};

#[test]
fn a_plan_set_follows_the_load_and_counts_weights_once() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
    let planner = Planner::from_profiles(&dir)
        .unwrap()
        .machines(&["m4-pro", "m5-pro"])
        .unwrap()
        .model(lemur_protocol::ModelConfig::preset("mistral-7b").unwrap())
        .weights(WeightFormat::Q4KM)
        .solver(Duration::from_secs(10), 1e-3);
    let buckets = Buckets { decode: vec![1, 16], prefill: vec![512], context: 1024 };
    let set = plan_set(&Roofline, planner.request(), &buckets).unwrap();
    assert_eq!(set.buckets.len(), 3);
    for b in &set.buckets {
        let (_, single) = b.best_single.clone().expect("a single machine holds Mistral-7B in 4 bits");
        let gap = b.planned.plan.gap.max(0.0);
        assert!(
            b.tokens_per_s >= single * (1.0 - gap) - 1e-9,
            "{:?} {}: {} < {single}",
            b.phase,
            b.size,
            b.tokens_per_s
        );
        // The step is what the plan predicts for its phase.
        let want = match b.phase {
            Phase::Decode => b.planned.plan.predicted.tpot_ms.unwrap(),
            _ => b.planned.plan.predicted.ttft_ms.unwrap(),
        };
        assert!((b.step_s * 1e3 - want).abs() <= 1e-6 * want.max(1.0), "{} vs {want}", b.step_s * 1e3);
        assert!((b.share.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
    // The seed's table: batch-1 decode is bandwidth-bound (M4 Pro), a batch of 16 and a
    // 512-token prefill are compute-bound (M5 Pro).
    let m4_share = |i: usize| set.buckets[i].share[0];
    assert!(m4_share(0) > 0.9, "decode x1 on the M4 Pro: {:?}", set.buckets[0].share);
    assert!(m4_share(1) < 0.5, "decode x16 toward the M5 Pro: {:?}", set.buckets[1].share);
    assert!(m4_share(2) < 0.1, "prefill on the M5 Pro: {:?}", set.buckets[2].share);
    // Weights: a machine holds the union of what the buckets place on it, each once. Here
    // both machines hold a full copy (decode x1 on one, prefill on the other): 4.37 GB each.
    let total = 4_368_000_000f64;
    for (m, &w) in set.weight_bytes.iter().enumerate() {
        assert!((w as f64 / total - 1.0).abs() < 0.01, "machine {m}: {w} bytes of weights");
    }
    let kinds: BTreeSet<_> = set.buckets.iter().map(|b| b.phase).collect();
    assert_eq!(kinds.len(), 2);
    assert!(set.fits(), "{}", set.table());
    // Switching: each bucket's own step on the diagonal; a placement at another bucket's
    // batch is no faster than that bucket's own placement (the solver's gap aside).
    let sw = &set.switching;
    let decode: Vec<_> = set.buckets.iter().filter(|b| b.phase == Phase::Decode).collect();
    for (i, b) in decode.iter().enumerate() {
        assert!((sw.decode_step_ms[i][i] - b.step_s * 1e3).abs() <= 1e-9 * b.step_s * 1e3);
        for (j, other) in decode.iter().enumerate() {
            let gap = other.planned.plan.gap.max(0.0);
            assert!(sw.decode_step_ms[i][j] >= sw.decode_step_ms[j][j] * (1.0 - gap) - 1e-9, "{:?}", sw);
        }
    }
    // x1 decodes on the M4 Pro and x16 on the M5 Pro: a request's whole cache changes
    // machine, 32 layers of K and V (1024 values each) per position over the link.
    let inst = &decode[0].planned.instance;
    let link = &inst.links[0];
    let want = 32.0 * 2.0 * 1024.0 * inst.dtype.bytes() as f64 / (link.bandwidth_gbps * 1e9) * 1e3;
    assert!((sw.move_ms_per_position[0][1] - want).abs() <= 1e-9 * want, "{} vs {want}", sw.move_ms_per_position[0][1]);
    assert!((sw.move_fixed_ms[0][1] - 32.0 * link.latency_us * 1e-3).abs() < 1e-9);
    assert_eq!((sw.move_ms_per_position[0][0], sw.move_fixed_ms[1][1]), (0.0, 0.0));
    let file = set.to_file();
    file.validate().unwrap();
    assert!(file.kv_positions().is_some_and(|p| p > 1024));
    assert_eq!((file.decode.len(), file.prefill.len()), (2, 1));
    let back: lemur_protocol::plan::PlanSet = serde_json::from_str(&serde_json::to_string(&file).unwrap()).unwrap();
    assert_eq!(back, file);
}
