//! Errors of the proxy port and the one place they become HTTP responses. Every body is
//! Gemini-shaped (`google.rpc.Status`), so SDKs raise their usual exceptions.

use crate::gemini::error_body;
use http::{HeaderValue, StatusCode};

/// Why the proxy answered a request itself instead of forwarding it.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No path prefix, no `x-agent-id`, no virtual key.
    #[error("no agent identity: use the base URL http://<proxy>/agents/<agent_id>, or send the header x-agent-id: <agent_id>, or a virtual key listed in budgets.json")]
    NoIdentity,
    /// The agent id has characters outside `[A-Za-z0-9._-]`, starts with `.` or is too long.
    #[error("invalid agent id {0:?}: use 1 to 128 characters from A-Z a-z 0-9 . _ - (not starting with .)")]
    BadAgentId(String),
    /// The agent is not in budgets.json and `unknown_agents` is `reject`.
    #[error("agent {0:?} is not in budgets.json and unknown agents are rejected; add it to the file or ask an operator")]
    UnknownAgent(String),
    /// The agent has `api_keys` and the request's key is missing or not one of them.
    #[error("agent {0:?} requires one of its api_keys (x-goog-api-key or ?key=); the key sent is missing or belongs to another agent")]
    KeyMismatch(String),
    /// Too many agents not in the file.
    #[error("agent {agent:?} is not in budgets.json and the limit of {cap} dynamically created agents is reached; add it to the file or raise max_dynamic_agents")]
    TooManyAgents {
        /// The agent.
        agent: String,
        /// The cap.
        cap: usize,
    },
    /// A virtual key was used but the proxy has no real key to send.
    #[error("agent {0:?} used a virtual key but GEMINI_API_KEY is not set on the proxy; set it in the proxy's environment")]
    NoUpstreamKey(String),
    /// The budget is spent and the action refuses the request.
    #[error("{message}")]
    BudgetExhausted {
        /// Says which agent, which limit and when it resets.
        message: String,
        /// Whole seconds to the reset (`None`: infinite period).
        retry_after_secs: Option<u64>,
    },
    /// The request body is larger than the proxy accepts.
    #[error("request body is larger than {limit} bytes; raise {flag} to accept it")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
        /// The flag that sets it.
        flag: &'static str,
    },
    /// The client's body could not be read.
    #[error("could not read the request body: {0}")]
    BadRequestBody(String),
    /// The upstream could not be reached.
    #[error("upstream {upstream} is unreachable: {reason}")]
    UpstreamUnreachable {
        /// The upstream base URL.
        upstream: String,
        /// The transport error.
        reason: String,
    },
    /// The upstream did not answer in time.
    #[error("upstream {upstream} did not answer within {secs} s (--upstream-timeout)")]
    UpstreamTimeout {
        /// The upstream base URL.
        upstream: String,
        /// The timeout.
        secs: u64,
    },
    /// The proxy is shutting down.
    #[error("the proxy is shutting down; retry shortly")]
    ShuttingDown,
    /// A deferred job's agent is still over budget (internal: the job stays pending).
    #[error("still over budget; the job stays pending")]
    NotYet,
    /// No such deferred job for this agent.
    #[error(
        "no deferred job {0:?} for this agent; jobs are kept for a limited time after they finish"
    )]
    JobNotFound(String),
    /// The job cannot change state that way.
    #[error("{0}")]
    JobConflict(String),
    /// The store could not take or read a job.
    #[error("the job store is unavailable: {0}; nothing was stored, retry later")]
    StoreUnavailable(String),
}

impl ProxyError {
    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoIdentity => StatusCode::UNAUTHORIZED,
            ProxyError::BadAgentId(_) | ProxyError::BadRequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnknownAgent(_)
            | ProxyError::KeyMismatch(_)
            | ProxyError::TooManyAgents { .. } => StatusCode::FORBIDDEN,
            ProxyError::NoUpstreamKey(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::BudgetExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ShuttingDown | ProxyError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::NotYet => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::JobNotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::JobConflict(_) => StatusCode::CONFLICT,
        }
    }

    /// The `google.rpc.Code` name Gemini uses for this status.
    pub fn rpc_status(&self) -> &'static str {
        match self {
            ProxyError::NoIdentity => "UNAUTHENTICATED",
            ProxyError::BadAgentId(_) | ProxyError::BadRequestBody(_) => "INVALID_ARGUMENT",
            ProxyError::UnknownAgent(_)
            | ProxyError::KeyMismatch(_)
            | ProxyError::TooManyAgents { .. } => "PERMISSION_DENIED",
            ProxyError::NoUpstreamKey(_) => "INTERNAL",
            ProxyError::BudgetExhausted { .. } => "RESOURCE_EXHAUSTED",
            ProxyError::BodyTooLarge { .. } => "INVALID_ARGUMENT",
            ProxyError::UpstreamUnreachable { .. } | ProxyError::ShuttingDown => "UNAVAILABLE",
            ProxyError::UpstreamTimeout { .. } => "DEADLINE_EXCEEDED",
            ProxyError::StoreUnavailable(_) => "UNAVAILABLE",
            ProxyError::NotYet => "RESOURCE_EXHAUSTED",
            ProxyError::JobNotFound(_) => "NOT_FOUND",
            ProxyError::JobConflict(_) => "FAILED_PRECONDITION",
        }
    }

    /// Seconds for `Retry-After`, when the client should come back later.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ProxyError::BudgetExhausted {
                retry_after_secs, ..
            } => *retry_after_secs,
            ProxyError::ShuttingDown | ProxyError::StoreUnavailable(_) => Some(1),
            _ => None,
        }
    }

    /// Whether this is the client's doing (logged at debug) or ours/upstream's (warn).
    pub fn is_client_error(&self) -> bool {
        self.status().is_client_error()
    }

    /// The response: status, `content-type`, `Retry-After` and the Gemini-shaped body.
    pub fn to_response(&self) -> http::Response<bytes::Bytes> {
        let retry = self.retry_after_secs();
        let body = error_body(
            self.status().as_u16(),
            self.rpc_status(),
            &self.to_string(),
            retry,
        );
        let mut resp = http::Response::new(body);
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
        if let Some(secs) = retry {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
