//! Token usage in responses and the incremental scanner that finds it.
//!
//! Responses are metered as they stream through, so the body is never buffered: the
//! [`UsageScanner`] is fed each chunk as it passes and keeps only a few hundred bytes of state
//! (plus at most two `usageMetadata` objects, each capped at 16 KiB: the last one, whose
//! parsing is deferred, and the one being read). A `usageMetadata` object that lies whole
//! in one chunk, in the usual shape, is read where it stands instead of being copied and
//! scanned (`UsageScanner::merge_read`). One byte-level state machine serves
//! the three framings Gemini uses: one JSON object (`generateContent`), SSE
//! (`data: {…}\r\n\r\n`, possibly ended by a raw `{"error":…}`), and a pretty-printed JSON
//! array streamed one element at a time.

mod reader;

use std::fmt;

use memchr::memchr;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

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

impl Usage {
    /// Output tokens as billed: visible candidates plus thinking, because Google bills
    /// thinking at the output rate while `candidatesTokenCount` leaves it out.
    pub fn completion_tokens(&self) -> u64 {
        self.candidates_tokens.saturating_add(self.thoughts_tokens)
    }

    /// Prompt tokens billed at the full input rate: the prompt less its cached part, because
    /// `promptTokenCount` includes `cachedContentTokenCount`, which is billed at the cache rate.
    pub fn uncached_prompt_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_sub(self.cached_tokens)
    }

    /// The tokens to count against a token budget: `totalTokenCount` when Google sent it, else
    /// the sum it stands for (prompt + candidates + thoughts + tool-use prompt), so a response
    /// whose total is missing is still counted.
    pub fn counted_tokens(&self) -> u64 {
        if self.total_tokens > 0 {
            self.total_tokens
        } else {
            self.prompt_tokens
                .saturating_add(self.candidates_tokens)
                .saturating_add(self.thoughts_tokens)
                .saturating_add(self.tool_use_prompt_tokens)
        }
    }

    /// Apply one parsed `usageMetadata`: fields it carries replace ours, absent ones stay,
    /// because stream chunks carry cumulative (not incremental) and sometimes partial counts.
    /// Returns whether it carried any token count.
    fn apply(&mut self, raw: &RawUsage) -> bool {
        let mut any = false;
        let mut set = |dst: &mut u64, src: Option<u64>| {
            if let Some(v) = src {
                *dst = v;
                any = true;
            }
        };
        set(&mut self.prompt_tokens, raw.prompt);
        set(&mut self.candidates_tokens, raw.candidates);
        set(&mut self.thoughts_tokens, raw.thoughts);
        set(&mut self.tool_use_prompt_tokens, raw.tool_use_prompt);
        set(&mut self.cached_tokens, raw.cached);
        set(&mut self.total_tokens, raw.total);
        set(&mut self.audio_prompt_tokens, raw.audio_prompt);
        any
    }
}

/// The wire form of `usageMetadata` (`None` = absent or null); unknown fields (`serviceTier`,
/// `trafficType`, `cacheTokensDetails`, …) are skipped.
///
/// `Deserialize` is written by hand rather than derived only for speed: a stream parses one of
/// these per event, and reading field names as bytes (`deserialize_bytes`) spares serde_json a
/// UTF-8 validation per key, which was the largest single cost of the scanner.
#[derive(Default)]
struct RawUsage {
    prompt: Option<u64>,
    candidates: Option<u64>,
    thoughts: Option<u64>,
    tool_use_prompt: Option<u64>,
    cached: Option<u64>,
    total: Option<u64>,
    /// Sum of the `AUDIO` entries of `promptTokensDetails`.
    audio_prompt: Option<u64>,
}

impl RawUsage {
    /// The `FIELD_*` bits of the fields this object sets.
    fn fields(&self) -> u8 {
        [
            (self.prompt, FIELD_PROMPT),
            (self.candidates, FIELD_CANDIDATES),
            (self.thoughts, FIELD_THOUGHTS),
            (self.tool_use_prompt, FIELD_TOOL_USE_PROMPT),
            (self.cached, FIELD_CACHED),
            (self.total, FIELD_TOTAL),
            (self.audio_prompt, FIELD_PROMPT_DETAILS),
        ]
        .iter()
        .fold(
            0,
            |bits, (v, bit)| if v.is_some() { bits | bit } else { bits },
        )
    }
}

/// The `usageMetadata` fields we read.
enum UsageField {
    Prompt,
    Candidates,
    Thoughts,
    ToolUsePrompt,
    Cached,
    Total,
    PromptDetails,
    Other,
}

impl UsageField {
    /// The field a key names. (Compared with `==`, which is a length check and a few words,
    /// rather than matched against byte-string patterns, which compile to a test per byte.)
    fn from_name(name: &[u8]) -> Self {
        let names: [(&[u8], Self); 7] = [
            (b"promptTokenCount", Self::Prompt),
            (b"candidatesTokenCount", Self::Candidates),
            (b"totalTokenCount", Self::Total),
            (b"thoughtsTokenCount", Self::Thoughts),
            (b"promptTokensDetails", Self::PromptDetails),
            (b"cachedContentTokenCount", Self::Cached),
            (b"toolUsePromptTokenCount", Self::ToolUsePrompt),
        ];
        names
            .into_iter()
            .find(|(n, _)| *n == name)
            .map_or(Self::Other, |(_, f)| f)
    }
}

impl<'de> Deserialize<'de> for UsageField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(NameVisitor)
            .map(|n| Self::from_name(&n))
    }
}

/// The fields of a `promptTokensDetails` entry.
enum DetailField {
    Modality,
    TokenCount,
    Other,
}

impl DetailField {
    /// The field a key names (compared as [`UsageField::from_name`] does).
    fn from_name(name: &[u8]) -> Self {
        if name == b"modality" {
            Self::Modality
        } else if name == b"tokenCount" {
            Self::TokenCount
        } else {
            Self::Other
        }
    }
}

impl<'de> Deserialize<'de> for DetailField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(NameVisitor)
            .map(|n| Self::from_name(&n))
    }
}

/// A field name or enum value, as raw bytes; only names we know fit in the buffer, longer
/// ones come back empty (they match nothing, which is all that matters).
struct NameVisitor;

impl<'de> Visitor<'de> for NameVisitor {
    type Value = NameBuf;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a name")
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(NameBuf::new(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(NameBuf::new(v.as_bytes()))
    }
}

/// A short name copied out of the input (no allocation).
struct NameBuf {
    buf: [u8; 24],
    len: usize,
}

impl NameBuf {
    fn new(v: &[u8]) -> Self {
        let mut buf = [0u8; 24];
        match buf.get_mut(..v.len()) {
            Some(dst) => {
                dst.copy_from_slice(v);
                Self { buf, len: v.len() }
            }
            None => Self { buf, len: 0 },
        }
    }
}

impl std::ops::Deref for NameBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<'de> Deserialize<'de> for RawUsage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct UsageVisitor;
        impl<'de> Visitor<'de> for UsageVisitor {
            type Value = RawUsage;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("usageMetadata")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawUsage, A::Error> {
                let mut raw = RawUsage::default();
                while let Some(field) = map.next_key::<UsageField>()? {
                    let slot = match field {
                        UsageField::Prompt => &mut raw.prompt,
                        UsageField::Candidates => &mut raw.candidates,
                        UsageField::Thoughts => &mut raw.thoughts,
                        UsageField::ToolUsePrompt => &mut raw.tool_use_prompt,
                        UsageField::Cached => &mut raw.cached,
                        UsageField::Total => &mut raw.total,
                        UsageField::PromptDetails => {
                            raw.audio_prompt = map.next_value::<AudioTokens>()?.0;
                            continue;
                        }
                        UsageField::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value::<Count>()?.0;
                }
                Ok(raw)
            }
        }
        d.deserialize_map(UsageVisitor)
    }
}

