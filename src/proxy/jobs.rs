//! Deferred jobs on the proxy port: `Prefer: respond-async` to an over-budget queue agent
//! answers `202 Accepted` with `Location: [/agents/{id}]/budget-jobs/{job}`; the job runs
//! through the normal admission path when budget returns; `GET` fetches its state or its
//! stored response, `DELETE` cancels it while pending. Execution is at-least-once.

use super::body::{PeekedBody, ResponseBody};
use super::{dispatch, Dispatched, Origin, Shared};
use crate::error::ProxyError;
use crate::identity::{Identity, KeyPlace, Via};
use crate::server::RequestHead;
use crate::store::jobs::{Job, JobState, StoredResponse};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, LOCATION};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Largest response body kept for a job.
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn store_err(e: impl std::fmt::Display) -> ProxyError {
    ProxyError::StoreUnavailable(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ProxyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(store_err)?
        .map_err(store_err)
}

fn new_id() -> String {
    use sha2::Digest;
    let seed = format!(
        "{:?}-{}-{}",
        std::time::SystemTime::now(),
        std::process::id(),
        rand_counter()
    );
    hex::encode(&sha2::Sha256::digest(seed.as_bytes())[..12])
}

fn rand_counter() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Store a deferred request and answer 202.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn defer(
    shared: &Arc<Shared>,
    ident: &Identity,
    parts: Box<RequestHead>,
    path: &str,
    query: Option<String>,
    peeked: PeekedBody,
    prefix: &str,
    resets_at: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let limit = shared.settings.max_deferred_body_bytes;
    let too_large = ProxyError::BodyTooLarge {
        limit,
        flag: "--max-deferred-body-bytes",
    };
    let peeked = match peeked.read_all(limit).await {
        Err(ProxyError::BodyTooLarge { .. }) => return Err(too_large),
        other => other?,
    };
    if peeked.head.len() > limit {
        return Err(too_large);
    }
    let mut headers = parts.headers.into_map();
    crate::wire::strip_hop_by_hop(&mut headers);
    headers.remove(http::header::HOST);
    headers.remove(super::PREFER);
    let job = Job {
        id: new_id(),
        agent: ident.agent.clone(),
        state: JobState::Pending,
        created_ms: shared.clock.now().timestamp_millis(),
        method: parts.method.to_string(),
        path: path.to_string(),
        query,
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: peeked.head.to_vec(),
        substitute_key: ident.substitute_key.map(|p| match p {
            KeyPlace::Header => "header".to_string(),
            KeyPlace::Query => "query".to_string(),
        }),
        response: None,
        expires_at: None,
    };
    let store = shared.jobs.clone();
    let j = job.clone();
    blocking(move || store.insert_job(&j)).await?;
    shared.queues.job_added();
    // Wake the runner at the reset; admin resets and raises wake it too.
    if let Some(end) = resets_at {
        let s = shared.clone();
        let agent: Arc<str> = Arc::from(ident.agent.as_str());
        let a = agent.clone();
        shared
            .queues
            .arm_reset_timer(&agent, end, shared.clock.now(), move || {
                super::release_agent(&s, &a);
                s.queues.wake_jobs();
            });
    }
    tracing::info!(target: "proxy", agent = %ident.agent, job = %job.id, "over budget: request deferred");
    let location = format!("{prefix}/budget-jobs/{}", job.id);
    let mut r = json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({"name": format!("budget-jobs/{}", job.id), "state": "pending", "agent": ident.agent}),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(LOCATION, v);
    }
    Ok(r)
}

