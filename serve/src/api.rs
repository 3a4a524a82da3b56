//! The HTTP routes: OpenAI's chat and completion endpoints (whole or streamed as
//! server-sent events), `/v1/models`, `/health` and `/metrics`, over the runtime's
//! [`Engine`]. Every error is OpenAI's error body with the status a client expects.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use bytes::Bytes;
use futures::StreamExt;
use lemur_protocol::openai::{self, BadField, Checked, ErrorBody};
use lemur_worker::batch::{Event, Refusal, Request};
use lemur_worker::runtime::{Engine, SubmitError};
use lemur_worker::sampling::Sampling;
use lemur_worker::tokenizer::Tok;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::metrics::Metrics;
use crate::text::TextStream;

/// The largest request body read.
pub const MAX_BODY: usize = 4 << 20;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub engine: Engine,
    pub tok: Arc<Tok>,
    /// The model's id in requests and `/v1/models`.
    pub model: String,
    pub created: u64,
    /// Ids a prompt may use.
    pub vocab: usize,
    pub stop_tokens: Vec<u32>,
    /// `max_tokens` when a request gives none: (completions, chat).
    pub default_max_tokens: (u64, u64),
    pub metrics: Arc<Metrics>,
    /// Each rank's machine, by rank.
    pub machines: Vec<String>,
}

/// An error as OpenAI sends it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn bad(param: Option<&str>, message: impl Into<String>, code: Option<&str>) -> Self {
        let param = param.filter(|p| !p.is_empty());
        Self { status: StatusCode::BAD_REQUEST, body: ErrorBody::new("invalid_request_error", message, param, code) }
    }

    fn field(e: BadField) -> Self {
        Self::bad(Some(&e.param), e.message, None)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        let body = ErrorBody::new("server_error", message, None, Some("service_unavailable"));
        Self { status: StatusCode::SERVICE_UNAVAILABLE, body }
    }

    fn response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(&self.body)
    }
}

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The routes, for `App::configure`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/chat/completions").route(web::post().to(chat)).default_service(web::to(not_allowed)),
    )
    .service(web::resource("/v1/completions").route(web::post().to(completions)).default_service(web::to(not_allowed)))
    .service(web::resource("/v1/models").route(web::get().to(models)))
    .service(web::resource("/health").route(web::get().to(health)))
    .service(web::resource("/metrics").route(web::get().to(metrics)))
    .default_service(web::to(not_found));
}

async fn not_found(req: actix_web::HttpRequest) -> HttpResponse {
    let body = ErrorBody::new(
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.path()),
        None,
        Some("not_found"),
    );
    HttpResponse::NotFound().json(body)
}

async fn not_allowed(req: actix_web::HttpRequest) -> HttpResponse {
    let body =
        ErrorBody::new("invalid_request_error", format!("{} takes POST, not {}", req.path(), req.method()), None, None);
    HttpResponse::MethodNotAllowed().json(body)
}

/// Reads the body up to [`MAX_BODY`].
/// A body must arrive whole within this (a slow sender holds a connection, never a worker).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

async fn read_body(payload: web::Payload) -> Result<Vec<u8>, ApiError> {
    actix_web::rt::time::timeout(BODY_TIMEOUT, read_whole_body(payload)).await.unwrap_or_else(|_| {
        let msg = format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs());
        Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            body: ErrorBody::new("invalid_request_error", msg, None, Some("body_timeout")),
        })
    })
}

async fn read_whole_body(mut payload: web::Payload) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad(None, format!("reading the body: {e}"), None))?;
        if body.len() + chunk.len() > MAX_BODY {
            let body = ErrorBody::new(
                "invalid_request_error",
                format!("the body exceeds {MAX_BODY} bytes"),
                None,
                Some("body_too_large"),
            );
            return Err(ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, body });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model != state.model {
        return Err(ApiError::bad(
            Some("model"),
            format!("unknown model `{model}`: this server serves `{}`", state.model),
            Some("model_not_found"),
        ));
    }
    Ok(())
}

async fn chat(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let arrived = Instant::now();
    let r = async {
        let req: openai::ChatRequest = openai::parse(&read_body(payload).await?).map_err(ApiError::field)?;
        check_model(&state, &req.model)?;
        let checked = req.sampling.check(state.default_max_tokens.1).map_err(ApiError::field)?;
        let turns = req.turns().map_err(ApiError::field)?;
        let text = state.tok.chat_messages(&turns).map_err(|e| ApiError::bad(Some("messages"), e.to_string(), None))?;
        let prompt = state.tok.encode(&text).map_err(|e| ApiError::bad(Some("messages"), e.to_string(), None))?;
        start(&state, prompt, checked, Kind::Chat, "messages", arrived).await
    }
    .await;
    respond(&state, "chat", r)
}

