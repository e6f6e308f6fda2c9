//! Which agent sent a request. First match wins:
//! 1. path prefix `/agents/{agent_id}/…` (stripped before forwarding);
//! 2. header `x-agent-id`;
//! 3. a virtual key (`x-goog-api-key` or `?key=`) listed in an agent's `api_keys`.
//!
//! When an agent has `api_keys`, rules 1–2 also need one of its keys, so a header cannot
//! spend another agent's budget. A virtual key is replaced by `GEMINI_API_KEY` upstream.

use crate::config::{hash_api_key, valid_agent_id, AgentBudget, Config, UnknownAgents};
use crate::error::ProxyError;
use crate::server::Headers;
use crate::wire::value_str;
use http::header::HeaderName;

// Constants: a `&str` name is parsed and validated on every lookup.
const X_AGENT_ID: HeaderName = HeaderName::from_static("x-agent-id");
const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

/// How the agent was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `/agents/{id}/…`.
    PathPrefix,
    /// `x-agent-id`.
    Header,
    /// A virtual key.
    Key,
}

/// Where the caller's key was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPlace {
    /// `x-goog-api-key` header.
    Header,
    /// `?key=` query parameter.
    Query,
}

/// The result of identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The agent id.
    pub agent: String,
    /// How it was named.
    pub via: Via,
    /// Byte length of the `/agents/{id}` prefix to strip from the path (0: none).
    pub prefix_len: usize,
    /// The caller's key is a virtual key: replace it with the real one upstream.
    pub substitute_key: Option<KeyPlace>,
    /// The agent is not in the file (gets the `default` budget).
    pub dynamic: bool,
}

/// The `/agents/{id}` prefix of a path: `(id, prefix length)`.
pub fn path_prefix(path: &str) -> Option<(&str, usize)> {
    let rest = path.strip_prefix("/agents/")?;
    // (`str::find` builds a searcher: 150 instructions a request.)
    let id_len = memchr::memchr(b'/', rest.as_bytes()).unwrap_or(rest.len());
    Some((&rest[..id_len], "/agents/".len() + id_len))
}

/// The caller's key: `x-goog-api-key`, else `?key=`.
pub fn caller_key<'a>(headers: &'a Headers, query: Option<&'a str>) -> Option<(String, KeyPlace)> {
    if let Some(v) = headers.get(&X_GOOG_API_KEY).and_then(value_str) {
        return Some((v.to_string(), KeyPlace::Header));
    }
    let q = query?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "key")
        .map(|(_, v)| (v.into_owned(), KeyPlace::Query))
}

/// Identify the agent of a request.
pub fn identify(
    path: &str,
    query: Option<&str>,
    headers: &Headers,
    config: &Config,
) -> Result<Identity, ProxyError> {
    // Hashing the caller's key (SHA-256) is only worth it when some agent has virtual keys:
    // with none configured, no key can match.
    let key = if config.key_index.is_empty() {
        None
    } else {
        caller_key(headers, query)
    };
    let key_owner = key.as_ref().and_then(|(k, place)| {
        config
            .key_index
            .get(&hash_api_key(k))
            .map(|a| (a.as_str(), *place))
    });

    let named = if let Some((id, len)) = path_prefix(path) {
        Some((id.to_string(), Via::PathPrefix, len))
    } else {
        headers
            .get(&X_AGENT_ID)
            .map(|v| (String::from_utf8_lossy(v).into_owned(), Via::Header, 0))
    };

    let (agent, via, prefix_len) = match named {
        Some(n) => n,
        None => match key_owner {
            Some((owner, _)) => (owner.to_string(), Via::Key, 0),
            None => return Err(ProxyError::NoIdentity),
        },
    };
    if !valid_agent_id(&agent) {
        return Err(ProxyError::BadAgentId(agent));
    }
    let budget: Option<&AgentBudget> = config.agent(&agent);
    if budget.is_none() && config.unknown_agents == UnknownAgents::Reject {
        return Err(ProxyError::UnknownAgent(agent));
    }
    // A virtual key must belong to the agent it is used for.
    if let Some((owner, _)) = key_owner {
        if owner != agent {
            return Err(ProxyError::KeyMismatch(agent));
        }
    }
    let needs_key = budget.is_some_and(|b| !b.api_keys.is_empty());
    if needs_key && key_owner.is_none() {
        return Err(ProxyError::KeyMismatch(agent));
    }
    Ok(Identity {
        dynamic: budget.is_none(),
        agent,
        via,
        prefix_len,
        substitute_key: key_owner.map(|(_, place)| place),
    })
}
