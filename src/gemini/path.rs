//! URL shapes: `/{v1|v1beta}/{models|tunedModels}/{model}:{method}`.
//!
//! The proxy needs the model of a call (to pick a price and a budget) and sometimes has to send
//! the call to another model (a fallback), so both parsing and rewriting live here, side by side,
//! to keep them in agreement about what a model call looks like.

/// A model call parsed from a request path (after any `/agents/{id}` prefix was stripped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelCall<'a> {
    /// `v1`, `v1beta`, `v1alpha`, …
    pub version: &'a str,
    /// `models` or `tunedModels`.
    pub collection: &'a str,
    /// The model id without the collection, e.g. `gemini-2.5-flash`.
    pub model: &'a str,
    /// The method after the colon, e.g. `generateContent`.
    pub method: &'a str,
}

/// The collections a model call can name.
const COLLECTIONS: [&str; 2] = ["models", "tunedModels"];

/// Parse `/{version}/{models|tunedModels}/{model}:{method}`; `None` for any other path.
///
/// The version is any segment that starts with `v1` (`v1`, `v1beta`, `v1alpha`, `v1beta1`):
/// SDKs move between them and the proxy must not care. A query string (`?alt=sse`), if the
/// caller left one on, is ignored.
pub fn parse_model_call(path: &str) -> Option<ModelCall<'_>> {
    // One pass over the path, each segment checked as it is crossed: every request goes
    // through here (a `memchr` per delimiter and a check per segment cost ~800 instructions).
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return None;
    }
    // The end of the run of bytes of class `class` from `from`, and the byte that ended it.
    let run = |from: usize, class: u8| {
        let end = bytes[from..]
            .iter()
            .position(|&b| CLASS[usize::from(b)] & class == 0)
            .map_or(bytes.len(), |k| from + k);
        (end, bytes.get(end).copied())
    };
    let (slash1, Some(b'/')) = run(1, ID) else {
        return None;
    };
    let (slash2, Some(b'/')) = run(slash1 + 1, ID) else {
        return None;
    };
    let (colon, Some(b':')) = run(slash2 + 1, MODEL) else {
        return None;
    };
    let (end, None | Some(b'?')) = run(colon + 1, ID) else {
        return None;
    };
    let version = &path[1..slash1];
    let collection = &path[slash1 + 1..slash2];
    let model = &path[slash2 + 1..colon];
    let method = &path[colon + 1..end];
    if !version.starts_with("v1")
        || !COLLECTIONS.contains(&collection)
        || model.is_empty()
        || method.is_empty()
    {
        return None;
    }
    Some(ModelCall {
        version,
        collection,
        model,
        method,
    })
}

/// The same path with the model replaced (`new_model` may carry a `models/` prefix, which is
/// dropped). `None` when the path is not a model call.
///
/// A fallback is a base model, so a `tunedModels/…` call is rewritten into the `models`
/// collection; only a `new_model` that itself says `tunedModels/…` keeps that collection.
/// `None` too when `new_model` is not a plain model id (empty, or with `/`, `:`, `?`), since
/// splicing it in would produce a different URL shape.
pub fn rewrite_model_in_path(path: &str, new_model: &str) -> Option<String> {
    let (bare, query) = strip_query(path);
    let call = parse_model_call(bare)?;
    let (collection, model) = match new_model.strip_prefix("tunedModels/") {
        Some(tuned) => ("tunedModels", tuned),
        None => (
            "models",
            new_model.strip_prefix("models/").unwrap_or(new_model),
        ),
    };
    if !is_model_id(model) {
        return None;
    }
    let mut out = String::with_capacity(path.len() + model.len());
    out.push('/');
    out.push_str(call.version);
    out.push('/');
    out.push_str(collection);
    out.push('/');
    out.push_str(model);
    out.push(':');
    out.push_str(call.method);
    out.push_str(query);
    Some(out)
}

/// Split `path` into the part before `?` and the query including its `?` (empty if none).
fn strip_query(path: &str) -> (&str, &str) {
    match path.find('?') {
        Some(i) => path.split_at(i),
        None => (path, ""),
    }
}

/// A model id such as `gemini-2.5-flash` or `gemini-2.0-flash-001`.
fn is_model_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| CLASS[usize::from(b)] & MODEL != 0)
}

/// Class bit of the bytes of a version, a collection or a method (`v1beta`, `models`,
/// `generateContent`): ASCII letters and digits.
const ID: u8 = 1;
/// Class bit of the bytes of a model id: ASCII letters and digits, `-`, `.`, `_`, `@`.
const MODEL: u8 = 2;