/// A token count: a number (negative → 0), a string holding one (proto3 JSON), or null (absent).
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = Option<u64>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Some(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Some(u64::try_from(v).unwrap_or(0)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                // `as` saturates: NaN and negatives become 0, huge values u64::MAX.
                Ok(Some(v as u64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(v.trim().parse().ok())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                d.deserialize_any(self)
            }
        }
        d.deserialize_any(CountVisitor).map(Count)
    }
}

/// The sum of the `AUDIO` entries of a `promptTokensDetails` list (0 when it has none), or
/// `None` when the value is null or not a list.
struct AudioTokens(Option<u64>);

impl<'de> Deserialize<'de> for AudioTokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DetailsVisitor;
        impl<'de> Visitor<'de> for DetailsVisitor {
            type Value = Option<u64>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of modality token counts")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut audio = 0u64;
                while let Some(entry) = seq.next_element::<ModalityCount>()? {
                    if entry.audio {
                        audio = audio.saturating_add(entry.tokens);
                    }
                }
                Ok(Some(audio))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // Not the documented shape: skip it rather than reject the whole usage.
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                d.deserialize_any(self)
            }
        }
        d.deserialize_any(DetailsVisitor).map(AudioTokens)
    }
}

/// One `{modality, tokenCount}` entry of a `*TokensDetails` list: whether it is `AUDIO` (the
/// only modality priced differently) and its count.
struct ModalityCount {
    audio: bool,
    tokens: u64,
}

impl<'de> Deserialize<'de> for ModalityCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = ModalityCount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a modality token count")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ModalityCount, A::Error> {
                let mut entry = ModalityCount {
                    audio: false,
                    tokens: 0,
                };
                while let Some(field) = map.next_key::<DetailField>()? {
                    match field {
                        DetailField::Modality => {
                            entry.audio = map.next_value::<Modality>()?.0;
                        }
                        DetailField::TokenCount => {
                            entry.tokens = map.next_value::<Count>()?.0.unwrap_or(0);
                        }
                        DetailField::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(entry)
            }
        }
        d.deserialize_map(EntryVisitor)
    }
}

/// Whether a modality is `AUDIO`; anything else (including null) is not.
struct Modality(bool);

impl<'de> Deserialize<'de> for Modality {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ModalityVisitor;
        impl<'de> Visitor<'de> for ModalityVisitor {
            type Value = bool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a modality")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<bool, E> {
                Ok(v == b"AUDIO")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
                Ok(v == "AUDIO")
            }
            fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
                Ok(false)
            }
            fn visit_none<E: de::Error>(self) -> Result<bool, E> {
                Ok(false)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<bool, D2::Error> {
                d.deserialize_bytes(self)
            }
        }
        d.deserialize_option(ModalityVisitor).map(Modality)
    }
}

/// Bytes of a key kept for matching: our longest names are 23 bytes
/// (`cachedContentTokenCount`); a longer key inside a `usageMetadata` object makes it opaque.
const KEY_CAP: usize = 32;
/// Most bytes of one `usageMetadata` object kept; a larger one is skipped.
const USAGE_CAP: usize = 16 * 1024;
/// Most bytes of a `modelVersion` string (without its quotes) kept; a longer one is skipped.
const MODEL_CAP: usize = 256;

/// The keys the scanner acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    UsageMetadata,
    ModelVersion,
    Error,
    FinishReason,
}

/// What the scanner waits for after a string that may be a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum After {
    /// Nothing: plain structural scanning.
    #[default]
    Nothing,
    /// A string matching a key closed; a `:` (after whitespace) makes it a key.
    KeyEnd(Key),
    /// `"key":` seen; the next non-whitespace byte starts its value.
    Value(Key),
    /// A string naming a `usageMetadata` field (its `FIELD_*` bit) closed at the top level of
    /// the captured object; a `:` makes it a key.
    FieldEnd(u8),
    /// `"field":` seen; the next non-whitespace byte starts its value.
    FieldValue(u8),
}

/// Bits of the `usageMetadata` fields a captured object is known to set (see
/// [`UsageScanner::finish_usage`]).
const FIELD_PROMPT: u8 = 1;
const FIELD_CANDIDATES: u8 = 1 << 1;
const FIELD_THOUGHTS: u8 = 1 << 2;
const FIELD_TOOL_USE_PROMPT: u8 = 1 << 3;
const FIELD_CACHED: u8 = 1 << 4;
const FIELD_TOTAL: u8 = 1 << 5;
const FIELD_PROMPT_DETAILS: u8 = 1 << 6;

/// The value being copied out of the stream, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Capture {
    /// Nothing is copied.
    #[default]
    None,
    /// A `usageMetadata` object that opened at this depth (it ends when depth comes back).
    Object(u32),
    /// A `modelVersion` string (it ends at its closing quote).
    Str,
}

/// Bytes that end a run of non-string bytes outside strings.
static STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t
};

/// The index of the first structural byte (see [`STRUCTURAL`]) in `chunk[i..]`, or
/// `chunk.len()`: what lies between JSON strings (white space, numbers, `,` `:`, literals)
/// skipped eight bytes at a time (pretty-printed bodies are mostly indentation).
#[inline(always)]
fn skip_plain(chunk: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Bytes of `x` that are zero have their high bit set; exact up to the first such byte,
    // which is all that is used (borrows only disturb the bytes above it).
    let zeros = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    while let Some(word) = chunk
        .get(i..i + 8)
        .and_then(|w| <[u8; 8]>::try_from(w).ok())
    {
        let v = u64::from_le_bytes(word);
        // `{` `}` `[` `]` all read 0x79 with bit 5 set and bits 1-2 cleared (so do `y`, `Y`,
        // `_` and DEL: checked against the table below).
        let bracket = ((v | (ONES * 0x20)) & (ONES * 0xF9)) ^ (ONES * 0x79);
        let marks = zeros(v ^ (ONES * u64::from(b'"'))) | zeros(bracket);
        if marks == 0 {
            i += 8;
            continue;
        }
        let at = i + (marks.trailing_zeros() / 8) as usize;
        if STRUCTURAL[usize::from(word[at - i])] {
            return at;
        }
        i = at + 1;
    }
    while i < chunk.len() && !STRUCTURAL[usize::from(chunk[i])] {
        i += 1;
    }
    i
}

