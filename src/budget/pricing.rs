//! Prices per model and the exact cost of a response, in integer pico-dollars.
//!
//! Prices are integers (micro-dollars per million tokens) so cost is exact: one micro-dollar
//! per million tokens is one pico-dollar per token, hence `cost = tokens × price` with no
//! division and no rounding. Costs are summed as `u128` pico-dollars and only turned into
//! floating-point dollars for display.
//!
//! Billing rules (GEMINI_WIRE.md §3, §7):
//! - the tier is chosen by the whole prompt (`prompt_tokens`, cached included) against
//!   `long_threshold_tokens`;
//! - `prompt_tokens` includes `cached_tokens`: the cached part bills at the cache rate,
//!   the audio part at the audio rate, the rest at the input rate;
//! - thinking (`thoughts_tokens`) bills as output; tool-use prompt tokens bill as input.

use crate::gemini::Usage;
use std::collections::HashMap;

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

impl ModelPrice {
    /// A single-tier price whose audio and cache rates equal the input rate (the rule for
    /// models whose price list has no separate audio or cache price).
    pub const fn flat(input: u64, output: u64) -> Self {
        ModelPrice {
            input,
            input_audio: input,
            output,
            cached: input,
            long_threshold_tokens: None,
            long_input: input,
            long_output: output,
            long_cached: input,
        }
    }

    /// The same price with a separate cache-read rate (both tiers).
    pub const fn with_cached(mut self, cached: u64) -> Self {
        self.cached = cached;
        self.long_cached = cached;
        self
    }

    /// The same price with a separate audio-input rate.
    pub const fn with_audio(mut self, input_audio: u64) -> Self {
        self.input_audio = input_audio;
        self
    }

    /// The same price with a long-prompt tier above `threshold_tokens` prompt tokens.
    pub const fn with_long_tier(
        mut self,
        threshold_tokens: u64,
        long_input: u64,
        long_output: u64,
        long_cached: u64,
    ) -> Self {
        self.long_threshold_tokens = Some(threshold_tokens);
        self.long_input = long_input;
        self.long_output = long_output;
        self.long_cached = long_cached;
        self
    }

    /// Whether a prompt of `prompt_tokens` bills at the long-prompt rates.
    pub fn is_long(&self, prompt_tokens: u64) -> bool {
        self.long_threshold_tokens
            .is_some_and(|t| prompt_tokens > t)
    }
}

/// Changes to one model's price from budgets.json, in micro-dollars per million tokens;
/// `None` keeps the base price's value (the built-in price, or the derived default for a
/// model the table does not know).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceOverride {
    /// Input rate.
    pub input: Option<u64>,
    /// Audio input rate.
    pub input_audio: Option<u64>,
    /// Output rate.
    pub output: Option<u64>,
    /// Cache-read rate.
    pub cached: Option<u64>,
    /// Long-prompt threshold in prompt tokens.
    pub long_threshold_tokens: Option<u64>,
    /// Long-prompt input rate.
    pub long_input: Option<u64>,
    /// Long-prompt output rate.
    pub long_output: Option<u64>,
    /// Long-prompt cache-read rate.
    pub long_cached: Option<u64>,
}

impl PriceOverride {
    /// Applies the override on top of `base`. Without a base (a model the table does not
    /// know) `input` and `output` are required, and the other rates default as in
    /// [`ModelPrice::flat`] (audio and cache = input, long rates = base rates). With a base,
    /// rates that are not overridden keep the base value, except that a rate derived from
    /// one that *is* overridden follows it when the base had them equal (so overriding only
    /// `input` of a model without a cache price also moves its cache price).
    ///
    /// Returns `Err` with the names of the missing required fields.
    pub fn apply(&self, base: Option<&ModelPrice>) -> Result<ModelPrice, Vec<&'static str>> {
        let base = match base {
            Some(b) => b.clone(),
            None => {
                let mut missing = Vec::new();
                if self.input.is_none() {
                    missing.push("input");
                }
                if self.output.is_none() {
                    missing.push("output");
                }
                match (self.input, self.output) {
                    (Some(i), Some(o)) => ModelPrice::flat(i, o),
                    _ => return Err(missing),
                }
            }
        };
        let input = self.input.unwrap_or(base.input);
        let output = self.output.unwrap_or(base.output);
        // A rate that equalled its source in the base follows the source's new value.
        let follow = |own: Option<u64>, base_own: u64, base_src: u64, new_src: u64| {
            own.unwrap_or(if base_own == base_src {
                new_src
            } else {
                base_own
            })
        };
        let input_audio = follow(self.input_audio, base.input_audio, base.input, input);
        let cached = follow(self.cached, base.cached, base.input, input);
        let long_threshold_tokens = self.long_threshold_tokens.or(base.long_threshold_tokens);
        let long_input = follow(self.long_input, base.long_input, base.input, input);
        let long_output = follow(self.long_output, base.long_output, base.output, output);
        let long_cached = follow(self.long_cached, base.long_cached, base.cached, cached);
        Ok(ModelPrice {
            input,
            input_audio,
            output,
            cached,
            long_threshold_tokens,
            long_input,
            long_output,
            long_cached,
        })
    }
}

