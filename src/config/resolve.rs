//! Validation of a [`RawConfig`] and resolution of each agent's budget.
//!
//! Each value is checked in the entry where it is written, and its error names that entry
//! (`default.timezone`, `agents.sage.reset_day`). A bad value inherited from `default` is
//! reported once, at `default`, not again for every agent that inherits it. Checks that
//! combine two keys (reset day vs period, degrade vs fallback) are reported at the agent
//! when at least one of the two keys is the agent's own.

use super::raw::{RawAgent, RawConfig, RawPrice, RedisFailureMode, WebhookFormat};
use super::{
    parse_key_digest, Action, AgentBudget, AgentIndex, Config, Priority, QueueLimits,
    UnknownAgents, Webhook,
};
use crate::budget::period::{Period, PeriodSpec};
use crate::budget::pricing::{normalize_model, PriceOverride, PriceTable};
use chrono::NaiveTime;
use chrono_tz::Tz;
use std::collections::{BTreeMap, HashMap};

/// Alert thresholds when neither the agent, `default` nor `alerts.thresholds` sets them.
const DEFAULT_THRESHOLDS: [u32; 3] = [75, 90, 100];
/// `max_dynamic_agents` when the file does not set it.
const DEFAULT_MAX_DYNAMIC_AGENTS: u64 = 1000;
/// Longest agent id accepted (it travels in paths and headers).
const MAX_AGENT_ID_LEN: usize = 128;
/// Largest price accepted, USD per 1M tokens (far above any real price; keeps the
/// conversion to integer micro-dollars exact and in range).
const MAX_PRICE_USD: f64 = 1_000_000.0;

/// A value after checking it where it was written.
#[derive(Debug, Clone)]
enum Checked<T> {
    /// The key is absent (or `null`).
    Unset,
    /// The key is present but invalid; already reported.
    Bad,
    /// The key is present and valid.
    Set(T),
}

impl<T> Checked<T> {
    /// Checks an optional raw value, recording the error message of a bad one.
    fn of<R>(
        raw: Option<R>,
        errs: &mut Vec<String>,
        check: impl FnOnce(R) -> Result<T, String>,
    ) -> Self {
        match raw.map(check) {
            None => Checked::Unset,
            Some(Ok(v)) => Checked::Set(v),
            Some(Err(e)) => {
                errs.push(e);
                Checked::Bad
            }
        }
    }

    /// A raw value that serde already fully validated.
    fn valid(raw: Option<T>) -> Self {
        raw.map_or(Checked::Unset, Checked::Set)
    }
}

