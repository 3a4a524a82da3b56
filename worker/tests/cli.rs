//! `lemur-worker` as a user runs it, given bad flags and files: each is refused before any
//! connection or compute, with a message naming the flag, file or field and what is allowed.

mod common;

use std::process::Command;

use common::*;

fn worker(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lemur-worker")).args(args).output().expect("lemur-worker runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn every_bad_flag_and_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = tiny(2);
    let model = model(d, &cfg, 3).unwrap();
    let plan = infer_plan(&cfg, 2, 4, |op| op.id % 2).unwrap();
    let plan_path = d.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string(&plan).unwrap()).unwrap();
    let (p0, p1) = (free_port(), free_port());
    let cluster = d.join("cluster.toml");
    std::fs::write(
        &cluster,
        format!(
            "id = \"t\"\n[[rank]]\nrank = 0\naddr = \"127.0.0.1:{p0}\"\nmachine = \"m4-pro\"\n\
             [[rank]]\nrank = 1\naddr = \"127.0.0.1:{p1}\"\nmachine = \"m5-pro\"\n"
        ),
    )
    .unwrap();
    let bad_cluster = d.join("bad-cluster.toml");
    std::fs::write(&bad_cluster, "id = \"t\"\n[[rank]]\nrank = 0\naddr = 127.0.0.1:7000\nmachine = \"a\"\n").unwrap();
    let corrupt = d.join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("config.json"), "{\"model_type\": ").unwrap();
    let text_file = d.join("notes.txt");
    std::fs::write(&text_file, "hello").unwrap();
    let garbage_plan = d.join("garbage.json");
    std::fs::write(&garbage_plan, "{\"format_version\": 2}").unwrap();
    let (c, pl, m) = (cluster.to_str().unwrap(), plan_path.to_str().unwrap(), model.to_str().unwrap());
    let leader = |extra: &[&'static str]| {
        let mut v = vec!["--rank", "0", "--cluster", c, "--plan", pl, "--model", m];
        v.extend_from_slice(extra);
        v
    };
    let ids = ["--prompt-ids", "1,2,3"];
    let with_ids = |extra: &[&'static str]| {
        let mut v = leader(&ids);
        v.extend_from_slice(extra);
        v
    };
    // (arguments, what the message must say)
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--rank", "1", "--cluster", c, "--model", m], vec!["--model given to rank 1", "rank 0 only"]),
        (
            vec!["--rank", "1", "--cluster", c, "--temperature", "0.5", "--lr", "0.1"],
            vec!["--temperature, --lr given to rank 1"],
        ),
        (with_ids(&["--wait", "5"]), vec!["--wait given to rank 0"]),
        (with_ids(&["--temperature", "nan"]), vec!["--temperature", "finite"]),
        (with_ids(&["--temperature", "-1"]), vec!["--temperature", "0 or more"]),
        (with_ids(&["--top-p", "0"]), vec!["--top-p", "(0, 1]"]),
        (with_ids(&["--top-p", "1.5"]), vec!["--top-p", "(0, 1]"]),
        (with_ids(&["--max-new-tokens", "0"]), vec!["--max-new-tokens", "at least 1"]),
        (with_ids(&["--repeat", "0"]), vec!["--repeat", "at least 1"]),
        (with_ids(&["--lora-dropout", "1"]), vec!["--lora-dropout", "[0, 1)"]),
        (with_ids(&["--lora-alpha", "0"]), vec!["--lora-alpha", "above 0"]),
        (with_ids(&["--lr", "-0.001"]), vec!["--lr", "above 0"]),
        (with_ids(&["--lr=-1e-3"]), vec!["--lr", "above 0"]),
        (with_ids(&["--lr", "inf"]), vec!["--lr", "finite"]),
        (with_ids(&["--min-lr-ratio", "2"]), vec!["--min-lr-ratio", "[0, 1]"]),
        (with_ids(&["--max-grad-norm", "0"]), vec!["--max-grad-norm", "above 0"]),
        (with_ids(&["--weight-decay", "-1"]), vec!["--weight-decay", "0 or more"]),
        (with_ids(&["--inflight", "0"]), vec!["--inflight", "at least 1"]),
        (with_ids(&["--steps", "0"]), vec!["--steps", "at least 1"]),
        (with_ids(&["--dtype", "f8"]), vec!["--dtype", "f32, f16 or bf16"]),
        (with_ids(&["--device", "tpu"]), vec!["--device", "tpu"]),
        (vec!["--rank", "1", "--cluster", c, "--wait", "0"], vec!["--wait", "at least 1"]),
        (leader(&["--prompt-ids", "1,99999"]), vec!["prompt token 1 is id 99999", "vocabulary of 256"]),
        (leader(&["--prompt-ids", ""]), vec!["--prompt-ids"]),
        (leader(&["--prompt-ids", "1,-2"]), vec!["--prompt-ids"]),
        (leader(&["--prompt", ""]), vec!["--prompt is empty"]),
        (leader(&["--prompt", "  "]), vec!["--prompt is empty"]),
        (leader(&["--prompt-ids", "1", "--max-new-tokens", "5000"]), vec!["max_new_tokens (5000)", "4096 positions"]),
        (leader(&["--train", "/missing/data.jsonl"]), vec!["--train needs a training plan"]),
        (vec!["--rank", "0", "--cluster", c], vec!["rank 0 needs --plan"]),
        (vec!["--rank", "0", "--cluster", c, "--plan", pl], vec!["rank 0 needs --model"]),
        (vec!["--rank", "0", "--cluster", c, "--plan", pl, "--model", m], vec!["--prompt or --prompt-ids"]),
        (vec!["--rank", "0", "--cluster", c, "--plan", "/missing/plan.json", "--model", m], vec!["/missing/plan.json"]),
        (
            vec!["--rank", "0", "--cluster", c, "--plan", garbage_plan.to_str().unwrap(), "--model", m],
            vec!["garbage.json"],
        ),
        (
            vec!["--rank", "0", "--cluster", c, "--plan", pl, "--model", "/missing.gguf", "--prompt-ids", "1"],
            vec!["/missing.gguf: no such file or directory"],
        ),
        (
            vec!["--rank", "0", "--cluster", c, "--plan", pl, "--model", text_file.to_str().unwrap(), "--prompt", "hi"],
            vec!["notes.txt", "not .gguf"],
        ),
        (
            vec!["--rank", "0", "--cluster", c, "--plan", pl, "--model", corrupt.to_str().unwrap(), "--prompt", "hi"],
            vec!["corrupt/config.json"],
        ),
        (vec!["--rank", "0", "--cluster", "/missing/cluster.toml"], vec!["/missing/cluster.toml"]),
        (vec!["--rank", "0", "--cluster", bad_cluster.to_str().unwrap()], vec!["bad-cluster.toml", "line 4, column"]),
        (vec!["--rank", "5", "--cluster", c], vec!["rank 5 is not in the cluster"]),
        (vec!["--rank", "-1", "--cluster", c], vec!["--rank"]),
    ];
    for (args, says) in &cases {
        let (ok, err) = worker(args);
        assert!(!ok, "{args:?} was accepted");
        for s in says {
            assert!(err.contains(s), "{args:?}: the message lacks `{s}`:\n{err}");
        }
        assert!(!err.contains("panicked") && err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("\x1b["), "{args:?}: colour codes in a log that is not a terminal: {err:?}");
        if args.iter().any(|a| a.ends_with("corrupt")) {
            // A corrupt checkpoint is reported as such, not as a missing tokenizer.
            assert!(!err.contains("tokenizer"), "{err}");
        }
    }
}