/// The price table: built-in prices overridden by `pricing` in budgets.json.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    /// Model id (without `models/`) → price. Looked up by every metered response, so hashed
    /// (foldhash): a B-tree compares the name with a string per level.
    entries: HashMap<String, ModelPrice, foldhash::fast::RandomState>,
}

/// Micro-dollars per million tokens from USD per million tokens, so the built-in table reads
/// like the price list it is copied from.
const fn usd(dollars_per_m: f64) -> u64 {
    // Only called in the constant table below with at most 6 decimals; the cast rounds to
    // the nearest integer after the +0.5, which makes the conversion exact for such values.
    (dollars_per_m * 1_000_000.0 + 0.5) as u64
}

/// GEMINI_WIRE.md §7 (paid Standard tier, Gemini Developer API, USD per 1M tokens).
fn builtin_entries() -> Vec<(&'static str, ModelPrice)> {
    // Pro models price every modality alike, so their audio rate is the input rate.
    let pro_3 = ModelPrice::flat(usd(2.0), usd(12.0)).with_long_tier(
        200_000,
        usd(4.0),
        usd(18.0),
        usd(0.40),
    );
    let pro_3 = ModelPrice {
        cached: usd(0.20),
        ..pro_3
    };
    // 3.6/3.7 flash: the price until 2027-01-01 (1.50 / 7.50 / 0.15 from then on).
    let flash_3_6 = ModelPrice::flat(usd(0.75), usd(3.75)).with_cached(usd(0.075));
    vec![
        (
            "gemini-1.5-flash",
            ModelPrice::flat(usd(0.075), usd(0.30))
                .with_cached(usd(0.01875))
                .with_long_tier(128_000, usd(0.15), usd(0.60), usd(0.01875)),
        ),
        (
            // No cache price listed: cache reads bill as input, in each tier.
            "gemini-1.5-pro",
            ModelPrice::flat(usd(1.25), usd(5.0)).with_long_tier(
                128_000,
                usd(2.50),
                usd(10.0),
                usd(2.50),
            ),
        ),
        (
            "gemini-2.0-flash",
            ModelPrice::flat(usd(0.10), usd(0.40))
                .with_audio(usd(0.70))
                .with_cached(usd(0.025)),
        ),
        (
            "gemini-2.0-flash-lite",
            ModelPrice::flat(usd(0.075), usd(0.30)),
        ),
        (
            "gemini-2.5-pro",
            ModelPrice {
                cached: usd(0.125),
                ..ModelPrice::flat(usd(1.25), usd(10.0))
            }
            .with_long_tier(200_000, usd(2.50), usd(15.0), usd(0.25)),
        ),
        (
            "gemini-2.5-flash",
            ModelPrice::flat(usd(0.30), usd(2.50))
                .with_audio(usd(1.0))
                .with_cached(usd(0.03)),
        ),
        (
            "gemini-2.5-flash-lite",
            ModelPrice::flat(usd(0.10), usd(0.40))
                .with_audio(usd(0.30))
                .with_cached(usd(0.01)),
        ),
        ("gemini-3-pro-preview", pro_3.clone()),
        (
            "gemini-3-flash-preview",
            ModelPrice::flat(usd(0.50), usd(3.0))
                .with_audio(usd(1.0))
                .with_cached(usd(0.05)),
        ),
        ("gemini-3.1-pro-preview", pro_3),
        (
            "gemini-3.1-flash-lite",
            ModelPrice::flat(usd(0.25), usd(1.50))
                .with_audio(usd(0.50))
                .with_cached(usd(0.025)),
        ),
        (
            "gemini-3.5-flash",
            ModelPrice::flat(usd(1.50), usd(9.0)).with_cached(usd(0.15)),
        ),
        (
            "gemini-3.5-flash-lite",
            ModelPrice::flat(usd(0.30), usd(2.50)).with_cached(usd(0.03)),
        ),
        ("gemini-3.6-flash", flash_3_6.clone()),
        ("gemini-3.7-flash", flash_3_6),
    ]
}

