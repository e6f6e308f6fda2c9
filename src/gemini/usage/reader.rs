//! A reader for the `usageMetadata` objects Gemini sends, in front of serde_json.
//!
//! serde_json spent about 3,400 instructions on the mock's pretty-printed 250-byte object,
//! most of them a byte at a time on indentation and key names: the largest single cost of
//! a proxied request. This reader takes the shape Gemini uses (plain ASCII keys and
//! strings, integer counts, `null`, nested lists and objects) with the indentation skipped
//! eight bytes at a time, and gives up (`None`) on anything else: escapes, non-ASCII,
//! fractions, exponents, negative or string counts, deep nesting, or anything invalid.
//! The caller then asks serde_json, so a `Some` is always what serde_json reads; the
//! property test below holds the two to that on generated and mutated objects.

use super::{DetailField, RawUsage, UsageField};

/// Nesting deeper than this (inside skipped values) is left to serde_json.
const MAX_DEPTH: u32 = 16;

/// Read `bytes` (one whole `usageMetadata` object) when it has the usual shape; `None`: not
/// decided here (ask serde_json), never "invalid".
pub(super) fn read(bytes: &[u8]) -> Option<RawUsage> {
    let mut r = Reader { b: bytes, i: 0 };
    r.ws();
    let raw = r.usage()?;
    r.ws();
    (r.i == bytes.len()).then_some(raw)
}

