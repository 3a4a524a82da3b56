//! `lemur-serve` under a fuzz run over raw TCP: truncated, mutated and mistyped JSON,
//! invalid UTF-8, absurd parameters, deep nesting, bodies past the limit, lying
//! Content-Lengths, wrong methods and paths, hundreds of idle connections and slow
//! senders. Every request must get a 4xx or a correct answer within its deadline, the
//! server's memory must stay bounded, and greedy requests before, during and after the
//! run must give the same text.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::*;

/// The same greedy request every time: its answer must never change.
const PROBE: &str = r#"{"model":"smol","prompt":"The capital of France is","max_tokens":4,"temperature":0}"#;
const CHAT: &str = r#"{"model":"smol","messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"temperature":0.7,"top_p":0.9,"stop":["."]}"#;

/// One request by hand; returns (status, body). Errs on a hang or a malformed response.
fn send(port: u16, method: &str, path: &str, headers: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let head = format!("{method} {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n{headers}\r\n");
    // The server may answer (413) and close before the whole body is sent: not an error.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    let _ = s.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    s.read_to_end(&mut out).with_context(|| format!("{method} {path}: no complete answer within 120 s"))?;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{method} {path}: not an HTTP answer: {:?}", &text[..text.len().min(200)]))?;
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |i| i + 4);
    Ok((status, out[at..].to_vec()))
}

fn post(port: u16, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let h = format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    send(port, "POST", path, &h, body)
}

/// The text of a non-streamed completion's first choice.
fn completion_text(body: &[u8]) -> Result<String> {
    let v: serde_json::Value = serde_json::from_slice(body).context("a 200 whose body is not JSON")?;
    v["choices"][0]["text"].as_str().map(str::to_string).with_context(|| format!("no choices[0].text in {v}"))
}

fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values of every wrong kind, for any field.
const WRONG: &[&str] = &[
    "null",
    "true",
    "-1",
    "0",
    "1e308",
    "-1e308",
    "18446744073709551616",
    "\"x\"",
    "\"\"",
    "[]",
    "{}",
    "[null]",
    "\"\\ud800\"",
    "99999999999",
    "0.5",
    "[[[[1]]]]",
    "{\"a\":{}}",
];
/// Fields with absurd values.
const ABSURD: &[(&str, &str)] = &[
    ("max_tokens", "1000000000"),
    ("max_tokens", "0"),
    ("max_tokens", "-5"),
    ("temperature", "-1"),
    ("temperature", "1e300"),
    ("top_p", "2"),
    ("top_p", "0"),
    ("top_k", "-3"),
    ("n", "1000"),
    ("seed", "-1"),
    ("stream", "\"yes\""),
    ("logprobs", "true"),
    ("frequency_penalty", "1e9"),
    ("model", "\"other\""),
    ("prompt", "[-1, 5]"),
    ("prompt", "[4294967296]"),
    ("prompt", "[]"),
    ("messages", "[]"),
    ("messages", "[{\"role\":\"wizard\",\"content\":\"x\"}]"),
    ("messages", "[{\"role\":\"user\"}]"),
    ("stop", "[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\"]"),
];

/// One fuzzed request body from a valid one.
fn mutate(rng: &mut Rng, base: &str) -> Vec<u8> {
    let b = base.as_bytes();
    match rng.below(7) {
        0 => b[..rng.below(b.len())].to_vec(),
        1 => {
            let mut v = b.to_vec();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8; // invalid UTF-8 and broken syntax alike
            }
            v
        }
        2 | 3 => {
            // A field's value replaced by a wrong type or an absurd value.
            let (field, value) = if rng.below(2) == 0 {
                let fields = ["model", "prompt", "max_tokens", "temperature", "messages", "stop", "top_p", "stream"];
                (fields[rng.below(fields.len())], WRONG[rng.below(WRONG.len())])
            } else {
                ABSURD[rng.below(ABSURD.len())]
            };
            let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(base).unwrap();
            v.remove(field);
            let mut text = serde_json::to_string(&v).unwrap();
            text.insert_str(1, &format!("\"{field}\":{value},"));
            text.into_bytes()
        }
        4 => format!("{}{}", "[".repeat(1 + rng.below(100_000)), "]".repeat(rng.below(10))).into_bytes(),
        5 => (0..rng.below(2000)).map(|_| rng.next() as u8).collect(),
        _ => {
            // A long prompt of token ids past the model's context (8192 positions): refused
            // before any compute.
            let ids: Vec<String> = (0..8200 + rng.below(16_000)).map(|i| (i % 1000).to_string()).collect();
            format!(r#"{{"model":"smol","prompt":[{}],"max_tokens":2}}"#, ids.join(",")).into_bytes()
        }
    }
}