/// The model id without the resource prefix the API puts in paths and bodies
/// (`models/gemini-2.5-flash`, `tunedModels/x`, Vertex `publishers/google/models/…`).
pub fn normalize_model(model: &str) -> &str {
    let model = model.trim();
    if !model.contains('/') {
        // The usual case (a `modelVersion`, a path's model): nothing to strip.
        return model;
    }
    if let Some(rest) = model.strip_prefix("tunedModels/") {
        return rest;
    }
    match model.rfind("models/") {
        Some(i) if i == 0 || model[..i].ends_with('/') => {
            model.get(i + "models/".len()..).unwrap_or(model)
        }
        _ => model,
    }
}

impl PriceTable {
    /// The built-in table (GEMINI_WIRE.md §7).
    pub fn builtin() -> Self {
        let entries = builtin_entries()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        PriceTable { entries }
    }

    /// This table with `overrides` replacing or adding whole entries (keys are normalised
    /// like [`PriceTable::lookup`] names); budgets.json's `pricing` goes through here after
    /// [`PriceOverride::apply`], so a price change needs no release.
    pub fn with_overrides<I, K>(mut self, overrides: I) -> Self
    where
        I: IntoIterator<Item = (K, ModelPrice)>,
        K: AsRef<str>,
    {
        for (model, price) in overrides {
            self.entries
                .insert(normalize_model(model.as_ref()).to_string(), price);
        }
        self
    }

    /// The price of `model` (`models/` prefix and version suffixes tolerated).
    ///
    /// Exact match first; otherwise the longest key that the name starts with followed by
    /// `-` (`gemini-2.5-flash-preview-09-2025` → `gemini-2.5-flash`,
    /// `gemini-2.5-flash-lite-001` → `gemini-2.5-flash-lite`).
    pub fn lookup(&self, model: &str) -> Option<&ModelPrice> {
        self.lookup_entry(model).map(|(_, price)| price)
    }

    /// Like [`PriceTable::lookup`], with the table key that matched (for logs and metrics).
    pub fn lookup_entry(&self, model: &str) -> Option<(&str, &ModelPrice)> {
        let name = normalize_model(model);
        // A key followed by `-` in `name` is `name` cut at one of its dashes: the longest
        // is the first found from the right (the whole name first).
        let mut end = name.len();
        loop {
            if let Some((k, v)) = self.entries.get_key_value(&name[..end]) {
                return Some((k.as_str(), v));
            }
            end = name[..end].rfind('-')?;
        }
    }

    /// The entry stored under exactly `model` (after normalisation), without prefix
    /// matching; config uses it to tell an override of a known model from a new model.
    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.entries.get(normalize_model(model))
    }

    /// Every entry, in the order of model ids; for the admin API and `check-config`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ModelPrice)> {
        let mut entries: Vec<_> = self.entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
        entries.sort_unstable_by_key(|(k, _)| *k);
        entries.into_iter()
    }

    /// Number of models in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no model at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Exact cost of `usage` at `price`, in pico-dollars (1e-12 USD).
///
/// Never panics: counts that do not add up (cached or audio above the prompt) are clamped
/// by saturating subtraction, and every product and sum saturates.
pub fn cost_pico(usage: &Usage, price: &ModelPrice) -> u128 {
    let long = price.is_long(usage.prompt_tokens);
    let (input, output, cached) = if long {
        (price.long_input, price.long_output, price.long_cached)
    } else {
        (price.input, price.output, price.cached)
    };
    // Audio has no long-tier price of its own: a model whose audio rate is its input rate
    // keeps that link in the long tier; a separate audio rate applies in both tiers.
    let audio = if long && price.input_audio == price.input {
        price.long_input
    } else {
        price.input_audio
    };
    let cached_tokens = usage.cached_tokens.min(usage.prompt_tokens);
    let audio_tokens = usage
        .audio_prompt_tokens
        .min(usage.prompt_tokens - cached_tokens);
    let plain_input = usage.prompt_tokens - cached_tokens - audio_tokens;
    let output_tokens = usage
        .candidates_tokens
        .saturating_add(usage.thoughts_tokens);
    let terms = [
        (plain_input, input),
        (audio_tokens, audio),
        (cached_tokens, cached),
        (usage.tool_use_prompt_tokens, input),
        (output_tokens, output),
    ];
    terms.iter().fold(0u128, |sum, &(tokens, rate)| {
        // u64 × u64 always fits in u128; only the sum can saturate.
        sum.saturating_add(u128::from(tokens) * u128::from(rate))
    })
}