#[test]
fn host_names_are_addresses_too() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.toml");
    let p = free_port();
    std::fs::write(
        &cluster,
        format!(
            "id = \"t\"\n[[rank]]\nrank = 0\naddr = \"localhost:{}\"\nmachine = \"a\"\n\
             [[rank]]\nrank = 1\naddr = \"localhost:{p}\"\nmachine = \"b\"\n",
            free_port()
        ),
    )
    .unwrap();
    // Accepted: rank 1 listens on localhost and waits for a leader that never comes.
    let (ok, err) = worker(&["--once", "--rank", "1", "--cluster", cluster.to_str().unwrap(), "--wait", "1"]);
    assert!(!ok && err.contains("no leader within 1 s"), "{err}");
}

#[test]
fn cluster_keys_are_written_private_and_checked_before_anything_listens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lan = d.join("lan.toml");
    std::fs::write(
        &lan,
        "id = \"t\"\n[[rank]]\nrank = 0\naddr = \"192.168.1.10:7000\"\nmachine = \"a\"\n\
         [[rank]]\nrank = 1\naddr = \"0.0.0.0:7001\"\nmachine = \"b\"\n",
    )
    .unwrap();
    let lan_s = lan.to_str().unwrap();
    // A network address and no key: refused before listening, saying how to make one.
    let (ok, err) = worker(&["--once", "--rank", "1", "--cluster", lan_s, "--wait", "1"]);
    assert!(!ok && err.contains("not a loopback address") && err.contains("lemur-worker keygen"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    // keygen writes a key only its owner can read, and never overwrites one.
    let key = d.join("cluster.key");
    let k = key.to_str().unwrap();
    let (ok, err) = worker(&["keygen", k]);
    assert!(ok && err.contains("fingerprint"), "{err}");
    let text = std::fs::read_to_string(&key).unwrap();
    assert_eq!(text.trim().len(), 64, "{text}");
    let (ok, err) = worker(&["keygen", k]);
    assert!(!ok && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
    // With the key (flag or environment), the same cluster file is accepted: rank 1 gets
    // as far as listening (it cannot bind 0.0.0.0:7001 here, or waits in vain).
    let out = Command::new(env!("CARGO_BIN_EXE_lemur-worker"))
        .args(["--once", "--rank", "1", "--cluster", lan_s, "--wait", "1"])
        .env("LEMUR_KEY_FILE", k)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("loopback") && err.contains("fingerprint"), "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let (ok, err) = worker(&["--once", "--rank", "1", "--cluster", lan_s, "--key-file", k]);
        assert!(!ok && err.contains("--key-file") && err.contains("chmod 600"), "{err}");
    }
    let (ok, err) = worker(&["--rank", "0", "--cluster", lan_s, "--once"]);
    assert!(!ok && err.contains("--once given to rank 0"), "{err}");
}
