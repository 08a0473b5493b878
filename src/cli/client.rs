//! The HTTP client the command line uses to talk to a main or a remote.

use std::time::Duration;

use serde_json::Value as J;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service answered with an error; its message is the whole story.
    #[error("{message}")]
    Api { status: u16, message: String },
    /// The command line itself was wrong.
    #[error("{0}")]
    Usage(String),
    #[error(
        "cannot reach the crmsync API at {url}: {detail}. Is the service running? (`crmsync up` starts one; --api or CRMSYNC_API picks another)"
    )]
    Unreachable { url: String, detail: String },
}

impl ClientError {
    /// The process exit code for this error: 1 for a refused request, 2 for a usage error,
    /// 3 when the service is unreachable.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Api { .. } => 1,
            ClientError::Usage(_) => 2,
            ClientError::Unreachable { .. } => 3,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client of the API at `base`, signing in with `token`; for HTTPS it trusts the
    /// system's certificate authorities and `ca`.
    pub fn new(base: &str, token: Option<String>, ca: Option<&std::path::Path>) -> Result<Client, ClientError> {
        let tls =
            crmsync::http::tls::client_config(ca).map_err(|e| ClientError::Usage(format!("{e} (--ca, CRMSYNC_CA)")))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(900))
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot set up the HTTP client: {}", root_cause(&e))))?;
        Ok(Client { base: base.trim_end_matches('/').to_owned(), http, token })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<J, ClientError> {
        let req = match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Unreachable { url: self.base.clone(), detail: root_cause(&e) })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Unreachable { url: self.base.clone(), detail: e.to_string() })?;
        if status.is_success() {
            return Ok(serde_json::from_str(&text).unwrap_or(J::String(text)));
        }
        let message = error_message(status, &text);
        Err(ClientError::Api { status: status.as_u16(), message })
    }

    pub async fn get(&self, path: &str, query: &[(String, String)]) -> Result<J, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query)).await
    }

    pub async fn post(&self, path: &str, body: &J) -> Result<J, ClientError> {
        self.write(|| self.http.post(format!("{}{path}", self.base)).json(body)).await
    }

    pub async fn patch(&self, path: &str, body: &J) -> Result<J, ClientError> {
        self.write(|| self.http.patch(format!("{}{path}", self.base)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<J, ClientError> {
        self.write(|| self.http.delete(format!("{}{path}", self.base))).await
    }

    /// Sends a write with a fresh `Idempotency-Key`, and sends it again with the same key when
    /// the service answers 503 (NATS unreachable, or a change it could not confirm): the main
    /// applies a key's change at most once, so a repeat after an unclear answer is safe.
    async fn write(&self, request: impl Fn() -> reqwest::RequestBuilder) -> Result<J, ClientError> {
        let key = crmsync::names::new_id();
        let mut attempt = 1;
        loop {
            match self.send(request().header("Idempotency-Key", &key)).await {
                Err(ClientError::Api { status: 503, .. }) if attempt < WRITE_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_secs(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// The token the command line signs in with: `--token`, else `CRMSYNC_TOKEN` (both read by
/// clap into `given`), else the file `CRMSYNC_TOKEN_FILE` names.
pub fn token(given: Option<String>) -> Result<Option<String>, ClientError> {
    if let Some(token) = given.filter(|t| !t.trim().is_empty()) {
        return Ok(Some(token.trim().to_owned()));
    }
    let Some(file) = std::env::var_os("CRMSYNC_TOKEN_FILE").filter(|f| !f.is_empty()) else { return Ok(None) };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        ClientError::Usage(format!("cannot read the token file {} (CRMSYNC_TOKEN_FILE): {e}", file.to_string_lossy()))
    })?;
    Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty()))
}

/// How often the command line sends a write that was answered 503.
const WRITE_ATTEMPTS: u64 = 3;

/// What an error answer says: its `error` message, or for an answer that is not the API's
/// JSON error (a proxy's page, an empty body), the status and whatever text came with it.
fn error_message(status: reqwest::StatusCode, text: &str) -> String {
    let json: Option<J> = serde_json::from_str(text).ok();
    if let Some(message) = json.as_ref().and_then(|b| b.get("error")).and_then(J::as_str) {
        return message.to_owned();
    }
    let text = text.trim();
    if text.is_empty() {
        format!("the service answered {status} with no message")
    } else {
        format!("the service answered {status}: {text}")
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_answer_that_is_not_the_apis_json_still_says_what_happened() {
        let bad_gateway = reqwest::StatusCode::BAD_GATEWAY;
        assert_eq!(error_message(bad_gateway, r#"{"error": "no such set"}"#), "no such set");
        assert_eq!(error_message(bad_gateway, ""), "the service answered 502 Bad Gateway with no message");
        assert_eq!(
            error_message(bad_gateway, " upstream down\n"),
            "the service answered 502 Bad Gateway: upstream down"
        );
        assert_eq!(
            error_message(bad_gateway, r#"{"detail": 1}"#),
            r#"the service answered 502 Bad Gateway: {"detail": 1}"#
        );
    }
}