/// Incremental scanner over a response body.
///
/// Feed it every chunk of a response body, in order, split anywhere; it finds the
/// response-level `usageMetadata` and `modelVersion` of a JSON body, an SSE stream or a
/// JSON-array stream without buffering the body. It tracks only JSON structure (depth, strings,
/// escapes), ignores bytes outside any JSON value (such as `data: `), and recognises keys only
/// in the response objects themselves (depth 1 for an object body, 2 inside an array), so a
/// `usageMetadata` inside function-call arguments is not taken. Its memory is bounded (under
/// 33 KiB) whatever it is fed, and malformed input never panics.
#[derive(Debug, Default)]
pub struct UsageScanner {
    /// Nesting depth of JSON containers (0 between values).
    depth: u32,
    /// Depth of keys of a response object: 1 when the current root value is an object, 2 when
    /// it is an array (0 before any value).
    response_depth: u32,
    /// Inside a string (only strings at depth ≥ 1 are tracked).
    in_string: bool,
    /// The previous byte was a backslash inside a string.
    escape: bool,
    /// The first bytes of the current string, to match keys.
    key: [u8; KEY_CAP],
    /// How many bytes of `key` are used.
    key_len: u8,
    /// `key` holds the whole current string so far (it is not too long, and did not start a
    /// chunk with an escaped byte).
    key_ok: bool,
    /// What the bytes after a candidate key mean.
    after: After,
    /// The value being copied.
    capture: Capture,
    /// The copied bytes of `capture` (capacity at most `USAGE_CAP`).
    cap_buf: Vec<u8>,
    /// The value being copied grew past its cap and will be dropped.
    cap_overflow: bool,
    /// `FIELD_*` bits the `usageMetadata` being copied surely sets (a number or, for the
    /// details, a list).
    cap_fields: u8,
    /// `FIELD_*` bits the `usageMetadata` being copied may set (its key is there at all).
    cap_maybe: u8,
    /// The `usageMetadata` being copied has a top-level key we cannot read without parsing
    /// (escaped or over-long), so it may set fields `cap_fields` does not show.
    cap_opaque: bool,
    /// The last complete `usageMetadata`, not parsed yet (capacity at most `USAGE_CAP`).
    pending: Vec<u8>,
    /// `pending` holds an object.
    has_pending: bool,
    /// `cap_maybe` of `pending`.
    pending_maybe: u8,
    /// `cap_opaque` of `pending`.
    pending_opaque: bool,
    /// Usage merged from every parsed `usageMetadata` (all but `pending`).
    usage: Usage,
    /// Some parsed `usageMetadata` carried at least one token count.
    has_usage: bool,
    /// The last `modelVersion` when `model_seen`, else the model the request was sent to
    /// (see [`UsageScanner::for_model`]). One buffer for both, so that the usual response,
    /// whose `modelVersion` is the model requested, costs no allocation and no copy.
    model: String,
    /// A `modelVersion` was seen (and is in `model`).
    model_seen: bool,
    /// A response-level `error` key was seen.
    saw_error: bool,
    /// A `finishReason` key was seen.
    saw_finish_reason: bool,
}

