//! The server's counters and histograms, written in Prometheus' text format for
//! `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use lemur_worker::runtime::{ClusterStatus, RankStatus};

/// A cumulative histogram over fixed upper bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self { bounds: bounds.to_vec(), counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

const SECONDS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const RATIOS: [f64; 10] = [0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0];

#[derive(Debug)]
struct Inner {
    /// By (endpoint, status code).
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Histogram,
    tpot: Histogram,
    ttft_ratio: Histogram,
    tpot_ratio: Histogram,
}

/// Everything `/metrics` reports besides the cluster's own status.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// The plan's predictions for a request alone: time to first token and per token, s.
    pub predicted_ttft: Option<f64>,
    pub predicted_tpot: Option<f64>,
}

/// A rank as `/health` and `/metrics` show it: `up` (in the placement), `standby` (up
/// but not in it), `lost` (with its reason), or `unknown` (the cluster is down).
pub fn rank_state(s: &ClusterStatus, r: &RankStatus) -> &'static str {
    if r.lost.is_some() {
        "lost"
    } else if s.down.is_some() {
        "unknown"
    } else if r.active {
        "up"
    } else {
        "standby"
    }
}

impl Metrics {
    pub fn new(predicted_ttft: Option<f64>, predicted_tpot: Option<f64>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                ttft: Histogram::new(&SECONDS),
                tpot: Histogram::new(&SECONDS),
                ttft_ratio: Histogram::new(&RATIOS),
                tpot_ratio: Histogram::new(&RATIOS),
            }),
            predicted_ttft,
            predicted_tpot,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request answered with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        *self.lock().requests.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// A finished generation: its tokens, time to first token and mean time per token.
    pub fn generation(&self, prompt: usize, completion: usize, ttft: Option<f64>, tpot: Option<f64>) {
        let mut m = self.lock();
        m.prompt_tokens += prompt as u64;
        m.completion_tokens += completion as u64;
        if let Some(t) = ttft {
            m.ttft.observe(t);
            if let Some(p) = self.predicted_ttft.filter(|p| *p > 0.0) {
                m.ttft_ratio.observe(t / p);
            }
        }
        if let Some(t) = tpot {
            m.tpot.observe(t);
            if let Some(p) = self.predicted_tpot.filter(|p| *p > 0.0) {
                m.tpot_ratio.observe(t / p);
            }
        }
    }

    /// The Prometheus text of everything, with the cluster's `status`.
    pub fn render(&self, status: Option<&ClusterStatus>) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(out, "# HELP lemur_requests_total HTTP requests answered, by endpoint and status.");
        let _ = writeln!(out, "# TYPE lemur_requests_total counter");
        for ((endpoint, code), n) in &m.requests {
            let _ = writeln!(out, "lemur_requests_total{{endpoint=\"{endpoint}\",status=\"{code}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(&mut out, "lemur_prompt_tokens_total", "Prompt tokens of finished generations.", m.prompt_tokens);
        counter(&mut out, "lemur_completion_tokens_total", "Tokens generated.", m.completion_tokens);
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        if let Some(s) = status {
            gauge(&mut out, "lemur_queue_depth", "Requests waiting for admission.", s.queue_depth as f64);
            gauge(&mut out, "lemur_running_requests", "Requests admitted (prefilling or decoding).", s.running as f64);
            gauge(&mut out, "lemur_batch_size", "Requests in the last step.", s.last_batch as f64);
            gauge(
                &mut out,
                "lemur_kv_positions_reserved",
                "KV positions reserved by running requests.",
                s.kv_positions_reserved as f64,
            );
            if let Some(k) = s.kv_positions {
                gauge(&mut out, "lemur_kv_positions", "KV positions the plan leaves room for.", k as f64);
            }
            counter(&mut out, "lemur_steps_total", "Batched steps run.", s.steps);
            gauge(&mut out, "lemur_busy_seconds", "Seconds with a step in flight.", s.busy_seconds);
            let up = s.ranks.iter().filter(|r| rank_state(s, r) == "up").count();
            gauge(&mut out, "lemur_ranks_up", "Ranks serving in the current placement.", up as f64);
            counter(
                &mut out,
                "lemur_replans_total",
                "Placements made after the first (a rank lost or back).",
                s.replans,
            );
            counter(&mut out, "lemur_replayed_total", "Requests replayed on a new placement.", s.replayed);
            gauge(
                &mut out,
                "lemur_replanning",
                "1 while a new placement is set up.",
                f64::from(u8::from(s.replanning)),
            );
            if let Some(p) = &s.placement {
                gauge(
                    &mut out,
                    "lemur_decode_placement",
                    "The plan set's decode bucket whose placement decodes now (0 = the first).",
                    p.decode_placement as f64,
                );
                counter(&mut out, "lemur_placement_switches_total", "Decode placement changes.", p.switches);
                counter(
                    &mut out,
                    "lemur_kv_moves_total",
                    "Layer KV caches moved between ranks for a step's placement.",
                    p.moves,
                );
            }
            let _ = writeln!(out, "# HELP lemur_rank_state Each rank's state (up, standby, lost, unknown).\n# TYPE lemur_rank_state gauge");
            for r in &s.ranks {
                let _ = writeln!(out, "lemur_rank_state{{rank=\"{}\",state=\"{}\"}} 1", r.rank, rank_state(s, r));
            }
            let _ = writeln!(out, "# HELP lemur_rank_peak_rss_bytes Peak resident memory by rank.\n# TYPE lemur_rank_peak_rss_bytes gauge");
            for r in &s.ranks {
                let _ = writeln!(out, "lemur_rank_peak_rss_bytes{{rank=\"{}\"}} {}", r.rank, r.peak_rss_bytes);
            }
        }
        if let Some(p) = self.predicted_ttft {
            gauge(&mut out, "lemur_predicted_ttft_seconds", "The plan's time to first token.", p);
        }
        if let Some(p) = self.predicted_tpot {
            gauge(&mut out, "lemur_predicted_tpot_seconds", "The plan's time per output token.", p);
        }
        m.ttft.write(&mut out, "lemur_time_to_first_token_seconds", "Time from arrival to the first token.");
        m.tpot.write(
            &mut out,
            "lemur_time_per_output_token_seconds",
            "Mean time per token after the first, per request.",
        );
        m.ttft_ratio.write(
            &mut out,
            "lemur_ttft_over_predicted",
            "Measured over predicted time to first token, per request.",
        );
        m.tpot_ratio.write(
            &mut out,
            "lemur_tpot_over_predicted",
            "Measured over predicted time per token, per request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_render_as_prometheus_text() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.7, 9.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.write(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"2\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\nx_sum 12.7\nx_count 4"), "{s}");
        let m = Metrics::new(Some(0.1), None);
        m.request("chat", 200);
        m.request("chat", 200);
        m.generation(5, 7, Some(0.2), Some(0.01));
        let text = m.render(None);
        assert!(text.contains("lemur_requests_total{endpoint=\"chat\",status=\"200\"} 2"), "{text}");
        assert!(text.contains("lemur_completion_tokens_total 7"), "{text}");
        // 0.2 s against 0.1 s predicted: ratio 2, in the bucket le=2 and not le=1.5.
        assert!(text.contains("lemur_ttft_over_predicted_bucket{le=\"2\"} 1"), "{text}");
        assert!(text.contains("lemur_ttft_over_predicted_bucket{le=\"1.5\"} 0"), "{text}");
    }
}
