//! The proxy port: identify the agent, admit the request against its budget, forward it
//! (rewriting the model on degrade), and meter the response as it streams back.

pub mod body;
mod deadline;
pub mod h1client;
pub mod jobs;
pub mod metered;
pub mod upstream;

use crate::boxed;
use crate::budget::ledger::{secs_until, Admission, AgentLedger, Decision, Ledger};
use crate::budget::queue::{Queues, Wait};
use crate::clock::Clock;
use crate::config::{Action, AgentBudget, Config};
use crate::error::ProxyError;
use crate::gemini::{body as gbody, parse_model_call, rewrite_model_in_path};
use crate::identity::{identify, Identity, KeyPlace};
use crate::server::{ClientRequest, Headers, RequestHead};
use crate::wire::{CarriesHead as _, RawHead};
use arc_swap::ArcSwap;
use body::{PeekedBody, RequestBody, ResponseBody};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST};
use http::{HeaderMap, Response};
use metered::{Meter, MeteredBody};
use std::sync::Arc;
use std::time::Duration;
use upstream::{Upstream, UpstreamClient, UpstreamError, UpstreamRequest};

/// Tunables of the proxy port.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Longest wait for the upstream's response headers.
    pub upstream_timeout: Duration,
    /// Longest time spent reading an upstream body after the client left.
    pub drain_timeout: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How much of a request body is read before forwarding, to estimate its cost.
    pub peek_bytes: usize,
    /// Output estimate when a request has no `maxOutputTokens`.
    pub default_output_tokens: u64,
    /// The real key sent upstream in place of virtual keys.
    pub gemini_api_key: Option<HeaderValue>,
    /// Largest body of a deferred request (413 beyond).
    pub max_deferred_body_bytes: usize,
    /// How long a finished job's response is kept.
    pub job_ttl: Duration,
}

/// State shared by every request.
pub struct Shared {
    /// The live config (one atomic load per request).
    pub config: Arc<ArcSwap<Config>>,
    /// Live counters.
    pub ledger: Arc<Ledger>,
    /// Budget alerts, checked when a reservation is settled.
    pub alerts: Arc<crate::budget::alerts::AlertCenter>,
    /// Parked requests of queue agents.
    pub queues: Arc<Queues>,
    /// Request and token counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The injected clock.
    pub clock: Arc<dyn Clock>,
    /// The upstream base URL.
    pub upstream: Upstream,
    /// The pooled client.
    pub client: UpstreamClient,
    /// Background drains of bodies whose client left (shutdown waits for them).
    pub drains: tokio_util::task::TaskTracker,
    /// Deferred jobs (the embedded store).
    pub jobs: Arc<crate::store::LocalStore>,
    /// Tunables.
    pub settings: ProxySettings,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("upstream", &self.upstream.display)
            .finish()
    }
}

const X_BUDGET_AGENT: HeaderName = HeaderName::from_static("x-budget-agent");
const X_BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-budget-remaining");
const X_BUDGET_ACTION: HeaderName = HeaderName::from_static("x-budget-action");
const X_BUDGET_MODEL: HeaderName = HeaderName::from_static("x-budget-model");
const X_BUDGET_QUEUED_MS: HeaderName = HeaderName::from_static("x-budget-queued-ms");
const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
const X_GOOG_UPLOAD_URL: HeaderName = HeaderName::from_static("x-goog-upload-url");
/// `Prefer` (RFC 7240), read on every request: a `&str` name would be parsed each time.
pub(crate) const PREFER: HeaderName = HeaderName::from_static("prefer");

/// The `x-budget-*` headers of a response.
#[derive(Debug, Clone)]
pub(crate) struct BudgetHeaders {
    /// The agent (`x-budget-agent`, made when applied: a value kept here and cloned into the
    /// map cost an allocation more).
    agent_id: Arc<str>,
    remaining_tokens: u64,
    action: &'static str,
    model: Option<String>,
    /// Time spent parked (queue action).
    queued_ms: Option<u64>,
}

