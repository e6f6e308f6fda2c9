//! Every validation rule of budgets.json, and the shipped file.

use super::*;
use crate::budget::period::Period;
use serde_json::json;

const SHIPPED: &str = include_str!("../../config/budgets.json");

fn parse(v: serde_json::Value) -> Result<Config, ConfigError> {
    Config::parse(&v.to_string(), "budgets.json")
}

/// A minimal valid file with `agents` replaced.
fn with_agents(agents: serde_json::Value) -> serde_json::Value {
    json!({
        "default": {"max_tokens": 1000, "period": "monthly", "action_on_limit": "warn"},
        "agents": agents,
    })
}

/// The error message of a refused file (panics if it was accepted).
fn err(v: serde_json::Value) -> String {
    match parse(v) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

fn err_text(text: &str) -> ConfigError {
    match Config::parse(text, "budgets.json") {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    }
}

fn assert_contains(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            haystack.contains(n),
            "{haystack:?}\n  does not contain {n:?}"
        );
    }
}

#[test]
fn shipped_file_parses_with_the_seed_agents() {
    let c = Config::parse(SHIPPED, "config/budgets.json").unwrap();
    assert_eq!(c.agents().len(), 13);
    let expect = [
        ("sage", 3_000_000, Action::Degrade, Priority::High),
        ("blaze", 2_500_000, Action::Degrade, Priority::High),
        ("volt", 2_200_000, Action::Degrade, Priority::High),
        ("luna", 2_000_000, Action::Degrade, Priority::High),
        ("nova", 1_800_000, Action::Degrade, Priority::Medium),
        ("spark", 1_500_000, Action::Queue, Priority::Medium),
        ("aura", 1_300_000, Action::Queue, Priority::Medium),
        ("stella", 1_200_000, Action::Degrade, Priority::Medium),
        ("wave", 1_100_000, Action::Queue, Priority::Low),
        ("code", 1_600_000, Action::Warn, Priority::Medium),
        ("nexus", 800_000, Action::Queue, Priority::High),
        ("node", 500_000, Action::Warn, Priority::Low),
        ("guardian", 400_000, Action::Block, Priority::Critical),
    ];
    for (id, max, action, priority) in expect {
        let a = c.agent(id).unwrap();
        assert_eq!(
            (a.max_tokens, a.action, a.priority),
            (max, action, priority),
            "{id}"
        );
        assert_eq!(a.period.period, Period::Monthly, "{id}");
        assert_eq!(a.period.reset_day, 1, "{id}");
        assert_eq!(
            a.fallback_model.as_deref(),
            Some("gemini-2.5-flash-lite"),
            "{id}"
        );
        assert!(a.description.is_some(), "{id}");
    }
    assert_eq!(
        c.agent("sage").unwrap().description.as_deref(),
        Some("Nutrition Architect - Highest usage with vision processing")
    );
    assert_eq!(c.default.max_tokens, 1_000_000);
    assert_eq!(c.default.action, Action::Warn);
    assert_eq!(
        c.default.fallback_model.as_deref(),
        Some("gemini-2.5-flash-lite")
    );
    let total: u64 = c.agents().values().map(|a| a.max_tokens).sum();
    // The seed's table says "23.9M" but its rows add up to 19.9M.
    assert_eq!(total, 19_900_000);
}

#[test]
fn built_in_defaults() {
    let c = parse(with_agents(json!({"a": {}}))).unwrap();
    let a = c.agent("a").unwrap();
    assert_eq!(a.period.reset_day, 1);
    assert_eq!(a.period.reset_time, NaiveTime::MIN);
    assert_eq!(a.period.timezone, Tz::UTC);
    assert_eq!(a.priority, Priority::Medium);
    assert_eq!(
        a.queue,
        QueueLimits {
            max_wait_seconds: 300,
            max_depth: 1000
        }
    );
    assert_eq!(a.alert_thresholds, vec![75, 90, 100]);
    assert!(a.api_keys.is_empty());
    assert_eq!(c.unknown_agents, UnknownAgents::Default);
    assert_eq!(c.max_dynamic_agents, 1000);
    assert_eq!(c.redis_failure_mode, "open");
    assert_eq!(c.alert_thresholds, vec![75, 90, 100]);
    assert!(c.webhooks.is_empty());
    assert!(c.key_index.is_empty());
    assert_eq!(
        c.pricing.lookup("gemini-2.5-pro"),
        PriceTable::builtin().lookup("gemini-2.5-pro")
    );
    assert!(c.agents().len() == 1 && c.agent("b").is_none());
    assert_eq!(c.budget_for("b"), &c.default);
}

