//! `lemur-plan` as a user runs it: the cost table, a plan with its files, and bad input.

use std::path::Path;
use std::process::Command;

fn lemur_plan(args: &[&str]) -> std::process::Output {
    let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
    Command::new(env!("CARGO_BIN_EXE_lemur-plan"))
        .arg("--profiles")
        .arg(&profiles)
        .args(args)
        .output()
        .expect("lemur-plan runs")
}

#[test]
fn costs_json_has_layer_costs_and_ops() {
    let out = lemur_plan(&["--model", "mistral-7b", "--costs", "--json", "--seq", "1024"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = v["layer_costs"].as_array().unwrap();
    assert_eq!(layers.len(), 2 * 32);
    for row in layers {
        let (f, b) = (row["forward_ms"].as_f64().unwrap(), row["backward_ms"].as_f64().unwrap());
        assert!(f > 0.0 && b > f, "{row}");
        assert!(row["machine"].is_string() && row["layer"].is_u64());
    }
    let ops = v["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 902);
    for key in ["id", "layer", "kind", "phase", "costs_ms"] {
        assert!(ops[5].get(key).is_some(), "op lacks {key}");
    }
    assert!(ops[5]["costs_ms"]["m4-pro"].as_f64().unwrap() > 0.0);
    // The table form names both machines.
    let out = lemur_plan(&["--costs", "--lora"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("m4-pro fwd ms") && text.contains("m5-pro fwd ms") && text.contains("lora-r16"), "{text}");
}

#[test]
fn plan_writes_json_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("plan.json");
    let svg = dir.path().join("plan.svg");
    let out = lemur_plan(&[
        "--mode",
        "train",
        "--lora",
        "--seq",
        "256",
        "--time-limit",
        "10",
        "--out",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "Machines:",
        "Placement",
        "Per machine",
        "Predicted: training step",
        "Baselines",
        "this plan",
        "Proof: lower bound",
    ] {
        assert!(summary.contains(needle), "summary lacks {needle}:\n{summary}");
    }
    let plan = lemur_protocol::Plan::from_json(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(plan.workload.mode, lemur_protocol::WorkloadMode::Train);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("m5-pro"));

    let out = lemur_plan(&["--json", "--seq", "128", "--gen-tokens", "16", "--time-limit", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan = lemur_protocol::Plan::from_json(std::str::from_utf8(&out.stdout).unwrap()).unwrap();
    assert!(plan.predicted.ttft_ms.is_some() && plan.predicted.tpot_ms.is_some());
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = lemur_plan(&["--machines", "m4-pro,h100"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("h100") && err.contains("m4-pro, m5-pro"), "{err}");
    let out = lemur_plan(&["--model", "gpt-9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("gpt-9") && err.contains("mistral-7b"), "{err}");
    let out = lemur_plan(&["--mode", "train"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("GB short"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_lemur-plan")).args(["--profiles", "/nonexistent"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}

#[test]
fn help_documents_every_flag() {
    let out = lemur_plan(&["--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--mode",
        "--seq",
        "--batch",
        "--gen-tokens",
        "--objective",
        "--time-limit",
        "--out",
        "--json",
        "--svg",
        "--costs",
        "--machines",
        "--lora",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn model_from_a_hugging_face_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let out = lemur_plan(&["--model", dir.path().to_str().unwrap(), "--seq", "64", "--gen-tokens", "8", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan = lemur_protocol::Plan::from_json(std::str::from_utf8(&out.stdout).unwrap()).unwrap();
    assert_eq!(plan.model.num_layers, 30);
    assert_eq!(plan.ops.len(), 2 * (3 + 14 * 30));
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"llama\"").unwrap();
    let out = lemur_plan(&["--model", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("config.json"), "{err}");
}

/// Runs lemur-plan with `args` (and `--profiles DIR` when given) and returns (success, stderr).
fn plan_stderr(profiles: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
    let out = Command::new(env!("CARGO_BIN_EXE_lemur-plan"))
        .arg("--profiles")
        .arg(profiles.unwrap_or(&shipped))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("lemur-plan runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn every_bad_flag_is_refused_naming_it_and_what_is_allowed() {
    const MAX: &str = "18446744073709551615";
    // (arguments, what the message must say)
    let cases: &[(&[&str], &[&str])] = &[
        (&["--gen-tokens", "18446744073709551610"], &["generated tokens (18446744073709551610)", "32768 positions"]),
        (&["--seq", MAX], &["32768 positions"]),
        (&["--batch", "9223372036854775807"], &["too large"]),
        (&["--mode", "train", "--lora", "--batch", "4611686018427387904"], &["too large"]),
        (&["--mode", "train", "--seq", "40000"], &["sequence length (40000)", "32768 positions"]),
        (&["--batch", "0"], &["--batch", "at least 1"]),
        (&["--serve", "--mode", "train"], &["--serve", "--mode train"]),
        (&["--serve", "--decode-buckets", "0"], &["--decode-buckets", "at least 1"]),
        (&["--serve", "--prefill-buckets", "64,x"], &["--prefill-buckets"]),
        (&["--batch", "-3"], &["--batch"]),
        (&["--batch", "1.5"], &["--batch", "whole number"]),
        (&["--seq", "0"], &["--seq", "at least 1"]),
        (&["--micro-batches", "0"], &["--micro-batches", "at least 1"]),
        (&["--lora-rank", "0"], &["--lora-rank", "at least 1"]),
        (&["--mode", "train", "--lora", "--lora-rank", "100000"], &["LoRA rank", "between 1 and 4096"]),
        (&["--gap", "nan"], &["--gap", "[0, 1]"]),
        (&["--gap", "-0.1"], &["--gap", "[0, 1]"]),
        (&["--gap", "2"], &["--gap", "[0, 1]"]),
        (&["--time-limit", "0"], &["--time-limit", "above 0"]),
        (&["--time-limit", "inf"], &["--time-limit", "finite"]),
        (&["--time-limit", "NaN"], &["--time-limit"]),
        (&["--time-limit", ""], &["--time-limit"]),
        (&["--dtype", "f8"], &["--dtype", "f16, bf16 or f32", "f8"]),
        (&["--dtype", ""], &["--dtype"]),
        (&["--lora-targets", "q_proj,attention"], &["--lora-targets", "attention", "not a projection"]),
        (&["--lora-targets", ""], &["--lora-targets", "not a projection"]),
        (&["--machines", ""], &["no machine profile named ``", "m4-pro, m5-pro"]),
        (&["--machines", "m4-pro,,m5-pro"], &["no machine profile named ``"]),
        (&["--model", ""], &["--model", "neither a preset"]),
        (&["--model", "/nonexistent/config.json"], &["/nonexistent/config.json"]),
        (&["--mode", "bogus"], &["--mode", "infer", "train"]),
        (&["--objective", "speed"], &["--objective", "latency", "throughput"]),
        (&["--weights", "q3"], &["--weights", "`q3` is not a weight format", "q4_k_m"]),
        (&["--mode", "train", "--weights", "q4_0"], &["full fine-tuning", "q4_0", "--lora"]),
        (
            &["--out", "/nonexistent/dir/plan.json", "--model", "tiny", "--seq", "16", "--gen-tokens", "2"],
            &["/nonexistent/dir/plan.json"],
        ),
    ];
    for (args, says) in cases {
        let (ok, err) = plan_stderr(None, args, &[]);
        assert!(!ok, "{args:?} was accepted");
        for s in *says {
            assert!(err.contains(s), "{args:?}: the message lacks `{s}`:\n{err}");
        }
        assert!(!err.contains("panicked") && !err.contains("HiGHS error"), "{args:?}: {err}");
    }
}

#[test]
fn errors_are_one_message_without_a_backtrace_unless_asked() {
    // RUST_BACKTRACE=1 is common among Rust users; it must not turn errors into stack traces.
    let (ok, err) = plan_stderr(None, &["--mode", "train"], &[("RUST_BACKTRACE", "1")]);
    assert!(!ok);
    assert!(err.starts_with("error: ") && err.contains("GB short"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert!(err.lines().count() <= 6, "{err}");
    // Asked for, it comes.
    for (args, env) in [(&["--mode", "train"][..], &[("LEMUR_BACKTRACE", "1")][..]), (&["--mode", "train", "-v"], &[])]
    {
        let (_, err) = plan_stderr(None, args, env);
        assert!(err.starts_with("error: ") && err.contains("Stack backtrace"), "{args:?} {env:?}: {err}");
    }
}

#[test]
fn bad_profile_directories_and_links_files_are_named() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
    let dir = tempfile::tempdir().unwrap();
    for m in ["m4-pro.toml", "m5-pro.toml"] {
        std::fs::copy(shipped.join(m), dir.path().join(m)).unwrap();
    }
    let links = dir.path().join("links.toml");
    let link = |between: &str| {
        format!("[[link]]\nname = \"tb\"\nbetween = {between}\nbandwidth_gbps = 3.5\nlatency_us = 50.0\n")
    };
    // (links.toml, or None for no file; what the message must say)
    let cases: [(Option<String>, &[&str]); 5] = [
        (None, &["links.toml", "no link joins `m4-pro` and `m5-pro`", "does not exist"]),
        (
            Some(link("[\"m4-max\", \"m9\"]")),
            &["links.toml", "`m4-max`, `m9` name no machine profile", "tb (m4-max - m9)"],
        ),
        (Some(link("[\"m4-pro\", \"m5-pro\", \"m5-max\"]")), &["links.toml", "exactly two machines", "got 3"]),
        (Some(link("[\"m4-pro\"]")), &["links.toml", "exactly two machines", "got 1"]),
        (Some("link = []\n".to_string()), &["links.toml", "no [[link]] entries"]),
    ];
    for (text, says) in cases {
        match &text {
            Some(t) => std::fs::write(&links, t).unwrap(),
            None => {
                let _ = std::fs::remove_file(&links);
            }
        }
        let (ok, err) = plan_stderr(Some(dir.path()), &["--model", "tiny", "--seq", "16", "--gen-tokens", "2"], &[]);
        assert!(!ok, "{text:?} was accepted");
        for s in says {
            assert!(err.contains(s), "{text:?}: the message lacks `{s}`:\n{err}");
        }
    }
    // One machine needs no link at all.
    let _ = std::fs::remove_file(&links);
    let (ok, err) = plan_stderr(
        Some(dir.path()),
        &["--machines", "m4-pro", "--model", "tiny", "--seq", "16", "--gen-tokens", "2"],
        &[],
    );
    assert!(ok, "{err}");
    // A file where the directory belongs.
    let (ok, err) = plan_stderr(Some(&dir.path().join("m4-pro.toml")), &[], &[]);
    assert!(!ok && err.contains("m4-pro.toml"), "{err}");
}

#[test]
fn quantized_weights_plan_in_less_memory_and_decode_faster() {
    let plan_json = |args: &[&str]| {
        let out = lemur_plan(&[&["--json", "--time-limit", "10"], args].concat());
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        lemur_protocol::Plan::from_json(std::str::from_utf8(&out.stdout).unwrap()).unwrap()
    };
    let dense = plan_json(&[]);
    let q4 = plan_json(&["--weights", "q4_k_m"]);
    assert_eq!(q4.workload.weights, lemur_protocol::WeightFormat::Q4KM);
    assert_eq!(dense.workload.weights, lemur_protocol::WeightFormat::Dense);
    let mem = |p: &lemur_protocol::Plan| p.predicted.per_machine.iter().map(|m| m.memory_bytes).max().unwrap();
    assert!(mem(&q4) * 3 < mem(&dense), "{} vs {}", mem(&q4), mem(&dense));
    let (tq, td) = (q4.predicted.tpot_ms.unwrap(), dense.predicted.tpot_ms.unwrap());
    assert!(tq < 0.6 * td, "decode {tq} ms with q4_k_m vs {td} ms dense");
    // QLoRA: a LoRA fine-tune over 4-bit weights plans where full fine-tuning cannot.
    let qlora = plan_json(&["--mode", "train", "--lora", "--weights", "q4_k_m", "--seq", "256"]);
    let lora = plan_json(&["--mode", "train", "--lora", "--seq", "256"]);
    assert!(mem(&qlora) < mem(&lora), "{} vs {}", mem(&qlora), mem(&lora));
    let out = lemur_plan(&["--weights", "q4_k_m", "--time-limit", "10"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The Apple profiles' quantized rates are derived, not measured: the summary says so.
    assert!(text.contains("q4_k_m weights") && text.contains("m4-pro q4_k/q6_k ESTIMATES"), "{text}");
}