impl BudgetHeaders {
    /// Each header with its value: the one list behind both ways of adding them.
    fn each(&self, mut f: impl FnMut(&HeaderName, &[u8])) {
        let mut number = itoa::Buffer::new();
        f(&X_BUDGET_AGENT, self.agent_id.as_bytes());
        f(
            &X_BUDGET_REMAINING,
            number.format(self.remaining_tokens).as_bytes(),
        );
        f(&X_BUDGET_ACTION, self.action.as_bytes());
        if let Some(m) = self.model.as_deref() {
            f(&X_BUDGET_MODEL, m.as_bytes());
        }
        if let Some(ms) = self.queued_ms {
            f(&X_BUDGET_QUEUED_MS, number.format(ms).as_bytes());
        }
    }

    /// Set them in `h` (over any of the same name).
    fn apply(&self, h: &mut HeaderMap) {
        self.each(|name, value| {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                h.insert(name.clone(), v);
            }
        });
    }

    /// Add them to a passed-through head (which leaves out the upstream's `x-budget-*`).
    fn apply_raw(&self, raw: &mut RawHead) {
        self.each(|name, value| raw.push(name, value));
    }
}

/// What handling a request learnt for its response headers and metrics.
#[derive(Default)]
pub(crate) struct Trace {
    budget_headers: Option<BudgetHeaders>,
    upstream_wait: Duration,
}

/// Answer a request on the proxy port. Never fails: errors become Gemini-shaped responses.
///
/// Not an `async fn`: an async fn's future keeps a slot for each argument for its whole
/// life, and `req` is a few hundred bytes. The request goes at once into `forward`'s
/// future, which is large (a few KiB) and boxed; a request that must wait for budget
/// comes back from it as a small `Parked` and waits in `resume`. So a parked request holds
/// neither the request nor the large future (see benches/queue_memory.sh).
pub fn handle(
    shared: Arc<Shared>,
    req: ClientRequest,
) -> crate::server::BoxFuture<Response<ResponseBody>> {
    let started = std::time::Instant::now();
    let forwarded = boxed!(forward(shared, req));
    boxed!(async move {
        let (forwarded, mut trace, shared) = forwarded.await;
        let result = match forwarded {
            Ok(Dispatched::Response(resp)) => Ok(resp),
            Ok(Dispatched::Park(parked)) => resume(&shared, parked, &mut trace).await,
            Err(e) => Err(e),
        };
        finish(&shared, result, &trace, started)
    })
}

/// The response of a handled request (errors turned Gemini-shaped), counted in the metrics.
fn finish(
    shared: &Shared,
    result: Result<Response<ResponseBody>, ProxyError>,
    trace: &Trace,
    started: std::time::Instant,
) -> Response<ResponseBody> {
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            if e.is_client_error() {
                tracing::debug!(target: "proxy", error = %e, "request refused");
            } else {
                tracing::warn!(target: "proxy", error = %e, "request failed");
            }
            error_response(&e, trace.budget_headers.as_ref())
        }
    };
    let m = &shared.metrics;
    match &trace.budget_headers {
        Some(h) => m.request(Some(&h.agent_id), h.action, resp.status().as_u16()),
        None => m.request(None, "none", resp.status().as_u16()),
    }
    if trace.upstream_wait > Duration::ZERO {
        crate::metrics::Metrics::observe(&m.upstream_latency, trace.upstream_wait);
    }
    crate::metrics::Metrics::observe(
        &m.proxy_overhead,
        started.elapsed().saturating_sub(trace.upstream_wait),
    );
    resp
}

fn error_response(e: &ProxyError, headers: Option<&BudgetHeaders>) -> Response<ResponseBody> {
    let (parts, body) = e.to_response().into_parts();
    let mut resp = Response::from_parts(parts, ResponseBody::full(body));
    if let Some(h) = headers {
        h.apply(resp.headers_mut());
    }
    resp
}

