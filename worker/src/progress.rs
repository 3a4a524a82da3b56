//! Progress bars for long work (loading, hashing and streaming weights), on stderr; hidden
//! when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn bar(len: u64, msg: &str, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.set_message(msg.to_string());
    bar
}

/// A bar counting ops.
pub fn ops_bar(len: u64, msg: &str) -> ProgressBar {
    bar(len, msg, "{msg} [{bar:30}] {pos}/{len} ops")
}

/// A bar counting bytes.
pub fn bytes_bar(len: u64, msg: &str) -> ProgressBar {
    bar(len, msg, "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
}