/// `GET`/`DELETE /budget-jobs/{id}` (same identity as the request that made the job).
pub(crate) async fn answer(
    shared: &Arc<Shared>,
    ident: &Identity,
    method: &Method,
    id: &str,
) -> Result<Response<ResponseBody>, ProxyError> {
    let store = shared.jobs.clone();
    let key = id.to_string();
    let job = blocking(move || store.job(&key))
        .await?
        .filter(|j| j.agent == ident.agent)
        .ok_or_else(|| ProxyError::JobNotFound(id.to_string()))?;
    let ttl = shared.settings.job_ttl;
    match *method {
        Method::DELETE => {
            let store = shared.jobs.clone();
            let key = id.to_string();
            let expires =
                shared.clock.now().timestamp() + i64::try_from(ttl.as_secs()).unwrap_or(86400);
            if blocking(move || store.cancel_job(&key, expires)).await? {
                shared.queues.job_settled();
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"name": format!("budget-jobs/{id}"), "state": "cancelled"}),
                ))
            } else {
                Err(ProxyError::JobConflict(format!(
                    "job {id:?} is {} and can no longer be cancelled",
                    serde_json::to_value(job.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                )))
            }
        }
        Method::GET => match (job.state, job.response) {
            (
                JobState::Done,
                Some(StoredResponse {
                    status,
                    headers,
                    body,
                }),
            ) => {
                let mut r = Response::new(ResponseBody::full(Bytes::from(body)));
                *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                for (k, v) in headers {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_bytes(&v),
                    ) {
                        r.headers_mut().append(k, v);
                    }
                }
                Ok(r)
            }
            (state, _) => {
                let mut r = json_response(
                    if state == JobState::Cancelled {
                        StatusCode::GONE
                    } else {
                        StatusCode::ACCEPTED
                    },
                    &serde_json::json!({"name": format!("budget-jobs/{id}"), "state": state, "agent": job.agent}),
                );
                if state != JobState::Cancelled {
                    r.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
                }
                Ok(r)
            }
        },
        _ => Err(ProxyError::JobConflict(format!(
            "use GET to fetch job {id:?} or DELETE to cancel it"
        ))),
    }
}

/// At start-up, before the proxy port accepts anything: jobs that were running when the
/// process stopped become pending again (at-least-once), and the pending count is loaded.
/// Synchronous on purpose: a count taken while clients already add jobs would overwrite
/// their increments, and a job counted as absent is never run.
pub(crate) fn recover(shared: &Shared) -> Result<(), crate::store::StoreError> {
    let n = shared.jobs.requeue_running_jobs()?;
    if n > 0 {
        tracing::warn!(target: "proxy", jobs = n, "deferred jobs that were running at the last stop run again (at-least-once)");
    }
    let counts = shared.jobs.job_counts()?;
    shared
        .queues
        .set_jobs_pending(counts.iter().map(|(_, c)| c.pending + c.running).sum());
    Ok(())
}

/// Run pending jobs whenever budget may have returned (and on a slow tick as a backstop),
/// until `stop` fires.
pub async fn run(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    // Finished jobs are pruned on a slow tick, never per wake-up.
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        run_pending(&shared).await;
        let prune_now = tokio::select! {
            _ = shared.queues.jobs_woken() => false,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = prune.tick() => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        if prune_now {
            let now = shared.clock.now().timestamp();
            let s = shared.jobs.clone();
            let _ = blocking(move || s.prune_jobs(now)).await;
        }
    }
}

async fn run_pending(shared: &Arc<Shared>) {
    if shared.queues.jobs_pending() == 0 {
        return;
    }
    let s = shared.jobs.clone();
    let Ok(pending) = blocking(move || s.pending_jobs(256)).await else {
        return;
    };
    // FIFO per agent: once an agent's job is not admitted, its later jobs wait too.
    let mut waiting: HashSet<String> = HashSet::new();
    for job in pending {
        if waiting.contains(&job.agent) {
            continue;
        }
        if !run_one(shared, job.clone()).await {
            waiting.insert(job.agent);
        }
    }
}

