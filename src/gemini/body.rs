//! Model names and hints carried in request bodies.

/// `generationConfig.maxOutputTokens` of a request body, when it is JSON and has one.
pub fn max_output_tokens(body: &[u8]) -> Option<u64> {
    let _ = body;
    None
}

/// The top-level `cachedContent` name of a request body (`cachedContents/…`), if any.
pub fn cached_content(body: &[u8]) -> Option<String> {
    let _ = body;
    None
}

/// Rewrite model names carried inside a body for `method` to `new_model`
/// (`batchEmbedContents` `requests[].model`, `batchGenerateContent` inline requests,
/// `countTokens` `generateContentRequest.model`). `Ok(None)` when nothing needed rewriting.
pub fn rewrite_models_in_body(
    method: &str,
    body: &[u8],
    new_model: &str,
) -> Result<Option<Vec<u8>>, serde_json::Error> {
    let _ = (method, body, new_model);
    Ok(None)
}
