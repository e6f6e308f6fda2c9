//! budget-proxy: a Gemini API gateway that meters every response and enforces per-agent
//! token budgets.
//!
//! # Layout
//! - [`config`]: `budgets.json` types, validation, resolution of defaults.
//! - [`gemini`]: the wire format (URLs, usage scanner, model names in bodies, error bodies).
//! - [`identity`]: which agent sent a request.
//! - [`budget`]: periods, prices, the ledger (reserve before forwarding, settle on usage) and
//!   alerts at usage thresholds.
//! - [`webhook`]: alert webhooks (bounded queue, retries with backoff, off the hot path).
//! - [`store`]: durable counters (embedded SQLite), written behind the hot path.
//! - [`proxy`]: the hyper service, the upstream client and the metered response body.
//! - [`admin`]: the side-port API.
//! - [`server`]: listeners and graceful shutdown; [`app`] wires everything together.
//! - [`tls`]: listener TLS (certificates reloaded on renewal) and `gen-cert`.
//! - [`error`]: one error type for the proxy port, mapped to Gemini-shaped responses in one place.
//! - [`clock`]: the injected clock.

pub mod admin;
pub mod app;
pub mod budget;
pub mod clock;
pub mod config;
pub mod error;
pub mod gemini;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod store;
pub mod tls;
pub mod webhook;
pub mod wire;

#[cfg(test)]
mod testing;