/// Where a resolved value came from.
enum Picked<'a, T> {
    /// The entry's own key.
    Own(&'a T),
    /// `default`'s key.
    Inherited(&'a T),
    /// Neither sets it.
    Missing,
    /// The value that would apply is invalid (reported where it is written).
    Bad,
}

/// The agent's own value, else `default`'s (`base` is `None` when resolving `default`).
fn pick<'a, T>(own: &'a Checked<T>, base: Option<&'a Checked<T>>) -> Picked<'a, T> {
    match (own, base) {
        (Checked::Set(v), _) => Picked::Own(v),
        (Checked::Bad, _) => Picked::Bad,
        (Checked::Unset, Some(Checked::Set(v))) => Picked::Inherited(v),
        (Checked::Unset, Some(Checked::Bad)) => Picked::Bad,
        (Checked::Unset, Some(Checked::Unset) | None) => Picked::Missing,
    }
}

/// One entry (`default` or an agent) with each of its own keys checked.
struct Entry {
    /// `default` or `agents.<id>`: the prefix of every message about this entry.
    label: String,
    max_tokens: Checked<u64>,
    period: Checked<Period>,
    action: Checked<Action>,
    reset_day: Checked<i64>,
    reset_time: Checked<NaiveTime>,
    timezone: Checked<Tz>,
    fallback_model: Checked<String>,
    description: Option<String>,
    priority: Checked<Priority>,
    api_keys: Checked<Vec<[u8; 32]>>,
    queue_wait: Checked<u64>,
    queue_depth: Checked<usize>,
    thresholds: Checked<Vec<u32>>,
}

impl Entry {
    /// Checks every key of `raw` that can be checked on its own.
    fn check(label: String, raw: &RawAgent, errs: &mut Vec<String>) -> Entry {
        let l = label.as_str();
        let queue = raw.queue.clone().unwrap_or_default();
        Entry {
            max_tokens: Checked::valid(raw.max_tokens),
            period: Checked::valid(raw.period),
            action: Checked::valid(raw.action_on_limit),
            reset_day: Checked::valid(raw.reset_day),
            reset_time: Checked::of(raw.reset_time.as_deref(), errs, |s| {
                parse_reset_time(s).ok_or_else(|| {
                    format!(
                        "{l}.reset_time: {s:?} is not a valid time \
                         (valid: \"HH:MM\" from \"00:00\" to \"23:59\")"
                    )
                })
            }),
            timezone: Checked::of(raw.timezone.as_deref(), errs, |s| {
                parse_timezone(&format!("{l}.timezone"), s)
            }),
            fallback_model: Checked::of(raw.fallback_model.as_deref(), errs, |s| {
                check_model_id(s).ok_or_else(|| {
                    format!(
                        "{l}.fallback_model: {s:?} is not a model id (valid: letters, digits, \
                         '.', '-' and '_', e.g. \"gemini-2.5-flash-lite\")"
                    )
                })
            }),
            description: raw.description.clone(),
            priority: Checked::valid(raw.priority),
            api_keys: Checked::of(raw.api_keys.as_deref(), errs, |keys| {
                check_api_keys(l, keys)
            }),
            queue_wait: Checked::of(queue.max_wait_seconds, errs, |v| {
                if v == 0 {
                    Err(format!(
                        "{l}.queue.max_wait_seconds: 0 is out of range (valid: 1 or more seconds)"
                    ))
                } else {
                    Ok(v)
                }
            }),
            queue_depth: Checked::of(queue.max_depth, errs, |v| match usize::try_from(v) {
                Ok(d) if d > 0 => Ok(d),
                _ => Err(format!(
                    "{l}.queue.max_depth: {v} is out of range (valid: 1 or more requests)"
                )),
            }),
            thresholds: Checked::of(raw.alert_thresholds.as_deref(), errs, |t| {
                check_thresholds(&format!("{l}.alert_thresholds"), t)
            }),
            label,
        }
    }
}

/// Top-level values every entry may fall back on.
struct Globals {
    timezone: Checked<Tz>,
    thresholds: Vec<u32>,
}

/// Validates `raw` and resolves every agent; `Err` lists every problem found.
pub(super) fn resolve(raw: &RawConfig) -> Result<Config, Vec<String>> {
    let mut errs = Vec::new();

    let globals = Globals {
        timezone: Checked::of(raw.timezone.as_deref(), &mut errs, |s| {
            parse_timezone("timezone", s)
        }),
        thresholds: raw
            .alerts
            .as_ref()
            .and_then(|a| a.thresholds.as_deref())
            .map(|t| check_thresholds("alerts.thresholds", t))
            .transpose()
            .unwrap_or_else(|e| {
                errs.push(e);
                None
            })
            .unwrap_or_else(|| DEFAULT_THRESHOLDS.to_vec()),
    };

    let default_entry = Entry::check("default".to_string(), &raw.default, &mut errs);
    if matches!(&default_entry.api_keys, Checked::Set(keys) if !keys.is_empty()) {
        errs.push(
            "default.api_keys: not allowed on default (a virtual key identifies one named \
             agent: put it under agents.<id>.api_keys)"
                .to_string(),
        );
    }
    let default = resolve_entry(&default_entry, None, &globals, &mut errs);

    let mut agents = BTreeMap::new();
    let mut key_index: HashMap<[u8; 32], String> = HashMap::new();
    for (id, raw_agent) in &raw.agents {
        let label = if valid_agent_id(id) {
            format!("agents.{id}")
        } else {
            errs.push(format!(
                "agents[{id:?}]: not a valid agent id (valid: 1–{MAX_AGENT_ID_LEN} characters \
                 from A–Z, a–z, 0–9, '-', '_' and '.', not starting with '.')"
            ));
            format!("agents[{id:?}]")
        };
        let entry = Entry::check(label, raw_agent, &mut errs);
        if let Some(budget) = resolve_entry(&entry, Some(&default_entry), &globals, &mut errs) {
            for (i, digest) in budget.api_keys.iter().enumerate() {
                if let Some(owner) = key_index.get(digest) {
                    errs.push(format!(
                        "{}.api_keys[{i}]: this key is already assigned to agents.{owner} \
                         (a virtual key must identify exactly one agent)",
                        entry.label
                    ));
                } else {
                    key_index.insert(*digest, id.clone());
                }
            }
            agents.insert(id.clone(), budget);
        }
    }

    let pricing = resolve_pricing(&raw.pricing, &mut errs);
    let webhooks = resolve_webhooks(raw, &mut errs);
    let max_dynamic_agents = raw.max_dynamic_agents.unwrap_or(DEFAULT_MAX_DYNAMIC_AGENTS);
    let max_dynamic_agents = usize::try_from(max_dynamic_agents).unwrap_or_else(|_| {
        errs.push(format!(
            "max_dynamic_agents: {max_dynamic_agents} is too large for this platform"
        ));
        0
    });

    match default {
        Some(default) if errs.is_empty() && agents.len() == raw.agents.len() => Ok(Config {
            default,
            index: AgentIndex::new(&agents),
            agents,
            unknown_agents: raw.unknown_agents.unwrap_or(UnknownAgents::Default),
            max_dynamic_agents,
            pricing,
            alert_thresholds: globals.thresholds,
            webhooks,
            redis_failure_mode: raw
                .redis_failure_mode
                .unwrap_or(RedisFailureMode::Open)
                .as_str()
                .to_string(),
            key_index,
        }),
        _ => {
            if errs.is_empty() {
                // Unreachable by construction (an entry fails only with a message); kept
                // so that a future check that forgets its message cannot load a bad file.
                errs.push("the configuration could not be resolved".to_string());
            }
            Err(errs)
        }
    }
}

/// `entry` merged over `base` (`None` for `default` itself) and the built-in defaults.
fn resolve_entry(
    entry: &Entry,
    base: Option<&Entry>,
    globals: &Globals,
    errs: &mut Vec<String>,
) -> Option<AgentBudget> {
    let l = entry.label.as_str();
    let is_default = base.is_none();
    let mut ok = true;
    // A required key missing here and in default is reported once, at default.
    let mut required = |what: &str, valid: &str| {
        if is_default {
            errs.push(format!("default.{what} is required (valid: {valid})"));
        }
    };

    let max_tokens = match pick(&entry.max_tokens, base.map(|b| &b.max_tokens)) {
        Picked::Own(v) | Picked::Inherited(v) => Some(*v),
        Picked::Missing => {
            required("max_tokens", "a positive integer, the tokens per period");
            None
        }
        Picked::Bad => None,
    };
    let period = match pick(&entry.period, base.map(|b| &b.period)) {
        Picked::Own(v) => Some((*v, false)),
        Picked::Inherited(v) => Some((*v, true)),
        Picked::Missing => {
            required("period", "daily, weekly, monthly, yearly, infinite");
            None
        }
        Picked::Bad => None,
    };
    let action = match pick(&entry.action, base.map(|b| &b.action)) {
        Picked::Own(v) => Some((*v, false)),
        Picked::Inherited(v) => Some((*v, true)),
        Picked::Missing => {
            required("action_on_limit", "warn, block, degrade, queue");
            None
        }
        Picked::Bad => None,
    };

    // reset_day: only weekly and monthly have one; other periods ignore the key.
    let reset_day = match (period, pick(&entry.reset_day, base.map(|b| &b.reset_day))) {
        (_, Picked::Bad) => None,
        (None, _) => None,
        (Some((p, p_inherited)), picked) => {
            let (day, day_inherited) = match picked {
                Picked::Own(d) => (*d, false),
                Picked::Inherited(d) => (*d, true),
                Picked::Missing | Picked::Bad => (1, true),
            };
            match p.reset_day_range() {
                None => Some(1),
                Some(range) => match u8::try_from(day).ok().filter(|d| range.contains(d)) {
                    Some(d) => Some(d),
                    None => {
                        if !(p_inherited && day_inherited) {
                            let note = if day_inherited && !is_default {
                                " (inherited from default)"
                            } else {
                                ""
                            };
                            errs.push(format!(
                                "{l}.reset_day: {day}{note} is out of range for a {p} period \
                                 (valid: {}–{})",
                                range.start(),
                                range.end()
                            ));
                        }
                        None
                    }
                },
            }
        }
    };

    let reset_time = match pick(&entry.reset_time, base.map(|b| &b.reset_time)) {
        Picked::Own(t) | Picked::Inherited(t) => Some(*t),
        Picked::Missing => Some(NaiveTime::MIN),
        Picked::Bad => None,
    };
    let timezone = match pick(&entry.timezone, base.map(|b| &b.timezone)) {
        Picked::Own(t) | Picked::Inherited(t) => Some(*t),
        Picked::Bad => None,
        Picked::Missing => match &globals.timezone {
            Checked::Set(t) => Some(*t),
            Checked::Unset => Some(Tz::UTC),
            Checked::Bad => None,
        },
    };
    let fallback_model = match pick(&entry.fallback_model, base.map(|b| &b.fallback_model)) {
        Picked::Own(m) | Picked::Inherited(m) => Some(Some(m.clone())),
        Picked::Missing => Some(None),
        Picked::Bad => None,
    };
    if let (Some((Action::Degrade, action_inherited)), Some(None)) = (action, &fallback_model) {
        if !action_inherited {
            let hint = if is_default {
                ""
            } else {
                " here or in default"
            };
            errs.push(format!(
                "{l}.action_on_limit is \"degrade\" but no fallback_model is set \
                 (set fallback_model{hint}, e.g. \"gemini-2.5-flash-lite\")"
            ));
        }
        ok = false;
    }
    let priority = match pick(&entry.priority, base.map(|b| &b.priority)) {
        Picked::Own(p) | Picked::Inherited(p) => Some(*p),
        Picked::Missing => Some(Priority::Medium),
        Picked::Bad => None,
    };
    // Virtual keys and descriptions belong to their entry: never inherited.
    let api_keys = match &entry.api_keys {
        Checked::Set(keys) if !is_default => Some(keys.clone()),
        Checked::Set(_) | Checked::Unset => Some(Vec::new()),
        Checked::Bad => None,
    };
    let defaults = QueueLimits::default();
    let max_wait_seconds = match pick(&entry.queue_wait, base.map(|b| &b.queue_wait)) {
        Picked::Own(v) | Picked::Inherited(v) => Some(*v),
        Picked::Missing => Some(defaults.max_wait_seconds),
        Picked::Bad => None,
    };
    let max_depth = match pick(&entry.queue_depth, base.map(|b| &b.queue_depth)) {
        Picked::Own(v) | Picked::Inherited(v) => Some(*v),
        Picked::Missing => Some(defaults.max_depth),
        Picked::Bad => None,
    };
    let alert_thresholds = match pick(&entry.thresholds, base.map(|b| &b.thresholds)) {
        Picked::Own(t) | Picked::Inherited(t) => Some(t.clone()),
        Picked::Missing => Some(globals.thresholds.clone()),
        Picked::Bad => None,
    };

    if !ok {
        return None;
    }
    Some(AgentBudget {
        max_tokens: max_tokens?,
        period: PeriodSpec {
            period: period?.0,
            reset_day: reset_day?,
            reset_time: reset_time?,
            timezone: timezone?,
        },
        action: action?.0,
        fallback_model: fallback_model?,
        description: entry.description.clone(),
        priority: priority?,
        api_keys: api_keys?,
        queue: QueueLimits {
            max_wait_seconds: max_wait_seconds?,
            max_depth: max_depth?,
        },
        alert_thresholds: alert_thresholds?,
    })
}

/// Built-in prices with the file's `pricing` applied.
fn resolve_pricing(raw: &BTreeMap<String, RawPrice>, errs: &mut Vec<String>) -> PriceTable {
    let builtin = PriceTable::builtin();
    let mut overrides = Vec::new();
    for (model, price) in raw {
        let l = format!("pricing.{model}");
        let Some(id) = check_model_id(model) else {
            errs.push(format!(
                "pricing[{model:?}]: not a model id (valid: letters, digits, '.', '-' and '_', \
                 e.g. \"gemini-2.5-flash\")"
            ));
            continue;
        };
        let mut ok = true;
        let mut rate = |field: &str, v: Option<f64>| -> Option<u64> {
            let v = v?;
            match usd_to_micro(v) {
                Ok(micro) => Some(micro),
                Err(why) => {
                    errs.push(format!("{l}.{field}: {v} {why}"));
                    ok = false;
                    None
                }
            }
        };
        let o = PriceOverride {
            input: rate("input", price.input),
            input_audio: rate("input_audio", price.input_audio),
            output: rate("output", price.output),
            cached: rate("cached", price.cached),
            long_threshold_tokens: price.long_threshold_tokens,
            long_input: rate("long_input", price.long_input),
            long_output: rate("long_output", price.long_output),
            long_cached: rate("long_cached", price.long_cached),
        };
        if !ok {
            continue;
        }
        match o.apply(builtin.lookup(&id)) {
            Ok(p) => overrides.push((id, p)),
            Err(missing) => errs.push(format!(
                "{l}: {} required for a model without a built-in price \
                 (valid: USD per 1M tokens, e.g. \"input\": 0.30, \"output\": 2.50)",
                missing.join(" and ")
            )),
        }
    }
    builtin.with_overrides(overrides)
}

/// `alerts.webhooks`, each checked.
fn resolve_webhooks(raw: &RawConfig, errs: &mut Vec<String>) -> Vec<Webhook> {
    let Some(alerts) = &raw.alerts else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, w) in alerts.webhooks.iter().enumerate() {
        let url = w.url.trim();
        let host = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .unwrap_or("");
        // The URL itself is not echoed: webhook URLs often embed a secret token.
        if host.is_empty() || host.starts_with('/') || url.chars().any(char::is_whitespace) {
            errs.push(format!(
                "alerts.webhooks[{i}].url is not an absolute http:// or https:// URL"
            ));
            continue;
        }
        out.push(Webhook {
            url: url.to_string(),
            format: w.format.unwrap_or(WebhookFormat::Json).as_str().to_string(),
        });
    }
    out
}

