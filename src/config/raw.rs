//! The budgets.json file exactly as written: serde types with `deny_unknown_fields`, every
//! key optional where the file may omit it. [`super::Config::from_raw`] validates these and
//! resolves defaults; nothing else should read them.
//!
//! They are public so that tools which edit the file (the admin API's update) can parse it,
//! change one agent and write it back without losing keys, then re-validate the result.
//! Values are kept as written (strings for times and zones, USD floats for prices), so a
//! round trip through these types changes nothing but formatting.

use super::{Action, Priority, UnknownAgents};
use crate::budget::period::Period;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// Implements `Deserialize` for a raw struct from a JSON object only.
///
/// serde's derive also accepts a struct written as an array of its fields in order (`[]`
/// for an entry whose keys are all optional), which would let `"sage": []` load as an
/// agent with every default. The structs derive with `remote = "Self"` (inherent
/// `deserialize`/`serialize` functions instead of trait impls) and these impls only offer
/// them a map.
macro_rules! object_only {
    ($t:ty, $what:literal) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct ObjectOnly;

                impl<'de> Visitor<'de> for ObjectOnly {
                    type Value = $t;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }

                    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<$t, A::Error> {
                        <$t>::deserialize(MapAccessDeserializer::new(map))
                    }
                }

                deserializer.deserialize_map(ObjectOnly)
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                <$t>::serialize(self, serializer)
            }
        }
    };
}

object_only!(RawConfig, "an object with \"default\" and \"agents\"");
object_only!(RawAgent, "an object (a budget entry)");
object_only!(RawQueue, "an object {\"max_wait_seconds\", \"max_depth\"}");
object_only!(RawPrice, "an object of prices in USD per 1M tokens");
object_only!(RawAlerts, "an object {\"thresholds\", \"webhooks\"}");
object_only!(RawWebhook, "an object {\"url\", \"format\"}");

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RawConfig {
    /// The budget of agents that are not in `agents`, and the defaults of those that are.
    pub default: RawAgent,
    /// Named agents (agent id → entry).
    #[serde(
        default,
        deserialize_with = "unique_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub agents: BTreeMap<String, RawAgent>,
    /// Price overrides and additions (model id → prices in USD per 1M tokens).
    #[serde(
        default,
        deserialize_with = "unique_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub pricing: BTreeMap<String, RawPrice>,
    /// Global alert thresholds and webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<RawAlerts>,
    /// `default` (the default budget) or `reject` (403) for agents not in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_agents: Option<UnknownAgents>,
    /// Cap on agents created on the fly (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dynamic_agents: Option<u64>,
    /// `open` (default: admit while Redis is down) or `closed` (refuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_failure_mode: Option<RedisFailureMode>,
    /// IANA time zone of every calendar that does not name its own (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// One agent entry (also the shape of `default`). Missing keys are inherited from
/// `default`, then from the built-in defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RawAgent {
    /// Tokens per period; a positive integer (zero and negatives fail at parse time).
    #[serde(
        default,
        deserialize_with = "opt_positive",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_tokens: Option<u64>,
    /// `daily|weekly|monthly|yearly|infinite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// `warn|block|degrade|queue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_on_limit: Option<Action>,
    /// Weekly 1–7 (Mon–Sun), monthly 1–28; signed so that a negative value gets the
    /// range message rather than a type error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_day: Option<i64>,
    /// Local `"HH:MM"` of the reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_time: Option<String>,
    /// IANA time zone of the calendar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Model used on `degrade`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_model: Option<String>,
    /// Free text (not inherited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `critical|high|medium|low`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Virtual keys as `"sha256:<64 hex>"` (not inherited; not allowed on `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<Vec<String>>,
    /// Bounds of the queue action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<RawQueue>,
    /// Alert thresholds in percent (1–1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_thresholds: Option<Vec<i64>>,
}

/// `queue: {max_wait_seconds, max_depth}`; each key is inherited separately.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RawQueue {
    /// Longest a request may stay parked (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_seconds: Option<u64>,
    /// Most requests parked per agent (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u64>,
}

/// One model's prices in USD per 1M tokens, as on Google's price page.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RawPrice {
    /// Input rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<f64>,
    /// Output rate (thinking included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<f64>,
    /// Cache-read rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<f64>,
    /// Audio input rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_audio: Option<f64>,
    /// Prompts above this many tokens bill at the `long_*` rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_threshold_tokens: Option<u64>,
    /// Input rate above the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_input: Option<f64>,
    /// Output rate above the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_output: Option<f64>,
    /// Cache-read rate above the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_cached: Option<f64>,
}

/// `alerts: {thresholds, webhooks}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RawAlerts {
    /// Percentages that raise an alert (default 75, 90, 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<i64>>,
    /// Where alerts are POSTed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<RawWebhook>,
}

/// One alert webhook.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RawWebhook {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Body shape (default `json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<WebhookFormat>,
}

/// Body shape of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// Slack incoming-webhook text.
    Slack,
    /// The alert object as JSON.
    Json,
}

impl WebhookFormat {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Slack => "slack",
            WebhookFormat::Json => "json",
        }
    }
}

/// What to do while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFailureMode {
    /// Admit requests (budgets are not enforced while it lasts).
    Open,
    /// Refuse requests.
    Closed,
}

impl RedisFailureMode {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisFailureMode::Open => "open",
            RedisFailureMode::Closed => "closed",
        }
    }
}

/// A JSON object into a map, refusing a key that appears twice (serde_json would keep the
/// last one silently, so a pasted-twice agent would lose its first budget unnoticed).
fn unique_map<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueMap<V>(std::marker::PhantomData<V>);

    impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueMap<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    return Err(de::Error::custom(format_args!(
                        "duplicate key `{key}` (each key may appear once)"
                    )));
                }
                let value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_map(UniqueMap(std::marker::PhantomData))
}

/// An optional positive integer, with a message that says so for 0, negatives, floats and
/// strings (serde's own would say "expected u64").
fn opt_positive<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    struct Positive;

    impl<'de> Visitor<'de> for Positive {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a positive integer")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            if v == 0 {
                return Err(E::invalid_value(Unexpected::Unsigned(0), &self));
            }
            Ok(Some(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            match u64::try_from(v) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
            }
        }
    }

    deserializer.deserialize_option(Positive)
}