async fn completions(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let arrived = Instant::now();
    let r = async {
        let req: openai::CompletionRequest = openai::parse(&read_body(payload).await?).map_err(ApiError::field)?;
        check_model(&state, &req.model)?;
        let checked = req.sampling.check(state.default_max_tokens.0).map_err(ApiError::field)?;
        let prompt = match req.prompt {
            openai::Prompt::Text(t) => state.tok.encode(&t),
            openai::Prompt::Texts(v) if v.len() == 1 => state.tok.encode(&v[0]),
            openai::Prompt::Texts(v) => {
                return Err(ApiError::bad(Some("prompt"), format!("one prompt per request, not {}", v.len()), None))
            }
            openai::Prompt::Ids(ids) => {
                if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= state.vocab) {
                    return Err(ApiError::bad(
                        Some(&format!("prompt[{i}]")),
                        format!("token id {id} is outside the vocabulary of {}", state.vocab),
                        None,
                    ));
                }
                Ok(ids)
            }
        }
        .map_err(|e| ApiError::bad(Some("prompt"), e.to_string(), None))?;
        start(&state, prompt, checked, Kind::Completion, "prompt", arrived).await
    }
    .await;
    respond(&state, "completions", r)
}

fn respond(state: &AppState, endpoint: &str, r: Result<HttpResponse, ApiError>) -> HttpResponse {
    let resp = r.unwrap_or_else(|e| e.response());
    state.metrics.request(endpoint, resp.status().as_u16());
    resp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Cancels its request when dropped before the request ended (a client that went away).
struct Guard {
    engine: Engine,
    id: u64,
    ended: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.ended {
            self.engine.cancel(self.id);
        }
    }
}

/// One request in flight: its events, its text so far, its timing.
struct Generation {
    state: web::Data<AppState>,
    rx: UnboundedReceiver<Event>,
    guard: Guard,
    text: TextStream,
    kind: Kind,
    id: String,
    include_usage: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    arrived: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    finish: Option<String>,
    stage: Stage,
}

/// Where a stream is: the role chunk (chat), content, the finishing chunk, the usage
/// chunk (if asked), `[DONE]`, over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Role,
    Content,
    Finish,
    Usage,
    Done,
    End,
}

async fn start(
    state: &web::Data<AppState>,
    prompt: Vec<u32>,
    c: Checked,
    kind: Kind,
    prompt_field: &str,
    arrived: Instant,
) -> Result<HttpResponse, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad(Some(prompt_field), "the prompt encodes to no tokens", None));
    }
    let id = state.engine.next_id();
    let seed = c.seed.unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(id, |d| d.as_nanos() as u64) ^ id.rotate_left(32)
    });
    let prompt_tokens = prompt.len();
    let req = Request {
        id,
        prompt,
        max_new_tokens: c.max_tokens.min(usize::MAX as u64) as usize,
        stop_tokens: if c.ignore_eos { Vec::new() } else { state.stop_tokens.clone() },
        sampling: Sampling { temperature: c.temperature, top_k: 0, top_p: c.top_p, seed },
        keep_logits: false,
    };
    let rx = state.engine.submit(req).await.map_err(|e| match e {
        SubmitError::Refused(r @ Refusal::QueueFull(_)) => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            body: ErrorBody::new("rate_limit_error", r.to_string(), None, Some("queue_full")),
        },
        SubmitError::Refused(r @ (Refusal::TooLong { .. } | Refusal::TooBig { .. })) => {
            ApiError::bad(Some(prompt_field), r.to_string(), Some("context_length_exceeded"))
        }
        SubmitError::Refused(r @ Refusal::EmptyPrompt) => ApiError::bad(Some(prompt_field), r.to_string(), None),
        SubmitError::Refused(r @ Refusal::Draining) => ApiError::unavailable(r.to_string()),
        SubmitError::Refused(r @ Refusal::Duplicate(_)) => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: ErrorBody::new("server_error", r.to_string(), None, None),
        },
        SubmitError::Unavailable(m) => ApiError::unavailable(format!("no cluster: {m}")),
    })?;
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let mut g = Generation {
        state: state.clone(),
        rx,
        guard: Guard { engine: state.engine.clone(), id, ended: false },
        text: TextStream::new(c.stop),
        kind,
        id: format!("{prefix}-{id}"),
        include_usage: c.include_usage,
        prompt_tokens,
        completion_tokens: 0,
        arrived,
        first: None,
        last: None,
        finish: None,
        stage: Stage::Role,
    };
    if c.stream {
        let body = futures::stream::unfold(g, |mut g| async move {
            let chunk = g.next_chunk().await?;
            Some((Ok::<_, actix_web::Error>(chunk), g))
        });
        return Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .streaming(body));
    }
    let mut text = String::new();
    while g.finish.is_none() {
        text.push_str(&g.next_text().await?);
    }
    let finish = g.finish.clone().unwrap_or_default();
    let usage = openai::Usage::new(g.prompt_tokens, g.completion_tokens);
    let (created, model) = (now_s(), state.model.clone());
    Ok(match kind {
        Kind::Chat => HttpResponse::Ok().json(openai::ChatCompletion {
            id: g.id.clone(),
            object: "chat.completion".into(),
            created,
            model,
            choices: vec![openai::ChatChoice {
                index: 0,
                message: openai::AssistantMessage { role: "assistant".into(), content: text },
                finish_reason: finish,
                logprobs: None,
            }],
            usage,
        }),
        Kind::Completion => HttpResponse::Ok().json(openai::Completion {
            id: g.id.clone(),
            object: "text_completion".into(),
            created,
            model,
            choices: vec![openai::CompletionChoice { index: 0, text, finish_reason: Some(finish), logprobs: None }],
            usage: Some(usage),
        }),
    })
}

