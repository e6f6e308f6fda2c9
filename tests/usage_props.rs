#![allow(clippy::unwrap_used)]
//! The usage scanner on recorded-looking response bodies: the expected usage for each, and the
//! property that any split of a body into chunks gives exactly what feeding it whole gives.

use budget_proxy::gemini::{Usage, UsageScanner};
use proptest::prelude::*;

/// What a scan ends with; compared as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    usage: Option<Usage>,
    model_version: Option<String>,
    saw_error: bool,
    saw_finish_reason: bool,
}

fn outcome(s: &UsageScanner) -> Outcome {
    Outcome {
        usage: s.usage(),
        model_version: s.model_version().map(str::to_owned),
        saw_error: s.saw_error(),
        saw_finish_reason: s.saw_finish_reason(),
    }
}

fn scan_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut s = UsageScanner::new();
    for c in chunks {
        s.feed(c);
    }
    outcome(&s)
}

fn scan_whole(body: &[u8]) -> Outcome {
    scan_chunks([body])
}

/// Feed `body` cut at `cuts` (any order, duplicates and out-of-range values allowed).
fn scan_cut(body: &[u8], cuts: &[usize]) -> Outcome {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for c in cuts {
        chunks.push(&body[from..c]);
        from = c;
    }
    chunks.push(&body[from..]);
    scan_chunks(chunks)
}

const FIXTURES: &[(&str, &[u8])] = &[
    ("generate.json", include_bytes!("fixtures/generate.json")),
    (
        "generate_function_call.json",
        include_bytes!("fixtures/generate_function_call.json"),
    ),
    (
        "generate_thinking.json",
        include_bytes!("fixtures/generate_thinking.json"),
    ),
    (
        "generate_cached.json",
        include_bytes!("fixtures/generate_cached.json"),
    ),
    ("stream.sse", include_bytes!("fixtures/stream.sse")),
    (
        "stream_error.sse",
        include_bytes!("fixtures/stream_error.sse"),
    ),
    (
        "stream_last_only.sse",
        include_bytes!("fixtures/stream_last_only.sse"),
    ),
    (
        "stream.json-array",
        include_bytes!("fixtures/stream.json-array"),
    ),
    (
        "count_tokens.json",
        include_bytes!("fixtures/count_tokens.json"),
    ),
    ("embed.json", include_bytes!("fixtures/embed.json")),
    ("error.json", include_bytes!("fixtures/error.json")),
];

fn fixture(name: &str) -> &'static [u8] {
    FIXTURES.iter().find(|(n, _)| *n == name).unwrap().1
}

fn expect(
    name: &str,
    usage: Option<Usage>,
    model: Option<&str>,
    saw_error: bool,
    saw_finish_reason: bool,
) {
    assert_eq!(
        scan_whole(fixture(name)),
        Outcome {
            usage,
            model_version: model.map(str::to_owned),
            saw_error,
            saw_finish_reason,
        },
        "{name}"
    );
}

#[test]
fn fixtures_give_the_expected_usage() {
    expect(
        "generate.json",
        Some(Usage {
            prompt_tokens: 18,
            candidates_tokens: 80,
            thoughts_tokens: 35,
            total_tokens: 133,
            ..Usage::default()
        }),
        Some("gemini-2.5-flash"),
        false,
        true,
    );
    expect(
        "generate_function_call.json",
        Some(Usage {
            prompt_tokens: 142,
            candidates_tokens: 58,
            thoughts_tokens: 44,
            tool_use_prompt_tokens: 16,
            total_tokens: 260,
            ..Usage::default()
        }),
        Some("gemini-2.5-pro"),
        false,
        true,
    );
    expect(
        "generate_thinking.json",
        Some(Usage {
            prompt_tokens: 21,
            thoughts_tokens: 60,
            total_tokens: 81,
            ..Usage::default()
        }),
        Some("gemini-2.5-flash"),
        false,
        true,
    );
    expect(
        "generate_cached.json",
        Some(Usage {
            prompt_tokens: 32871,
            candidates_tokens: 24,
            cached_tokens: 32768,
            total_tokens: 32895,
            ..Usage::default()
        }),
        Some("gemini-2.5-flash"),
        false,
        true,
    );
    expect(
        "stream.sse",
        Some(Usage {
            prompt_tokens: 18,
            candidates_tokens: 80,
            thoughts_tokens: 35,
            total_tokens: 133,
            ..Usage::default()
        }),
        Some("gemini-2.5-flash"),
        false,
        true,
    );
    expect(
        "stream_error.sse",
        Some(Usage {
            prompt_tokens: 18,
            candidates_tokens: 25,
            thoughts_tokens: 35,
            total_tokens: 78,
            ..Usage::default()
        }),
        Some("gemini-2.5-flash"),
        true,
        false,
    );
    expect(
        "stream_last_only.sse",
        Some(Usage {
            prompt_tokens: 6,
            candidates_tokens: 9,
            total_tokens: 15,
            ..Usage::default()
        }),
        Some("gemini-2.0-flash-001"),
        false,
        true,
    );
    expect(
        "stream.json-array",
        Some(Usage {
            prompt_tokens: 412,
            candidates_tokens: 15,
            total_tokens: 427,
            audio_prompt_tokens: 400,
            ..Usage::default()
        }),
        Some("gemini-2.5-flash-lite"),
        false,
        true,
    );
    expect("count_tokens.json", None, None, false, false);
    expect("embed.json", None, None, false, false);
    expect("error.json", None, None, true, false);
}