use chrono::NaiveTime;
use chrono_tz::Tz;

#[test]
fn agents_inherit_every_missing_key_from_default() {
    let c = parse(json!({
        "timezone": "Europe/Paris",
        "alerts": {"thresholds": [100, 50]},
        "default": {
            "max_tokens": 1000, "period": "weekly", "action_on_limit": "degrade",
            "reset_day": 7, "reset_time": "06:15", "timezone": "Asia/Kolkata",
            "fallback_model": "models/gemini-2.5-flash-lite", "priority": "low",
            "queue": {"max_wait_seconds": 30, "max_depth": 5},
            "alert_thresholds": [80], "description": "the default"
        },
        "agents": {
            "a": {},
            "b": {"max_tokens": 7, "period": "monthly", "reset_day": 28,
                  "queue": {"max_depth": 9}, "timezone": "America/New_York",
                  "action_on_limit": "queue", "priority": "critical"}
        }
    }))
    .unwrap();
    let a = c.agent("a").unwrap();
    assert_eq!(a.max_tokens, 1000);
    assert_eq!(a.period.period, Period::Weekly);
    assert_eq!(a.period.reset_day, 7);
    assert_eq!(a.period.reset_time.to_string(), "06:15:00");
    assert_eq!(a.period.timezone, chrono_tz::Asia::Kolkata);
    assert_eq!(a.action, Action::Degrade);
    assert_eq!(a.fallback_model.as_deref(), Some("gemini-2.5-flash-lite"));
    assert_eq!(a.priority, Priority::Low);
    assert_eq!(
        a.queue,
        QueueLimits {
            max_wait_seconds: 30,
            max_depth: 5
        }
    );
    assert_eq!(a.alert_thresholds, vec![80]);
    assert_eq!(a.description, None, "descriptions are not inherited");
    let b = c.agent("b").unwrap();
    assert_eq!(
        (b.max_tokens, b.period.period, b.period.reset_day),
        (7, Period::Monthly, 28)
    );
    assert_eq!(b.period.timezone, chrono_tz::America::New_York);
    assert_eq!(
        b.queue,
        QueueLimits {
            max_wait_seconds: 30,
            max_depth: 9
        }
    );
    assert_eq!((b.action, b.priority), (Action::Queue, Priority::Critical));
    assert_eq!(c.default.description.as_deref(), Some("the default"));
    // Global thresholds are sorted; the top-level zone applies where no entry sets one.
    assert_eq!(c.alert_thresholds, vec![50, 100]);
    let c = parse(json!({
        "timezone": "Europe/Paris",
        "default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
        "agents": {"a": {}}
    }))
    .unwrap();
    assert_eq!(
        c.agent("a").unwrap().period.timezone,
        chrono_tz::Europe::Paris
    );
    assert_eq!(c.default.period.timezone, chrono_tz::Europe::Paris);
}

#[test]
fn top_level_options() {
    let c = parse(json!({
        "default": {"max_tokens": 1, "period": "infinite", "action_on_limit": "block"},
        "unknown_agents": "reject",
        "max_dynamic_agents": 5,
        "redis_failure_mode": "closed",
        "alerts": {"webhooks": [
            {"url": "https://hooks.slack.com/services/T/B/X", "format": "slack"},
            {"url": "http://127.0.0.1:9000/alerts"}
        ]}
    }))
    .unwrap();
    assert_eq!(c.unknown_agents, UnknownAgents::Reject);
    assert_eq!(c.max_dynamic_agents, 5);
    assert_eq!(c.redis_failure_mode, "closed");
    assert_eq!(c.webhooks.len(), 2);
    assert_eq!(c.webhooks[0].format, "slack");
    assert_eq!(c.webhooks[1].format, "json");
    assert_eq!(c.default.period.period, Period::Infinite);
}