/// The class bits of each byte (a table: one load per byte of the path).
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] = ID | MODEL;
        } else if matches!(c, b'-' | b'.' | b'_' | b'@') {
            t[b] = MODEL;
        }
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The former parser (split at each delimiter, then check each segment): the one-pass
    /// parser must agree with it on every path.
    fn split_then_check(path: &str) -> Option<ModelCall<'_>> {
        let rest = path.strip_prefix('/')?;
        let rest = rest.split('?').next()?;
        let (version, rest) = rest.split_once('/')?;
        let (collection, rest) = rest.split_once('/')?;
        let (model, method) = rest.split_once(':')?;
        let ok = version.starts_with("v1")
            && version.bytes().all(|b| b.is_ascii_alphanumeric())
            && COLLECTIONS.contains(&collection)
            && !model.is_empty()
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'@'))
            && !method.is_empty()
            && method.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then_some(ModelCall {
            version,
            collection,
            model,
            method,
        })
    }

    /// Paths in the shape of a model call, each piece now and then replaced by another
    /// (so that about half are calls and the rest miss in one place or another).
    fn call_like_path() -> impl Strategy<Value = String> {
        let piece = |usual: &'static str, others: Vec<&'static str>| prop_oneof![6 => Just(usual), 1 => prop::sample::select(others)];
        let odd = vec![
            "", "/", ":", "?", "-", "@", "é", "%20", "v2", "x/y", "a:b", "?alt=sse",
        ];
        (
            piece("/", odd.clone()),
            piece(
                "v1beta",
                [odd.clone(), vec!["v1", "v1alpha", "V1", "v1-beta"]].concat(),
            ),
            piece("/", odd.clone()),
            piece(
                "models",
                [odd.clone(), vec!["tunedModels", "model"]].concat(),
            ),
            piece("/", odd.clone()),
            piece(
                "gemini-2.5-flash",
                [odd.clone(), vec!["m_1@x.y", "gemini 2"]].concat(),
            ),
            piece(":", odd.clone()),
            piece(
                "generateContent",
                [odd.clone(), vec!["countTokens", "gen-erate"]].concat(),
            ),
            piece("", odd),
        )
            .prop_map(|(a, b, c, d, e, f, g, h, i)| [a, b, c, d, e, f, g, h, i].concat())
    }

    proptest! {
        #[test]
        fn one_pass_agrees_with_split_then_check(path in call_like_path()) {
            prop_assert_eq!(parse_model_call(&path), split_then_check(&path), "{}", path);
        }
    }

    /// The comparison above bites only if many generated paths are calls.
    #[test]
    fn many_generated_paths_are_calls() {
        let calls = crate::testing::how_many_generated(&call_like_path(), 400, |p| {
            split_then_check(p).is_some()
        });
        assert!((100..350).contains(&calls), "{calls} of 400 are calls");
    }

    #[test]
    fn parses_versions_and_collections() {
        let c = parse_model_call("/v1beta/models/gemini-2.5-flash:generateContent").unwrap();
        assert_eq!(
            c,
            ModelCall {
                version: "v1beta",
                collection: "models",
                model: "gemini-2.5-flash",
                method: "generateContent",
            }
        );
        for v in ["v1", "v1alpha", "v1beta1"] {
            let p = format!("/{v}/models/gemini-2.0-flash-001:streamGenerateContent");
            let c = parse_model_call(&p).unwrap();
            assert_eq!(c.version, v);
            assert_eq!(c.model, "gemini-2.0-flash-001");
            assert_eq!(c.method, "streamGenerateContent");
        }
        let c = parse_model_call("/v1/tunedModels/my-tuned-abc123:generateContent").unwrap();
        assert_eq!(c.collection, "tunedModels");
        assert_eq!(c.model, "my-tuned-abc123");
    }

    #[test]
    fn ignores_a_query() {
        let c = parse_model_call("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse")
            .unwrap();
        assert_eq!(c.model, "gemini-2.5-pro");
        assert_eq!(c.method, "streamGenerateContent");
    }

    #[test]
    fn rejects_other_shapes() {
        for p in [
            "",
            "/",
            "/v1beta/models",
            "/v1beta/models/",
            "/v1beta/models/gemini-2.5-flash",
            "/v1beta/models/gemini-2.5-flash:",
            "/v1beta/models/:generateContent",
            "/v1beta/files/abc",
            "/upload/v1beta/files",
            "/v2/models/gemini-2.5-flash:generateContent",
            "/v1beta/models/gemini-2.5-flash:generateContent/extra",
            "v1beta/models/gemini-2.5-flash:generateContent",
            "/v1beta/cachedContents/abc:generateContent",
            "/v1beta/batches/123:cancel",
            "/v1beta/openai/chat/completions",
            "/v1beta/models/a b:generateContent",
            "/v1beta/models/x:gen:erate",
            "/v1beta/models/a/b:generateContent",
            "/v1beta/models//gemini-2.5-flash:generateContent",
        ] {
            assert_eq!(parse_model_call(p), None, "{p}");
        }
    }

    #[test]
    fn rewrites_the_model() {
        let p = "/v1beta/models/gemini-2.5-pro:generateContent";
        assert_eq!(
            rewrite_model_in_path(p, "gemini-2.5-flash").as_deref(),
            Some("/v1beta/models/gemini-2.5-flash:generateContent")
        );
        assert_eq!(
            rewrite_model_in_path(p, "models/gemini-2.5-flash-lite").as_deref(),
            Some("/v1beta/models/gemini-2.5-flash-lite:generateContent")
        );
        assert_eq!(
            rewrite_model_in_path(
                "/v1/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
                "gemini-2.5-flash"
            )
            .as_deref(),
            Some("/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
        );
    }

    #[test]
    fn rewrites_tuned_models_to_base_models() {
        let p = "/v1beta/tunedModels/my-model-1:generateContent";
        assert_eq!(
            rewrite_model_in_path(p, "gemini-2.5-flash").as_deref(),
            Some("/v1beta/models/gemini-2.5-flash:generateContent")
        );
        assert_eq!(
            rewrite_model_in_path(p, "tunedModels/other").as_deref(),
            Some("/v1beta/tunedModels/other:generateContent")
        );
    }

    #[test]
    fn rewrite_refuses_non_calls_and_bad_models() {
        assert_eq!(
            rewrite_model_in_path("/v1beta/files/abc", "gemini-2.5-flash"),
            None
        );
        let p = "/v1beta/models/gemini-2.5-pro:generateContent";
        assert_eq!(rewrite_model_in_path(p, ""), None);
        assert_eq!(rewrite_model_in_path(p, "models/"), None);
        assert_eq!(rewrite_model_in_path(p, "a/b"), None);
        assert_eq!(rewrite_model_in_path(p, "x:y"), None);
    }
}
