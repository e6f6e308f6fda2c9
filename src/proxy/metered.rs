//! The metered response body: forwards every upstream frame at once, feeds a copy of the
//! bytes to the usage scanner (which keeps only a bounded amount of state) and settles the
//! reservation exactly once: at the end of the stream, on a stream error, or — when the
//! client goes away — after draining the rest of the upstream body in the background
//! (bounded by the drain timeout), so the usage Google bills is still recorded.

use super::upstream::UpstreamBody;
use super::Shared;
use crate::budget::ledger::{Charge, Reservation};
use crate::budget::pricing::cost_pico;
use crate::gemini::{Usage, UsageScanner};
use crate::server::BodyError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The upstream finished the body.
    Complete,
    /// The upstream body failed (connection cut, reset).
    Cut,
    /// The client left and the drain ran out of time.
    DrainTimedOut,
}

/// Metering state of one response.
#[derive(Debug)]
pub struct Meter {
    /// Also holds the model the request was sent to (after any degrade), which prices the
    /// response unless its body names another.
    scanner: UsageScanner,
    reservation: Reservation,
    shared: Arc<Shared>,
}

impl Meter {
    /// Meter a response of a request to `model` that holds `reservation`.
    pub fn new(reservation: Reservation, model: String, shared: Arc<Shared>) -> Self {
        Self {
            scanner: UsageScanner::for_model(model),
            reservation,
            shared,
        }
    }

    fn finish(self: Box<Self>, ending: Ending) {
        let Meter {
            scanner,
            reservation,
            shared,
        } = *self;
        // Borrowed, not copied: the scanner and the reservation's agent id outlive their use.
        let model: &str = scanner.model();
        let agent_id = reservation.agent_arc();
        let agent: &str = &agent_id;
        let config = shared.config.load();
        let price = config.pricing.lookup(model);
        let usage = match (scanner.usage(), ending) {
            (Some(u), Ending::Complete) => u,
            (Some(u), _) => {
                tracing::warn!(target: "proxy", agent = %agent, model = %model, tokens = u.counted_tokens(),
                    ending = ?ending, "response stream ended early; charging the last usage seen");
                u
            }
            (None, Ending::Complete) => Usage::default(),
            (None, _) => {
                let est = reservation.estimate_tokens();
                tracing::warn!(target: "proxy", agent = %agent, model = %model, tokens = est,
                    ending = ?ending, "response stream ended before any usage was seen; charging the reservation estimate as output tokens");
                Usage {
                    candidates_tokens: est,
                    total_tokens: est,
                    ..Usage::default()
                }
            }
        };
        let cost = price.map_or(0, |p| cost_pico(&usage, p));
        if price.is_none() && usage.counted_tokens() > 0 {
            tracing::debug!(target: "proxy", model = %model, "no price for model; cost counted as 0");
        }
        let now = shared.clock.now();
        let charge = Charge::from_usage(model, &usage, cost);
        // One lookup for the four kinds (prompt, completion, cached, total).
        shared.metrics.tokens_all(
            &agent_id,
            model,
            [
                charge.prompt_tokens,
                charge.completion_tokens,
                charge.cached_tokens,
                charge.total_tokens,
            ],
        );
        let settled = reservation.settle(charge, now);
        shared
            .alerts
            .check(agent, config.budget_for(agent), &settled, now);
        // A settle below the estimate frees budget: parked requests may fit now.
        shared
            .queues
            .release_agent(&shared.ledger, &config, agent, now);
    }
}

/// The upstream body, metered.
#[derive(Debug)]
pub struct MeteredBody {
    inner: Option<UpstreamBody>,
    /// Boxed: most of a body's life is spent being polled, and the meter is large.
    meter: Option<Box<Meter>>,
}

impl crate::wire::CarriesHead for MeteredBody {
    fn take_head(&mut self) -> Option<Box<crate::wire::RawHead>> {
        self.inner.as_mut()?.take_head()
    }
}

impl MeteredBody {
    /// Wrap `inner`; `meter` is `None` for responses that are not budgeted.
    pub fn new(inner: UpstreamBody, meter: Option<Meter>) -> Self {
        Self {
            inner: Some(inner),
            meter: meter.map(Box::new),
        }
    }

    fn finish(&mut self, ending: Ending) {
        if let Some(m) = self.meter.take() {
            m.finish(ending);
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(m), Some(data)) = (this.meter.as_mut(), frame.data_ref()) {
                    m.scanner.feed(data);
                }
                if this.inner.as_ref().is_some_and(Body::is_end_stream) {
                    this.finish(Ending::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.inner = None;
                this.finish(Ending::Cut);
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.inner = None;
                this.finish(Ending::Complete);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Not metered: a body left before its end closes its connection (dropped with
        // it), as nothing needs the rest of it.
        let Some(meter) = self.meter.take() else {
            return;
        };
        let inner = match self.inner.take() {
            Some(b) if !b.is_end_stream() => b,
            _ => return meter.finish(Ending::Complete),
        };
        // The client went away mid-body: keep reading the upstream so the usage that
        // Google bills is recorded, within the drain timeout.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let tracker = meter.shared.drains.clone();
                tracker.spawn_on(drain(inner, meter), &rt);
            }
            Err(_) => meter.finish(Ending::Cut),
        }
    }
}

async fn drain(mut body: UpstreamBody, mut meter: Box<Meter>) {
    let timeout = meter.shared.settings.drain_timeout;
    tracing::debug!(target: "proxy", agent = %meter.reservation.agent(), "client left mid-stream; draining upstream");
    let read = async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        meter.scanner.feed(d);
                    }
                }
                Err(_) => return Ending::Cut,
            }
        }
        Ending::Complete
    };
    let ending = tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Ending::DrainTimedOut);
    meter.finish(ending);
}