// === Parse errors: types, unknown keys, syntax ===

#[test]
fn empty_file_is_reported_as_empty() {
    for text in ["", "  \n\t", "\u{feff}"] {
        let e = err_text(text).to_string();
        assert_contains(&e, &["budgets.json", "is empty"]);
    }
}

#[test]
fn top_level_must_be_an_object() {
    for text in ["[]", "42", "\"x\"", "null"] {
        assert_contains(
            &err_text(text).to_string(),
            &["top level must be a JSON object"],
        );
    }
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let text = "{\n  \"default\": {\n    \"max_tokens\": 1000,,\n  }\n}";
    match err_text(text) {
        ConfigError::Parse {
            line,
            column,
            message,
            ..
        } => {
            assert_eq!(line, 3);
            assert!(column > 0);
            assert!(!message.contains(" at line "), "{message}");
        }
        e => panic!("{e:?}"),
    }
    // Trailing garbage after the object.
    let e = err_text("{\"default\": {\"max_tokens\": 1, \"period\": \"daily\", \"action_on_limit\": \"warn\"}} x");
    assert_contains(&e.to_string(), &["trailing characters", "line 1"]);
}

#[test]
fn wrong_json_types_name_the_path() {
    let e = err(with_agents(json!({"sage": {"max_tokens": "3000000"}})));
    assert_contains(
        &e,
        &[
            "agents.sage.max_tokens",
            "expected a positive integer",
            "line 1",
        ],
    );
    let e = err(with_agents(json!({"sage": {"max_tokens": 1.5}})));
    assert_contains(
        &e,
        &[
            "agents.sage.max_tokens",
            "floating point",
            "positive integer",
        ],
    );
    let e = err(with_agents(json!({"sage": {"period": 1}})));
    assert_contains(&e, &["agents.sage.period", "expected value", "line 1"]);
    let e = err(with_agents(json!({"sage": {"api_keys": "sha256:00"}})));
    assert_contains(&e, &["agents.sage.api_keys", "expected a sequence"]);
    let e = err(with_agents(json!({"sage": {"reset_day": "1"}})));
    assert_contains(&e, &["agents.sage.reset_day", "invalid type"]);
    let e = err(with_agents(json!({"sage": {"queue": {"max_depth": -1}}})));
    assert_contains(&e, &["agents.sage.queue.max_depth"]);
    let e = err(with_agents(json!(["sage"])));
    assert_contains(&e, &["agents", "expected an object"]);
    let e = err(with_agents(json!({"sage": []})));
    assert_contains(
        &e,
        &[
            "agents.sage",
            "invalid type: sequence, expected an object (a budget entry)",
        ],
    );
    let e = err(with_agents(json!({"sage": {"queue": [5, 6]}})));
    assert_contains(&e, &["agents.sage.queue", "invalid type: sequence"]);
    let e = err(json!({"default": [1000, "monthly", "warn"]}));
    assert_contains(&e, &["default", "invalid type: sequence"]);
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "max_dynamic_agents": -3}),
    );
    assert_contains(&e, &["max_dynamic_agents", "invalid value"]);
}

#[test]
fn zero_and_negative_max_tokens_are_refused() {
    let e = err(with_agents(json!({"sage": {"max_tokens": 0}})));
    assert_contains(
        &e,
        &[
            "agents.sage.max_tokens",
            "integer `0`",
            "expected a positive integer",
        ],
    );
    let e = err(with_agents(json!({"sage": {"max_tokens": -5}})));
    assert_contains(
        &e,
        &[
            "agents.sage.max_tokens",
            "integer `-5`",
            "expected a positive integer",
        ],
    );
    let e =
        err(json!({"default": {"max_tokens": 0, "period": "daily", "action_on_limit": "warn"}}));
    assert_contains(&e, &["default.max_tokens", "positive integer"]);
}

