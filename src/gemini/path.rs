//! URL shapes: `/{v1|v1beta}/{models|tunedModels}/{model}:{method}`.

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

/// Parse `/{version}/{models|tunedModels}/{model}:{method}`; `None` for any other path.
pub fn parse_model_call(path: &str) -> Option<ModelCall<'_>> {
    let _ = path;
    None
}

/// The same path with the model replaced (`new_model` may carry a `models/` prefix, which is
/// dropped). `None` when the path is not a model call.
pub fn rewrite_model_in_path(path: &str, new_model: &str) -> Option<String> {
    let _ = (path, new_model);
    None
}