/// Whether a model method is billed by tokens (everything but `countTokens`).
fn is_budgeted(method: &http::Method, model_method: Option<&str>) -> bool {
    method == http::Method::POST && model_method.is_some_and(|m| m != "countTokens")
}

/// Methods whose bodies may name a model or a cachedContent that a degrade must look at.
fn degrade_reads_body(model_method: &str) -> bool {
    matches!(
        model_method,
        "generateContent"
            | "streamGenerateContent"
            | "batchEmbedContents"
            | "batchGenerateContent"
            | "countTokens"
    )
}

/// Where a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A client on the proxy port.
    Client {
        /// Defer instead of parking when the queue action applies and the client sent
        /// `Prefer: respond-async` (read only then); not for a request released from the
        /// queue.
        may_defer: bool,
    },
    /// A deferred job being run: never parks; "not yet" when over budget.
    Job,
}

/// Identify the agent, peek the body, and dispatch.
///
/// Hands `shared` back when done rather than [`handle`] keeping a clone: the I/O threads
/// share its reference count, and each clone and drop of it is a cache line passed between
/// cores.
///
/// One async fn, not a wrapper around a second one: each level's future is built, then
/// moved into its caller's state, a copy of its whole size (2.7 KiB for this one) on every
/// request. Hence the labeled block instead of `?`.
async fn forward(
    shared: Arc<Shared>,
    req: ClientRequest,
) -> (Result<Dispatched, ProxyError>, Trace, Arc<Shared>) {
    let mut trace = Trace::default();
    let result = 'result: {
        let config = shared.config.load_full();
        let ClientRequest { head: parts, body } = req;
        // A clone of the target (a reference count) to read the path and query from while
        // `parts` moves on: copies of them cost an allocation each.
        let target = parts.target.clone();
        let (full_path, query) = (target.path(), target.query());
        let ident = match identify(full_path, query, &parts.headers, &config) {
            Ok(ident) => ident,
            Err(e) => break 'result Err(e),
        };
        let path = match &full_path[ident.prefix_len..] {
            "" => "/",
            p => p,
        };
        if let Some(job_id) = path.strip_prefix("/budget-jobs/") {
            break 'result jobs::answer(&shared, &ident, &parts.method, job_id)
                .await
                .map(Dispatched::Response);
        }
        // The server framed the body by its Content-Length (HTTP/2: hyper did).
        let content_length = http_body::Body::size_hint(&body).exact();
        let peeked = match PeekedBody::read(
            body,
            content_length,
            shared.settings.peek_bytes,
            shared.settings.max_body_bytes,
        )
        .await
        {
            Ok(peeked) => peeked,
            Err(e) => break 'result Err(e),
        };
        dispatch(
            &shared,
            &config,
            parts,
            &ident,
            full_path,
            query,
            peeked,
            Origin::Client { may_defer: true },
            None,
            &mut trace,
        )
        .await
    };
    (result, trace, shared)
}

/// Whether the client sent `Prefer: respond-async` (RFC 7240).
fn prefers_async(headers: &Headers) -> bool {
    headers
        .get_all(&PREFER)
        .filter_map(crate::wire::value_str)
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
        })
}

/// What [`dispatch`] did with a request.
pub(crate) enum Dispatched {
    /// Forwarded (or answered by the proxy).
    Response(Response<ResponseBody>),
    /// Over budget with the queue action: to wait in [`resume`].
    Park(Box<Parked>),
}

