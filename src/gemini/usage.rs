//! Token usage in responses and the incremental scanner that finds it.

/// Token counts of one response (`usageMetadata`); absent fields are 0.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `promptTokenCount` (includes `cached_tokens`).
    pub prompt_tokens: u64,
    /// `candidatesTokenCount` (visible output).
    pub candidates_tokens: u64,
    /// `thoughtsTokenCount` (thinking, billed as output).
    pub thoughts_tokens: u64,
    /// `toolUsePromptTokenCount`.
    pub tool_use_prompt_tokens: u64,
    /// `cachedContentTokenCount` (part of the prompt, billed at the cache rate).
    pub cached_tokens: u64,
    /// `totalTokenCount`.
    pub total_tokens: u64,
    /// Audio tokens of the prompt (from `promptTokensDetails`, modality `AUDIO`).
    pub audio_prompt_tokens: u64,
}

/// Incremental scanner over a response body.
#[derive(Debug, Default)]
pub struct UsageScanner {}

impl UsageScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }
    /// Feed the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let _ = chunk;
    }
    /// The latest usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        None
    }
    /// The last `modelVersion` seen.
    pub fn model_version(&self) -> Option<&str> {
        None
    }
}
