//! `lemur-serve`: rank 0 of a Lemurian cluster behind an OpenAI-compatible HTTP API.
//!
//! A tour:
//! - The runtime does the work: [`lemur_worker::runtime::serve_node`] connects the ranks,
//!   loads the weights once and runs the continuous-batching scheduler
//!   ([`lemur_worker::batch`]); this crate holds its [`Engine`] handle.
//! - [`api`]: the routes (chat and completions, whole or streamed, models, health,
//!   metrics) on actix-web, in the same actor system as the runtime; the JSON types are
//!   [`lemur_protocol::openai`]'s.
//! - [`text`]: tokens to text as a client sees it (whole characters, stop sequences).
//! - [`metrics`]: counters and histograms in Prometheus' text format.
//!
//! SIGINT or SIGTERM drains: admissions stop (503), running requests finish within the
//! grace period and the rest are cancelled, the HTTP server closes, every rank is told to
//! exit, and [`serve`] returns.

pub mod api;
pub mod metrics;
pub mod text;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use lemur_worker::runtime::{serve_node, Engine, NodeConfig};
use lemur_worker::tokenizer::Tok;
use lemur_worker::WorkerError;

use crate::api::AppState;
use crate::metrics::Metrics;

/// Everything the HTTP side needs besides the runtime.
#[derive(Debug)]
pub struct Front {
    /// Bound before the weights load, so that a taken port fails at once.
    pub listener: TcpListener,
    pub tok: Arc<Tok>,
    /// The model's id in requests.
    pub model: String,
    /// Ids a prompt may use (the model's vocabulary).
    pub vocab: usize,
    /// `max_tokens` when a request gives none: (completions, chat).
    pub default_max_tokens: (u64, u64),
    /// The plan's predicted time to first token and per token, seconds.
    pub predicted: (Option<f64>, Option<f64>),
    /// Each rank's machine, by rank.
    pub machines: Vec<String>,
    /// How long running requests may take to finish on shutdown.
    pub grace: Duration,
    /// HTTP worker threads.
    pub http_workers: usize,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Runtime(#[from] WorkerError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Runs the server until a signal (or [`Engine::stop`]) ends it.
pub fn serve(cfg: NodeConfig, front: Front) -> Result<(), ServeError> {
    let failed: Arc<std::sync::Mutex<Option<std::io::Error>>> = Arc::default();
    let failed2 = failed.clone();
    serve_node(cfg, move |engine| {
        if let Err(e) = start_http(engine.clone(), front) {
            tracing::error!("the HTTP server failed to start: {e}");
            *failed2.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            engine.stop();
        }
    })?;
    let e = failed.lock().unwrap_or_else(|p| p.into_inner()).take();
    e.map_or(Ok(()), |e| Err(ServeError::Http(e)))
}

fn start_http(engine: Engine, front: Front) -> std::io::Result<()> {
    let addr = front.listener.local_addr()?;
    let state = web::Data::new(AppState {
        engine: engine.clone(),
        stop_tokens: front.tok.stop_tokens(),
        tok: front.tok,
        model: front.model,
        created: api::now_s(),
        vocab: front.vocab,
        default_max_tokens: front.default_max_tokens,
        metrics: Arc::new(Metrics::new(front.predicted.0, front.predicted.1)),
        machines: front.machines,
    });
    let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(api::routes))
        .workers(front.http_workers.max(1))
        .disable_signals()
        .shutdown_timeout(front.grace.as_secs().max(1))
        .listen(front.listener)?
        .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    tracing::info!("serving on http://{addr}");
    eprintln!("lemur-serve: listening on http://{addr}");
    let grace = front.grace;
    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        eprintln!("lemur-serve: shutting down (finishing running requests for up to {} s)", grace.as_secs());
        engine.drain(grace).await;
        handle.stop(true).await;
        engine.stop();
    });
    Ok(())
}

/// SIGINT or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
