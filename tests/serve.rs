//! `lemur-serve` as users run it: real processes on loopback (rank 0 serving SmolLM2's
//! quantized GGUF, rank 1 a `lemur-worker`), talked to by the official `openai` Python
//! package (tests/openai_client.py): chat and completions, streamed and not, concurrent
//! streams against solo runs, stops, limits, bad requests, a disconnect, a full queue,
//! and SIGTERM during a stream.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::*;

const MODEL: &str = SERVED_MODEL;

fn client(python: &Path, url: &str, mode: &str) -> Command {
    let mut c = Command::new(python);
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py")).args([url, MODEL, mode]);
    c
}

fn run_client(python: &Path, url: &str, mode: &str) -> Result<()> {
    let child = client(python, url, mode).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let out = wait_exit(child, Duration::from_secs(300)).with_context(|| format!("the {mode} client"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("ok") {
        bail!("the {mode} client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn the_openai_client_chats_completes_streams_and_batches_against_two_ranks() -> Result<()> {
    let (gguf, python) = (smollm2()?, openai_python()?);
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &gguf, &["--max-batch", "8"])?;
    run_client(&python, &server.url, "api")?;
    Ok(())
}

#[test]
fn over_a_plan_set_concurrent_streams_switch_placements_and_equal_their_solo_runs() -> Result<()> {
    let (gguf, python) = (smollm2()?, openai_python()?);
    let dir = tempfile::tempdir()?;
    let server = Server::start_set(dir.path(), &gguf, &["--max-batch", "8"])?;
    run_client(&python, &server.url, "planset")?;
    Ok(())
}

#[test]
fn a_plan_set_planned_at_start_serves_streams_equal_to_their_solo_runs() -> Result<()> {
    let (gguf, python) = (smollm2()?, openai_python()?);
    let dir = tempfile::tempdir()?;
    let server = Server::start_planned_set(dir.path(), &gguf, &["--max-batch", "8"])?;
    run_client(&python, &server.url, "plannedset")?;
    Ok(())
}

#[test]
fn a_full_queue_answers_429() -> Result<()> {
    let (gguf, python) = (smollm2()?, openai_python()?);
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &gguf, &["--max-batch", "1", "--max-queue", "1"])?;
    run_client(&python, &server.url, "queue")?;
    Ok(())
}

#[test]
fn sigterm_during_a_stream_finishes_it_then_every_rank_exits_cleanly() -> Result<()> {
    let (gguf, python) = (smollm2()?, openai_python()?);
    let dir = tempfile::tempdir()?;
    // A grace far past the stream's length: on a loaded 2-core CI machine (other servers of
    // this file running beside it) 40 tokens took over 20 s once.
    let mut server = Server::start(dir.path(), &gguf, &["--grace", "150"])?;
    let mut c = client(&python, &server.url, "sigterm").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    assert_eq!(line.trim(), "streaming", "the client never began streaming");
    let st = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status()?;
    assert!(st.success());
    let served = wait_exit(server.procs.0.remove(0), Duration::from_secs(200))?.status;
    assert!(served.success(), "lemur-serve exited with {served} after SIGTERM");
    let worker = wait_exit(server.procs.0.remove(0), Duration::from_secs(30))?.status;
    assert!(worker.success(), "rank 1 exited with {worker}");
    let out = c.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("ok"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn a_rank_killed_mid_stream_is_planned_around_with_the_same_text_and_rejoins_when_restarted() -> Result<()> {
    let (gguf, python) = (smollm2()?, openai_python()?);
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path(), &gguf, &[])?;
    let mut c = client(&python, &server.url, "failover")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(c.stdout.take().context("stdout")?).lines();
    let mut next = || lines.next().transpose().map(|l| l.unwrap_or_default());
    if next()? != "streaming" {
        let out = c.wait_with_output()?;
        bail!("the client never began streaming: {}", String::from_utf8_lossy(&out.stderr));
    }
    server.procs.0[1].kill()?;
    let _ = server.procs.0[1].wait();
    if next()? != "restart" {
        let out = c.wait_with_output()?;
        bail!("the client's checks after the kill failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The same rank 1, long-running this time.
    let cluster = dir.path().join("cluster.toml");
    let worker = Command::new(worker_bin())
        .args(["--rank", "1", "--cluster"])
        .arg(&cluster)
        .env("LEMUR_CACHE", test_cache(&cluster))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    server.procs.0.push(worker);
    std::io::Write::write_all(c.stdin.as_mut().context("stdin")?, b"back\n")?;
    let last = next()?;
    let out = wait_exit(c, Duration::from_secs(200))?;
    assert!(
        out.status.success() && last == "ok",
        "the client failed after the restart ({last}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn bad_flags_and_files_are_refused_naming_them() -> Result<()> {
    let gguf = smollm2()?;
    let dir = tempfile::tempdir()?;
    let (plan, cluster) = smol_plan(dir.path(), &gguf)?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = format!("127.0.0.1:{}", taken.local_addr()?.port());
    let (c, p, g) = (cluster.to_str().context("path")?, plan.to_str().context("path")?, gguf.to_str().context("path")?);
    let cases: &[(&[&str], &[&str])] = &[
        (&["--cluster", "/nope.toml", "--model", g, "--plan", p], &["/nope.toml"]),
        (&["--cluster", c, "--model", "/nope", "--plan", p], &["--model", "/nope"]),
        (&["--cluster", c, "--model", g, "--plan", "/nope.json"], &["/nope.json"]),
        (&["--cluster", c, "--model", g], &["--plan"]),
        (&["--cluster", c, "--model", g, "--plan", p, "--decode-buckets", "1,4"], &["--decode-buckets", "--profiles"]),
        (
            &["--cluster", c, "--model", g, "--plan", p, "--prefill-buckets", "64"],
            &["--prefill-buckets", "--decode-buckets"],
        ),
        (&["--cluster", c, "--model", g, "--plan-set", p], &["--plan-set", "not a plan set"]),
        (&["--cluster", c, "--model", g, "--plan", p, "--dense-matmul", "sometimes"], &["--dense-matmul", "never"]),
        (&["--cluster", c, "--model", g, "--plan", p, "--max-batch", "0"], &["--max-batch", "at least 1"]),
        (&["--cluster", c, "--model", g, "--plan", p, "--http", &taken], &["--http", "in use"]),
    ];
    for (args, want) in cases {
        let child = Command::new(serve_bin()).args(*args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let out = wait_exit(child, Duration::from_secs(60)).with_context(|| format!("{args:?}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        for w in *want {
            assert!(err.contains(w), "{args:?}: `{err}` lacks `{w}`");
        }
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    Ok(())
}