/// Read the object that `bytes` starts with (at its `{`), whatever follows it, when it has the
/// usual shape: its usage and its length up to and including its closing brace. `None` when
/// it is not read here, which includes an object that `bytes` cuts short: the scanner then
/// copies it as usual.
pub(super) fn read_object(bytes: &[u8]) -> Option<(RawUsage, usize)> {
    let mut r = Reader { b: bytes, i: 0 };
    let raw = r.usage()?;
    Some((raw, r.i))
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

const ONES: u64 = 0x0101_0101_0101_0101;
/// Eight spaces, as one word.
const SPACES: u64 = ONES * b' ' as u64;
/// Eight quotes, as one word.
const QUOTES: u64 = ONES * b'"' as u64;

impl<'a> Reader<'a> {
    /// A `usageMetadata` object (`RawUsage`).
    fn usage(&mut self) -> Option<RawUsage> {
        let mut raw = RawUsage::default();
        self.object(|r, key| {
            match UsageField::from_name(key) {
                UsageField::Prompt => raw.prompt = r.count()?,
                UsageField::Candidates => raw.candidates = r.count()?,
                UsageField::Thoughts => raw.thoughts = r.count()?,
                UsageField::ToolUsePrompt => raw.tool_use_prompt = r.count()?,
                UsageField::Cached => raw.cached = r.count()?,
                UsageField::Total => raw.total = r.count()?,
                UsageField::PromptDetails => raw.audio_prompt = r.audio_tokens()?,
                UsageField::Other if Reader::plain(key) => r.skip_value(0)?,
                UsageField::Other => return None,
            }
            Some(())
        })?;
        Some(raw)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Skip JSON white space. After a line break, indentation goes eight spaces at a time.
    #[inline(always)]
    fn ws(&mut self) {
        while let Some(c) = self.peek() {
            if !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                return;
            }
            self.i += 1;
            if c == b'\n' {
                // The first byte that is not a space is the lowest non-zero byte of the word
                // XOR eight spaces.
                while let Some(w) = self.word(self.i) {
                    let other = w ^ SPACES;
                    if other != 0 {
                        self.i += (other.trailing_zeros() / 8) as usize;
                        break;
                    }
                    self.i += 8;
                }
            }
        }
    }

    /// Consume `c` (after white space).
    #[inline(always)]
    fn expect(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string at `self.i` (its opening quote), as its raw content up to the next quote.
    /// The caller checks it with [`Reader::plain`] unless it matched a known name (which is
    /// plain, so the quote was not escaped and the content is the string).
    #[inline(always)]
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let mut at = start;
        // Eight bytes at a time (the strings here are short: no call to memchr).
        let end = loop {
            match self.word(at) {
                Some(w) => {
                    let x = w ^ QUOTES;
                    // High bit set in each zero byte of `x`, exact up to the lowest one.
                    let zeros = x.wrapping_sub(ONES) & !x & (ONES << 7);
                    if zeros != 0 {
                        break at + (zeros.trailing_zeros() / 8) as usize;
                    }
                    at += 8;
                }
                None => break at + self.b.get(at..)?.iter().position(|&c| c == b'"')?,
            }
        };
        self.i = end + 1;
        self.b.get(start..end)
    }

    /// The eight bytes at `at`, as a little-endian word (`None` near the end).
    #[inline(always)]
    fn word(&self, at: usize) -> Option<u64> {
        let w = self.b.get(at..at + 8)?;
        <[u8; 8]>::try_from(w).ok().map(u64::from_le_bytes)
    }

    /// Whether string content needs nothing of serde_json's string handling.
    fn plain(s: &[u8]) -> bool {
        s.iter().all(|&c| (0x20..0x7f).contains(&c) && c != b'\\')
    }

    /// An object: `{`, then for each member its key (read here, raw) and `member` reading
    /// the value, then `}`. `member` must check with [`Reader::plain`] any key it does not
    /// match against a known name.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        let mut more = self.open(b'{', b'}')?;
        while more {
            let key = self.raw_string()?;
            self.expect(b':')?;
            self.ws();
            member(self, key)?;
            more = self.more_after(b'}')?;
        }
        Some(())
    }

    /// A list: `[`, `element` for each element, `]`.
    fn list(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        let mut more = self.open(b'[', b']')?;
        while more {
            element(self)?;
            more = self.more_after(b']')?;
        }
        Some(())
    }

    /// The opening bracket `open`: whether anything comes before `close`.
    ///
    /// Inlined, as are `more_after`, `integer` and `count`: they run for every member, and
    /// their calls cost ~180 instructions a request (benches/README.md, "Thirteenth round").
    #[inline(always)]
    fn open(&mut self, open: u8, close: u8) -> Option<bool> {
        self.expect(open)?;
        self.ws();
        if self.peek()? == close {
            self.i += 1;
            return Some(false);
        }
        Some(true)
    }

    /// After a member or an element: `,` (another follows: `true`) or `close` (`false`).
    #[inline(always)]
    fn more_after(&mut self, close: u8) -> Option<bool> {
        self.ws();
        match self.peek()? {
            b',' => {
                self.i += 1;
                self.ws();
                Some(true)
            }
            c if c == close => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// `null`.
    fn null(&mut self) -> Option<()> {
        self.literal(b"null")
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        (self.b.get(self.i..self.i + word.len())? == word).then(|| self.i += word.len())
    }

    /// A non-negative integer without leading zeros that fits in a u64 (larger ones, which
    /// serde_json reads as floats, and anything with a sign, fraction or exponent are left
    /// to it).
    #[inline(always)]
    fn integer(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        // A fraction or an exponent (`.`, `e`) is then where a `,` or a closing bracket must
        // be: the caller gives up.
        Some(n)
    }

    /// A token count (`Count`): an integer, or `null` (absent).
    #[inline(always)]
    fn count(&mut self) -> Option<Option<u64>> {
        match self.peek()? {
            b'n' => self.null().map(|()| None),
            _ => self.integer().map(Some),
        }
    }

    /// `promptTokensDetails` (`AudioTokens`): the sum of its `AUDIO` entries, `None` for null
    /// or an object.
    fn audio_tokens(&mut self) -> Option<Option<u64>> {
        match self.peek()? {
            b'n' => self.null().map(|()| None),
            b'{' => self.skip_value(0).map(|()| None),
            _ => {
                let mut audio = 0u64;
                self.list(|r| {
                    let (is_audio, tokens) = r.modality_count()?;
                    if is_audio {
                        audio = audio.saturating_add(tokens);
                    }
                    Some(())
                })?;
                Some(Some(audio))
            }
        }
    }

    /// One `{modality, tokenCount}` entry (`ModalityCount`).
    fn modality_count(&mut self) -> Option<(bool, u64)> {
        let (mut audio, mut tokens) = (false, 0u64);
        self.object(|r, key| {
            match DetailField::from_name(key) {
                DetailField::Modality => {
                    audio = match r.peek()? {
                        b'n' => r.null().map(|()| false)?,
                        _ => {
                            let s = r.raw_string()?;
                            if !Self::plain(s) {
                                return None;
                            }
                            s == b"AUDIO"
                        }
                    }
                }
                DetailField::TokenCount => tokens = r.count()?.unwrap_or(0),
                DetailField::Other if Self::plain(key) => r.skip_value(0)?,
                DetailField::Other => return None,
            }
            Some(())
        })?;
        Some((audio, tokens))
    }

    /// Skip any value of the usual shape (`IgnoredAny`), `depth` levels down.
    fn skip_value(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => {
                let s = self.raw_string()?;
                Self::plain(s).then_some(())
            }
            b'{' => self.object(|r, key| {
                if !Self::plain(key) {
                    return None;
                }
                r.skip_value(depth + 1)
            }),
            b'[' => self.list(|r| r.skip_value(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.null(),
            _ => self.integer().map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What serde_json reads, in comparable form.
    fn serde(bytes: &[u8]) -> Option<[Option<u64>; 7]> {
        super::super::parse_usage_serde(bytes).map(|r| fields(&r))
    }

    fn fields(r: &RawUsage) -> [Option<u64>; 7] {
        [
            r.prompt,
            r.candidates,
            r.thoughts,
            r.tool_use_prompt,
            r.cached,
            r.total,
            r.audio_prompt,
        ]
    }

    fn fast(bytes: &[u8]) -> Option<[Option<u64>; 7]> {
        read(bytes).map(|r| fields(&r))
    }

    const MOCK: &str = r#"{
    "promptTokenCount": 10,
    "candidatesTokenCount": 20,
    "totalTokenCount": 30,
    "promptTokensDetails": [
      {
        "modality": "TEXT",
        "tokenCount": 10
      }
    ]
  }"#;

    #[test]
    fn the_usual_shapes_are_read_here_as_serde_json_reads_them() {
        for body in [
            MOCK,
            r#"{"promptTokenCount":7,"candidatesTokenCount":3,"totalTokenCount":10,"promptTokensDetails":[{"modality":"TEXT","tokenCount":5},{"modality":"AUDIO","tokenCount":2}],"thoughtsTokenCount":4,"trafficType":"ON_DEMAND","cacheTokensDetails":[{"modality":"AUDIO","tokenCount":1}],"cachedContentTokenCount":1,"toolUsePromptTokenCount":0}"#,
            r#"{}"#,
            r#" { "trafficType" : "PROVISIONED_THROUGHPUT" } "#,
            r#"{"promptTokenCount": null, "promptTokensDetails": null, "x": [true, false, null, {}, [], 0]}"#,
            r#"{"promptTokenCount": 1, "promptTokenCount": 2, "promptTokensDetails": {"a": 1}}"#,
            r#"{"promptTokenCount": 18446744073709551615}"#,
        ] {
            let got = fast(body.as_bytes());
            assert!(got.is_some(), "not read here: {body}");
            assert_eq!(got, serde(body.as_bytes()), "{body}");
        }
        assert_eq!(
            fast(MOCK.as_bytes()),
            Some([Some(10), Some(20), None, None, None, Some(30), Some(0)])
        );
    }

    #[test]
    fn anything_unusual_is_left_to_serde_json() {
        for body in [
            r#"{"promptTokenCount": "12"}"#,
            r#"{"promptTokenCount": -1}"#,
            r#"{"promptTokenCount": 1.0}"#,
            r#"{"promptTokenCount": 1e3}"#,
            r#"{"promptTokenCount": 01}"#,
            r#"{"promptTokenCount": 99999999999999999999}"#,
            r#"{"prompt\u0054okenCount": 5}"#,
            r#"{"x": "caf\u00e9"}"#,
            "{\"x\": \"café\"}",
            r#"{"promptTokenCount": 1,}"#,
            r#"{"promptTokenCount": 1} x"#,
            r#"{"promptTokenCount" 1}"#,
            r#"{"promptTokensDetails": [{"modality": 5}]}"#,
            r#"{"promptTokensDetails": [1]}"#,
            r#"{"x": tru}"#,
            r#"[]"#,
            r#"{"promptTokenCount": 1"#,
        ] {
            assert_eq!(fast(body.as_bytes()), None, "read here: {body}");
        }
    }

    /// Objects in Gemini's shape with random spacing, field order, nulls, duplicates,
    /// skipped values and AUDIO entries.
    fn usage_object() -> impl Strategy<Value = String> {
        let ws = prop::sample::select(vec!["", " ", "\n  ", "\n        ", "\t", "\r\n    "]);
        // Mostly the usual values (so that most objects are read here and compared), now
        // and then one that is left to serde_json.
        let count = prop_oneof![
            30 => (0u64..100_000).prop_map(|n| n.to_string()),
            3 => Just("null".to_string()),
            3 => Just("0".to_string()),
            1 => Just("18446744073709551615".to_string()),
            1 => Just("\"12\"".to_string()),
            1 => Just("-3".to_string()),
            1 => Just("2.5".to_string()),
            1 => Just("1e3".to_string()),
        ];
        let modality = prop_oneof![
            10 => prop::sample::select(vec!["\"AUDIO\"", "\"TEXT\"", "\"IMAGE\"", "null"]),
            1 => prop::sample::select(vec!["\"AUD\\u0049O\"", "7"]),
        ];
        let entry = (modality, count.clone(), ws.clone()).prop_map(|(m, c, w)| {
            format!("{{{w}\"modality\":{w}{m},{w}\"tokenCount\":{w}{c}{w}}}")
        });
        let details = prop_oneof![
            prop::collection::vec(entry, 0..4).prop_map(|es| format!("[{}]", es.join(", "))),
            Just("null".to_string()),
            Just("{\"modality\": \"AUDIO\"}".to_string()),
        ];
        let key = prop::sample::select(vec![
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "toolUsePromptTokenCount",
            "cachedContentTokenCount",
            "totalTokenCount",
            "trafficType",
        ]);
        let member = prop_oneof![
            4 => (key, count).prop_map(|(k, c)| format!("\"{k}\": {c}")),
            1 => details.clone().prop_map(|d| format!("\"promptTokensDetails\": {d}")),
            1 => details.prop_map(|d| format!("\"cacheTokensDetails\": {d}")),
            1 => Just("\"trafficType\": \"ON_DEMAND\"".to_string()),
        ];
        (prop::collection::vec((member, ws.clone()), 0..9), ws).prop_map(|(ms, w)| {
            let inner: Vec<String> = ms.into_iter().map(|(m, w)| format!("{w}{m}")).collect();
            format!("{{{}{w}}}", inner.join(","))
        })
    }

    /// The comparisons below only bite on objects read here: most generated ones must be.
    #[test]
    fn most_generated_objects_are_read_here() {
        let read_here = crate::testing::how_many_generated(&usage_object(), 400, |b| {
            fast(b.as_bytes()).is_some()
        });
        assert!(read_here > 200, "only {read_here} of 400 read here");
    }

    proptest! {
        #[test]
        fn whatever_is_read_here_is_what_serde_json_reads(body in usage_object()) {
            let got = fast(body.as_bytes());
            if got.is_some() {
                prop_assert_eq!(got, serde(body.as_bytes()), "{}", body);
            }
        }

        #[test]
        fn an_object_is_read_in_place_whatever_follows_it_and_never_when_cut(
            body in usage_object(),
            tail in prop::sample::select(vec!["", ",\"modelVersion\": \"m\"}", "}\r\n\r\ndata: {", "\"x"]),
            cut in any::<prop::sample::Index>(),
        ) {
            let whole = read(body.as_bytes()).map(|r| fields(&r));
            let in_place = read_object(format!("{body}{tail}").as_bytes());
            prop_assert_eq!(in_place.as_ref().map(|(r, _)| fields(r)), whole, "{}", body);
            if let Some((_, len)) = in_place {
                prop_assert_eq!(len, body.len());
                let short = &body.as_bytes()[..cut.index(len)];
                prop_assert!(read_object(short).is_none(), "read when cut: {:?}", short);
            }
        }

        #[test]
        fn mutated_objects_are_never_read_differently(
            body in usage_object(),
            at in any::<prop::sample::Index>(),
            byte in prop::sample::select(b" \n,:{}[]\"\\0123456789-.entulfasAUDIO\x01\xc3".to_vec()),
            insert in any::<bool>(),
        ) {
            let mut b = body.into_bytes();
            if !b.is_empty() {
                let i = at.index(b.len());
                if insert { b.insert(i, byte) } else { b[i] = byte }
            }
            let got = fast(&b);
            if got.is_some() {
                prop_assert_eq!(got, serde(&b), "{}", String::from_utf8_lossy(&b));
            }
        }
    }
}
