//! What every binary shares: how it logs and how it reports a failure.
//!
//! A binary's `main` is `lemur_protocol::cli::main(args.verbose, || run(args))`: logs go to stderr through
//! `tracing` (colour only on a terminal, level from `RUST_LOG`), and an error is printed as
//! `error: <message>` with one `caused by:` line per cause, then the process exits 1. No
//! backtrace unless asked for with `LEMUR_BACKTRACE=1` (or a binary's `-v`), whatever
//! `RUST_BACKTRACE` says: users who set it for their own programs should not get a stack
//! trace for a misspelt flag.

use std::error::Error;
use std::fmt::Debug;
use std::io::IsTerminal;
use std::process::ExitCode;

/// Whether the user asked for backtraces (`LEMUR_BACKTRACE` set to anything but 0).
pub fn backtrace_requested() -> bool {
    std::env::var_os("LEMUR_BACKTRACE").is_some_and(|v| v != "0" && !v.is_empty())
}

/// Logs to stderr at `RUST_LOG`'s level (default `warn`), with ANSI colour only when
/// stderr is a terminal (a log file gets plain text).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// `error: <message>`, then `  caused by: <cause>` for each cause, one per line.
pub fn report(err: &(dyn Error + 'static)) -> String {
    let mut out = format!("error: {err}\n");
    let mut last = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Errors that already include their cause's text (`{0}` wrappers) print it once.
        if !last.contains(&text) {
            out.push_str(&format!("  caused by: {text}\n"));
        }
        last = text;
        source = cause.source();
    }
    out
}

/// Runs a binary's body: logging set up, the error (if any) reported as [`report`] does,
/// exit code 1 on failure. With `verbose` (a binary's `-v`) or `LEMUR_BACKTRACE`, the
/// error's `Debug` form follows, which for `anyhow` includes the backtrace.
pub fn main<E>(verbose: bool, run: impl FnOnce() -> Result<(), E>) -> ExitCode
where
    E: AsRef<dyn Error + 'static> + Debug,
{
    init_logging();
    let verbose = verbose || backtrace_requested();
    if verbose {
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
    }
    if !verbose {
        // anyhow captures a backtrace at every error when RUST_BACKTRACE is set; we never
        // print it unasked, so don't pay for it either.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", report(e.as_ref()));
            if verbose {
                eprintln!("\n{e:?}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Flag parsers for clap's `value_parser`: each says what is allowed, and clap names the
/// flag (`invalid value 'nan' for '--gap <GAP>': must be a finite number in [0, 1]`).
pub mod parse {
    use std::str::FromStr;

    fn number(s: &str) -> Result<f64, String> {
        let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
        if v.is_finite() {
            Ok(v)
        } else {
            Err(format!("must be a finite number, not {s}"))
        }
    }

    fn within(s: &str, ok: impl Fn(f64) -> bool, what: &str) -> Result<f64, String> {
        let v = number(s).map_err(|e| format!("{e} ({what})"))?;
        if ok(v) {
            Ok(v)
        } else {
            Err(format!("must be {what}, not {s}"))
        }
    }

    /// A finite number > 0.
    pub fn positive(s: &str) -> Result<f64, String> {
        within(s, |v| v > 0.0, "a finite number above 0")
    }

    /// A finite number >= 0.
    pub fn non_negative(s: &str) -> Result<f64, String> {
        within(s, |v| v >= 0.0, "a finite number, 0 or more")
    }

    /// A number in [0, 1].
    pub fn fraction(s: &str) -> Result<f64, String> {
        within(s, |v| (0.0..=1.0).contains(&v), "a finite number in [0, 1]")
    }

    /// A number in [0, 1) (a dropout probability).
    pub fn below_one(s: &str) -> Result<f64, String> {
        within(s, |v| (0.0..1.0).contains(&v), "a finite number in [0, 1)")
    }

    /// A number in (0, 1] (nucleus sampling's mass).
    pub fn above_zero_to_one(s: &str) -> Result<f64, String> {
        within(s, |v| v > 0.0 && v <= 1.0, "a finite number in (0, 1]")
    }

    /// An integer of at least 1.
    pub fn at_least_one<T: FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
        let v: T = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number in range"))?;
        if v >= T::from(1) {
            Ok(v)
        } else {
            Err(format!("must be at least 1, not {s}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer problem")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner problem")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Transparent(#[source] Inner);

    #[test]
    fn flag_parsers_reject_what_they_say() {
        // (parser, input, accepted)
        type P = fn(&str) -> Result<f64, String>;
        let cases: [(P, &str, bool); 16] = [
            (parse::positive, "1.5", true),
            (parse::positive, "0", false),
            (parse::positive, "-1", false),
            (parse::positive, "nan", false),
            (parse::positive, "inf", false),
            (parse::positive, "x", false),
            (parse::non_negative, "0", true),
            (parse::non_negative, "-0.1", false),
            (parse::fraction, "1", true),
            (parse::fraction, "1.01", false),
            (parse::fraction, "NaN", false),
            (parse::below_one, "0.99", true),
            (parse::below_one, "1", false),
            (parse::above_zero_to_one, "1", true),
            (parse::above_zero_to_one, "0", false),
            (parse::above_zero_to_one, "-inf", false),
        ];
        for (p, input, ok) in cases {
            assert_eq!(p(input).is_ok(), ok, "{input}: {:?}", p(input));
        }
        assert_eq!(parse::at_least_one::<u64>("3"), Ok(3));
        assert!(parse::at_least_one::<u64>("0").unwrap_err().contains("at least 1"));
        assert!(parse::at_least_one::<usize>("-2").is_err());
        assert!(parse::at_least_one::<u32>("99999999999").is_err());
    }

    #[test]
    fn report_lists_each_cause_once() {
        assert_eq!(report(&Outer(Inner)), "error: outer problem\n  caused by: inner problem\n");
        // A message that already says its cause does not repeat it.
        assert_eq!(report(&Transparent(Inner)), "error: wrapped: inner problem\n");
    }
}