/// Strict `"HH:MM"`, 00:00–23:59.
fn parse_reset_time(s: &str) -> Option<NaiveTime> {
    let (h, m) = s.split_once(':')?;
    let two_digits = |x: &str| x.len() == 2 && x.bytes().all(|c| c.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return None;
    }
    NaiveTime::from_hms_opt(h.parse().ok()?, m.parse().ok()?, 0)
}

/// An IANA zone name, or a message naming `field` with examples.
fn parse_timezone(field: &str, s: &str) -> Result<Tz, String> {
    s.parse::<Tz>().map_err(|_| {
        format!(
            "{field}: {s:?} is not an IANA time zone \
             (valid: names such as \"UTC\", \"America/New_York\", \"Asia/Kolkata\")"
        )
    })
}

/// A model id as it may appear in a URL path (`models/` prefix dropped), or `None`.
fn check_model_id(s: &str) -> Option<String> {
    let id = normalize_model(s);
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'));
    ok.then(|| id.to_string())
}

/// Agent ids travel in URL paths and headers: a conservative alphabet.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AGENT_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
}

/// Every entry of `api_keys` as a digest. A bad entry is not echoed: it may be a key
/// pasted in clear.
fn check_api_keys(label: &str, keys: &[String]) -> Result<Vec<[u8; 32]>, String> {
    let mut out: Vec<[u8; 32]> = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let Some(d) = parse_key_digest(k) else {
            return Err(format!(
                "{label}.api_keys[{i}]: not a key digest (valid: \"sha256:\" followed by 64 hex \
                 digits, the SHA-256 of the key; never the key itself)"
            ));
        };
        if let Some(j) = out.iter().position(|o| *o == d) {
            return Err(format!(
                "{label}.api_keys[{i}]: the same key as api_keys[{j}]"
            ));
        }
        out.push(d);
    }
    Ok(out)
}

/// Percentages 1–1000, returned ascending without duplicates.
fn check_thresholds(field: &str, raw: &[i64]) -> Result<Vec<u32>, String> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, &t) in raw.iter().enumerate() {
        match u32::try_from(t) {
            Ok(v) if (1..=1000).contains(&v) => out.push(v),
            _ => {
                return Err(format!(
                    "{field}[{i}]: {t} is out of range (valid: 1–1000 percent)"
                ))
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// USD per 1M tokens → integer micro-dollars per 1M tokens, or why not. Rounds to the
/// micro-dollar, which is exact for prices written with up to six decimals.
fn usd_to_micro(v: f64) -> Result<u64, String> {
    if !v.is_finite() || v < 0.0 {
        return Err("is negative (valid: USD per 1M tokens, 0 or more)".to_string());
    }
    if v > MAX_PRICE_USD {
        return Err(format!(
            "is too large (valid: up to {MAX_PRICE_USD} USD per 1M tokens)"
        ));
    }
    // In range by the checks above: 0 ≤ v × 1e6 ≤ 1e12 < 2^64.
    Ok((v * 1_000_000.0).round() as u64)
}
