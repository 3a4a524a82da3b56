//! Profile loading: the shipped profiles load, and every kind of bad file gives an error naming file and field.

use std::path::{Path, PathBuf};

use lemur_planner::profiles::ProfileSet;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")
}

#[test]
fn shipped_profiles_load_with_the_measured_numbers() {
    let set = ProfileSet::load(&shipped()).unwrap();
    let names: Vec<_> = set.machines.iter().map(|(m, _)| m.name.as_str()).collect();
    assert_eq!(names, ["m4-pro", "m5-pro"]);
    let m5 = set.machine("m5-pro").unwrap();
    assert_eq!(m5.bandwidth.read_gbps, 118.0);
    assert_eq!(m5.gemm[&lemur_protocol::DType::F16].tflops, [0.82, 4.91, 12.58, 13.39, 12.49]);
    let m4 = set.machine("m4-pro").unwrap();
    assert_eq!(m4.bandwidth.read_gbps, 253.0);
    assert_eq!(m4.attention[&lemur_protocol::DType::F16].size, [512.0, 1024.0, 2048.0, 4096.0]);
    let link = set.link("m4-pro", "m5-pro").unwrap();
    assert_eq!(link.name, "thunderbolt-4");
    assert!(set.machine("h100").unwrap_err().to_string().contains("m4-pro, m5-pro"));
}

/// Writes the shipped m5-pro profile with `edit` applied into a fresh directory and loads it.
fn load_edited(edit: impl Fn(String) -> String) -> String {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(shipped().join("m5-pro.toml")).unwrap();
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit must change the file");
    std::fs::write(dir.path().join("bad.toml"), edited).unwrap();
    let err = ProfileSet::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("bad.toml"), "error does not name the file: {err}");
    err
}

#[test]
fn unknown_field_is_named() {
    let err = load_edited(|t| t.replace("[bandwidth]\n", "[bandwidth]\nwrite_gbps = 3.0\n"));
    assert!(err.contains("write_gbps"), "{err}");
}

#[test]
fn missing_field_is_named() {
    let err = load_edited(|t| t.replace("copy_gbps = 119.0\n", ""));
    assert!(err.contains("copy_gbps"), "{err}");
}

#[test]
fn non_finite_value_is_named() {
    let err = load_edited(|t| t.replace("read_gbps = 118.0", "read_gbps = nan"));
    assert!(err.contains("bandwidth.read_gbps") && err.contains("finite"), "{err}");
    let err = load_edited(|t| t.replace("tflops = [0.82,", "tflops = [inf,"));
    assert!(err.contains("gemm.f16.tflops[0]"), "{err}");
}

#[test]
fn non_positive_value_is_named() {
    let err = load_edited(|t| t.replace("4.91, 12.58", "-4.91, 12.58"));
    assert!(err.contains("gemm.f16.tflops[1]") && err.contains("positive"), "{err}");
    let err = load_edited(|t| t.replace("max_alloc_bytes = 12_000_000_000", "max_alloc_bytes = 0"));
    assert!(err.contains("memory.max_alloc_bytes"), "{err}");
}

#[test]
fn unsorted_or_empty_curve_is_named() {
    let err = load_edited(|t| t.replace("size = [512, 1024, 2048, 4096]", "size = [512, 2048, 1024, 4096]"));
    assert!(err.contains("attention.f16.size[2]") && err.contains("increasing"), "{err}");
    let err = load_edited(|t| {
        t.replace("size = [512, 1024, 2048, 4096]\ntflops = [2.34, 2.79, 2.94, 2.85]", "size = []\ntflops = []")
    });
    assert!(err.contains("attention.f16.size") && err.contains("no points"), "{err}");
    let err = load_edited(|t| t.replace("tflops = [2.34, 2.79, 2.94, 2.85]", "tflops = [2.34, 2.79]"));
    assert!(err.contains("attention.f16.tflops") && err.contains("2 values"), "{err}");
}

#[test]
fn malformed_toml_and_wrong_types_do_not_panic() {
    let err = load_edited(|t| t.replace("name = \"m5-pro\"", "name = [1, 2"));
    assert!(err.contains("bad.toml"), "{err}");
    let err = load_edited(|t| t.replace("read_gbps = 118.0", "read_gbps = \"fast\""));
    assert!(err.contains("read_gbps"), "{err}");
    let err = load_edited(|t| t.replace("[gemm.f16]", "[gemm.f8]"));
    assert!(err.contains("f8"), "{err}");
}

#[test]
fn bad_link_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(shipped().join("m5-pro.toml"), dir.path().join("m5-pro.toml")).unwrap();
    std::fs::write(
        dir.path().join("links.toml"),
        "[[link]]\nname = \"tb\"\nbetween = [\"*\", \"*\"]\nbandwidth_gbps = 0.0\nlatency_us = 1.0\n",
    )
    .unwrap();
    let err = ProfileSet::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("links.toml") && err.contains("link[0].bandwidth_gbps"), "{err}");
}

#[test]
fn duplicate_names_and_empty_dirs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = ProfileSet::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no machine profiles"), "{err}");
    std::fs::copy(shipped().join("m5-pro.toml"), dir.path().join("a.toml")).unwrap();
    std::fs::copy(shipped().join("m5-pro.toml"), dir.path().join("b.toml")).unwrap();
    let err = ProfileSet::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("defined twice") && err.contains("a.toml") && err.contains("b.toml"), "{err}");
    let err = ProfileSet::load(&dir.path().join("missing")).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn no_link_between_two_machines_is_an_error() {
    let set = ProfileSet { machines: vec![], links: vec![], links_file: None };
    let err = set.link("m4-pro", "m5-pro").unwrap_err().to_string();
    assert!(err.contains("m4-pro") && err.contains("m5-pro"), "{err}");
}

#[test]
fn bad_quantized_rates_are_named() {
    let err = load_edited(|t| t.replace("[quantized.q4_k]", "[quantized.q4_k_m]"));
    assert!(err.contains("quantized.q4_k_m") && err.contains("block format"), "{err}");
    let err = load_edited(|t| t.replacen("gemv_gbps = 95.6", "gemv_gbps = -1.0", 1));
    assert!(err.contains("quantized.q4_0.gemv_gbps") && err.contains("positive"), "{err}");
    let err = load_edited(|t| t.replace("[quantized.q6_k]", "[quantized.q9_k]"));
    assert!(err.contains("q9_k"), "{err}");
    let err = load_edited(|t| t.replacen("estimate = true", "estimate = true\nbits = 4", 1));
    assert!(err.contains("bits"), "{err}");
}
