//! OpenAI's HTTP API as `lemur-serve` speaks it: the request bodies it accepts, the
//! responses and stream chunks it sends, and the error body, with each request checked
//! field by field so that a bad value is answered naming the field.
//!
//! Fields this server does not act on (`user`, `presence_penalty`, `logit_bias`, ...) are
//! accepted and ignored, as OpenAI-compatible servers do; `n` other than 1 is refused.

use serde::{Deserialize, Serialize};

/// A request field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadField {
    /// The field's path (`messages[1].role`, `temperature`), or empty for the whole body.
    pub param: String,
    pub message: String,
}

impl BadField {
    pub fn new(param: &str, message: impl Into<String>) -> Self {
        Self { param: param.into(), message: message.into() }
    }
}

/// `stop`: one string or up to four.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What both endpoints share: sampling, limits, stops, streaming.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Sampling {
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// The chat endpoint's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// An extension of vLLM's and llama.cpp's servers: generate `max_tokens` whatever the
    /// model says (benchmarks).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

impl Sampling {
    /// Checks every value; `default_max` is used when no limit is given.
    pub fn check(&self, default_max: u64) -> Result<Checked, BadField> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(BadField::new("n", format!("only n = 1 is supported, not {n}")));
            }
        }
        let max = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", m),
            (None, Some(m)) => ("max_tokens", m),
            (None, None) => ("max_tokens", default_max),
        };
        if max.1 == 0 {
            return Err(BadField::new(max.0, format!("{} must be at least 1", max.0)));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(BadField::new("temperature", format!("temperature must be in [0, 2], not {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(BadField::new("top_p", format!("top_p must be in (0, 1], not {top_p}")));
        }
        let stop = self.stop.clone().map(Stop::into_vec).unwrap_or_default();
        if stop.len() > 4 {
            return Err(BadField::new("stop", format!("at most 4 stop sequences, not {}", stop.len())));
        }
        if stop.iter().any(String::is_empty) {
            return Err(BadField::new("stop", "a stop sequence must not be empty"));
        }
        Ok(Checked {
            max_tokens: max.1,
            temperature,
            top_p,
            seed: self.seed.map(|s| s as u64),
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

/// A request's sampling, limits and stops, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub max_tokens: u64,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

/// A chat message's content: a string, or a list of parts of which only text is read.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl ChatRequest {
    /// The messages as (role, text), checked: at least one, known roles, text parts only.
    pub fn turns(&self) -> Result<Vec<(String, String)>, BadField> {
        if self.messages.is_empty() {
            return Err(BadField::new("messages", "messages must hold at least one message"));
        }
        let mut out = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            if !["system", "user", "assistant", "developer", "tool"].contains(&m.role.as_str()) {
                return Err(BadField::new(&format!("messages[{i}].role"), format!("unknown role `{}`", m.role)));
            }
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut t = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(s)) => t.push_str(s),
                            (kind, _) => {
                                return Err(BadField::new(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("only text content is supported, not `{kind}`"),
                                ))
                            }
                        }
                    }
                    t
                }
            };
            let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
            out.push((role, text));
        }
        Ok(out)
    }
}

/// `prompt`: text, or token ids (one prompt only).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt as u64,
            completion_tokens: completion as u64,
            total_tokens: (prompt + completion) as u64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: String,
    pub logprobs: Option<()>,
}

/// The answer to a chat request without `stream`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<String>,
    pub logprobs: Option<()>,
}

/// One server-sent event of a streamed chat answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<String>,
    pub logprobs: Option<()>,
}

/// The answer to a completion request, whole or (with `object` `text_completion` too) one
/// streamed piece of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// OpenAI's error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(kind: &str, message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.into(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }
}

/// Parses a request body, naming the field at fault (`messages[0].content`) on error.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BadField> {
    match parse_one::<T>(body) {
        // A flattened field (the shared sampling fields) loses its path: parse those alone.
        Err(e) if e.param.is_empty() && serde_json::from_slice::<serde_json::Value>(body).is_ok() => {
            Err(parse_one::<Sampling>(body).err().unwrap_or(e))
        }
        r => r,
    }
}

fn parse_one<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BadField> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." || path == "?" { String::new() } else { path };
        let inner = e.into_inner();
        let message = if param.is_empty() {
            format!("the body is not a valid request: {inner}")
        } else {
            format!("field `{param}`: {inner}")
        };
        BadField { param, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let e = parse::<ChatRequest>(br#"{"model":"m","messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(e.param, "messages[0].content", "{e}");
        let e = parse::<ChatRequest>(br#"{"model":"m","messages":[],"temperature":"hot"}"#).unwrap_err();
        assert_eq!(e.param, "temperature", "{e}");
        let e = parse::<ChatRequest>(br#"{"model":"m"}"#).unwrap_err();
        assert!(e.message.contains("messages"), "{e}");
        let e = parse::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(e.param, "");
        let r = parse::<ChatRequest>(br#"{"model":"m","messages":[],"temperature":3}"#).unwrap();
        assert_eq!(r.sampling.check(16).unwrap_err().param, "temperature");
        assert_eq!(r.turns().unwrap_err().param, "messages");
        let r = parse::<ChatRequest>(br#"{"model":"m","messages":[{"role":"robot","content":"x"}],"n":2}"#).unwrap();
        assert_eq!(r.sampling.check(16).unwrap_err().param, "n");
        assert_eq!(r.turns().unwrap_err().param, "messages[0].role");
    }

    #[test]
    fn defaults_and_both_names_of_the_limit() {
        let r = parse::<CompletionRequest>(br#"{"model":"m","prompt":"hi","stop":"\n","user":"x"}"#).unwrap();
        let c = r.sampling.check(16).unwrap();
        assert_eq!((c.max_tokens, c.temperature, c.top_p, c.stream), (16, 1.0, 1.0, false));
        assert_eq!(c.stop, ["\n"]);
        let r = parse::<CompletionRequest>(br#"{"model":"m","prompt":[1,2],"max_tokens":3}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Ids(vec![1, 2]));
        assert_eq!(r.sampling.check(16).unwrap().max_tokens, 3);
        let r = parse::<ChatRequest>(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}],"max_completion_tokens":5,"max_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(r.sampling.check(16).unwrap().max_tokens, 5);
        assert_eq!(r.turns().unwrap(), [("user".to_string(), "a".to_string())]);
    }
}