#[test]
fn unknown_period_action_priority_list_the_valid_values() {
    let e = err(with_agents(json!({"sage": {"period": "hourly"}})));
    assert_contains(
        &e,
        &[
            "agents.sage.period",
            "`hourly`",
            "`daily`",
            "`weekly`",
            "`monthly`",
            "`yearly`",
            "`infinite`",
        ],
    );
    let e = err(with_agents(json!({"sage": {"action_on_limit": "explode"}})));
    assert_contains(
        &e,
        &[
            "agents.sage.action_on_limit",
            "`explode`",
            "`warn`",
            "`block`",
            "`degrade`",
            "`queue`",
        ],
    );
    let e = err(with_agents(json!({"sage": {"priority": "urgent"}})));
    assert_contains(&e, &["agents.sage.priority", "`critical`", "`low`"]);
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "unknown_agents": "allow"}),
    );
    assert_contains(&e, &["unknown_agents", "`default`", "`reject`"]);
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "redis_failure_mode": "maybe"}),
    );
    assert_contains(&e, &["redis_failure_mode", "`open`", "`closed`"]);
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "alerts": {"webhooks": [{"url": "https://x", "format": "xml"}]}}),
    );
    assert_contains(&e, &["alerts.webhooks[0].format", "`slack`", "`json`"]);
}

#[test]
fn unknown_keys_name_the_key_and_the_valid_ones() {
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "agent": {}}),
    );
    assert_contains(
        &e,
        &[
            "unknown field `agent`",
            "`default`",
            "`agents`",
            "`pricing`",
            "`timezone`",
        ],
    );
    let e = err(with_agents(json!({"sage": {"max_token": 5}})));
    assert_contains(
        &e,
        &[
            "agents.sage.max_token",
            "unknown field `max_token`",
            "`max_tokens`",
            "`reset_day`",
        ],
    );
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn", "colour": 1}}),
    );
    assert_contains(&e, &["default.colour", "unknown field `colour`"]);
    let e = err(with_agents(json!({"sage": {"queue": {"max_wait": 5}}})));
    assert_contains(
        &e,
        &[
            "agents.sage.queue.max_wait",
            "`max_wait_seconds`",
            "`max_depth`",
        ],
    );
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "pricing": {"gemini-2.5-flash": {"inptu": 1.0}}}),
    );
    assert_contains(&e, &["pricing.gemini-2.5-flash.inptu", "`input`"]);
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "alerts": {"threshold": [1]}}),
    );
    assert_contains(&e, &["alerts.threshold", "`thresholds`", "`webhooks`"]);
    let e = err(
        json!({"$schema": "x", "default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"}}),
    );
    assert_contains(&e, &["unknown field `$schema`"]);
}

#[test]
fn missing_default_and_its_required_keys() {
    let e = err(json!({"agents": {}}));
    assert_contains(&e, &["missing field `default`"]);
    let e = err(json!({"default": {}}));
    assert_contains(
        &e,
        &[
            "3 problems",
            "default.max_tokens is required",
            "default.period is required (valid: daily, weekly, monthly, yearly, infinite)",
            "default.action_on_limit is required (valid: warn, block, degrade, queue)",
        ],
    );
    // An agent that sets them itself is fine; the default is still incomplete.
    let e = err(
        json!({"default": {"period": "daily", "action_on_limit": "warn"},
                       "agents": {"a": {"max_tokens": 5}, "b": {}}}),
    );
    assert_eq!(e, "budgets.json: default.max_tokens is required (valid: a positive integer, the tokens per period)");
}

#[test]
fn duplicate_agents_are_refused() {
    let text = r#"{"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                   "agents": {"sage": {}, "sage": {}}}"#;
    let e = err_text(text).to_string();
    assert_contains(&e, &["agents", "duplicate key `sage`", "line 2"]);
}