/// Pico-dollars as US dollars, for display (`estimated_cost_usd`); not for accounting.
pub fn pico_to_usd(pico: u128) -> f64 {
    // Split to keep precision: whole micro-dollars, then the remainder.
    let micro = pico / 1_000_000;
    let rest = pico % 1_000_000;
    (micro as f64) / 1e6 + (rest as f64) / 1e12
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, cached: u64, audio: u64, candidates: u64, thoughts: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            candidates_tokens: candidates,
            thoughts_tokens: thoughts,
            tool_use_prompt_tokens: 0,
            cached_tokens: cached,
            total_tokens: prompt + candidates + thoughts,
            audio_prompt_tokens: audio,
        }
    }

    #[test]
    fn builtin_prices_match_the_price_list() {
        let t = PriceTable::builtin();
        let pro = t.lookup("gemini-2.5-pro").unwrap();
        assert_eq!(
            *pro,
            ModelPrice {
                input: 1_250_000,
                input_audio: 1_250_000,
                output: 10_000_000,
                cached: 125_000,
                long_threshold_tokens: Some(200_000),
                long_input: 2_500_000,
                long_output: 15_000_000,
                long_cached: 250_000,
            }
        );
        let flash = t.lookup("gemini-2.5-flash").unwrap();
        assert_eq!(
            (flash.input, flash.input_audio, flash.output),
            (300_000, 1_000_000, 2_500_000)
        );
        assert_eq!((flash.cached, flash.long_threshold_tokens), (30_000, None));
        let lite = t.lookup("gemini-2.5-flash-lite").unwrap();
        assert_eq!(
            (lite.input, lite.input_audio, lite.output, lite.cached),
            (100_000, 300_000, 400_000, 10_000)
        );
        let f15 = t.lookup("gemini-1.5-flash").unwrap();
        assert_eq!(f15.long_threshold_tokens, Some(128_000));
        assert_eq!(
            (f15.input, f15.long_input, f15.output, f15.long_output),
            (75_000, 150_000, 300_000, 600_000)
        );
        assert_eq!(f15.cached, 18_750);
        // No cache price listed: cached = input, in both tiers.
        let p15 = t.lookup("gemini-1.5-pro").unwrap();
        assert_eq!((p15.cached, p15.long_cached), (1_250_000, 2_500_000));
        let l20 = t.lookup("gemini-2.0-flash-lite").unwrap();
        assert_eq!((l20.cached, l20.input_audio), (75_000, 75_000));
        assert_eq!(t.lookup("gemini-2.0-flash").unwrap().input_audio, 700_000);
        let p3 = t.lookup("gemini-3.1-pro-preview").unwrap();
        assert_eq!(
            (p3.input, p3.long_input, p3.output, p3.long_output),
            (2_000_000, 4_000_000, 12_000_000, 18_000_000)
        );
        assert_eq!((p3.cached, p3.long_cached), (200_000, 400_000));
        assert_eq!(t.lookup("gemini-3-pro-preview"), Some(p3));
        let f3 = t.lookup("gemini-3-flash-preview").unwrap();
        assert_eq!(
            (f3.input, f3.input_audio, f3.output, f3.cached),
            (500_000, 1_000_000, 3_000_000, 50_000)
        );
        let fl31 = t.lookup("gemini-3.1-flash-lite").unwrap();
        assert_eq!(
            (fl31.input, fl31.input_audio, fl31.output, fl31.cached),
            (250_000, 500_000, 1_500_000, 25_000)
        );
        let f35 = t.lookup("gemini-3.5-flash").unwrap();
        assert_eq!(
            (f35.input, f35.output, f35.cached),
            (1_500_000, 9_000_000, 150_000)
        );
        let fl35 = t.lookup("gemini-3.5-flash-lite").unwrap();
        assert_eq!(
            (fl35.input, fl35.output, fl35.cached),
            (300_000, 2_500_000, 30_000)
        );
        for m in ["gemini-3.6-flash", "gemini-3.7-flash"] {
            let p = t.lookup(m).unwrap();
            assert_eq!(
                (p.input, p.output, p.cached),
                (750_000, 3_750_000, 75_000),
                "{m}"
            );
        }
        assert_eq!(t.len(), 15);
    }

    #[test]
    fn lookup_strips_prefixes_and_matches_version_suffixes() {
        let t = PriceTable::builtin();
        let key = |m: &str| t.lookup_entry(m).map(|(k, _)| k.to_string());
        assert_eq!(
            key("models/gemini-2.5-flash").as_deref(),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            key("tunedModels/gemini-2.5-flash").as_deref(),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            key("publishers/google/models/gemini-2.5-pro").as_deref(),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            key("gemini-2.5-flash-preview-09-2025").as_deref(),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            key("gemini-2.5-flash-lite-001").as_deref(),
            Some("gemini-2.5-flash-lite")
        );
        assert_eq!(
            key("models/gemini-2.5-flash-lite-preview-06-17").as_deref(),
            Some("gemini-2.5-flash-lite")
        );
        assert_eq!(
            key("gemini-2.0-flash-001").as_deref(),
            Some("gemini-2.0-flash")
        );
        assert_eq!(
            key("gemini-3.1-flash-lite-preview").as_deref(),
            Some("gemini-3.1-flash-lite")
        );
        // A key must be followed by '-': no match on a longer version number.
        assert_eq!(key("gemini-2.5-flashy"), None);
        assert_eq!(key("gemini-2.55-pro"), None);
        assert_eq!(key("gemini-3.8-flash"), None);
        assert_eq!(key("text-embedding-004"), None);
        assert_eq!(key(""), None);
    }

    #[test]
    fn overrides_replace_and_extend() {
        let new = ModelPrice::flat(750_000, 3_000_000);
        let cheaper = ModelPrice::flat(1, 2);
        let t = PriceTable::builtin().with_overrides([
            ("models/gemini-3.8-flash", new.clone()),
            ("gemini-2.5-flash", cheaper.clone()),
        ]);
        assert_eq!(t.lookup("gemini-3.8-flash-001"), Some(&new));
        assert_eq!(t.lookup("gemini-2.5-flash"), Some(&cheaper));
        // The more specific built-in entry still wins for its own names.
        assert_eq!(t.lookup("gemini-2.5-flash-lite").unwrap().input, 100_000);
        assert_eq!(t.get("gemini-2.5-flash-preview"), None);
    }

    #[test]
    fn price_override_inherits_from_the_base() {
        let t = PriceTable::builtin();
        let base = t.get("gemini-2.5-pro");
        let o = PriceOverride {
            input: Some(1_000_000),
            ..Default::default()
        };
        let p = o.apply(base).unwrap();
        assert_eq!(p.input, 1_000_000);
        assert_eq!(p.input_audio, 1_000_000, "audio followed input");
        assert_eq!(
            (p.cached, p.long_input, p.output),
            (125_000, 2_500_000, 10_000_000)
        );
        // A model without a cache price: the cache price follows a new input price.
        let o = PriceOverride {
            input: Some(2_000_000),
            ..Default::default()
        };
        let p = o.apply(t.get("gemini-1.5-pro")).unwrap();
        assert_eq!((p.cached, p.long_cached), (2_000_000, 2_500_000));
        // A new model needs input and output; the rest defaults from them.
        assert_eq!(
            PriceOverride::default().apply(None),
            Err(vec!["input", "output"])
        );
        let o = PriceOverride {
            input: Some(10),
            output: Some(20),
            ..Default::default()
        };
        assert_eq!(o.apply(None), Ok(ModelPrice::flat(10, 20)));
        let o = PriceOverride {
            input: Some(10),
            output: Some(20),
            long_threshold_tokens: Some(1000),
            long_input: Some(15),
            ..Default::default()
        };
        let p = o.apply(None).unwrap();
        assert_eq!(
            (p.long_input, p.long_output, p.long_cached, p.cached),
            (15, 20, 10, 10)
        );
    }

    #[test]
    fn cost_of_a_plain_flash_response() {
        // 1000 prompt, 500 visible output, 200 thinking at gemini-2.5-flash:
        // 1000 × 300_000 + 700 × 2_500_000 = 300_000_000 + 1_750_000_000 pico.
        let t = PriceTable::builtin();
        let p = t.lookup("gemini-2.5-flash").unwrap();
        assert_eq!(cost_pico(&usage(1000, 0, 0, 500, 200), p), 2_050_000_000);
        assert!((pico_to_usd(2_050_000_000) - 0.00205).abs() < 1e-15);
    }

    #[test]
    fn cost_with_cache_audio_and_tools() {
        // gemini-2.5-flash: prompt 10_000 of which 4_000 cached and 1_000 audio; 2_000 out,
        // 300 tool-use prompt tokens.
        //   plain input 5_000 × 300_000   = 1_500_000_000
        //   audio 1_000 × 1_000_000       = 1_000_000_000
        //   cached 4_000 × 30_000         =   120_000_000
        //   tool use 300 × 300_000        =    90_000_000
        //   output 2_000 × 2_500_000      = 5_000_000_000
        let p = PriceTable::builtin()
            .lookup("gemini-2.5-flash")
            .unwrap()
            .clone();
        let mut u = usage(10_000, 4_000, 1_000, 2_000, 0);
        u.tool_use_prompt_tokens = 300;
        assert_eq!(cost_pico(&u, &p), 7_710_000_000);
    }

    #[test]
    fn long_prompt_tier_switches_above_the_threshold() {
        let p = PriceTable::builtin()
            .lookup("gemini-2.5-pro")
            .unwrap()
            .clone();
        // Exactly at the threshold: base rates. 200_000 × 1_250_000 + 1_000 × 10_000_000.
        assert_eq!(
            cost_pico(&usage(200_000, 0, 0, 1_000, 0), &p),
            250_000_000_000 + 10_000_000_000
        );
        // One above: long rates for the whole request, cache included.
        //   (200_001 − 100_000) × 2_500_000 = 250_002_500_000
        //   100_000 × 250_000               =  25_000_000_000
        //   (1_000 + 500) × 15_000_000      =  22_500_000_000
        assert_eq!(
            cost_pico(&usage(200_001, 100_000, 0, 1_000, 500), &p),
            297_502_500_000
        );
        // Audio on a model without an audio price follows the tier's input rate.
        assert_eq!(
            cost_pico(&usage(300_000, 0, 300_000, 0, 0), &p),
            300_000 * 2_500_000
        );
        // 1.5 models switch at 128k.
        let f = PriceTable::builtin()
            .lookup("gemini-1.5-flash")
            .unwrap()
            .clone();
        assert_eq!(
            cost_pico(&usage(128_001, 0, 0, 10, 0), &f),
            128_001 * 150_000 + 10 * 600_000
        );
        assert_eq!(
            cost_pico(&usage(128_000, 0, 0, 10, 0), &f),
            128_000 * 75_000 + 10 * 300_000
        );
    }

    #[test]
    fn odd_usage_never_panics() {
        let p = PriceTable::builtin()
            .lookup("gemini-2.5-flash")
            .unwrap()
            .clone();
        // Cached above the prompt: the whole prompt bills as cached, nothing negative.
        assert_eq!(cost_pico(&usage(100, 500, 0, 0, 0), &p), 100 * 30_000);
        // Audio above what is left after the cache.
        assert_eq!(
            cost_pico(&usage(100, 60, 70, 0, 0), &p),
            60 * 30_000 + 40 * 1_000_000
        );
        // Everything at u64::MAX saturates instead of overflowing.
        let max = Usage {
            prompt_tokens: u64::MAX,
            candidates_tokens: u64::MAX,
            thoughts_tokens: u64::MAX,
            tool_use_prompt_tokens: u64::MAX,
            cached_tokens: u64::MAX,
            total_tokens: u64::MAX,
            audio_prompt_tokens: u64::MAX,
        };
        let huge = ModelPrice::flat(u64::MAX, u64::MAX);
        assert_eq!(cost_pico(&max, &huge), u128::MAX);
        assert_eq!(cost_pico(&Usage::default(), &p), 0);
    }

    #[test]
    fn usd_conversion_is_exact_for_six_decimals() {
        assert_eq!(usd(0.01875), 18_750);
        assert_eq!(usd(0.075), 75_000);
        assert_eq!(usd(2.50), 2_500_000);
        assert_eq!(usd(0.000001), 1);
    }
}
