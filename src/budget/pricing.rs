//! Prices per model and the exact cost of a response, in integer pico-dollars.

use crate::gemini::Usage;

/// Prices of one model in micro-dollars per million tokens (so `$0.075/1M` is `75_000`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelPrice {
    /// Text/image/video input.
    pub input: u64,
    /// Audio input (defaults to `input`).
    pub input_audio: u64,
    /// Output, thinking included.
    pub output: u64,
    /// Cached prompt tokens.
    pub cached: u64,
    /// Prompts above this many tokens bill at the `long_*` rates (`None`: no tier).
    pub long_threshold_tokens: Option<u64>,
    /// Input above the threshold.
    pub long_input: u64,
    /// Output above the threshold.
    pub long_output: u64,
    /// Cached above the threshold.
    pub long_cached: u64,
}

/// The price table: built-in prices overridden by `pricing` in budgets.json.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {}

impl PriceTable {
    /// The built-in table (GEMINI_WIRE.md §7).
    pub fn builtin() -> Self {
        Self::default()
    }
    /// The price of `model` (`models/` prefix and version suffixes tolerated).
    pub fn lookup(&self, model: &str) -> Option<&ModelPrice> {
        let _ = model;
        None
    }
}

/// Exact cost of `usage` at `price`, in pico-dollars (1e-12 USD).
pub fn cost_pico(usage: &Usage, price: &ModelPrice) -> u128 {
    let _ = (usage, price);
    0
}