// === Validation errors ===

#[test]
fn weekly_reset_day_must_be_1_to_7() {
    for day in [0, 8, -1] {
        let e = err(with_agents(
            json!({"sage": {"period": "weekly", "reset_day": day}}),
        ));
        assert_eq!(
            e,
            format!("budgets.json: agents.sage.reset_day: {day} is out of range for a weekly period (valid: 1–7)")
        );
    }
    for day in 1..=7 {
        let c = parse(with_agents(
            json!({"sage": {"period": "weekly", "reset_day": day}}),
        ))
        .unwrap();
        assert_eq!(i64::from(c.agent("sage").unwrap().period.reset_day), day);
    }
}

#[test]
fn monthly_reset_day_must_be_1_to_28() {
    let e = err(with_agents(json!({"sage": {"reset_day": 29}})));
    assert_eq!(
        e,
        "budgets.json: agents.sage.reset_day: 29 is out of range for a monthly period (valid: 1–28)"
    );
    let e = err(with_agents(json!({"sage": {"reset_day": 0}})));
    assert_contains(
        &e,
        &["agents.sage.reset_day: 0", "monthly", "(valid: 1–28)"],
    );
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "monthly", "action_on_limit": "warn", "reset_day": 31}}),
    );
    assert_contains(
        &e,
        &["default.reset_day: 31 is out of range for a monthly period"],
    );
    assert!(parse(with_agents(json!({"sage": {"reset_day": 28}}))).is_ok());
}

#[test]
fn inherited_reset_day_that_does_not_fit_the_agents_period() {
    let e = err(json!({
        "default": {"max_tokens": 1, "period": "monthly", "action_on_limit": "warn", "reset_day": 15},
        "agents": {"w": {"period": "weekly"}}
    }));
    assert_eq!(
        e,
        "budgets.json: agents.w.reset_day: 15 (inherited from default) is out of range for a \
         weekly period (valid: 1–7)"
    );
}

#[test]
fn reset_day_is_ignored_by_periods_without_one() {
    for period in ["daily", "yearly", "infinite"] {
        let c = parse(with_agents(
            json!({"a": {"period": period, "reset_day": 99}}),
        ))
        .unwrap();
        assert_eq!(c.agent("a").unwrap().period.reset_day, 1, "{period}");
    }
}

#[test]
fn degrade_needs_a_fallback_model() {
    let e = err(with_agents(
        json!({"guardian": {"action_on_limit": "degrade"}}),
    ));
    assert_eq!(
        e,
        "budgets.json: agents.guardian.action_on_limit is \"degrade\" but no fallback_model is set \
         (set fallback_model here or in default, e.g. \"gemini-2.5-flash-lite\")"
    );
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "degrade"},
                       "agents": {"a": {}, "b": {}}}),
    );
    assert_contains(
        &e,
        &["default.action_on_limit is \"degrade\" but no fallback_model is set"],
    );
    assert!(!e.contains("agents."), "reported once, at default: {e}");
    // The fallback may come from default.
    let c = parse(json!({
        "default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn",
                    "fallback_model": "gemini-2.5-flash-lite"},
        "agents": {"g": {"action_on_limit": "degrade"}}
    }))
    .unwrap();
    assert_eq!(
        c.agent("g").unwrap().fallback_model.as_deref(),
        Some("gemini-2.5-flash-lite")
    );
    let e = err(with_agents(
        json!({"g": {"action_on_limit": "degrade", "fallback_model": "a b/c"}}),
    ));
    assert_contains(
        &e,
        &["agents.g.fallback_model: \"a b/c\" is not a model id"],
    );
}