impl Generation {
    /// The next piece of text; sets `finish` when the request has ended.
    async fn next_text(&mut self) -> Result<String, ApiError> {
        loop {
            let Some(event) = self.rx.recv().await else {
                self.end("failed");
                return Err(ApiError::unavailable("the runtime stopped"));
            };
            match event {
                Event::Token { token, .. } => {
                    let now = Instant::now();
                    self.first.get_or_insert(now);
                    self.last = Some(now);
                    self.completion_tokens += 1;
                    if self.state.stop_tokens.contains(&token) {
                        continue;
                    }
                    let piece = self.text.push(&self.state.tok, token).unwrap_or_default();
                    if piece.stopped {
                        // A stop sequence: the answer ends here; the cluster stops at its next step.
                        self.state.engine.cancel(self.guard.id);
                        self.end("stop");
                    }
                    if !piece.text.is_empty() || piece.stopped {
                        return Ok(piece.text);
                    }
                }
                Event::Done { reason, .. } => {
                    use lemur_worker::batch::FinishReason as F;
                    let tail = self.text.finish(&self.state.tok).unwrap_or_default();
                    match reason {
                        F::Stop => self.end("stop"),
                        F::Length => self.end("length"),
                        F::Cancelled => self.end("cancelled"),
                        F::Failed => {
                            self.end("failed");
                            return Err(ApiError::unavailable("the cluster failed during the request"));
                        }
                    }
                    return Ok(tail);
                }
            }
        }
    }

    fn end(&mut self, reason: &str) {
        if self.finish.is_some() {
            return;
        }
        self.finish = Some(reason.to_string());
        self.guard.ended = true;
        let tpot = match (self.first, self.last) {
            (Some(f), Some(l)) if self.completion_tokens > 1 => {
                Some((l - f).as_secs_f64() / (self.completion_tokens - 1) as f64)
            }
            _ => None,
        };
        let ttft = self.first.map(|f| (f - self.arrived).as_secs_f64());
        self.state.metrics.generation(self.prompt_tokens, self.completion_tokens, ttft, tpot);
    }

