//! Model names and hints carried in request bodies.
//!
//! The proxy reads two hints before forwarding (the output cap, to size a reservation, and a
//! cache name, which pins the model) and rewrites the model names that some bodies repeat, so a
//! fallback model is used consistently. The REST API accepts both camelCase and snake_case
//! field names, so both are read.

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// The few top-level request fields the hints need; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Hints {
    #[serde(rename = "generationConfig", default)]
    generation_config_camel: Option<OutputCap>,
    #[serde(rename = "generation_config", default)]
    generation_config_snake: Option<OutputCap>,
    #[serde(rename = "cachedContent", default)]
    cached_content_camel: Option<Value>,
    #[serde(rename = "cached_content", default)]
    cached_content_snake: Option<Value>,
}

fn hints(body: &[u8]) -> Option<Hints> {
    serde_json::from_slice(body).ok()
}

/// The output cap of a `generationConfig`: `maxOutputTokens`, else `max_output_tokens`, each
/// the last occurrence when repeated (as a JSON object holds it); `None` when it is not an
/// object or has neither as a count. Read on every request, so without building a `Value`:
/// the other fields are skipped.
struct OutputCap(Option<u64>);

impl<'de> Deserialize<'de> for OutputCap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OutputCap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OutputCap, A::Error> {
                let (mut camel, mut snake) = (None, None);
                while let Some(key) = map.next_key::<CapKey>()? {
                    match key {
                        CapKey::Camel => camel = map.next_value::<Count>()?.0,
                        CapKey::Snake => snake = map.next_value::<Count>()?.0,
                        CapKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(OutputCap(camel.or(snake)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<OutputCap, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| OutputCap(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<OutputCap, E> {
                Ok(OutputCap(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<OutputCap, E> {
                Ok(OutputCap(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<OutputCap, E> {
                Ok(OutputCap(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<OutputCap, E> {
                Ok(OutputCap(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<OutputCap, E> {
                Ok(OutputCap(None))
            }
            fn visit_unit<E>(self) -> Result<OutputCap, E> {
                Ok(OutputCap(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A key of a `generationConfig`, told apart without allocating.
enum CapKey {
    Camel,
    Snake,
    Other,
}

impl<'de> Deserialize<'de> for CapKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = CapKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, k: &str) -> Result<CapKey, E> {
                Ok(match k {
                    "maxOutputTokens" => CapKey::Camel,
                    "max_output_tokens" => CapKey::Snake,
                    _ => CapKey::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A non-negative integer, or a string holding one (proto3 JSON allows it); `None` for any
/// other value (negative, fractional, too large, not a number).
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_str<E>(self, s: &str) -> Result<Count, E> {
                Ok(Count(s.trim().parse().ok()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Count, A::Error> {
                IgnoredAny.visit_map(map).map(|_| Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `generationConfig.maxOutputTokens` of a request body, when it is JSON and has one.
///
/// Also reads the snake_case spellings, and a count sent as a string (proto3 JSON allows it).
pub fn max_output_tokens(body: &[u8]) -> Option<u64> {
    if !may_name_output_cap(body) {
        return None;
    }
    let h = hints(body)?;
    h.generation_config_camel
        .and_then(|c| c.0)
        .or_else(|| h.generation_config_snake.and_then(|c| c.0))
}

/// Whether `body` may hold a `maxOutputTokens` (or `max_output_tokens`) key. Most requests
/// never set the cap: searching the body for the two names (SIMD) costs a fraction of
/// parsing it, on every request. A key can only be spelt differently with `\u` escapes
/// (no other JSON escape makes a letter or `_`), so a body with any goes to the parser.
fn may_name_output_cap(body: &[u8]) -> bool {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static NAMES: LazyLock<[Finder<'static>; 3]> = LazyLock::new(|| {
        [
            Finder::new("maxOutputTokens"),
            Finder::new("max_output_tokens"),
            Finder::new("\\u"),
        ]
    });
    NAMES.iter().any(|f| f.find(body).is_some())
}

/// The top-level `cachedContent` name of a request body (`cachedContents/…`), if any.
///
/// Such a request is pinned to the model the cache was made for, so it must not be rewritten.
pub fn cached_content(body: &[u8]) -> Option<String> {
    let h = hints(body)?;
    [h.cached_content_camel, h.cached_content_snake]
        .into_iter()
        .flatten()
        .find_map(|v| match v {
            Value::String(s) if !s.is_empty() => Some(s),
            _ => None,
        })
}

/// Rewrite model names carried inside a body for `method` to `new_model`
/// (`batchEmbedContents` `requests[].model`, `batchGenerateContent` inline requests,
/// `countTokens` `generateContentRequest.model`). `Ok(None)` when nothing needed rewriting.
///
/// Bodies of other methods are not parsed at all (`Ok(None)`); neither is an empty body. An
/// `Err` means the body of one of those three methods is not valid JSON. Only `model` fields
/// that are present are rewritten (to `models/{new_model}`); none is added.
pub fn rewrite_models_in_body(
    method: &str,
    body: &[u8],
    new_model: &str,
) -> Result<Option<Vec<u8>>, serde_json::Error> {
    if !matches!(
        method,
        "batchEmbedContents" | "batchGenerateContent" | "countTokens"
    ) || body.iter().all(u8::is_ascii_whitespace)
    {
        return Ok(None);
    }
    let mut root: Value = serde_json::from_slice(body)?;
    let target = qualified_model(new_model);
    let mut changed = false;
    match method {
        "batchEmbedContents" => {
            for req in array_items(root.get_mut("requests")) {
                changed |= set_model(req, &target);
            }
        }
        "batchGenerateContent" => {
            let requests = root
                .get_mut("batch")
                .and_then(|b| get_either(b, "inputConfig", "input_config"))
                .and_then(|c| c.get_mut("requests"))
                .and_then(|r| r.get_mut("requests"));
            for item in array_items(requests) {
                if let Some(req) = item.get_mut("request") {
                    changed |= set_model(req, &target);
                }
            }
        }
        _ => {
            if let Some(req) = get_either(
                &mut root,
                "generateContentRequest",
                "generate_content_request",
            ) {
                changed |= set_model(req, &target);
            }
        }
    }
    if !changed {
        return Ok(None);
    }
    serde_json::to_vec(&root).map(Some)
}

/// `models/{id}` for a bare id; names that already carry a collection are kept.
fn qualified_model(new_model: &str) -> String {
    if new_model.starts_with("models/") || new_model.starts_with("tunedModels/") {
        new_model.to_owned()
    } else {
        format!("models/{new_model}")
    }
}

/// The camelCase field of an object, else its snake_case twin.
fn get_either<'a>(v: &'a mut Value, camel: &str, snake: &str) -> Option<&'a mut Value> {
    let obj = v.as_object_mut()?;
    if obj.contains_key(camel) {
        obj.get_mut(camel)
    } else {
        obj.get_mut(snake)
    }
}

/// The elements of an optional array (nothing for a missing or non-array value).
fn array_items(v: Option<&mut Value>) -> impl Iterator<Item = &mut Value> {
    v.and_then(Value::as_array_mut).into_iter().flatten()
}

/// Set an existing string `model` field to `target`; true when that changed it.
fn set_model(req: &mut Value, target: &str) -> bool {
    match req.get_mut("model") {
        Some(Value::String(m)) if m != target => {
            target.clone_into(m);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The reading of the output cap before it skipped building a `Value`: the reference.
    fn max_output_tokens_via_value(body: &[u8]) -> Option<u64> {
        #[derive(Deserialize)]
        struct ValueHints {
            #[serde(rename = "generationConfig", default)]
            camel: Option<Value>,
            #[serde(rename = "generation_config", default)]
            snake: Option<Value>,
            #[serde(rename = "cachedContent", default)]
            _cc: Option<Value>,
            #[serde(rename = "cached_content", default)]
            _cs: Option<Value>,
        }
        let h: ValueHints = serde_json::from_slice(body).ok()?;
        let as_u64 = |v: &Value| match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        [h.camel, h.snake].iter().flatten().find_map(|gc| {
            let gc = gc.as_object()?;
            ["maxOutputTokens", "max_output_tokens"]
                .iter()
                .find_map(|k| gc.get(*k).and_then(as_u64))
        })
    }

    #[test]
    fn output_cap_reads_as_a_value_would() {
        let bodies = [
            r#"{"generationConfig":{"maxOutputTokens":256,"temperature":0.2}}"#,
            r#"{"generation_config":{"max_output_tokens":"77"}}"#,
            r#"{"generationConfig":{"maxOutputTokens":" 12 "}}"#,
            r#"{"generationConfig":{"maxOutputTokens":-3,"max_output_tokens":9}}"#,
            r#"{"generationConfig":{"maxOutputTokens":1.5}}"#,
            r#"{"generationConfig":{"maxOutputTokens":1e3}}"#,
            r#"{"generationConfig":{"maxOutputTokens":-0}}"#,
            r#"{"generationConfig":{"maxOutputTokens":18446744073709551616}}"#,
            r#"{"generationConfig":{"maxOutputTokens":null,"max_output_tokens":4}}"#,
            r#"{"generationConfig":{"maxOutputTokens":[1],"x":{"maxOutputTokens":2}}}"#,
            r#"{"generationConfig":{"maxOutputTokens":{"a":1}}}"#,
            r#"{"generationConfig":{"maxOutputTokens":true}}"#,
            r#"{"generationConfig":{"maxOutputTokens":5,"maxOutputTokens":6}}"#,
            r#"{"generationConfig":{"maxOutputTokens":5,"maxOutputTokens":"x"}}"#,
            r#"{"generationConfig":{"max_output_tokens":5,"maxOutputTokens":"x"}}"#,
            r#"{"generationConfig":{"max\u004futputTokens":8}}"#,
            r#"{"generation_config":{"max_outp\u0075t_tokens":5}}"#,
            r#"{"contents":[{"parts":[{"text":"say maxOutputTokens"}]}]}"#,
            r#"{"generationConfig":{},"generation_config":{"maxOutputTokens":3}}"#,
            r#"{"generationConfig":{"maxOutputTokens":"a"},"generation_config":{"maxOutputTokens":3}}"#,
            r#"{"generationConfig":[],"generation_config":{"maxOutputTokens":3}}"#,
            r#"{"generationConfig":"x","generation_config":null}"#,
            r#"{"generationConfig":null}"#,
            r#"{"contents":[{"parts":[{"text":"hi \" there"}]}],"generationConfig":{"stopSequences":["a"],"maxOutputTokens":42}}"#,
            r#"{"generationConfig":{"maxOutputTokens":42}} trailing"#,
            r#"{"generationConfig":{"maxOutputTokens":42"#,
            r#"[{"maxOutputTokens":1}]"#,
            r#"[null, {"max_output_tokens":2}]"#,
            r#"{"generationConfig":{"maxOutputTokens":1},"generationConfig":{}}"#,
            r#"{}"#,
            r#""#,
            r#"not json"#,
        ];
        for b in bodies {
            assert_eq!(
                max_output_tokens(b.as_bytes()),
                max_output_tokens_via_value(b.as_bytes()),
                "{b}"
            );
        }
    }

    #[test]
    fn reads_max_output_tokens() {
        let b = br#"{"contents":[{"parts":[{"text":"hi"}]}],"generationConfig":{"temperature":0.2,"maxOutputTokens":1024}}"#;
        assert_eq!(max_output_tokens(b), Some(1024));
        assert_eq!(
            max_output_tokens(br#"{"generation_config":{"max_output_tokens":77}}"#),
            Some(77)
        );
        assert_eq!(
            max_output_tokens(br#"{"generationConfig":{"maxOutputTokens":"300"}}"#),
            Some(300)
        );
        assert_eq!(max_output_tokens(br#"{"generationConfig":{}}"#), None);
        assert_eq!(
            max_output_tokens(br#"{"generationConfig":{"maxOutputTokens":-1}}"#),
            None
        );
        assert_eq!(max_output_tokens(br#"{"contents":[]}"#), None);
        assert_eq!(max_output_tokens(b"not json"), None);
        assert_eq!(max_output_tokens(b""), None);
        assert_eq!(max_output_tokens(b"[1,2]"), None);
    }

    #[test]
    fn reads_cached_content() {
        assert_eq!(
            cached_content(br#"{"contents":[],"cachedContent":"cachedContents/abc123"}"#)
                .as_deref(),
            Some("cachedContents/abc123")
        );
        assert_eq!(
            cached_content(br#"{"cached_content":"cachedContents/x"}"#).as_deref(),
            Some("cachedContents/x")
        );
        assert_eq!(cached_content(br#"{"cachedContent":7}"#), None);
        assert_eq!(cached_content(br#"{"contents":[]}"#), None);
        assert_eq!(cached_content(b"{"), None);
    }

    fn rewrite(method: &str, body: &Value, model: &str) -> Option<Value> {
        let bytes = serde_json::to_vec(body).unwrap();
        rewrite_models_in_body(method, &bytes, model)
            .unwrap()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn rewrites_batch_embed_contents() {
        let body = json!({"requests":[
            {"model":"models/text-embedding-004","content":{"parts":[{"text":"a"}]}},
            {"model":"models/text-embedding-004","content":{"parts":[{"text":"b"}]},"taskType":"RETRIEVAL_QUERY"}
        ]});
        let out = rewrite("batchEmbedContents", &body, "gemini-embedding-001").unwrap();
        let mut want = body.clone();
        want["requests"][0]["model"] = json!("models/gemini-embedding-001");
        want["requests"][1]["model"] = json!("models/gemini-embedding-001");
        assert_eq!(out, want);
        // Already right (prefix given or not): nothing to do.
        assert_eq!(
            rewrite("batchEmbedContents", &out, "models/gemini-embedding-001"),
            None
        );
        assert_eq!(
            rewrite("batchEmbedContents", &out, "gemini-embedding-001"),
            None
        );
    }

    #[test]
    fn rewrites_batch_generate_content() {
        let body = json!({"batch":{"displayName":"b1","inputConfig":{"requests":{"requests":[
            {"request":{"model":"models/gemini-2.5-pro","contents":[{"parts":[{"text":"x"}]}]},"metadata":{"key":"k1"}},
            {"request":{"contents":[]}}
        ]}}}});
        let out = rewrite("batchGenerateContent", &body, "gemini-2.5-flash").unwrap();
        let mut want = body.clone();
        want["batch"]["inputConfig"]["requests"]["requests"][0]["request"]["model"] =
            json!("models/gemini-2.5-flash");
        assert_eq!(out, want);
        let file_input = json!({"batch":{"inputConfig":{"fileName":"files/abc"}}});
        assert_eq!(
            rewrite("batchGenerateContent", &file_input, "gemini-2.5-flash"),
            None
        );
    }

    #[test]
    fn rewrites_count_tokens() {
        let body =
            json!({"generateContentRequest":{"model":"models/gemini-2.5-pro","contents":[]}});
        let out = rewrite("countTokens", &body, "models/gemini-2.5-flash").unwrap();
        assert_eq!(
            out,
            json!({"generateContentRequest":{"model":"models/gemini-2.5-flash","contents":[]}})
        );
        assert_eq!(
            rewrite("countTokens", &json!({"contents":[]}), "gemini-2.5-flash"),
            None
        );
        let snake = json!({"generate_content_request":{"model":"models/a"}});
        assert_eq!(
            rewrite("countTokens", &snake, "b").unwrap(),
            json!({"generate_content_request":{"model":"models/b"}})
        );
    }

    #[test]
    fn other_methods_and_bad_bodies() {
        assert_eq!(
            rewrite_models_in_body("generateContent", b"not json", "x").unwrap(),
            None
        );
        assert_eq!(
            rewrite_models_in_body("generateContent", br#"{"model":"models/a"}"#, "x").unwrap(),
            None
        );
        assert!(rewrite_models_in_body("countTokens", b"{not json", "x").is_err());
        assert!(rewrite_models_in_body("batchEmbedContents", b"\xff", "x").is_err());
        assert_eq!(
            rewrite_models_in_body("countTokens", b"  ", "x").unwrap(),
            None
        );
        assert_eq!(
            rewrite_models_in_body("batchEmbedContents", br#"{"requests":"nope"}"#, "x").unwrap(),
            None
        );
    }

    #[test]
    fn keeps_other_content() {
        let body = br#"{"requests":[{"model":"models/a","content":{"parts":[{"text":"caf\u00e9 \"q\" \ud83d\ude00"}]},"outputDimensionality":768}]}"#;
        let out = rewrite_models_in_body("batchEmbedContents", body, "b")
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["requests"][0]["model"], "models/b");
        assert_eq!(
            v["requests"][0]["content"]["parts"][0]["text"],
            "café \"q\" 😀"
        );
        assert_eq!(v["requests"][0]["outputDimensionality"], 768);
    }
}