#[test]
fn bad_timezones_are_refused() {
    let e = err(with_agents(
        json!({"sage": {"timezone": "Mars/Olympus_Mons"}}),
    ));
    assert_contains(
        &e,
        &[
            "agents.sage.timezone: \"Mars/Olympus_Mons\" is not an IANA time zone",
            "America/New_York",
        ],
    );
    let e = err(json!({"timezone": "EST5EDT-ish",
                       "default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "agents": {"a": {}, "b": {}}}));
    assert_eq!(
        e,
        "budgets.json: timezone: \"EST5EDT-ish\" is not an IANA time zone (valid: names such as \
         \"UTC\", \"America/New_York\", \"Asia/Kolkata\")"
    );
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn", "timezone": ""}}),
    );
    assert_contains(&e, &["default.timezone: \"\""]);
}

#[test]
fn bad_reset_times_are_refused() {
    for t in [
        "24:00", "7:30", "07:60", "0730", "07:30:00", "", "ab:cd", " 07:30",
    ] {
        let e = err(with_agents(json!({"sage": {"reset_time": t}})));
        assert_eq!(
            e,
            format!(
                "budgets.json: agents.sage.reset_time: {t:?} is not a valid time (valid: \"HH:MM\" \
                 from \"00:00\" to \"23:59\")"
            )
        );
    }
    let c = parse(with_agents(json!({"sage": {"reset_time": "23:59"}}))).unwrap();
    assert_eq!(
        c.agent("sage").unwrap().period.reset_time.to_string(),
        "23:59:00"
    );
}

#[test]
fn api_keys_must_be_sha256_digests() {
    let good = format_key_digest(&hash_api_key("secret-key-1"));
    let c = parse(with_agents(json!({"sage": {"api_keys": [good]}}))).unwrap();
    assert_eq!(
        c.agent("sage").unwrap().api_keys,
        vec![hash_api_key("secret-key-1")]
    );
    assert_eq!(
        c.key_index
            .get(&hash_api_key("secret-key-1"))
            .map(String::as_str),
        Some("sage")
    );
    // Upper-case hex is accepted.
    let upper = format!("sha256:{}", hex::encode_upper(hash_api_key("k")));
    assert!(parse(with_agents(json!({"sage": {"api_keys": [upper]}}))).is_ok());
    for bad in [
        "my-clear-text-key",
        "sha256:abc",
        "sha256:zz4f6ed3fa7b1d0e5e5b3d6d1e2b0f8c9a7d6e5f4c3b2a1908f7e6d5c4b3a291",
        "SHA256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "sha1:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",
    ] {
        let e = err(with_agents(
            json!({"sage": {"api_keys": [good.clone(), bad]}}),
        ));
        assert_contains(
            &e,
            &[
                "agents.sage.api_keys[1]: not a key digest",
                "\"sha256:\" followed by 64 hex",
            ],
        );
        assert!(
            !e.contains(bad),
            "the bad value (maybe a clear key) is not echoed: {e}"
        );
    }
    let e = err(with_agents(
        json!({"sage": {"api_keys": [good.clone(), good.clone()]}}),
    ));
    assert_contains(
        &e,
        &["agents.sage.api_keys[1]: the same key as api_keys[0]"],
    );
}

#[test]
fn a_key_shared_by_two_agents_names_both() {
    let k = format_key_digest(&hash_api_key("shared"));
    let e = err(with_agents(
        json!({"aura": {"api_keys": [k]}, "blaze": {"api_keys": [k]}}),
    ));
    assert_eq!(
        e,
        "budgets.json: agents.blaze.api_keys[0]: this key is already assigned to agents.aura \
         (a virtual key must identify exactly one agent)"
    );
}

#[test]
fn api_keys_on_default_are_refused() {
    let k = format_key_digest(&hash_api_key("x"));
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn",
                                   "api_keys": [k]}}),
    );
    assert_contains(&e, &["default.api_keys: not allowed on default"]);
}

