//! Budgets: periods, prices and the ledger.

pub mod ledger;
pub mod period;
pub mod pricing;
