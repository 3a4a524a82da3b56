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
    assert_eq!(plan.workload.mode, "train");
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