/// A request of a queue agent waiting for budget, with what it needs to go on once
/// admitted: a few hundred bytes instead of the handler's future.
pub(crate) struct Parked {
    /// The body as the server handed it out: a slice of the connection's read buffer, let go
    /// of once the request is parked (see [`resume`]).
    read_buffer: Option<Bytes>,
    /// The path and query are read again from `parts.target` once released.
    parts: Box<RequestHead>,
    ident: Identity,
    peeked: PeekedBody,
    entry: Arc<AgentLedger>,
    estimate: u64,
    retry_after_secs: Option<u64>,
    resets_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Wait in the agent's queue, then go on with the admission it was released with.
async fn resume(
    shared: &Arc<Shared>,
    mut parked: Box<Parked>,
    trace: &mut Trace,
) -> Result<Response<ResponseBody>, ProxyError> {
    // The request's head and body are slices of the read buffer its connection read it
    // into; `detach` gave the request copies of its own. Our HTTP/1.1 connection has let
    // go of that buffer already, so dropping the slices frees it. hyper's (HTTP/1.1 over
    // TLS) keeps an 8 KiB buffer to watch the connection and reuses it in place when
    // nothing else shares it, else allocates a fresh one: holding the old slices across one
    // yield makes it take a fresh buffer (untouched pages, no RSS while the request waits)
    // and frees the old one, whose page can then serve the next connection. Measured with
    // benches/queue_memory.sh when hyper served plain HTTP/1.1 too: 7.8 -> 6.5-7.2 KiB per
    // parked request.
    if let Some(read_buffer) = parked.read_buffer.take() {
        tokio::task::yield_now().await;
        drop(read_buffer);
    }
    let waited = std::time::Instant::now();
    // The config of now, for the queue limits (and again after the wait).
    let config = shared.config.load_full();
    let budget = config.agent(&parked.ident.agent).unwrap_or(&config.default);
    let admission = Box::pin(park(
        shared,
        &parked.entry,
        budget,
        parked.estimate,
        parked.retry_after_secs,
        parked.resets_at,
    ))
    .await?;
    let queued_ms = u64::try_from(waited.elapsed().as_millis()).unwrap_or(u64::MAX);
    // Boxed: the request's parts are unpacked only once it is released.
    let dispatched = Box::pin(dispatch_released(
        shared, parked, admission, queued_ms, trace,
    ))
    .await?;
    match dispatched {
        Dispatched::Response(resp) => Ok(resp),
        // Cannot happen: a request resumed with an admission is not parked again.
        Dispatched::Park(_) => Err(ProxyError::NotYet),
    }
}

/// Dispatch a parked request that was released with `admission`.
async fn dispatch_released(
    shared: &Arc<Shared>,
    parked: Box<Parked>,
    admission: Admission,
    queued_ms: u64,
    trace: &mut Trace,
) -> Result<Dispatched, ProxyError> {
    let config = shared.config.load_full();
    let Parked {
        parts,
        ident,
        peeked,
        ..
    } = *parked;
    let target = parts.target.clone();
    dispatch(
        shared,
        &config,
        parts,
        &ident,
        target.path(),
        target.query(),
        peeked,
        Origin::Client { may_defer: false },
        Some(Box::new((admission, queued_ms))),
        trace,
    )
    .await
}

/// Admission, degrade and forwarding of an identified request whose body was peeked.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn dispatch(
    shared: &Arc<Shared>,
    config: &Config,
    mut parts: Box<RequestHead>,
    ident: &Identity,
    full_path: &str,
    query: Option<&str>,
    mut peeked: PeekedBody,
    origin: Origin,
    // Boxed: `None` but for released queue requests, and an async fn keeps two slots of
    // each argument.
    resumed: Option<Box<(Admission, u64)>>,
    trace: &mut Trace,
) -> Result<Dispatched, ProxyError> {
    let path = match &full_path[ident.prefix_len..] {
        "" => "/",
        p => p,
    };
    let budget: &AgentBudget = config.agent(&ident.agent).unwrap_or(&config.default);
    let now = shared.clock.now();
    let entry = shared
        .ledger
        .entry(
            &ident.agent,
            &budget.period,
            now,
            ident.dynamic.then_some(config.max_dynamic_agents),
        )
        .map_err(|cap| ProxyError::TooManyAgents {
            agent: ident.agent.clone(),
            cap: cap.0,
        })?;
    // The id goes into the `x-budget-agent` header; a valid id is a valid header value.
    if !crate::config::valid_agent_id(&ident.agent) {
        return Err(ProxyError::BadAgentId(ident.agent.clone()));
    }
    let call = parse_model_call(path);

    let mut upstream_path = std::borrow::Cow::Borrowed(path);
    let mut reservation = None;
    let mut model = call.map(|c| c.model.to_string()).unwrap_or_default();
    let mut rewritten_body: Option<Bytes> = None;

    if is_budgeted(&parts.method, call.map(|c| c.method)) {
        let estimate = estimate_tokens(&peeked, shared.settings.default_output_tokens);
        // Queue agents keep FIFO order: while others wait, a newcomer waits behind them.
        let queued_ms = resumed.as_ref().map(|r| r.1);
        let admission = if let Some((admitted, _)) = resumed.map(|r| *r) {
            admitted
        } else if budget.action == Action::Queue && shared.queues.has_waiters(&ident.agent) {
            // (A job yields to parked requests: they hold connections.)
            let resets_at = crate::budget::period::window(&budget.period, now).end;
            Admission {
                decision: Decision::Queue {
                    retry_after_secs: secs_until(resets_at, now),
                },
                reservation: None,
                remaining_tokens: 0,
                resets_at,
            }
        } else {
            shared.ledger.admit(&entry, budget, now, estimate)
        };
        let mut headers = BudgetHeaders {
            agent_id: entry.id_arc(),
            remaining_tokens: admission.remaining_tokens,
            action: "allow",
            model: None,
            queued_ms: None,
        };
        if let Decision::Queue { retry_after_secs } = admission.decision {
            headers.action = "block";
            headers.remaining_tokens = 0;
            trace.budget_headers = Some(headers.clone());
            match origin {
                Origin::Job => return Err(ProxyError::NotYet),
                Origin::Client { may_defer: true } if prefers_async(&parts.headers) => {
                    headers.action = "queued";
                    trace.budget_headers = Some(headers);
                    let prefix = &full_path[..ident.prefix_len];
                    return Box::pin(jobs::defer(
                        shared,
                        ident,
                        parts,
                        path,
                        query.map(str::to_owned),
                        peeked,
                        prefix,
                        admission.resets_at,
                    ))
                    .await
                    .map(Dispatched::Response);
                }
                Origin::Client { .. } => {}
            }
            // A parked request may wait minutes: stop sharing the connection's read buffer.
            detach(&mut parts);
            let read_buffer = peeked.detach();
            return Ok(Dispatched::Park(Box::new(Parked {
                read_buffer: Some(read_buffer),
                parts,
                ident: ident.clone(),
                peeked,
                entry,
                estimate,
                retry_after_secs,
                resets_at: admission.resets_at,
            })));
        }
        match admission.decision {
            Decision::Allow => {}
            Decision::Warn => {
                headers.action = "warn";
                if entry.should_log_warning(now) {
                    tracing::warn!(target: "budget", agent = %ident.agent, max_tokens = budget.max_tokens,
                        "agent is over its token budget; allowed (action_on_limit: warn)");
                }
            }
            Decision::Degrade(fallback) => {
                headers.action = "degrade";
                headers.model = Some(fallback.clone());
                // Budgeted requests are model calls, so `call` is present.
                if let Some(c) = call {
                    if degrade_reads_body(c.method) {
                        trace.budget_headers = Some(headers.clone());
                        peeked = peeked.read_all(shared.settings.max_body_bytes).await?;
                        if let Some(cached) = gbody::cached_content(&peeked.head) {
                            if c.model != fallback {
                                trace.budget_headers = Some(BudgetHeaders {
                                    action: "block",
                                    remaining_tokens: 0,
                                    model: None,
                                    ..headers
                                });
                                return Err(ProxyError::BudgetExhausted {
                                    message: format!(
                                        "token budget of agent {:?} is exhausted and its action is degrade, but this request uses cachedContent {cached:?} made for model {:?}, which cannot be sent to the fallback model {fallback:?}; send it without the cache, or wait for the reset",
                                        ident.agent, c.model
                                    ),
                                    retry_after_secs: secs_until(admission.resets_at, now),
                                });
                            }
                        }
                        match gbody::rewrite_models_in_body(c.method, &peeked.head, &fallback) {
                            Ok(Some(b)) => rewritten_body = Some(Bytes::from(b)),
                            Ok(None) => {}
                            Err(e) => {
                                tracing::debug!(target: "proxy", error = %e, "body is not JSON; model names in it not rewritten")
                            }
                        }
                    }
                    if let Some(p) = rewrite_model_in_path(path, &fallback) {
                        upstream_path = std::borrow::Cow::Owned(p);
                    }
                }
                model = fallback.trim_start_matches("models/").to_string();
            }
            // `park` only returns admitted requests; a Queue decision here cannot happen.
            Decision::Block { retry_after_secs } | Decision::Queue { retry_after_secs } => {
                headers.action = "block";
                headers.remaining_tokens = 0;
                trace.budget_headers = Some(headers);
                return Err(ProxyError::BudgetExhausted {
                    message: exhausted_message(&ident.agent, budget, admission.resets_at),
                    retry_after_secs,
                });
            }
        }
        if let Some(ms) = queued_ms {
            headers.action = "queued";
            headers.queued_ms = Some(ms);
        }
        trace.budget_headers = Some(headers);
        reservation = admission.reservation;
    } else {
        trace.budget_headers = Some(BudgetHeaders {
            agent_id: entry.id_arc(),
            remaining_tokens: shared.ledger.remaining(&entry, budget, now),
            action: "allow",
            model: None,
            queued_ms: None,
        });
    }

    // Build the upstream request.
    // Only an upload's start is answered with an `x-goog-upload-url` to rewrite
    // (`POST /upload/{version}/files`); the other requests skip reading the client's host
    // and scheme (~400 instructions).
    let public_base = path
        .starts_with("/upload/")
        .then(|| public_base(&parts, ident.prefix_len));
    let substituted;
    let query = match (ident.substitute_key, query) {
        (Some(KeyPlace::Query), Some(q)) => {
            substituted = substitute_query_key(q, shared, ident)?;
            Some(substituted.as_str())
        }
        (_, q) => q,
    };
    let target = shared.upstream.target(&upstream_path, query);
    // (`Host` is the client's business: set per protocol, see `upstream`.)
    parts.headers.strip_hop_by_hop();
    if ident.substitute_key == Some(KeyPlace::Header) {
        let key = shared
            .settings
            .gemini_api_key
            .clone()
            .ok_or_else(|| ProxyError::NoUpstreamKey(ident.agent.clone()))?;
        parts.headers.insert(X_GOOG_API_KEY, key);
    }
    let body = match rewritten_body {
        Some(b) => {
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(b.len()));
            RequestBody::Full(Some(b))
        }
        None => peeked.into_forward(),
    };
    let mut upstream_req = UpstreamRequest {
        method: parts.method,
        target,
        headers: parts.headers,
        body,
    };

    // One clock reading for the timeout's deadline, the upstream wait and the pool's idle
    // check (a request reads the clock about nine times, ~30 ns each here). The pool keeps
    // the upstream timeout (`proxy::deadline`).
    let sent_at = std::time::Instant::now();
    // (The pool boxes the exchange: see `Pool::send`.)
    let sent = shared.client.request(&mut upstream_req, sent_at).await;
    trace.upstream_wait = sent_at.elapsed();
    let resp = match sent {
        Err(UpstreamError::Timeout) => {
            return Err(ProxyError::UpstreamTimeout {
                upstream: shared.upstream.display.clone(),
                secs: shared.settings.upstream_timeout.as_secs(),
            })
        }
        Err(e) => {
            return Err(ProxyError::UpstreamUnreachable {
                upstream: shared.upstream.display.clone(),
                reason: error_chain(&e),
            })
        }
        Ok(sent) => sent,
    };

    let (mut rparts, mut rbody) = resp.into_parts();
    match rbody.head_mut() {
        // HTTP/1.1 from the upstream: its head goes on as it came (see `RawHead`).
        Some(raw) if !raw.has(X_GOOG_UPLOAD_URL.as_str()) => {
            if let Some(h) = trace.budget_headers.as_ref() {
                h.apply_raw(raw);
            }
        }
        _ => {
            // HTTP/2, or an upload URL to rewrite: a map.
            if let Some(raw) = rbody.take_head() {
                raw.into_map(&mut rparts.headers);
            }
            crate::wire::strip_hop_by_hop(&mut rparts.headers);
            if let Some(h) = trace.budget_headers.as_ref() {
                h.apply(&mut rparts.headers);
            }
            if let Some(base) = &public_base {
                rewrite_upload_url(&mut rparts.headers, base, full_path);
            }
        }
    }
    let meter = reservation.map(|r| Meter::new(r, model, shared.clone()));
    Ok(Dispatched::Response(Response::from_parts(
        rparts,
        ResponseBody::Metered(MeteredBody::new(rbody, meter)),
    )))
}