#[test]
fn queue_and_threshold_ranges() {
    let e = err(with_agents(json!({"q": {"queue": {"max_depth": 0}}})));
    assert_contains(
        &e,
        &["agents.q.queue.max_depth: 0 is out of range (valid: 1 or more requests)"],
    );
    let e = err(with_agents(
        json!({"q": {"queue": {"max_wait_seconds": 0}}}),
    ));
    assert_contains(&e, &["agents.q.queue.max_wait_seconds: 0 is out of range"]);
    for t in [0, 1001, -5] {
        let e = err(with_agents(json!({"q": {"alert_thresholds": [50, t]}})));
        assert_eq!(
            e,
            format!("budgets.json: agents.q.alert_thresholds[1]: {t} is out of range (valid: 1–1000 percent)")
        );
    }
    let e = err(
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                       "alerts": {"thresholds": [0]}}),
    );
    assert_contains(&e, &["alerts.thresholds[0]: 0 is out of range"]);
    let c = parse(with_agents(
        json!({"q": {"alert_thresholds": [100, 75, 75, 1000]}}),
    ))
    .unwrap();
    assert_eq!(c.agent("q").unwrap().alert_thresholds, vec![75, 100, 1000]);
    let c = parse(with_agents(json!({"q": {"alert_thresholds": []}}))).unwrap();
    assert!(c.agent("q").unwrap().alert_thresholds.is_empty());
}

#[test]
fn webhook_urls_must_be_http() {
    for url in [
        "ftp://example.com/x",
        "example.com",
        "https://",
        "https:///path",
        "http://a b",
    ] {
        let e = err(
            json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
                           "alerts": {"webhooks": [{"url": url, "format": "json"}]}}),
        );
        assert_eq!(
            e,
            "budgets.json: alerts.webhooks[0].url is not an absolute http:// or https:// URL"
        );
    }
}

#[test]
fn agent_ids_are_checked() {
    for id in ["", "a/b", "has space", ".hidden", "é"] {
        let e = err(with_agents(json!({id: {}})));
        assert_contains(&e, &[&format!("agents[{id:?}]: not a valid agent id")]);
    }
    assert!(parse(with_agents(json!({"Agent_7.v2-beta": {}}))).is_ok());
}

#[test]
fn several_problems_are_all_listed() {
    let e = err(with_agents(json!({
        "a": {"reset_day": 29},
        "b": {"reset_time": "25:00"},
        "c": {"timezone": "Nowhere"}
    })));
    assert_contains(
        &e,
        &[
            "3 problems:",
            "\n  - agents.a.reset_day",
            "\n  - agents.b.reset_time",
            "\n  - agents.c.timezone",
        ],
    );
}

// === Pricing ===

#[test]
fn pricing_overrides_and_additions() {
    let c = parse(json!({
        "default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
        "pricing": {
            "gemini-2.5-flash": {"input": 0.25},
            "models/gemini-4-flash": {"input": 0.30, "output": 2.50, "cached": 0.03,
                                      "input_audio": 1.0, "long_threshold_tokens": 200000,
                                      "long_input": 0.6, "long_output": 5, "long_cached": 0.06}
        }
    }))
    .unwrap();
    let f = c.pricing.lookup("gemini-2.5-flash").unwrap();
    assert_eq!(
        (f.input, f.output, f.cached, f.input_audio),
        (250_000, 2_500_000, 30_000, 1_000_000)
    );
    let n = c.pricing.lookup("gemini-4-flash-001").unwrap();
    assert_eq!(
        *n,
        crate::budget::pricing::ModelPrice {
            input: 300_000,
            input_audio: 1_000_000,
            output: 2_500_000,
            cached: 30_000,
            long_threshold_tokens: Some(200_000),
            long_input: 600_000,
            long_output: 5_000_000,
            long_cached: 60_000,
        }
    );
    // Other built-in prices are untouched.
    assert_eq!(
        c.pricing.lookup("gemini-2.5-pro"),
        PriceTable::builtin().lookup("gemini-2.5-pro")
    );
    // Six decimals convert exactly.
    let c = parse(json!({
        "default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
        "pricing": {"x-model": {"input": 0.000001, "output": 0.01875}}
    }))
    .unwrap();
    let x = c.pricing.lookup("x-model").unwrap();
    assert_eq!((x.input, x.output, x.cached), (1, 18_750, 1));
}

