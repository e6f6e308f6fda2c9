//! Budgets: periods, prices, the ledger and alerts.

pub mod alerts;
pub mod ledger;
pub mod period;
pub mod pricing;
pub mod queue;