    /// The next server-sent event of a stream; `None` after `[DONE]`.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            match self.stage {
                Stage::Role => {
                    self.stage = Stage::Content;
                    if self.kind == Kind::Chat {
                        let delta = openai::Delta { role: Some("assistant".into()), content: Some(String::new()) };
                        return Some(self.chat_chunk(delta, None));
                    }
                }
                Stage::Content => {
                    if self.finish.is_some() {
                        self.stage = Stage::Finish;
                        continue;
                    }
                    match self.next_text().await {
                        Ok(piece) if piece.is_empty() => {}
                        Ok(piece) => {
                            return Some(match self.kind {
                                Kind::Chat => self.chat_chunk(openai::Delta { role: None, content: Some(piece) }, None),
                                Kind::Completion => self.completion_chunk(Some(piece), None, None),
                            })
                        }
                        Err(e) => {
                            self.stage = Stage::Done;
                            return Some(self.event(&e.body));
                        }
                    }
                }
                Stage::Finish => {
                    self.stage = if self.include_usage { Stage::Usage } else { Stage::Done };
                    let reason = self.finish.clone();
                    return Some(match self.kind {
                        Kind::Chat => self.chat_chunk(openai::Delta::default(), reason),
                        Kind::Completion => self.completion_chunk(Some(String::new()), reason, None),
                    });
                }
                Stage::Usage => {
                    // stream_options.include_usage: a last chunk with no choices.
                    self.stage = Stage::Done;
                    let usage = Some(openai::Usage::new(self.prompt_tokens, self.completion_tokens));
                    return Some(match self.kind {
                        Kind::Chat => self.event(&openai::ChatChunk {
                            id: self.id.clone(),
                            object: "chat.completion.chunk".into(),
                            created: now_s(),
                            model: self.state.model.clone(),
                            choices: vec![],
                            usage,
                        }),
                        Kind::Completion => self.completion_chunk(None, None, usage),
                    });
                }
                Stage::Done => {
                    self.stage = Stage::End;
                    return Some(Bytes::from_static(b"data: [DONE]\n\n"));
                }
                Stage::End => return None,
            }
        }
    }

    fn event<T: Serialize>(&self, v: &T) -> Bytes {
        Bytes::from(format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default()))
    }

    fn chat_chunk(&self, delta: openai::Delta, finish: Option<String>) -> Bytes {
        self.event(&openai::ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: now_s(),
            model: self.state.model.clone(),
            choices: vec![openai::ChunkChoice { index: 0, delta, finish_reason: finish, logprobs: None }],
            usage: None,
        })
    }

    /// A completion chunk: `text` (none: the usage chunk, with no choices).
    fn completion_chunk(&self, text: Option<String>, finish: Option<String>, usage: Option<openai::Usage>) -> Bytes {
        let choices = match text {
            None => vec![],
            Some(text) => vec![openai::CompletionChoice { index: 0, text, finish_reason: finish, logprobs: None }],
        };
        self.event(&openai::Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: now_s(),
            model: self.state.model.clone(),
            choices,
            usage,
        })
    }
}

async fn models(state: web::Data<AppState>) -> HttpResponse {
    state.metrics.request("models", 200);
    HttpResponse::Ok().json(openai::ModelList {
        object: "list".into(),
        data: vec![openai::ModelCard {
            id: state.model.clone(),
            object: "model".into(),
            created: state.created,
            owned_by: "lemurian".into(),
        }],
    })
}

#[derive(Serialize)]
struct RankHealth {
    rank: u32,
    machine: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    peak_rss_bytes: u64,
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    model: String,
    ranks: Vec<RankHealth>,
    queue_depth: usize,
    running: usize,
    kv_positions_reserved: usize,
    kv_positions: Option<usize>,
    replans: u64,
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let s = match state.engine.status().await {
        Ok(s) => s,
        Err(e) => return ApiError::unavailable(e.to_string()).response(),
    };
    // Serving with a rank lost, or while a new placement is set up, is degraded but up:
    // requests are taken (they queue during the set-up).
    let status = if s.down.is_some() {
        "down"
    } else if s.draining {
        "draining"
    } else if s.replanning {
        "replanning"
    } else if s.ranks.iter().any(|r| r.lost.is_some()) {
        "degraded"
    } else {
        "ok"
    };
    let ranks = s
        .ranks
        .iter()
        .map(|r| RankHealth {
            rank: r.rank,
            machine: state.machines.get(r.rank as usize).cloned().unwrap_or_default(),
            state: crate::metrics::rank_state(&s, r),
            reason: r.lost.clone(),
            peak_rss_bytes: r.peak_rss_bytes,
        })
        .collect();
    let body = Health {
        status,
        reason: s.down.clone(),
        model: state.model.clone(),
        ranks,
        queue_depth: s.queue_depth,
        running: s.running,
        kv_positions_reserved: s.kv_positions_reserved,
        kv_positions: s.kv_positions,
        replans: s.replans,
    };
    let code = if matches!(status, "ok" | "degraded" | "replanning") {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    HttpResponse::build(code).json(body)
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let status = state.engine.status().await.ok();
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render(status.as_ref()))
}