/// Give `parts` their own copies of the URI and header values: on HTTP/1.1 they are slices
/// of the buffer the connection read the request into, which a parked request holding them
/// would keep alive for as long as it waits (measured with `benches/queue_memory.sh`).
fn detach(parts: &mut RequestHead) {
    parts.headers.detach();
    parts.target.detach();
}

/// Park a request of a queue agent until budget returns, the wait runs out, or shutdown.
async fn park(
    shared: &Arc<Shared>,
    entry: &Arc<AgentLedger>,
    budget: &AgentBudget,
    estimate: u64,
    retry_after_secs: Option<u64>,
    resets_at: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Admission, ProxyError> {
    let agent = entry.id_arc();
    let limits = budget.queue;
    let mut ticket = shared.queues.park(&agent, estimate, limits.max_depth).map_err(|full| {
        shared.ledger.count_refusal(entry, shared.clock.now());
        ProxyError::BudgetExhausted {
            message: format!(
                "token budget of agent {agent:?} is exhausted and its queue is full ({} requests waiting, queue.max_depth); retry after the reset",
                full.max_depth
            ),
            retry_after_secs,
        }
    })?;
    if let Some(end) = resets_at {
        let s = shared.clone();
        let a = agent.clone();
        shared
            .queues
            .arm_reset_timer(&agent, end, shared.clock.now(), move || {
                release_agent(&s, &a);
            });
    }
    // Budget may have returned between the decision and the parking.
    release_agent(shared, &agent);
    let max_wait = std::time::Duration::from_secs(limits.max_wait_seconds);
    match tokio::time::timeout(max_wait, ticket.released()).await {
        Ok(Wait::Released(admission)) => Ok(admission),
        Ok(Wait::ShuttingDown) => Err(ProxyError::ShuttingDown),
        Err(_) => {
            shared.ledger.count_refusal(entry, shared.clock.now());
            let now = shared.clock.now();
            Err(ProxyError::BudgetExhausted {
                message: format!(
                    "token budget of agent {agent:?} is exhausted; the request waited {} s in the queue (queue.max_wait_seconds) and budget did not return; retry after the reset",
                    limits.max_wait_seconds
                ),
                retry_after_secs: secs_until(resets_at, now),
            })
        }
    }
}

/// Re-admit parked requests of `agent` while its budget allows.
pub fn release_agent(shared: &Shared, agent: &str) -> usize {
    let config = shared.config.load();
    shared
        .queues
        .release_agent(&shared.ledger, &config, agent, shared.clock.now())
}

fn exhausted_message(
    agent: &str,
    budget: &AgentBudget,
    end: Option<chrono::DateTime<chrono::Utc>>,
) -> String {
    let period = format!("{:?}", budget.period.period).to_lowercase();
    match end {
        Some(end) => format!(
            "token budget of agent {agent:?} is exhausted ({} tokens per {period} period); it resets at {}. Retry after the reset or ask an operator to raise max_tokens.",
            budget.max_tokens,
            end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        None => format!(
            "token budget of agent {agent:?} is exhausted ({} tokens, period infinite: it never resets). Ask an operator to raise max_tokens or reset the budget.",
            budget.max_tokens
        ),
    }
}

/// Request body bytes / 4 plus the requested output (or the default output estimate).
fn estimate_tokens(body: &PeekedBody, default_output: u64) -> u64 {
    let input = body.len.unwrap_or(body.head.len() as u64) / 4;
    let output = if body.complete {
        gbody::max_output_tokens(&body.head).unwrap_or(default_output)
    } else {
        default_output
    };
    input.saturating_add(output)
}

fn substitute_query_key(q: &str, shared: &Shared, ident: &Identity) -> Result<String, ProxyError> {
    let key = shared
        .settings
        .gemini_api_key
        .as_ref()
        .and_then(|k| k.to_str().ok())
        .ok_or_else(|| ProxyError::NoUpstreamKey(ident.agent.clone()))?;
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        if k == "key" {
            out.append_pair("key", key);
        } else {
            out.append_pair(&k, &v);
        }
    }
    Ok(out.finish())
}

/// What the client used to reach the proxy (scheme, host, agent prefix), kept cheaply for
/// rewriting upload URLs: the URL itself is only formatted for a response that has one.
struct PublicBase {
    secure: bool,
    scheme: Option<http::uri::Scheme>,
    host: Option<HeaderValue>,
    authority: Option<http::uri::Authority>,
    prefix_len: usize,
}

/// The scheme + authority (+ agent prefix) the client used, for rewriting upload URLs.
fn public_base(parts: &RequestHead, prefix_len: usize) -> PublicBase {
    PublicBase {
        // HTTP/1.1 request URIs carry no scheme: the listener marks requests that came over TLS.
        secure: parts.extensions.get::<crate::tls::Secure>().is_some(),
        scheme: parts.target.uri().and_then(|u| u.scheme().cloned()),
        host: parts.headers.get_value(&HOST),
        authority: parts.target.uri().and_then(|u| u.authority().cloned()),
        prefix_len,
    }
}

impl PublicBase {
    fn format(&self, full_path: &str) -> Option<String> {
        let host = match self.host.as_ref().and_then(|h| h.to_str().ok()) {
            Some(h) => h,
            None => self.authority.as_ref()?.as_str(),
        };
        let scheme = match (self.secure, &self.scheme) {
            (true, _) => "https",
            (false, Some(s)) => s.as_str(),
            (false, None) => "http",
        };
        let prefix = &full_path[..self.prefix_len];
        Some(format!("{scheme}://{host}{prefix}"))
    }
}

/// Point a resumable upload's `x-goog-upload-url` back at the proxy (with the agent prefix).
fn rewrite_upload_url(headers: &mut HeaderMap, public_base: &PublicBase, full_path: &str) {
    let Some(v) = headers.get(&X_GOOG_UPLOAD_URL) else {
        return;
    };
    let Some(base) = public_base.format(full_path) else {
        return;
    };
    let Some(url) = v.to_str().ok().and_then(|s| s.parse::<http::Uri>().ok()) else {
        return;
    };
    let pq = url.path_and_query().map_or("/", |p| p.as_str());
    if let Ok(v) = HeaderValue::from_str(&format!("{base}{pq}")) {
        headers.insert(X_GOOG_UPLOAD_URL, v);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