/// Whether admission would still refuse `agent`'s job now (its queue budget is spent, or
/// parked requests go first). The runner then leaves the job pending without marking it
/// running: a client polling the job would otherwise see it flicker to `running` on every
/// wake-up while the agent is over budget.
fn still_refused(shared: &Shared, config: &crate::config::Config, agent: &str) -> bool {
    let budget = config.agent(agent).unwrap_or(&config.default);
    if budget.action != crate::config::Action::Queue {
        return false;
    }
    if shared.queues.has_waiters(agent) {
        return true;
    }
    shared
        .ledger
        .get(agent)
        .is_some_and(|entry| shared.ledger.remaining(&entry, budget, shared.clock.now()) == 0)
}

/// Run one job; `false` when its agent is still over budget (it stays pending).
async fn run_one(shared: &Arc<Shared>, job: Job) -> bool {
    let config = shared.config.load_full();
    if still_refused(shared, &config, &job.agent) {
        return false;
    }
    let s = shared.jobs.clone();
    let id = job.id.clone();
    if !matches!(
        blocking(move || s.transition_job(&id, JobState::Pending, JobState::Running)).await,
        Ok(true)
    ) {
        return true; // cancelled meanwhile
    }
    let mut builder = http::Request::builder().method(job.method.as_str()).uri({
        let mut u = job.path.clone();
        if let Some(q) = &job.query {
            u.push('?');
            u.push_str(q);
        }
        u
    });
    for (k, v) in &job.headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let Ok(req) = builder.body(()) else {
        tracing::error!(target: "proxy", job = %job.id, "stored request cannot be rebuilt; dropping it");
        let s = shared.jobs.clone();
        let id = job.id.clone();
        let _ = blocking(move || {
            s.finish_job(&id, 500, &[], b"stored request could not be rebuilt", 0)
        })
        .await;
        return true;
    };
    let (parts, ()) = req.into_parts();
    let ident = Identity {
        agent: job.agent.clone(),
        via: Via::Header,
        prefix_len: 0,
        substitute_key: match job.substitute_key.as_deref() {
            Some("header") => Some(KeyPlace::Header),
            Some("query") => Some(KeyPlace::Query),
            _ => None,
        },
        dynamic: config.agent(&job.agent).is_none(),
    };
    let peeked = PeekedBody::from_bytes(Bytes::from(job.body.clone()));
    let result = dispatch(
        shared,
        &config,
        Box::new(RequestHead::from_parts(parts)),
        &ident,
        &job.path,
        job.query.as_deref(),
        peeked,
        Origin::Job,
        None,
        &mut super::Trace::default(),
    )
    .await;
    let (status, rheaders, body) = match result {
        // (A job is never parked: over budget it stays pending.)
        Err(ProxyError::NotYet) | Ok(Dispatched::Park(_)) => {
            let s = shared.jobs.clone();
            let id = job.id.clone();
            let _ =
                blocking(move || s.transition_job(&id, JobState::Running, JobState::Pending)).await;
            return false;
        }
        Ok(Dispatched::Response(mut resp)) => {
            crate::wire::head_into_map(&mut resp);
            let (p, b) = resp.into_parts();
            let body = match http_body_util::Limited::new(b, MAX_RESPONSE_BYTES)
                .collect()
                .await
            {
                Ok(c) => c.to_bytes(),
                Err(e) => Bytes::from(format!("the response could not be kept: {e}")),
            };
            (p.status, p.headers, body)
        }
        Err(e) => {
            let (p, b) = e.to_response().into_parts();
            (p.status, p.headers, b)
        }
    };
    let rheaders: Vec<(String, Vec<u8>)> = rheaders
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let expires = shared.clock.now().timestamp()
        + i64::try_from(shared.settings.job_ttl.as_secs()).unwrap_or(86400);
    let s = shared.jobs.clone();
    let id = job.id.clone();
    match blocking(move || s.finish_job(&id, status.as_u16(), &rheaders, &body, expires)).await {
        Ok(()) => {
            shared.queues.job_settled();
            tracing::info!(target: "proxy", agent = %job.agent, job = %job.id, status = status.as_u16(), "deferred job done");
        }
        Err(e) => {
            tracing::error!(target: "proxy", job = %job.id, error = %e, "could not store a job's response; it will run again")
        }
    }
    true
}