impl UsageScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scanner at the start of the body of a response to a request for `model`: what
    /// [`UsageScanner::model`] answers until the body names the model that served it.
    pub fn for_model(model: String) -> Self {
        Self {
            model,
            ..Self::default()
        }
    }

    /// Feed the next chunk of the body. Chunks may be cut anywhere (inside a key, an escape or
    /// a UTF-8 character, between `\r` and `\n`): the outcome does not depend on where, so
    /// the proxy can pass each network chunk straight through.
    pub fn feed(&mut self, chunk: &[u8]) {
        let n = chunk.len();
        if n == 0 {
            return;
        }
        let mut i = 0usize;
        // Where the part of `chunk` still to be copied into `cap_buf` starts.
        let mut cap_from = 0usize;

        if self.in_string {
            // Finish a string that an earlier chunk left open (the slow path: the key so far
            // is in `self.key`).
            if self.escape {
                // The first byte is escaped; a string with an escape is no key of ours.
                self.escape = false;
                self.key_ok = false;
                i = 1;
            }
            match scan_string(chunk, i, &mut self.escape) {
                None => {
                    self.key_push(&chunk[i..]);
                    if !matches!(self.capture, Capture::None) {
                        self.cap_append(chunk);
                    }
                    return;
                }
                Some(end) => {
                    self.key_push(&chunk[i..end - 1]);
                    self.in_string = false;
                    i = end;
                    let key = self.key;
                    let key = &key[..usize::from(self.key_len)];
                    match self.capture {
                        Capture::None => {
                            if self.key_ok {
                                self.match_key(key);
                            }
                        }
                        Capture::Object(d) => {
                            if self.depth == d + 1 {
                                self.match_usage_field(key, self.key_ok);
                            }
                        }
                        Capture::Str => {
                            self.cap_append(&chunk[..end]);
                            self.finish_model_version();
                        }
                    }
                }
            }
        }

        if !matches!(self.after, After::Nothing) {
            i = self.resolve_after(chunk, i, &mut cap_from);
        }
        while i < n {
            let b = chunk[i];
            match b {
                b'"' => {
                    i += 1;
                    if self.depth == 0 {
                        // Not inside any JSON value (e.g. SSE framing): not a string we track.
                        continue;
                    }
                    let start = i;
                    match scan_string(chunk, start, &mut self.escape) {
                        Some(end) => {
                            i = end;
                            match self.capture {
                                Capture::None => {
                                    if is_key_len(end - 1 - start) {
                                        self.match_key(&chunk[start..end - 1]);
                                    }
                                }
                                Capture::Object(d) => {
                                    if self.depth == d + 1 {
                                        self.match_usage_field(&chunk[start..end - 1], true);
                                    }
                                }
                                Capture::Str if self.cap_buf.is_empty() && !self.cap_overflow => {
                                    // The whole string is in this chunk: kept from where it
                                    // stands, without a copy.
                                    self.capture = Capture::None;
                                    self.set_model_version(&chunk[cap_from..end]);
                                }
                                Capture::Str => {
                                    self.cap_append(&chunk[cap_from..end]);
                                    self.finish_model_version();
                                }
                            }
                            if !matches!(self.after, After::Nothing) {
                                i = self.resolve_after(chunk, i, &mut cap_from);
                            }
                        }
                        None => {
                            self.in_string = true;
                            self.key_len = 0;
                            self.key_ok = true;
                            self.key_push(&chunk[start..]);
                            i = n;
                        }
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 0 {
                        self.response_depth = if b == b'{' { 1 } else { 2 };
                    }
                    self.depth = self.depth.saturating_add(1);
                    i += 1;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    i += 1;
                    if matches!(self.capture, Capture::Object(d) if d == self.depth) {
                        self.cap_append(&chunk[cap_from..i]);
                        self.finish_usage();
                    }
                }
                _ => {
                    i = skip_plain(chunk, i + 1);
                }
            }
        }
        if !matches!(self.capture, Capture::None) && cap_from < n {
            self.cap_append(&chunk[cap_from..]);
        }
    }

    /// What follows a string that may be a key (`self.after` is set): white space, then its
    /// `:`, then the first byte of its value, from `chunk[i..]`. Returns where the main loop
    /// goes on: at the first byte not consumed here, with `self.after` cleared (a byte that
    /// turns out not to follow a key is scanned as usual), or at the chunk's end with
    /// `self.after` still set for the next chunk. Run only when a string closes, rather than
    /// checked at every step of the main loop.
    fn resolve_after(&mut self, chunk: &[u8], mut i: usize, cap_from: &mut usize) -> usize {
        while let Some(&b) = chunk.get(i) {
            if matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
                i += 1;
                continue;
            }
            match std::mem::take(&mut self.after) {
                After::Nothing => return i,
                After::KeyEnd(k) if b == b':' => {
                    match k {
                        Key::Error => self.saw_error = true,
                        Key::FinishReason => self.saw_finish_reason = true,
                        Key::UsageMetadata | Key::ModelVersion => self.after = After::Value(k),
                    }
                    i += 1;
                    continue;
                }
                After::Value(Key::UsageMetadata) if b == b'{' => {
                    // Usually the whole object is in this chunk, in the usual shape:
                    // read it where it stands, without copying it or scanning it.
                    if let Some((raw, len)) = reader::read_object(&chunk[i..]) {
                        self.merge_read(&raw);
                        return i + len;
                    }
                    self.start_capture(Capture::Object(self.depth));
                    *cap_from = i;
                }
                After::Value(Key::ModelVersion) if b == b'"' => {
                    self.start_capture(Capture::Str);
                    *cap_from = i;
                }
                After::FieldEnd(bit) if b == b':' => {
                    self.cap_maybe |= bit;
                    self.after = After::FieldValue(bit);
                    i += 1;
                    continue;
                }
                After::FieldValue(bit) => {
                    // serde_json reads a number as a count and a list as details: only
                    // then does this object surely set the field.
                    let sets = if bit == FIELD_PROMPT_DETAILS {
                        b == b'['
                    } else {
                        b.is_ascii_digit()
                    };
                    if sets {
                        self.cap_fields |= bit;
                    } else {
                        // null, a string, … (or a repeated key: the last one counts).
                        self.cap_fields &= !bit;
                    }
                }
                // Not a key after all, or a value we do not want: scanned as usual.
                _ => {}
            }
            return i;
        }
        i
    }

    /// The latest usage seen so far: `None` until a `usageMetadata` with at least one token
    /// count was seen (a `{"trafficType":…}`-only object does not count), so callers can tell
    /// "no usage reported" from "zero tokens".
    pub fn usage(&self) -> Option<Usage> {
        let mut usage = self.usage;
        let mut has = self.has_usage;
        if self.has_pending {
            if let Some(raw) = parse_usage(&self.pending) {
                has |= usage.apply(&raw);
            }
        }
        has.then_some(usage)
    }

    /// The last `modelVersion` seen: the model that actually served the response, which is
    /// what to price by (retired ids may be routed to newer models).
    pub fn model_version(&self) -> Option<&str> {
        self.model_seen.then_some(self.model.as_str())
    }

    /// The model to price by: the last `modelVersion` seen, else the model given to
    /// [`UsageScanner::for_model`] (empty for [`UsageScanner::new`]).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whether a response-level `error` key was seen (an error body, an SSE error event, or the
    /// raw error object Google appends to a stream that fails midway), so a 200 stream that
    /// ended in an error can be told from a clean one.
    pub fn saw_error(&self) -> bool {
        self.saw_error
    }

    /// Whether a `finishReason` key was seen anywhere; a stream that ends without one was cut
    /// short, which is the only sign of truncation Gemini gives.
    pub fn saw_finish_reason(&self) -> bool {
        self.saw_finish_reason
    }

    /// Append up to `KEY_CAP` bytes of the current string.
    #[inline]
    fn key_push(&mut self, s: &[u8]) {
        if !self.key_ok {
            return;
        }
        let len = usize::from(self.key_len);
        match self.key.get_mut(len..len + s.len()) {
            Some(dst) => {
                dst.copy_from_slice(s);
                // len + s.len() <= KEY_CAP = 32, so this fits in u8.
                self.key_len = u8::try_from(len + s.len()).unwrap_or(u8::MAX);
            }
            None => self.key_ok = false,
        }
    }

    /// A string closed outside any capture: if it is one of the keys we act on (at the right
    /// depth), wait for its `:`.
    ///
    /// Compared with `==`, not matched against byte-string patterns: a pattern compiles to
    /// a comparison per byte, `==` to a length check and a word or two.
    #[inline]
    fn match_key(&mut self, key: &[u8]) {
        let k = if key == b"finishReason" {
            Key::FinishReason
        } else if self.depth != self.response_depth {
            return;
        } else if key == b"usageMetadata" {
            Key::UsageMetadata
        } else if key == b"modelVersion" {
            Key::ModelVersion
        } else if key == b"error" {
            Key::Error
        } else {
            return;
        };
        self.after = After::KeyEnd(k);
    }

    fn start_capture(&mut self, c: Capture) {
        self.capture = c;
        self.cap_buf.clear();
        self.cap_overflow = false;
        self.cap_fields = 0;
        self.cap_maybe = 0;
        self.cap_opaque = false;
    }

    /// Copy `s` into `cap_buf`, or mark the capture overflowed when it would pass its cap.
    fn cap_append(&mut self, s: &[u8]) {
        if self.cap_overflow {
            return;
        }
        let cap = match self.capture {
            Capture::None => return,
            Capture::Object(_) => USAGE_CAP,
            Capture::Str => MODEL_CAP + 2,
        };
        let need = self.cap_buf.len() + s.len();
        if need > cap {
            self.cap_overflow = true;
            self.cap_buf.clear();
            return;
        }
        if need > self.cap_buf.capacity() {
            // Grow by doubling but never past USAGE_CAP, so memory stays bounded.
            let target = need.max(self.cap_buf.capacity() * 2).min(USAGE_CAP);
            self.cap_buf.reserve_exact(target - self.cap_buf.len());
        }
        self.cap_buf.extend_from_slice(s);
    }

    /// A copied `usageMetadata` object closed (one that [`reader::read_object`] could not
    /// read in place: cut by the chunk's end, or of an unusual shape): parse and merge it.
    ///
    /// Parsing is deferred: the object becomes `pending`, and the previous pending object is
    /// parsed and merged only if the new one might not override all its fields. A stream
    /// repeats the full cumulative usage in every event, so in practice only the last object
    /// is ever parsed (in [`UsageScanner::usage`]), which halves the cost per event. The result
    /// is the same as parsing every object, except that a later object that is itself invalid
    /// JSON can no longer fall back on the one before it.
    fn finish_usage(&mut self) {
        self.capture = Capture::None;
        if self.cap_overflow {
            self.cap_buf.clear();
            return;
        }
        if self.has_pending && (self.cap_opaque || !self.overrides_pending(self.cap_fields)) {
            self.merge_pending();
        }
        std::mem::swap(&mut self.pending, &mut self.cap_buf);
        self.cap_buf.clear();
        self.has_pending = true;
        self.pending_maybe = self.cap_maybe;
        self.pending_opaque = self.cap_opaque;
    }

    /// A `usageMetadata` object read whole where it stood ([`reader::read_object`]): merged
    /// at once, after the pending object unless this one overrides it.
    fn merge_read(&mut self, raw: &RawUsage) {
        if self.has_pending {
            if !self.overrides_pending(raw.fields()) {
                self.merge_pending();
            }
            self.has_pending = false;
            self.pending.clear();
        }
        self.has_usage |= self.usage.apply(raw);
    }

    /// Whether an object that surely sets the `FIELD_*` bits `sets` overrides everything the
    /// pending object may set (so that the pending one need not be parsed).
    fn overrides_pending(&self, sets: u8) -> bool {
        !self.pending_opaque && sets & self.pending_maybe == self.pending_maybe
    }

    /// Parse the pending object and merge it.
    fn merge_pending(&mut self) {
        if let Some(raw) = parse_usage(&self.pending) {
            self.has_usage |= self.usage.apply(&raw);
        }
    }

    /// A key closed at the top level of a captured `usageMetadata` object: note which field
    /// it names, or that the object is opaque when the key cannot be read raw.
    fn match_usage_field(&mut self, key: &[u8], complete: bool) {
        if !complete {
            // (Only a prefix of it is in `key`.)
            self.cap_opaque = true;
            return;
        }
        // A known name has no escape: only other keys need the backslash check.
        let bit = match UsageField::from_name(key) {
            UsageField::Prompt => FIELD_PROMPT,
            UsageField::Candidates => FIELD_CANDIDATES,
            UsageField::Thoughts => FIELD_THOUGHTS,
            UsageField::ToolUsePrompt => FIELD_TOOL_USE_PROMPT,
            UsageField::Cached => FIELD_CACHED,
            UsageField::Total => FIELD_TOTAL,
            UsageField::PromptDetails => FIELD_PROMPT_DETAILS,
            UsageField::Other => {
                if key.contains(&b'\\') {
                    self.cap_opaque = true;
                }
                return;
            }
        };
        self.after = After::FieldEnd(bit);
    }

    /// A `modelVersion` string that began in an earlier chunk closed: keep it (the copy
    /// includes both quotes).
    fn finish_model_version(&mut self) {
        self.capture = Capture::None;
        let quoted = std::mem::take(&mut self.cap_buf);
        if !self.cap_overflow {
            self.set_model_version(&quoted);
        }
        self.cap_buf = quoted;
        self.cap_buf.clear();
    }

    /// Keep a `modelVersion` string (`quoted`: with both quotes), unless it is longer than
    /// `MODEL_CAP`.
    fn set_model_version(&mut self, quoted: &[u8]) {
        if quoted.len() < 2 || quoted.len() > MODEL_CAP + 2 {
            return;
        }
        let inner = &quoted[1..quoted.len() - 1];
        if inner.contains(&b'\\') {
            if let Ok(s) = serde_json::from_slice::<String>(quoted) {
                self.model = s;
                self.model_seen = true;
            }
        } else if self.model.as_bytes() == inner {
            // The model requested, or the same as before (every stream event repeats it).
            self.model_seen = true;
        } else if let Ok(s) = std::str::from_utf8(inner) {
            self.model.clear();
            self.model.push_str(s);
            self.model_seen = true;
        }
    }
}

