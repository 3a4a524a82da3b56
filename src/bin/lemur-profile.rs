//! `lemur-profile`: measure a machine (or a link) with the workers' own kernels and
//! transport, and fold measured run times back into a profile (thin over the libraries).

/// candle allocates every op's output; mimalloc reuses freed memory instead of returning it
/// to the OS and faulting it back in, which made element-wise ops several times slower
/// (and `alloc::keep_freed_memory` turns its delayed purging off).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lemurian::planner::profiles::parse_machine;
use lemurian::planner::refine::refine;
use lemurian::protocol::cli::parse;
use lemurian::protocol::timings::Timings;
use lemurian::protocol::MachineProfile;
use lemurian::worker::profiler::{measure, tasks, ProfileOptions};

/// Measure what a machine can do, with the kernels the workers run, into a profile.
///
/// Without a subcommand: measures the device (GEMM and attention curves per dtype, read and
/// copy bandwidth, element-wise throughput, dispatch overhead, memory, and the quantized
/// kernels' matrix-vector, GEMM and dequantize rates per block format) and writes a
/// profile in the schema of `profiles/`. `link` measures a link; `refine` folds a timed
/// run's measurements back into a profile.
#[derive(Debug, Parser)]
#[command(name = "lemur-profile", version, about, long_about, allow_negative_numbers = true)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// cpu, cuda (cuda:N) or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The profile's machine name.
    #[arg(long, default_value = "my-machine")]
    name: String,
    /// Where to write the profile (TOML); stdout if absent.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fewer sizes, shorter timing: under a minute on a small CPU.
    #[arg(long)]
    quick: bool,
    /// Dtypes of the GEMM and attention curves (default: f32 on CPU, f16,bf16,f32 on GPUs).
    #[arg(long, value_delimiter = ',')]
    dtype: Vec<String>,
    /// Block formats whose quantized linear-op rates to measure (`q4_0,q8_0,q4_k`), or
    /// `none`. Default: every format the workers run (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k ..
    /// q6_k).
    #[arg(long, value_delimiter = ',')]
    quantized: Vec<String>,
    /// Memory in GB, for devices that do not report theirs.
    #[arg(long, value_parser = parse::positive)]
    memory_gb: Option<f64>,
    /// The device's theoretical peak TFLOP/s (spec sheet), to report achieved against it.
    #[arg(long, value_parser = parse::positive)]
    peak_tflops: Option<f64>,
    /// The device's theoretical memory bandwidth GB/s (spec sheet).
    #[arg(long, value_parser = parse::positive)]
    peak_gbps: Option<f64>,
    /// On failure, also print the error's backtrace (as LEMUR_BACKTRACE=1 does).
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Measure bandwidth and latency to another process running `link --listen`.
    Link {
        /// Listen here and serve one probe.
        #[arg(long, conflicts_with = "peer")]
        listen: Option<String>,
        /// Probe the process listening here.
        #[arg(long)]
        peer: Option<String>,
        /// This machine's name (the link joins it to the peer's).
        #[arg(long, default_value = "my-machine")]
        name: String,
        /// Where to write the link (TOML, `links.toml` format); stdout if absent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The cluster key (`lemur-worker keygen`): both ends must give the same one.
        #[arg(long, env = "LEMUR_KEY_FILE")]
        key_file: Option<PathBuf>,
    },
    /// Fold measured op times (`lemur-worker --timings`) into a profile.
    Refine {
        /// The profile to refine.
        #[arg(long)]
        profile: PathBuf,
        /// Timings files (repeat for several runs; several prompt lengths generalise better).
        #[arg(long = "from", required = true)]
        from: Vec<PathBuf>,
        /// Where to write the refined profile; stdout if absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn write_out(out: &Option<PathBuf>, text: &str) -> Result<()> {
    match out {
        Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn profile_toml(p: &MachineProfile, header: &str) -> Result<String> {
    Ok(format!("{header}{}", toml::to_string_pretty(p)?))
}

fn main() -> ExitCode {
    lemurian::worker::alloc::keep_freed_memory();
    let args = Args::parse();
    lemurian::protocol::cli::main(args.verbose, || run(args))
}

fn run(args: Args) -> Result<()> {
    match args.cmd {
        Some(Cmd::Link { listen, peer, name, out, key_file }) => {
            let key = key_file.as_deref().map(lemurian::protocol::auth::ClusterKey::load).transpose()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match (listen, peer) {
                (Some(addr), None) => {
                    eprintln!("listening on {addr} for one probe");
                    rt.block_on(lemurian::worker::link::serve(&addr, &name, key.as_ref()))?;
                }
                (None, Some(addr)) => {
                    let link = rt.block_on(lemurian::worker::link::probe(&addr, &name, key.as_ref(), 500, 64))?;
                    eprintln!(
                        "{} <-> {}: {:.2} GB/s, {:.1} us one way",
                        link.between[0], link.between[1], link.bandwidth_gbps, link.latency_us
                    );
                    #[derive(serde::Serialize)]
                    struct LinksFile<'a> {
                        link: [&'a lemurian::protocol::LinkProfile; 1],
                    }
                    let text = format!(
                        "# Measured by lemur-profile link: 500 round trips of a small frame (latency is half the\n# median), then 64 frames of 4 MiB (bandwidth).\n{}",
                        toml::to_string_pretty(&LinksFile { link: [&link] })?
                    );
                    write_out(&out, &text)?;
                }
                _ => bail!("link needs --listen ADDR or --peer ADDR"),
            }
        }
        Some(Cmd::Refine { profile, from, out }) => {
            let text = std::fs::read_to_string(&profile).with_context(|| format!("reading {}", profile.display()))?;
            let prof = parse_machine(&profile, &text)?;
            let mut runs = Vec::new();
            for f in &from {
                let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
                let t: Timings =
                    serde_json::from_str(&text).with_context(|| format!("{}: not a timings file", f.display()))?;
                t.plan.validate().with_context(|| format!("{}: its plan", f.display()))?;
                runs.push(t);
            }
            let (refined, report) = refine(&prof, &runs)?;
            for line in &report.lines {
                eprintln!("{line}");
            }
            let header = format!(
                "# {}: refined by lemur-profile refine from {} ({} observations).\n",
                refined.name,
                from.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
                report.observations.values().sum::<usize>()
            );
            write_out(&out, &profile_toml(&refined, &header)?)?;
        }
        None => {
            let device = lemurian::worker::device::open(&args.device)?;
            let dtypes = if args.dtype.is_empty() {
                if device.is_cpu() {
                    vec!["f32".to_string()]
                } else {
                    vec!["f16".into(), "bf16".into(), "f32".into()]
                }
            } else {
                args.dtype.clone()
            };
            let dtypes =
                dtypes.iter().map(|d| lemurian::worker::weights::parse_dtype(d)).collect::<Result<Vec<_>, _>>()?;
            let quantized = match args.quantized.as_slice() {
                [] => lemurian::worker::weights::block_formats().collect(),
                [none] if none == "none" => vec![],
                names => names
                    .iter()
                    .map(|n| lemurian::worker::weights::parse_block_format(n).map_err(anyhow::Error::msg))
                    .collect::<Result<Vec<_>>>()
                    .context("--quantized")?,
            };
            let opts = ProfileOptions {
                name: args.name.clone(),
                quick: args.quick,
                dtypes,
                memory_bytes: args.memory_gb.map(|g| (g * 1e9) as u64),
                quantized,
            };
            let list = tasks(&device, &opts);
            let estimate: f64 = list.iter().map(|t| t.estimate_s(opts.quick, device.is_cpu())).sum();
            eprintln!(
                "measuring {} on {}: {} measurements, about {:.0} s",
                args.name,
                args.device,
                list.len(),
                estimate
            );
            let bar = indicatif::ProgressBar::new(list.len() as u64);
            bar.set_style(indicatif::ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")?);
            let t0 = Instant::now();
            let mut profile = measure(&device, &opts, |done, _, what| {
                bar.set_position(done as u64);
                bar.set_message(what.to_string());
            })?;
            bar.finish_and_clear();
            if let (Some(t), Some(g)) = (args.peak_tflops, args.peak_gbps) {
                // Spec sheets quote the fastest dtype: the profile's fastest curve.
                let peak_dtype = profile
                    .gemm
                    .iter()
                    .max_by(|a, b| a.1.peak().total_cmp(&b.1.peak()))
                    .map(|(d, _)| *d)
                    .unwrap_or(lemurian::protocol::DType::F32);
                profile.peak = Some(lemurian::protocol::Peak {
                    tflops: [(peak_dtype, t)].into_iter().collect(),
                    bandwidth_gbps: g,
                });
            }
            let best: f64 = profile.gemm.values().map(|c| c.peak()).fold(0.0, f64::max);
            eprintln!(
                "measured in {:.1} s: GEMM up to {best:.3} TFLOP/s, read {:.1} GB/s, copy {:.1} GB/s, dispatch {:.1} us",
                t0.elapsed().as_secs_f64(),
                profile.bandwidth.read_gbps,
                profile.bandwidth.copy_gbps,
                profile.dispatch_overhead_us
            );
            if let Some(peak) = &profile.peak {
                let t = peak.tflops.values().next().copied().unwrap_or(1.0);
                eprintln!(
                    "against the spec sheet: GEMM {:.1}% of {t} TFLOP/s, read bandwidth {:.1}% of {} GB/s",
                    best / t * 100.0,
                    profile.bandwidth.read_gbps / peak.bandwidth_gbps * 100.0,
                    peak.bandwidth_gbps
                );
            }
            let header = format!(
                "# {}: measured by lemur-profile{} on {} with candle's kernels (the workers' own).\n# GEMM: square N x N times a transposed N x N weight; attention: the workers' attention, 8 heads\n# of 64 over 4 KV heads, causal; element-wise rates are GB/s of minimal traffic; quantized:\n# gemv_gbps is stored weight bytes per second, gemm TFLOP/s at N = cbrt(rows x out x in).\n",
                args.name,
                if args.quick { " --quick" } else { "" },
                args.device
            );
            write_out(&args.out, &profile_toml(&profile, &header)?)?;
        }
    }
    Ok(())
}