#[test]
fn the_http_api_survives_a_fuzz_run_and_keeps_answering_right() -> Result<()> {
    let gguf = smollm2()?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &gguf, &["--max-batch", "4", "--max-queue", "64"])?;
    let port: u16 = server.url.rsplit(':').next().context("port")?.parse()?;
    let (status, body) = post(port, "/v1/completions", PROBE.as_bytes())?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let want = completion_text(&body)?;
    assert!(!want.is_empty());
    let rss_start = rss_kb(server.pid())?;

    // Idle connections and slow senders, held open through the whole run.
    let idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(("127.0.0.1", port))).collect::<Result<_, _>>()?;
    let slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo")?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let slow_since = Instant::now();

    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    let paths = ["/v1/completions", "/v1/chat/completions"];
    let mut slowest = Vec::new();
    for i in 0..300 {
        let path = paths[rng.below(2)];
        let base = if path.contains("chat") { CHAT } else { PROBE };
        let body = mutate(&mut rng, base);
        let t = Instant::now();
        let (status, answer) = post(port, path, &body).with_context(|| format!("request {i}"))?;
        slowest.push((t.elapsed(), i, status, String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned()));
        *by_status.entry(status).or_default() += 1;
        let shown = || {
            format!(
                "request {i} to {path}: {:?}\n-> {status} {}",
                String::from_utf8_lossy(&body[..body.len().min(300)]),
                String::from_utf8_lossy(&answer[..answer.len().min(300)])
            )
        };
        assert!((200..300).contains(&status) || (400..500).contains(&status), "{}", shown());
        if (400..500).contains(&status) {
            let v: serde_json::Value = serde_json::from_slice(&answer).with_context(shown)?;
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", shown());
        } else if !answer.starts_with(b"data:") {
            let v: serde_json::Value = serde_json::from_slice(&answer).with_context(shown)?;
            assert!(v["choices"].as_array().is_some_and(|c| !c.is_empty()), "{}", shown());
        }
        if i % 100 == 99 {
            let (s, b) = post(port, "/v1/completions", PROBE.as_bytes())?;
            assert_eq!((s, completion_text(&b)?), (200, want.clone()), "after {} fuzzed requests", i + 1);
        }
    }

    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    eprintln!("slowest fuzzed requests: {:?}", &slowest[..3]);

    // Bodies past the limit, declared or not, and lying lengths; methods and paths.
    let big = vec![b'x'; 6 << 20];
    let h = "Content-Type: application/json\r\nContent-Length: 10000000000\r\n";
    assert_eq!(send(port, "POST", "/v1/completions", h, &big)?.0, 413);
    let h = format!("Content-Type: application/json\r\nContent-Length: {}\r\n", big.len());
    assert_eq!(send(port, "POST", "/v1/chat/completions", &h, &big)?.0, 413);
    let h = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n";
    let mut chunked = Vec::new();
    for _ in 0..6 {
        chunked.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
        chunked.extend(std::iter::repeat_n(b' ', 1 << 20));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(send(port, "POST", "/v1/completions", h, &chunked)?.0, 413);
    let (s, _) = send(port, "POST", "/v1/completions", "Content-Length: 500\r\n", PROBE.as_bytes())?;
    assert!((400..500).contains(&s), "a body shorter than its Content-Length: {s}");
    let (s, _) = send(port, "POST", "/v1/completions", "Transfer-Encoding: chunked\r\n", b"zz\r\nab\r\n")?;
    assert!((400..500).contains(&s), "a malformed chunk: {s}");
    for (method, path) in [("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("POST", "/v2/x"), ("GET", "/%ff%00")]
    {
        let (s, _) = send(port, method, path, "Content-Length: 0\r\n", b"")?;
        assert!((400..500).contains(&s), "{method} {path}: {s}");
    }

    // Slow senders are answered 408 and closed by the server within its body timeout, not
    // held forever (each read ends in EOF, not in this side's timeout).
    // lemur-serve's body timeout (serve/src/api.rs, BODY_TIMEOUT) is 20 s.
    let limit = Duration::from_secs(20 + 15);
    for mut s in slow {
        s.set_read_timeout(Some(limit.saturating_sub(slow_since.elapsed()).max(Duration::from_secs(1))))?;
        let mut out = Vec::new();
        if let Err(e) = s.read_to_end(&mut out) {
            bail!("a slow sender was still held open {:?} after it started: {e}", slow_since.elapsed());
        }
        let text = String::from_utf8_lossy(&out);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "a slow sender got: {text}");
    }
    drop(idle);

    let (s, b) = post(port, "/v1/completions", PROBE.as_bytes())?;
    assert_eq!((s, completion_text(&b)?), (200, want), "after the run");
    let rss_end = rss_kb(server.pid())?;
    eprintln!("statuses {by_status:?}; resident memory {rss_start} kB -> {rss_end} kB");
    assert!(rss_end < rss_start + 150 * 1024, "resident memory grew from {rss_start} kB to {rss_end} kB");
    assert!(by_status.keys().any(|s| *s == 400) && by_status.keys().any(|s| *s == 200), "{by_status:?}");
    Ok(())
}