/// Parse a captured `usageMetadata` object; `None` when it is not valid. The usual shape is
/// read by [`reader`]; serde_json reads the rest.
fn parse_usage(bytes: &[u8]) -> Option<RawUsage> {
    reader::read(bytes).or_else(|| parse_usage_serde(bytes))
}

fn parse_usage_serde(bytes: &[u8]) -> Option<RawUsage> {
    serde_json::from_slice(bytes).ok()
}

/// Whether a string of this length can be one of the keys we act on (`error`,
/// `modelVersion`, `finishReason`, `usageMetadata`): a cheap filter before comparing bytes.
#[inline(always)]
fn is_key_len(len: usize) -> bool {
    matches!(len, 5 | 12 | 13)
}

/// Scan string content from `chunk[from..]` (where `from` is not an escaped byte) to its
/// closing quote: `Some(index after the quote)`, or `None` when the chunk ends inside the
/// string, with `pending_escape` set when the chunk ended on an unpaired backslash (so the next
/// chunk's first byte is escaped).
///
/// Only quotes stop the scan: a quote preceded by an odd run of backslashes is escaped, so the
/// scan goes on after it. Other escapes (`\n`, `\\`, `\u00e9`), frequent in model output, cost
/// nothing. Raw key bytes can then contain backslashes, but such a string never equals one of
/// our (backslash-free) key names, so no key is taken by mistake.
#[inline(always)]
fn scan_string(chunk: &[u8], mut from: usize, pending_escape: &mut bool) -> Option<usize> {
    loop {
        let rest = chunk.get(from..)?;
        let Some(off) = find_quote(rest) else {
            *pending_escape = !trailing_backslashes(rest).is_multiple_of(2);
            return None;
        };
        let q = from + off;
        if trailing_backslashes(&rest[..off]).is_multiple_of(2) {
            return Some(q + 1);
        }
        // An escaped quote: the byte after it starts clean.
        from = q + 1;
    }
}

/// How many backslashes `s` ends with.
#[inline(always)]
fn trailing_backslashes(s: &[u8]) -> usize {
    s.iter().rev().take_while(|&&b| b == b'\\').count()
}

/// The first `"` in `s`. Keys and short values end within a few bytes, so the first 16 are
/// checked eight at a time with plain integer arithmetic (no call); longer strings go to SIMD
/// `memchr`.
#[inline(always)]
fn find_quote(s: &[u8]) -> Option<usize> {
    if s.len() < 16 {
        // The end of a chunk.
        return s.iter().position(|&b| b == b'"');
    }
    swar_quote(s, 0)
        .or_else(|| swar_quote(s, 8))
        .or_else(|| memchr(b'"', &s[16..]).map(|k| k + 16))
}

