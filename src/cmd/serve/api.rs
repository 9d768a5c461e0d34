//! The OpenAI API's shapes as `serve` speaks them: requests (parsed with the path of a bad
//! field in the message), their checks, the responses and stream chunks, and the error object.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// An error as OpenAI answers it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::invalid(message);
        e.param = Some(param.to_string());
        e
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).with_code(code)
    }

    pub fn busy(waiting: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server is busy: {waiting} request(s) are waiting already (--max-queue); retry later"
            ),
        )
        .with_code("queue_full");
        e.retry_after = Some(1);
        e
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// Parses a JSON body; a bad field is named by its path (`messages[1].role: ...`).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid(format!("the body: {inner}"))
        } else {
            ApiError::invalid_param(&path, format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

/// `stop`: a string or up to four strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's content: a string, or parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A request to either endpoint: `messages` for chat completions, `prompt` for completions,
/// and the fields that shape the generation (other fields are ignored, as OpenAI-compatible
/// servers do).
#[derive(Debug, Default, Deserialize)]
pub struct Request {
    pub messages: Option<Vec<Message>>,
    pub prompt: Option<PromptField>,
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not OpenAI's; as vLLM and llama.cpp's server take it.
    pub top_k: Option<usize>,
    /// HF's repetition penalty (not OpenAI's frequency/presence penalties); as vLLM takes it.
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

impl PromptField {
    pub fn text(self) -> Result<String, ApiError> {
        match self {
            PromptField::One(s) => Ok(s),
            PromptField::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
            PromptField::Many(v) => Err(ApiError::invalid_param(
                "prompt",
                format!(
                    "prompt: one prompt per request is served ({} given)",
                    v.len()
                ),
            )),
        }
    }
}

impl Request {
    /// The stop strings, checked.
    pub fn stops(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > 4 {
            return Err(ApiError::invalid_param(
                "stop",
                format!("stop: at most 4 sequences ({} given)", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "stop",
                "stop: a stop sequence is empty",
            ));
        }
        Ok(stops)
    }

    /// Checks the fields against OpenAI's ranges (and ours).
    pub fn check(&self) -> Result<(), ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid_param(
                "n",
                format!("n: one choice per request is served ({n} asked)"),
            ));
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature: {t} is not in [0, 2]"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p: {p} is not in (0, 1]"),
            ));
        }
        if let Some(r) = self.repetition_penalty
            && !(r.is_finite() && r > 0.0)
        {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                format!("repetition_penalty: {r} must be > 0"),
            ));
        }
        for (name, v) in [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", self.max_completion_tokens),
        ] {
            if v == Some(0) {
                return Err(ApiError::invalid_param(
                    name,
                    format!("{name}: must be at least 1"),
                ));
            }
        }
        self.stops()?;
        Ok(())
    }

    /// The requested token limit, if any.
    pub fn max_tokens(&self) -> Option<usize> {
        self.max_completion_tokens
            .or(self.max_tokens)
            .map(|n| n.min(usize::MAX as u64) as usize)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// A chat's persona (its system messages, split into facts at sentence ends as the data loader
/// splits a persona string) and dialogue (the user and assistant turns, oldest first).
pub fn persona_and_dialogue(
    messages: Vec<Message>,
) -> Result<(Option<Vec<String>>, Vec<String>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages: at least one message is needed",
        ));
    }
    let mut persona: Option<Vec<String>> = None;
    let mut dialogue = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let text = match m.content {
            None => String::new(),
            Some(Content::Text(s)) => s,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid_param(
                                &format!("messages[{i}].content[{j}]"),
                                format!(
                                    "messages[{i}].content[{j}]: only text parts are understood (got {kind:?})"
                                ),
                            ));
                        }
                    }
                }
                text
            }
        };
        match m.role.as_str() {
            "system" | "developer" => persona
                .get_or_insert_with(Vec::new)
                .extend(phitune_data::row::split_facts(&text)),
            "user" | "assistant" => dialogue.push(text.trim().to_string()),
            other => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!(
                        "messages[{i}].role: {other:?} is not understood (system, user or assistant)"
                    ),
                ));
            }
        }
    }
    if dialogue.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages: a user message to answer is needed",
        ));
    }
    Ok((persona, dialogue))
}

/// `usage`.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_named_by_its_path() {
        let e = parse::<Request>(br#"{"messages": [{"role": "user", "content": 3}]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.starts_with("messages[0].content"),
            "{}",
            e.message
        );
        let e = parse::<Request>(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{}", e.message);
        let e = parse::<Request>(b"{\"messages\": [").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse::<Request>(b"\"hi\"").unwrap_err();
        assert!(e.message.starts_with("the body"), "{}", e.message);
    }

    #[test]
    fn system_messages_are_the_persona_and_the_turns_the_dialogue() {
        let r: Request = parse(
            br#"{"messages": [
                {"role": "system", "content": "i like cats. i am a nurse!"},
                {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
                {"role": "assistant", "content": " hello "},
                {"role": "user", "content": "how are you?"}
            ], "stop": "x", "unknown_field": 1}"#,
        )
        .unwrap();
        r.check().unwrap();
        let (persona, dialogue) = persona_and_dialogue(r.messages.unwrap()).unwrap();
        assert_eq!(persona.unwrap(), ["i like cats.", "i am a nurse!"]);
        assert_eq!(dialogue, ["hi there", "hello", "how are you?"]);
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        for (body, param) in [
            (r#"{"n": 2}"#, "n"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"stop": ["a", "b", "c", "d", "e"]}"#, "stop"),
            (r#"{"repetition_penalty": -1}"#, "repetition_penalty"),
        ] {
            let s: Request = parse(body.as_bytes()).unwrap();
            let e = s.check().unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        let only_tool = vec![Message {
            role: "tool".into(),
            content: None,
        }];
        assert!(persona_and_dialogue(only_tool).is_err());
    }
}