#[test]
fn cumulative_stream_usage_is_never_summed() {
    // Before the last event, the scanner holds the second event's counts, not a sum.
    let mut events = Vec::new();
    let mut rest = fixture("stream.sse");
    while let Some(p) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        events.push(&rest[..p + 4]);
        rest = &rest[p + 4..];
    }
    assert_eq!(events.len(), 3);
    let mut s = UsageScanner::new();
    let mut seen = Vec::new();
    for e in events {
        s.feed(e);
        let u = s.usage().unwrap();
        seen.push((u.candidates_tokens, u.total_tokens));
    }
    assert_eq!(seen, [(31, 84), (79, 132), (80, 133)]);
}

#[test]
fn one_byte_chunks_match_whole() {
    for (name, body) in FIXTURES {
        assert_eq!(
            scan_chunks(body.chunks(1)),
            scan_whole(body),
            "{name} fed byte by byte"
        );
    }
}

#[test]
fn every_two_way_split_matches_whole() {
    for (name, body) in FIXTURES {
        let whole = scan_whole(body);
        for cut in 0..=body.len() {
            assert_eq!(scan_cut(body, &[cut]), whole, "{name} cut at {cut}");
        }
    }
}

#[test]
fn concatenated_fixtures_with_sse_framing() {
    // A stream of every response fixture, each as one SSE event (newlines inside pretty JSON are
    // fine for the scanner): the last event with usage wins, field by field.
    let mut body = Vec::new();
    for (_, f) in FIXTURES {
        body.extend_from_slice(b"data: ");
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n\r\n");
    }
    let whole = scan_whole(&body);
    assert!(whole.saw_error);
    assert_eq!(
        whole.model_version.as_deref(),
        Some("gemini-2.5-flash-lite")
    );
    assert_eq!(whole.usage.unwrap().total_tokens, 427);
    assert_eq!(scan_chunks(body.chunks(3)), whole);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_chunking_matches_whole(
        which in 0..FIXTURES.len(),
        cuts in proptest::collection::vec(any::<usize>(), 0..48),
    ) {
        let (name, body) = FIXTURES[which];
        prop_assert_eq!(scan_cut(body, &cuts), scan_whole(body), "{}", name);
    }

    #[test]
    fn small_chunks_match_whole(which in 0..FIXTURES.len(), size in 1usize..9) {
        let (name, body) = FIXTURES[which];
        prop_assert_eq!(scan_chunks(body.chunks(size)), scan_whole(body), "{}", name);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        seed in any::<u64>(),
        len in 0usize..2048,
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        // JSON-ish noise (drawn from a seed: far cheaper than a strategy per byte). Whatever
        // the input, any chunking gives the same outcome as feeding it whole.
        const ALPHABET: &[u8] = b"{}[]\"\\:, \r\n0123456789usageMetadata modelVersion error data:\xff\xc3\xa9";
        let mut x = seed;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ALPHABET[(x >> 33) as usize % ALPHABET.len()]
            })
            .collect();
        prop_assert_eq!(scan_cut(&bytes, &cuts), scan_whole(&bytes));
    }

    #[test]
    fn spliced_keys_are_found(
        which in 0..FIXTURES.len(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        // A garbage prefix between values does not stop the next response from being read.
        let (name, body) = FIXTURES[which];
        let mut with_prefix = b"data: : keep-alive\r\n\r\n".to_vec();
        with_prefix.extend_from_slice(body);
        prop_assert_eq!(scan_cut(&with_prefix, &cuts), scan_whole(body), "{}", name);
    }
}