#[test]
fn pricing_errors() {
    let base = |pricing: serde_json::Value| {
        json!({"default": {"max_tokens": 1, "period": "daily", "action_on_limit": "warn"},
               "pricing": pricing})
    };
    let e = err(base(json!({"gemini-2.5-flash": {"input": -0.1}})));
    assert_contains(&e, &["pricing.gemini-2.5-flash.input: -0.1 is negative"]);
    let e = err(base(json!({"new-model": {"cached": 0.1}})));
    assert_contains(
        &e,
        &["pricing.new-model: input and output required for a model without a built-in price"],
    );
    let e = err(base(json!({"new-model": {"input": 1}})));
    assert_contains(&e, &["pricing.new-model: output required"]);
    let e = err(base(json!({"gemini-2.5-flash": {"output": "2.5"}})));
    assert_contains(&e, &["pricing.gemini-2.5-flash.output", "invalid type"]);
    let e = err(base(json!({"gemini-2.5-flash": {"output": 1e9}})));
    assert_contains(&e, &["pricing.gemini-2.5-flash.output", "too large"]);
    let e = err(base(json!({"bad model": {"input": 1, "output": 1}})));
    assert_contains(&e, &["pricing[\"bad model\"]: not a model id"]);
}

// === Keys, table, raw round trip ===

#[test]
fn key_digests() {
    // sha256("test")
    let d = hash_api_key("test");
    assert_eq!(
        format_key_digest(&d),
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
    assert_eq!(parse_key_digest(&format_key_digest(&d)), Some(d));
    assert_eq!(parse_key_digest("sha256:9f86"), None);
    assert_eq!(
        parse_key_digest("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
        None
    );
}

#[test]
fn resolved_table() {
    let c = Config::parse(SHIPPED, "config/budgets.json").unwrap();
    let rows = c.resolved_rows();
    assert_eq!(rows.len(), 14);
    assert_eq!(rows[0].agent, DEFAULT_ROW);
    let table = c.to_table();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 15);
    assert_contains(
        lines[0],
        &[
            "agent",
            "max_tokens",
            "period",
            "reset",
            "action",
            "fallback",
            "priority",
        ],
    );
    let sage = lines.iter().find(|l| l.starts_with("sage ")).unwrap();
    assert_contains(
        sage,
        &[
            "3000000",
            "monthly",
            "day 1 00:00 UTC",
            "degrade",
            "gemini-2.5-flash-lite",
            "high",
        ],
    );
    // Columns line up: "period" starts at the same offset on every line.
    let col = lines[0].find("period").unwrap();
    for l in &lines[1..] {
        assert_eq!(&l[col..col + 7], "monthly", "{l}");
    }
    let c = parse(json!({
        "default": {"max_tokens": 1, "period": "weekly", "reset_day": 7, "reset_time": "07:30",
                    "timezone": "Asia/Kolkata", "action_on_limit": "block"},
        "agents": {"y": {"period": "yearly"}, "i": {"period": "infinite"}, "d": {"period": "daily"}}
    }))
    .unwrap();
    let resets: Vec<String> = c.resolved_rows().into_iter().map(|r| r.reset).collect();
    assert_eq!(
        resets,
        [
            "Sun 07:30 Asia/Kolkata",
            "07:30 Asia/Kolkata",
            "never",
            "Jan 1 07:30 Asia/Kolkata"
        ]
    );
    assert!(c.to_table().contains("  -  "), "no fallback shows as -");
}

#[test]
fn raw_round_trip_keeps_the_file() {
    let raw = raw::RawConfig::parse(SHIPPED, "x").unwrap();
    let text = serde_json::to_string_pretty(&raw).unwrap();
    let again = raw::RawConfig::parse(&text, "x").unwrap();
    assert_eq!(raw, again);
    let a: serde_json::Value = serde_json::from_str(SHIPPED).unwrap();
    let b: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(a, b);
}

#[test]
fn load_reports_a_missing_file() {
    let e = Config::load(Path::new("/nonexistent/budgets.json")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert_contains(&e.to_string(), &["cannot read /nonexistent/budgets.json"]);
}