/// The first `"` in `s[at..at + 8]`, or `None` when there is none or fewer than 8 bytes are
/// left. SWAR: a `"` byte becomes zero after the XOR, and `(x - 0x01…) & !x & 0x80…` flags the
/// lowest zero byte exactly (flags above it may be spurious, so only the lowest is used).
#[inline(always)]
fn swar_quote(s: &[u8], at: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let bytes: [u8; 8] = s.get(at..at + 8)?.try_into().ok()?;
    let x = u64::from_le_bytes(bytes) ^ (LO * u64::from(b'"'));
    let m = x.wrapping_sub(LO) & !x & HI;
    if m == 0 {
        return None;
    }
    Some(at + (m.trailing_zeros() / 8) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_plain_stops_where_the_byte_table_says() {
        // Every byte value at every offset of a word, between plain bytes.
        for b in 0..=255u8 {
            for at in 0..20 {
                let mut chunk = vec![b' '; 24];
                chunk[at] = b;
                let want = (0..chunk.len())
                    .find(|&k| STRUCTURAL[usize::from(chunk[k])])
                    .unwrap_or(chunk.len());
                for from in 0..=at {
                    let from_want = if want >= from { want } else { chunk.len() };
                    assert_eq!(
                        skip_plain(&chunk, from),
                        from_want,
                        "byte {b} at {at} from {from}"
                    );
                }
            }
        }
        assert_eq!(skip_plain(b"  yY_\x7f 12, \n  ]", 0), 14);
        assert_eq!(skip_plain(b"", 0), 0);
    }

    fn scan(body: &[u8]) -> UsageScanner {
        let mut s = UsageScanner::new();
        s.feed(body);
        s
    }

    fn scan_bytewise(body: &[u8]) -> UsageScanner {
        let mut s = UsageScanner::new();
        for b in body.chunks(1) {
            s.feed(b);
        }
        s
    }

    /// Whole, byte by byte, and split at every point: all must agree.
    fn scan_all_ways(body: &[u8]) -> UsageScanner {
        let whole = scan(body);
        let bytewise = scan_bytewise(body);
        assert_eq!(whole.usage(), bytewise.usage());
        assert_eq!(whole.model_version(), bytewise.model_version());
        assert_eq!(whole.saw_error(), bytewise.saw_error());
        assert_eq!(whole.saw_finish_reason(), bytewise.saw_finish_reason());
        for cut in 0..=body.len() {
            let mut s = UsageScanner::new();
            s.feed(&body[..cut]);
            s.feed(&body[cut..]);
            assert_eq!(whole.usage(), s.usage(), "cut at {cut}");
            assert_eq!(whole.model_version(), s.model_version(), "cut at {cut}");
            assert_eq!(whole.saw_error(), s.saw_error(), "cut at {cut}");
        }
        whole
    }

    const GENERATE: &str = r#"{
  "candidates": [
    {
      "content": {
        "parts": [
          {
            "text": "Hello! He said \"hi\" \\ and left. Caf\u00e9 — naïve 😀"
          }
        ],
        "role": "model"
      },
      "finishReason": "STOP",
      "index": 0
    }
  ],
  "usageMetadata": {
    "promptTokenCount": 18,
    "candidatesTokenCount": 80,
    "totalTokenCount": 133,
    "promptTokensDetails": [
      {
        "modality": "TEXT",
        "tokenCount": 18
      }
    ],
    "thoughtsTokenCount": 35,
    "serviceTier": "standard"
  },
  "modelVersion": "gemini-2.5-flash",
  "responseId": "ru1garvBEoOiqtsP2fznmQw"
}
"#;

    #[test]
    fn single_json_object() {
        let s = scan_all_ways(GENERATE.as_bytes());
        let u = s.usage().unwrap();
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 18,
                candidates_tokens: 80,
                thoughts_tokens: 35,
                total_tokens: 133,
                ..Usage::default()
            }
        );
        assert_eq!(u.completion_tokens(), 115);
        assert_eq!(u.counted_tokens(), 133);
        assert_eq!(s.model_version(), Some("gemini-2.5-flash"));
        assert!(s.saw_finish_reason());
        assert!(!s.saw_error());
    }

    fn sse_event(cands: Option<u64>, total: u64, finish: bool) -> String {
        let c = cands
            .map(|c| format!("\"candidatesTokenCount\": {c},"))
            .unwrap_or_default();
        let f = if finish {
            ",\"finishReason\": \"STOP\""
        } else {
            ""
        };
        format!(
            "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"chunk \\\"q\\\" {total}\"}}],\"role\": \"model\"}}{f},\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": 18,{c}\"totalTokenCount\": {total},\"promptTokensDetails\": [{{\"modality\": \"TEXT\",\"tokenCount\": 18}}],\"thoughtsTokenCount\": 35}},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"abc\"}}\r\n\r\n"
        )
    }

    #[test]
    fn sse_cumulative_usage_keeps_the_last() {
        let body = [
            sse_event(Some(31), 84, false),
            sse_event(Some(79), 132, false),
            sse_event(Some(80), 133, true),
        ]
        .concat();
        let s = scan_all_ways(body.as_bytes());
        let u = s.usage().unwrap();
        assert_eq!(u.candidates_tokens, 80);
        assert_eq!(u.total_tokens, 133);
        assert_eq!(u.prompt_tokens, 18);
        assert_eq!(u.thoughts_tokens, 35);
        assert_eq!(s.model_version(), Some("gemini-2.5-flash"));
        assert!(s.saw_finish_reason());
        assert!(!s.saw_error());
    }

    #[test]
    fn sse_partial_usage_merges_field_by_field() {
        // Gemini 1.5 style: candidates only at the end; the prompt stays from earlier chunks.
        let body = concat!(
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"a\"}]}}],\"usageMetadata\": {\"promptTokenCount\": 9,\"totalTokenCount\": 9}}\r\n\r\n",
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"b\"}]}}],\"usageMetadata\": {\"trafficType\": \"ON_DEMAND\"}}\r\n\r\n",
            "data: {\"candidates\": [{\"finishReason\": \"STOP\"}],\"usageMetadata\": {\"candidatesTokenCount\": 4,\"totalTokenCount\": 13}}\r\n\r\n",
        );
        let s = scan_all_ways(body.as_bytes());
        assert_eq!(
            s.usage(),
            Some(Usage {
                prompt_tokens: 9,
                candidates_tokens: 4,
                total_tokens: 13,
                ..Usage::default()
            })
        );
        assert_eq!(s.model_version(), None);
    }

    #[test]
    fn deferred_parsing_keeps_fields_a_later_object_lacks() {
        let first = r#"{"usageMetadata":{"promptTokenCount":9,"cached\u0043ontentTokenCount":7,"promptTokensDetails":[{"modality":"AUDIO","tokenCount":4}],"totalTokenCount":9}}"#;
        let later = [
            // null is absent, a repeated key counts last, a string count is read.
            r#"{"usageMetadata":{"promptTokenCount":3,"promptTokenCount":null,"totalTokenCount":12}}"#,
            r#"{"usageMetadata":{"promptTokensDetails":null,"candidatesTokenCount":"5","totalTokenCount":14}}"#,
            r#"{"usageMetadata":{"totalTokenCount":15}}"#,
        ];
        let want = Usage {
            prompt_tokens: 9,
            cached_tokens: 7,
            audio_prompt_tokens: 4,
            candidates_tokens: 5,
            total_tokens: 15,
            ..Usage::default()
        };
        let body = [first, later[0], later[1], later[2]].concat();
        assert_eq!(scan_all_ways(body.as_bytes()).usage(), Some(want));
        // Asking for the usage in between changes nothing.
        let mut s = UsageScanner::new();
        s.feed(first.as_bytes());
        assert_eq!(s.usage().unwrap().cached_tokens, 7);
        for l in later {
            s.feed(l.as_bytes());
            assert_eq!(s.usage().unwrap().prompt_tokens, 9);
        }
        assert_eq!(s.usage(), Some(want));
        // A later object that sets every field overrides all of them.
        s.feed(br#"{"usageMetadata":{"promptTokenCount":1,"candidatesTokenCount":2,"thoughtsTokenCount":3,"toolUsePromptTokenCount":4,"cachedContentTokenCount":5,"totalTokenCount":6,"promptTokensDetails":[]}}"#);
        let u = s.usage().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.candidates_tokens, u.thoughts_tokens),
            (1, 2, 3)
        );
        assert_eq!((u.tool_use_prompt_tokens, u.cached_tokens), (4, 5));
        assert_eq!((u.total_tokens, u.audio_prompt_tokens), (6, 0));
    }

    #[test]
    fn deferred_parsing_matches_parsing_every_object() {
        // Random sequences of usage objects with fields present, absent, null, as strings,
        // escaped, repeated or unknown: the scanner must equal parsing each object in turn.
        let names = [
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "toolUsePromptTokenCount",
            "cachedContentTokenCount",
            "totalTokenCount",
            r"total\u0054okenCount",
            "trafficType",
        ];
        let mut x: u64 = 99;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % n
        };
        for _ in 0..3000 {
            let mut objects = Vec::new();
            for _ in 0..next(4) + 1 {
                let mut fields = Vec::new();
                for _ in 0..next(5) {
                    let name = names[next(names.len() as u64) as usize];
                    let value = match next(5) {
                        0 => "null".to_owned(),
                        1 => format!("\"{}\"", next(100)),
                        _ => next(1000).to_string(),
                    };
                    fields.push(format!("\"{name}\":{value}"));
                }
                match next(4) {
                    0 => fields.push(
                        r#""promptTokensDetails":[{"modality":"AUDIO","tokenCount":7}]"#.to_owned(),
                    ),
                    1 => fields.push(r#""promptTokensDetails":null"#.to_owned()),
                    _ => {}
                }
                objects.push(format!(r#"{{"usageMetadata":{{{}}}}}"#, fields.join(",")));
            }
            let mut want = Usage::default();
            let mut has = false;
            for o in &objects {
                let start = o.find(":{").unwrap() + 1;
                if let Some(raw) = parse_usage(&o.as_bytes()[start..o.len() - 1]) {
                    has |= want.apply(&raw);
                }
            }
            let body = objects.concat();
            let got = scan(body.as_bytes()).usage();
            assert_eq!(got, has.then_some(want), "{body}");
            assert_eq!(scan_bytewise(body.as_bytes()).usage(), got, "{body}");
        }
    }

    #[test]
    fn usage_only_in_the_last_chunk() {
        let body = concat!(
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"a\"}]}}]}\r\n\r\n",
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"b\"}]}}]}\r\n\r\n",
        );
        let mut s = UsageScanner::new();
        s.feed(body.as_bytes());
        assert_eq!(s.usage(), None);
        s.feed(b"data: {\"candidates\": [{\"finishReason\": \"STOP\"}],\"usageMetadata\": {\"promptTokenCount\": 5,\"candidatesTokenCount\": 2,\"totalTokenCount\": 7},\"modelVersion\": \"gemini-2.0-flash\"}\r\n\r\n");
        assert_eq!(s.usage().unwrap().total_tokens, 7);
        assert_eq!(s.model_version(), Some("gemini-2.0-flash"));
    }

    #[test]
    fn traffic_type_only_is_no_usage() {
        let s = scan(br#"{"usageMetadata": {"trafficType": "ON_DEMAND"}}"#);
        assert_eq!(s.usage(), None);
    }

    #[test]
    fn json_array_stream() {
        let body = "[{\n  \"candidates\": [\n    {\n      \"content\": {\n        \"parts\": [\n          {\n            \"text\": \"Hel\"\n          }\n        ],\n        \"role\": \"model\"\n      }\n    }\n  ],\n  \"usageMetadata\": {\n    \"promptTokenCount\": 7,\n    \"candidatesTokenCount\": 1,\n    \"totalTokenCount\": 8\n  },\n  \"modelVersion\": \"gemini-2.5-flash-lite\"\n}\n,\r\n{\n  \"candidates\": [\n    {\n      \"content\": {\n        \"parts\": [\n          {\n            \"text\": \"lo\"\n          }\n        ],\n        \"role\": \"model\"\n      },\n      \"finishReason\": \"STOP\"\n    }\n  ],\n  \"usageMetadata\": {\n    \"promptTokenCount\": 7,\n    \"candidatesTokenCount\": 3,\n    \"totalTokenCount\": 10,\n    \"promptTokensDetails\": [\n      {\n        \"modality\": \"TEXT\",\n        \"tokenCount\": 4\n      },\n      {\n        \"modality\": \"AUDIO\",\n        \"tokenCount\": 3\n      }\n    ]\n  },\n  \"modelVersion\": \"gemini-2.5-flash-lite\"\n}\n]";
        let s = scan_all_ways(body.as_bytes());
        assert_eq!(
            s.usage(),
            Some(Usage {
                prompt_tokens: 7,
                candidates_tokens: 3,
                total_tokens: 10,
                audio_prompt_tokens: 3,
                ..Usage::default()
            })
        );
        assert_eq!(s.model_version(), Some("gemini-2.5-flash-lite"));
        assert!(s.saw_finish_reason());
    }

    #[test]
    fn json_array_error() {
        let s = scan_all_ways(
            b"[{\n  \"error\": {\n    \"code\": 429,\n    \"message\": \"quota\",\n    \"status\": \"RESOURCE_EXHAUSTED\"\n  }\n}\n]",
        );
        assert!(s.saw_error());
        assert_eq!(s.usage(), None);
    }

    #[test]
    fn thinking_without_candidates() {
        let s = scan_all_ways(
            br#"{"candidates":[{"content":{"role":"model"},"finishReason":"MAX_TOKENS","index":0}],"usageMetadata":{"promptTokenCount":21,"totalTokenCount":81,"promptTokensDetails":[{"modality":"TEXT","tokenCount":21}],"thoughtsTokenCount":60},"modelVersion":"gemini-2.5-flash"}"#,
        );
        let u = s.usage().unwrap();
        assert_eq!(u.prompt_tokens, 21);
        assert_eq!(u.candidates_tokens, 0);
        assert_eq!(u.thoughts_tokens, 60);
        assert_eq!(u.total_tokens, 81);
        assert_eq!(u.completion_tokens(), 60);
    }

    #[test]
    fn cached_tokens() {
        let s = scan_all_ways(
            br#"{"usageMetadata":{"promptTokenCount":2100,"candidatesTokenCount":12,"totalTokenCount":2112,"cachedContentTokenCount":2048,"cacheTokensDetails":[{"modality":"TEXT","tokenCount":2048}],"toolUsePromptTokenCount":5}}"#,
        );
        let u = s.usage().unwrap();
        assert_eq!(u.cached_tokens, 2048);
        assert_eq!(u.uncached_prompt_tokens(), 52);
        assert_eq!(u.tool_use_prompt_tokens, 5);
    }

    #[test]
    fn counted_tokens_falls_back_to_the_sum() {
        let u = Usage {
            prompt_tokens: 10,
            candidates_tokens: 5,
            thoughts_tokens: 3,
            tool_use_prompt_tokens: 2,
            ..Usage::default()
        };
        assert_eq!(u.counted_tokens(), 20);
        assert_eq!(
            Usage {
                total_tokens: 7,
                ..u
            }
            .counted_tokens(),
            7
        );
    }

    #[test]
    fn nested_usage_metadata_is_not_taken() {
        let body = br#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"report","args":{"usageMetadata":{"promptTokenCount":999999,"totalTokenCount":999999},"modelVersion":"evil","error":{"code":1}}}}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":40,"candidatesTokenCount":8,"totalTokenCount":48},"modelVersion":"gemini-2.5-pro"}"#;
        let s = scan_all_ways(body);
        assert_eq!(s.usage().unwrap().total_tokens, 48);
        assert_eq!(s.model_version(), Some("gemini-2.5-pro"));
        assert!(!s.saw_error());
    }

    #[test]
    fn key_names_as_values_or_in_text_are_not_keys() {
        let body = br#"{"candidates":[{"content":{"parts":[{"text":"usageMetadata"},{"text":"\"usageMetadata\": {\"totalTokenCount\": 5}"}]}}],"x":["usageMetadata",{"a":1}],"y":"error","modelVersion":"m"}"#;
        let s = scan_all_ways(body);
        assert_eq!(s.usage(), None);
        assert!(!s.saw_error());
        assert_eq!(s.model_version(), Some("m"));
    }

    #[test]
    fn mid_stream_raw_error_after_sse() {
        let body = [
            sse_event(Some(31), 84, false),
            "{\n  \"error\": {\n    \"code\": 503,\n    \"message\": \"The model is overloaded. Please try again later.\",\n    \"status\": \"UNAVAILABLE\"\n  }\n}\n".to_owned(),
        ]
        .concat();
        let s = scan_all_ways(body.as_bytes());
        assert!(s.saw_error());
        assert!(!s.saw_finish_reason());
        assert_eq!(s.usage().unwrap().candidates_tokens, 31);
    }

    #[test]
    fn escaped_model_version() {
        let s = scan_all_ways(br#"{"modelVersion":"gemini\u002d2.5\"x"}"#);
        assert_eq!(s.model_version(), Some("gemini-2.5\"x"));
        let s = scan_all_ways("{\"modelVersion\":\"gémini-2.5\"}".as_bytes());
        assert_eq!(s.model_version(), Some("gémini-2.5"), "UTF-8 as it is");
        let s = scan_all_ways(br#"{"modelVersion":"a"}{"modelVersion":"b"}{"modelVersion":"b"}"#);
        assert_eq!(s.model_version(), Some("b"), "the last one");
        let long = format!(
            r#"{{"modelVersion":"ok"}}{{"modelVersion":"{}"}}"#,
            "m".repeat(300)
        );
        let s = scan(long.as_bytes());
        assert_eq!(s.model_version(), Some("ok"));
    }

    #[test]
    fn the_model_requested_prices_until_the_body_names_one() {
        let feed_split = |body: &[u8], at: usize| {
            let mut s = UsageScanner::for_model("gemini-2.5-flash".to_owned());
            s.feed(&body[..at]);
            s.feed(&body[at..]);
            s
        };
        let none = br#"{"candidates":[]}"#;
        let same = br#"{"modelVersion":"gemini-2.5-flash"}"#;
        let other = br#"{"modelVersion":"gemini-2.5-flash-001"}"#;
        let shorter = br#"{"modelVersion":"gemini-2.5"}"#;
        let bad_utf8 = b"{\"modelVersion\":\"gemini-\xff\"}";
        for at in 0..=other.len() {
            let s = feed_split(&none[..], at.min(none.len()));
            assert_eq!((s.model(), s.model_version()), ("gemini-2.5-flash", None));
            let s = feed_split(&same[..], at.min(same.len()));
            let want = ("gemini-2.5-flash", Some("gemini-2.5-flash"));
            assert_eq!((s.model(), s.model_version()), want, "split at {at}");
            let s = feed_split(&other[..], at);
            let want = ("gemini-2.5-flash-001", Some("gemini-2.5-flash-001"));
            assert_eq!((s.model(), s.model_version()), want, "split at {at}");
            let s = feed_split(&shorter[..], at.min(shorter.len()));
            let want = ("gemini-2.5", Some("gemini-2.5"));
            assert_eq!((s.model(), s.model_version()), want, "split at {at}");
            let s = feed_split(&bad_utf8[..], at.min(bad_utf8.len()));
            assert_eq!((s.model(), s.model_version()), ("gemini-2.5-flash", None));
        }
        // A stream that names another model, then the requested one again.
        let mut s = UsageScanner::for_model("gemini-2.5-flash".to_owned());
        s.feed(other);
        s.feed(same);
        assert_eq!(s.model(), "gemini-2.5-flash");
        assert_eq!(UsageScanner::new().model(), "");
    }

    #[test]
    fn backslash_runs_before_quotes_at_any_split() {
        // Strings built from escape-heavy pieces, as text, as keys and as the model version;
        // the model version the scanner reports must be serde_json's reading at every split.
        let pieces = [
            r"\\",
            r#"\""#,
            "a",
            r"\n",
            r"\u0022",
            "usageMetadata",
            r"\\\\",
            r#"\\\""#,
            "é",
        ];
        let mut x: u32 = 7;
        for round in 0..200 {
            let mut parts = Vec::new();
            for _ in 0..(round % 7 + 1) {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                parts.push(pieces[(x >> 16) as usize % pieces.len()]);
            }
            let s = parts.concat();
            let body = format!(
                r#"{{"candidates":[{{"text":"{s}","{s}":"{s}\\"}}],"{s}":1,"usageMetadata":{{"totalTokenCount":{round}}},"modelVersion":"v{s}"}}"#
            );
            let want: serde_json::Value = serde_json::from_str(&body).unwrap();
            let sc = scan_all_ways(body.as_bytes());
            assert_eq!(sc.model_version(), want["modelVersion"].as_str(), "{body}");
            assert_eq!(sc.usage().unwrap().total_tokens, round as u64, "{body}");
        }
    }

    #[test]
    fn garbage_does_not_panic() {
        let inputs: [&[u8]; 10] = [
            b"",
            b"}}}]]]\"\"\"",
            b"data: [DONE]\n\n",
            b"\xff\xfe\x00{\"usageMetadata\":\xff{\"a\"",
            b"{\"usageMetadata\": {\"promptTokenCount\": \"x\"}}",
            b"{\"usageMetadata\": {\"promptTokenCount\": true}}",
            b"{\"usageMetadata\": 5, \"modelVersion\": 7}",
            b"{\"usageMetadata\" \"x\" : {\"totalTokenCount\": 1}}",
            b"{\"usageMetadata\": {\"promptTokenCount\": -4, \"totalTokenCount\": 1e3, \"candidatesTokenCount\": \"12\"}}",
            b"\\\\\"{[{[{[\"\\",
        ];
        for input in inputs {
            let s = scan_all_ways(input);
            let _ = (s.usage(), s.model_version());
        }
        let s = scan(inputs[8]);
        assert_eq!(
            s.usage(),
            Some(Usage {
                prompt_tokens: 0,
                total_tokens: 1000,
                candidates_tokens: 12,
                ..Usage::default()
            })
        );
        // Pseudo-random bytes drawn from a JSON-ish alphabet.
        let alphabet = b"{}[]\":,\\ usageMetadata modelVersion error 0123 \r\n data:";
        let mut x: u32 = 12345;
        let mut junk = Vec::new();
        for _ in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            junk.push(alphabet[(x >> 16) as usize % alphabet.len()]);
        }
        let mut s = UsageScanner::new();
        for c in junk.chunks(7) {
            s.feed(c);
        }
        assert!(s.cap_buf.capacity() <= USAGE_CAP);
        assert!(s.pending.capacity() <= USAGE_CAP);
    }

    #[test]
    fn huge_strings_keep_memory_bounded() {
        let text = "lorem ipsum \\\"x\\\" ".repeat(200_000);
        let body = format!(
            r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{text}"}}]}}}}],"usageMetadata":{{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7,"junk":"{text}"}},"modelVersion":"{text}"}}{{"usageMetadata":{{"totalTokenCount":9}},"modelVersion":"gemini-2.5-flash"}}"#
        );
        let mut s = UsageScanner::new();
        for c in body.as_bytes().chunks(65_536) {
            s.feed(c);
            assert!(s.cap_buf.capacity() <= USAGE_CAP);
            assert!(s.pending.capacity() <= USAGE_CAP);
        }
        // The oversized usage object is skipped; the next one is taken.
        assert_eq!(
            s.usage(),
            Some(Usage {
                total_tokens: 9,
                ..Usage::default()
            })
        );
        assert_eq!(s.model_version(), Some("gemini-2.5-flash"));
        let held = std::mem::size_of::<UsageScanner>()
            + s.cap_buf.capacity()
            + s.pending.capacity()
            + s.model.capacity();
        assert!(held <= 33 * 1024, "{held}");
    }

    #[test]
    fn huge_usage_object_just_under_the_cap_is_taken() {
        let pad = "p".repeat(USAGE_CAP - 100);
        let body = format!(r#"{{"usageMetadata":{{"totalTokenCount":5,"pad":"{pad}"}}}}"#);
        let s = scan(body.as_bytes());
        assert_eq!(s.usage().unwrap().total_tokens, 5);
        // Two such objects held (one pending, one being read) still fit the bound.
        let mut s = UsageScanner::new();
        for c in [
            body.as_bytes(),
            body.as_bytes(),
            &body.as_bytes()[..body.len() - 2],
        ] {
            for piece in c.chunks(1000) {
                s.feed(piece);
            }
        }
        assert!(s.cap_buf.len() > USAGE_CAP - 100);
        assert!(s.pending.len() > USAGE_CAP - 100);
        assert!(s.cap_buf.capacity() <= USAGE_CAP);
        assert!(s.pending.capacity() <= USAGE_CAP);
        assert!(std::mem::size_of::<UsageScanner>() + 2 * USAGE_CAP <= 33 * 1024);
    }

    #[test]
    fn count_tokens_and_embed_have_no_usage() {
        let s = scan_all_ways(
            b"{\n  \"totalTokens\": 12,\n  \"promptTokensDetails\": [\n    {\n      \"modality\": \"TEXT\",\n      \"tokenCount\": 12\n    }\n  ]\n}\n",
        );
        assert_eq!(s.usage(), None);
        let s = scan_all_ways(b"{\n  \"embedding\": {\n    \"values\": [\n      0.013,\n      -0.008\n    ]\n  }\n}\n");
        assert_eq!(s.usage(), None);
        assert_eq!(s.model_version(), None);
    }
}
